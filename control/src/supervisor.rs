//! Process supervision: rigd runs each service of an environment as a local
//! child process, and never leaves one behind.
//!
//! How no process outlives rigd:
//! - each child leads its own process group, and stopping it signals the whole
//!   group, so what it started (a shell script's sub-processes) stops too;
//! - each child gets `PR_SET_PDEATHSIG(SIGKILL)`, so the kernel kills it when
//!   rigd dies, even by SIGKILL (the fork happens on one long-lived thread, as
//!   the signal follows the forking *thread*);
//! - when a child exits on its own, what is left of its group is stopped (TERM,
//!   then KILL after the grace period);
//! - the death signal does not reach grandchildren, so each child also has a
//!   record in a state directory ([`init`], [`Child::spawn_recorded`]), and
//!   [`sweep_orphans`] (run by [`init`] when rigd starts) kills the groups a
//!   dead rigd left;
//! - what leaves the process group (`setsid` daemons) is still held, by a
//!   cgroup v2 per service or, without one, by the [`MARKER_VAR`] variable in
//!   the environment (see [`Protection`]); once the child and its group are
//!   gone, what is left there is SIGKILLed;
//! - a reaper process ([`protect`], [`reaper_dispatch`]) outlives rigd and,
//!   when rigd dies, kills rigd's cgroup, recorded groups and marked
//!   processes within moments, instead of waiting for the next rigd;
//! - dropping a [`Child`] that is still running SIGKILLs its group (and its
//!   cgroup).
//!
//! Output: stdout and stderr are read line by line into [`LogLine`]s, kept in
//! a ring buffer of the last [`RECENT_LOG_LINES`] lines
//! ([`Child::recent_logs`]) and sent on a bounded channel ([`LogOutput`]).
//! The pipes are always drained, so a child never blocks on its output, and
//! what rigd holds of it stays bounded:
//! - lines are cut at [`MAX_LINE_BYTES`];
//! - each service may log [`LOG_LINES_PER_SEC`] lines a second (both streams
//!   together) with bursts of [`LOG_LINES_BURST`]; the lines over that rate
//!   are dropped (reason `rate`);
//! - lines are sent with `try_send`: when the channel is full (its reader is
//!   behind; [`LOG_QUEUE_LINES`] is the capacity rigd uses) the line is
//!   dropped (reason `queue_full`);
//! - dropped lines are counted in `rig_service_log_lines_dropped_total{env,
//!   service,reason}`, and at most every [`LOG_DROP_NOTICE_INTERVAL`] (and at
//!   the end of the stream) one line on the stream says how many were
//!   dropped since the last such notice.

mod contain;
mod logs;
mod procfs;
mod reaper;
mod record;
mod spawner;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::num::NonZeroU32;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tracing::{debug, info, warn};

pub use contain::{CGROUP_ENV, CgroupChoice, KILL_WAIT, MARKER_VAR, Protection};
pub use reaper::{Job as ReaperJob, REAP_ARG};
pub use record::{ChildRecord, sweep_orphans};

use logs::{Outlet, RecentLogs};

/// How many lines [`Child::recent_logs`] keeps (both streams together).
pub const RECENT_LOG_LINES: usize = 50;
/// Lines longer than this many bytes are cut (and marked with `…`).
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// Lines per second a service may log (stdout and stderr together) once its
/// burst is spent; the lines over this rate are dropped and counted.
pub const LOG_LINES_PER_SEC: u32 = 1_000;
/// Lines a service may log at once above [`LOG_LINES_PER_SEC`] (the burst
/// refills at that rate), so a start-up banner or a stack trace passes whole.
pub const LOG_LINES_BURST: u32 = 5_000;
/// Capacity, in lines, of the channel rigd gives the services of one
/// environment ([`LogOutput::tx`]); a line that finds it full is dropped and
/// counted. At [`MAX_LINE_BYTES`] a line, it holds at most 16 MiB.
pub const LOG_QUEUE_LINES: usize = 1_024;
/// How often at most a stream says how many of its lines were dropped.
pub const LOG_DROP_NOTICE_INTERVAL: Duration = Duration::from_secs(1);
/// A reasonable [`ProcessSpec::stop_grace`].
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);

/// How often to look whether a process group is gone.
const GROUP_POLL: Duration = Duration::from_millis(20);
/// How long to wait, once the group is gone, for the last output to be read.
/// Bounded: a descendant that left the group (setsid) may hold the pipes.
const LOG_DRAIN: Duration = Duration::from_secs(1);

/// What to run for one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Service name, for logs and errors.
    pub name: String,
    /// Program and arguments. A program without '/' is looked up in the
    /// child's PATH, with the directory of rigd's executable prepended; one
    /// with '/' is taken relative to `cwd`.
    pub argv: Vec<String>,
    /// Working directory (rigd's when `None`).
    pub cwd: Option<PathBuf>,
    /// Variables added to (or replacing in) rigd's environment.
    pub env: BTreeMap<String, String>,
    /// How long [`Child::stop`] waits after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
}

impl ProcessSpec {
    /// A spec with no cwd, no extra env and [`DEFAULT_STOP_GRACE`].
    pub fn new(name: impl Into<String>, argv: impl IntoIterator<Item = impl Into<String>>) -> Self {
        ProcessSpec {
            name: name.into(),
            argv: argv.into_iter().map(Into::into).collect(),
            cwd: None,
            env: BTreeMap::new(),
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }
}

/// Which pipe a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line a service wrote (without its line ending; invalid UTF-8 replaced).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub service: String,
    pub stream: Stream,
    pub line: String,
    /// When rigd read it.
    pub time: SystemTime,
}

/// How many output lines a service may log; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogLimits {
    /// Sustained lines per second, both streams together.
    pub lines_per_sec: NonZeroU32,
    /// Lines that may pass at once above the rate.
    pub burst: NonZeroU32,
    /// How often at most a stream reports its dropped lines.
    pub notice_interval: Duration,
}

impl Default for LogLimits {
    /// [`LOG_LINES_PER_SEC`], [`LOG_LINES_BURST`], [`LOG_DROP_NOTICE_INTERVAL`].
    fn default() -> Self {
        LogLimits {
            lines_per_sec: NonZeroU32::new(LOG_LINES_PER_SEC).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(LOG_LINES_BURST).unwrap_or(NonZeroU32::MIN),
            notice_interval: LOG_DROP_NOTICE_INTERVAL,
        }
    }
}

/// Where a child's output lines go, and how many of them.
#[derive(Clone, Debug)]
pub struct LogOutput {
    /// Bounded: a line that finds it full is dropped (and counted).
    pub tx: mpsc::Sender<LogLine>,
    /// The `env` label of `rig_service_log_lines_dropped_total`.
    pub env: String,
    pub limits: LogLimits,
}

impl LogOutput {
    /// Output to `tx` for a service of environment `env`, with the default limits.
    pub fn new(tx: mpsc::Sender<LogLine>, env: impl Into<String>) -> Self {
        LogOutput {
            tx,
            env: env.into(),
            limits: LogLimits::default(),
        }
    }
}

impl From<mpsc::Sender<LogLine>> for LogOutput {
    /// Output outside any environment (an empty `env` label).
    fn from(tx: mpsc::Sender<LogLine>) -> Self {
        LogOutput::new(tx, "")
    }
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitInfo {
    /// It exited with this code.
    Exited(i32),
    /// A signal (this number) killed it.
    Signaled(i32),
    /// rigd could not learn it (waiting failed, or the runtime shut down).
    Unknown,
}

impl ExitInfo {
    pub fn success(self) -> bool {
        self == ExitInfo::Exited(0)
    }

    pub fn code(self) -> Option<i32> {
        match self {
            ExitInfo::Exited(code) => Some(code),
            _ => None,
        }
    }

    pub fn signal(self) -> Option<i32> {
        match self {
            ExitInfo::Signaled(signal) => Some(signal),
            _ => None,
        }
    }
}

impl From<std::process::ExitStatus> for ExitInfo {
    fn from(status: std::process::ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitInfo::Exited(code),
            (None, Some(signal)) => ExitInfo::Signaled(signal),
            (None, None) => ExitInfo::Unknown,
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitInfo::Exited(code) => write!(f, "exited with code {code}"),
            ExitInfo::Signaled(signal) => match Signal::try_from(signal) {
                Ok(name) => write!(f, "killed by signal {signal} ({})", name.as_str()),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
            ExitInfo::Unknown => f.write_str("exit status unknown"),
        }
    }
}

/// Why a service could not be started. Nothing runs when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("service {service}: empty command line")]
    EmptyCommand { service: String },
    #[error(
        "service {service}: cannot start {program:?}: No such file or directory (searched PATH {path})"
    )]
    NotFound {
        service: String,
        program: String,
        path: String,
    },
    #[error("service {service}: cannot use working directory {cwd:?}: {source}")]
    Cwd {
        service: String,
        cwd: PathBuf,
        source: io::Error,
    },
    #[error("service {service}: cannot start {program:?}: {source}")]
    Start {
        service: String,
        program: String,
        source: io::Error,
    },
    #[error("service {service}: cannot start outside a tokio runtime")]
    NoRuntime { service: String },
}

/// The state directory [`Child::spawn`] records children in (see [`init`]).
static STATE_DIR: RwLock<Option<PathBuf>> = RwLock::new(None);

/// Prepares supervision for this rigd: creates `state_dir`, kills what a
/// previous rigd left there ([`sweep_orphans`]) and makes [`Child::spawn`]
/// record every child in it. Returns how many orphaned process groups it
/// killed.
pub fn init(state_dir: &Path) -> io::Result<usize> {
    std::fs::create_dir_all(state_dir)?;
    let killed = sweep_orphans(state_dir);
    *STATE_DIR.write().unwrap_or_else(PoisonError::into_inner) = Some(state_dir.to_path_buf());
    Ok(killed)
}

/// The protection [`Child::spawn`] and [`Child::spawn_recorded`] use: the one
/// [`protect`] set up, else (nothing set up yet) the environment marker.
static PROTECTION: OnceLock<Arc<Protection>> = OnceLock::new();
/// The reaper [`protect`] started (kept for good: dropping it would close the
/// pipe and make the reaper act).
static REAPER: OnceLock<Option<reaper::Reaper>> = OnceLock::new();

fn protection() -> Arc<Protection> {
    PROTECTION
        .get_or_init(|| Arc::new(Protection::new(&CgroupChoice::Off)))
        .clone()
}

/// What [`protect`] put in place; its `Display` is rigd's start-up line.
#[derive(Debug, Clone)]
pub struct OrphanProtection {
    pub protection: Arc<Protection>,
    /// Whether a reaper runs.
    pub reaper: bool,
}

impl fmt::Display for OrphanProtection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.protection)?;
        if self.reaper {
            f.write_str("; reaper running")
        } else {
            f.write_str("; no reaper (sub-processes outlive a crash until the next rigd)")
        }
    }
}

/// Sets up, once per process, how this rigd keeps hold of what its services
/// start: a cgroup per `choice` or the environment marker ([`Protection`]),
/// and, when this executable is rigd (it called [`reaper_dispatch`]), the
/// reaper that ends all of it when rigd dies. Later calls return the first
/// setup. Call before spawning anything.
pub fn protect(state_dir: &Path, choice: &CgroupChoice) -> OrphanProtection {
    let protection = PROTECTION
        .get_or_init(|| Arc::new(Protection::new(choice)))
        .clone();
    let reaper = REAPER.get_or_init(|| match reaper::start(&protection, state_dir) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot start the reaper; sub-processes may outlive a crashed rigd until the next one starts");
            None
        }
    });
    OrphanProtection {
        protection,
        reaper: reaper.is_some(),
    }
}

/// Call first thing in rigd's `main`: runs the reaper and returns its exit
/// code when rigd was started as one (`rigd __reap ...`), else `None`.
pub fn reaper_dispatch() -> Option<std::process::ExitCode> {
    reaper::dispatch()
}

/// A running (or finished) service process.
///
/// Dropping it while the process still runs SIGKILLs its process group.
#[derive(Debug)]
pub struct Child {
    service: String,
    pid: u32,
    pgid: Pid,
    cgroup: Option<PathBuf>,
    stop_grace: Duration,
    exit: watch::Receiver<Option<ExitInfo>>,
    recent: Arc<RecentLogs>,
    stop_deadline: Arc<Mutex<Option<Instant>>>,
}

impl Child {
    /// Starts `spec`, sending its output lines to `logs`, and records it in
    /// the state directory given to [`init`] (if any).
    ///
    /// Must be called inside a tokio runtime, which then supervises the child.
    pub fn spawn(spec: ProcessSpec, logs: impl Into<LogOutput>) -> Result<Child, SpawnError> {
        let state_dir = STATE_DIR
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Child::spawn_recorded(spec, logs, state_dir.as_deref())
    }

    /// Like [`Child::spawn`], but records the child in `state_dir` (or
    /// nowhere) instead of the directory given to [`init`].
    pub fn spawn_recorded(
        spec: ProcessSpec,
        logs: impl Into<LogOutput>,
        state_dir: Option<&Path>,
    ) -> Result<Child, SpawnError> {
        Child::spawn_protected(spec, logs, state_dir, &protection())
    }

    /// Like [`Child::spawn_recorded`], with `protection` instead of the one
    /// [`protect`] set up.
    pub fn spawn_protected(
        spec: ProcessSpec,
        logs: impl Into<LogOutput>,
        state_dir: Option<&Path>,
        protection: &Arc<Protection>,
    ) -> Result<Child, SpawnError> {
        let logs = logs.into();
        let handle = Handle::try_current().map_err(|_| SpawnError::NoRuntime {
            service: spec.name.clone(),
        })?;
        let mut placement = protection.place(&spec.name);
        let unplace = |placement: &contain::Placement| {
            if let Some(dir) = &placement.cgroup {
                contain::remove_cgroup_tree(dir);
            }
        };
        let (cmd, program) = match spawner::prepare(&spec, &mut placement) {
            Ok(prepared) => prepared,
            Err(e) => {
                unplace(&placement);
                return Err(e);
            }
        };
        let start_error = |source| SpawnError::Start {
            service: spec.name.clone(),
            program: spec.argv[0].clone(),
            source,
        };
        let mut child = match spawner::spawn(cmd, handle.clone()) {
            Ok(child) => child,
            Err(e) => {
                unplace(&placement);
                return Err(start_error(e));
            }
        };
        let pid = child
            .id()
            .ok_or_else(|| start_error(io::Error::other("the child has no pid")))?;
        let pgid = Pid::from_raw(
            i32::try_from(pid).map_err(|_| start_error(io::Error::other("pid out of range")))?,
        );

        let record = state_dir.and_then(|dir| {
            match ChildRecord::for_this_process(&spec.name, pid, pid).write(dir) {
                Ok(path) => Some(path),
                Err(e) => {
                    // The death signal still covers the child itself.
                    warn!(service = %spec.name, dir = %dir.display(), error = %e, "cannot record the child; its sub-processes may outlive a crashed rigd");
                    None
                }
            }
        });

        let recent = Arc::new(RecentLogs::new(RECENT_LOG_LINES));
        let outlet = Arc::new(Outlet::new(&spec.name, logs, recent.clone()));
        let mut pumps = Vec::with_capacity(2);
        if let Some(stdout) = child.stdout.take() {
            pumps.push(spawn_pump(&handle, stdout, Stream::Stdout, &outlet));
        }
        if let Some(stderr) = child.stderr.take() {
            pumps.push(spawn_pump(&handle, stderr, Stream::Stderr, &outlet));
        }

        let (exit_tx, exit_rx) = watch::channel(None);
        let stop_deadline = Arc::new(Mutex::new(None));
        handle.spawn(supervise(Supervised {
            child,
            service: spec.name.clone(),
            pgid,
            stop_grace: spec.stop_grace,
            stop_deadline: stop_deadline.clone(),
            pumps,
            record,
            marker: placement.marker,
            cgroup: placement.cgroup.clone(),
            _protection: protection.clone(),
            exit: exit_tx,
        }));
        info!(service = %spec.name, pid, program = %program.display(), "service started");
        Ok(Child {
            service: spec.name,
            pid,
            pgid,
            cgroup: placement.cgroup,
            stop_grace: spec.stop_grace,
            exit: exit_rx,
            recent,
            stop_deadline,
        })
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The child's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The last [`RECENT_LOG_LINES`] lines of stdout and stderr, oldest first.
    /// Once [`Child::wait_exit`] has resolved, this includes the final lines.
    pub fn recent_logs(&self) -> Vec<LogLine> {
        self.recent.snapshot()
    }

    /// Resolves when the child has exited, the rest of its process group is
    /// gone and its output has been read. Any number of tasks may wait.
    pub async fn wait_exit(&self) -> ExitInfo {
        let mut exit = self.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(info) => info.unwrap_or(ExitInfo::Unknown),
            Err(_) => ExitInfo::Unknown,
        }
    }

    /// How the child ended, or `None` while it runs.
    pub fn try_exit(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Stops the child: SIGTERM to its whole process group, then, if the group
    /// is not gone within `stop_grace`, SIGKILL. Idempotent: once the child
    /// has ended this just returns how.
    pub async fn stop(&self) -> ExitInfo {
        if let Some(info) = self.try_exit() {
            return info;
        }
        let deadline = *self
            .stop_deadline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| Instant::now() + self.stop_grace);
        debug!(service = %self.service, pid = self.pid, "stopping: SIGTERM to the process group");
        signal_group(&self.service, self.pgid, Signal::SIGTERM);
        if let Ok(info) = timeout_at(deadline, self.wait_exit()).await {
            return info;
        }
        warn!(service = %self.service, pid = self.pid, grace = ?self.stop_grace, "did not stop within the grace period: SIGKILL to the process group");
        signal_group(&self.service, self.pgid, Signal::SIGKILL);
        self.wait_exit().await
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            debug!(service = %self.service, pid = self.pid, "child handle dropped: SIGKILL to the process group");
            signal_group(&self.service, self.pgid, Signal::SIGKILL);
            if let Some(dir) = &self.cgroup
                && let Err(e) = contain::kill_cgroup(dir)
            {
                debug!(service = %self.service, error = %e, "cannot write cgroup.kill");
            }
        }
    }
}

fn spawn_pump(
    handle: &Handle,
    reader: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    stream: Stream,
    outlet: &Arc<Outlet>,
) -> JoinHandle<()> {
    let outlet = outlet.clone();
    handle.spawn(async move { logs::pump(reader, &outlet, stream).await })
}

/// What the supervising task owns.
struct Supervised {
    child: tokio::process::Child,
    service: String,
    pgid: Pid,
    stop_grace: Duration,
    stop_deadline: Arc<Mutex<Option<Instant>>>,
    pumps: Vec<JoinHandle<()>>,
    record: Option<PathBuf>,
    /// The child's [`MARKER_VAR`] value.
    marker: String,
    /// The child's own cgroup, if any.
    cgroup: Option<PathBuf>,
    /// Keeps rigd's cgroup (the parent of `cgroup`) until the child is done.
    _protection: Arc<Protection>,
    exit: watch::Sender<Option<ExitInfo>>,
}

/// Waits for the child, clears out its process group, then what left the
/// group (its cgroup, or its marked processes), lets the output drain,
/// removes the record, then publishes the exit.
async fn supervise(mut s: Supervised) {
    let info = match s.child.wait().await {
        Ok(status) => ExitInfo::from(status),
        Err(e) => {
            warn!(service = %s.service, error = %e, "cannot wait for the child");
            ExitInfo::Unknown
        }
    };
    clear_group(&s).await;
    // A daemon that left the group was still started by the service: it goes
    // with it (SIGKILL: it got no stop signal of its own, but the service is
    // over). Before the drain, as such a daemon may hold the output pipes.
    match &s.cgroup {
        Some(dir) => contain::end_service_cgroup(&s.service, dir).await,
        None => contain::end_marked(&s.service, &s.marker).await,
    }
    let drain = async {
        for pump in s.pumps.drain(..) {
            let _ = pump.await;
        }
    };
    if timeout(LOG_DRAIN, drain).await.is_err() {
        debug!(service = %s.service, "output still open after the process group ended");
    }
    if let Some(path) = &s.record {
        record::remove_record(path);
    }
    info!(service = %s.service, pid = s.pgid.as_raw(), status = %info, "service exited");
    s.exit.send_replace(Some(info));
}

/// Ends what is left of the child's process group once the child itself has
/// exited: SIGTERM, then SIGKILL at the stop deadline (or after the grace
/// period when the child exited on its own).
async fn clear_group(s: &Supervised) {
    if !procfs::group_alive(s.pgid) {
        return;
    }
    let deadline = (*s
        .stop_deadline
        .lock()
        .unwrap_or_else(PoisonError::into_inner))
    .unwrap_or_else(|| Instant::now() + s.stop_grace);
    debug!(service = %s.service, pgid = s.pgid.as_raw(), "child exited with its process group still running: SIGTERM");
    signal_group(&s.service, s.pgid, Signal::SIGTERM);
    if poll_group_gone(s.pgid, deadline).await {
        return;
    }
    warn!(service = %s.service, pgid = s.pgid.as_raw(), "process group still running after the grace period: SIGKILL");
    signal_group(&s.service, s.pgid, Signal::SIGKILL);
    if !poll_group_gone(s.pgid, Instant::now() + KILL_WAIT).await {
        warn!(service = %s.service, pgid = s.pgid.as_raw(), "process group survived SIGKILL");
    }
}

/// Polls until the group is gone (true) or `deadline` passes (false).
async fn poll_group_gone(pgid: Pid, deadline: Instant) -> bool {
    loop {
        if !procfs::group_alive(pgid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(GROUP_POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

fn signal_group(service: &str, pgid: Pid, signal: Signal) {
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => {
            warn!(service, pgid = pgid.as_raw(), signal = signal.as_str(), error = %e, "cannot signal the process group")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_info_reads_like_a_sentence() {
        assert_eq!(ExitInfo::Exited(1).to_string(), "exited with code 1");
        assert_eq!(
            ExitInfo::Signaled(9).to_string(),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            ExitInfo::Signaled(15).to_string(),
            "killed by signal 15 (SIGTERM)"
        );
        assert_eq!(ExitInfo::Signaled(77).to_string(), "killed by signal 77");
        assert!(ExitInfo::Exited(0).success());
        assert!(!ExitInfo::Signaled(9).success());
    }

    #[test]
    fn exit_info_from_a_raw_status() {
        use std::process::ExitStatus;
        assert_eq!(
            ExitInfo::from(ExitStatus::from_raw(3 << 8)),
            ExitInfo::Exited(3)
        );
        assert_eq!(
            ExitInfo::from(ExitStatus::from_raw(9)),
            ExitInfo::Signaled(9)
        );
    }
}
