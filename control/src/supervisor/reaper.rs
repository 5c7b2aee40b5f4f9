//! The reaper: a small process that outlives rigd and ends what rigd's
//! services left when rigd dies, however it dies (`kill -9` included).
//!
//! rigd re-executes itself as `rigd __reap ...` ([`REAP_ARG`]; [`dispatch`]
//! at the top of rigd's `main` runs it) in its own session, without a death
//! signal, with the read end of a pipe as stdin. Only rigd holds the write
//! end (close-on-exec, so no service inherits it): the reaper reads EOF
//! exactly when rigd is gone. It then waits until rigd no longer runs, and
//! kills
//! - rigd's cgroup (`cgroup.kill`), when cgroups are in use, and removes it;
//! - the process groups recorded in the state directory by rigds that are gone
//!   ([`super::sweep_orphans`]);
//! - every process carrying rigd's [`super::MARKER_VAR`] (`setsid` daemons
//!   without cgroups);
//!
//! then exits. After a clean shutdown all of that is already stopped, so it
//! kills nothing. A byte `q` on the pipe makes it exit without killing.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use tracing::{error, info, warn};

use super::contain::{self, KILL_WAIT, Protection};
use super::procfs;

/// The hidden first argument that makes rigd the reaper.
pub const REAP_ARG: &str = "__reap";
/// How long the reaper waits, after EOF, for rigd to be gone.
const RIGD_EXIT_WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// Set by [`dispatch`]: this executable answers [`REAP_ARG`], so it can be
/// re-executed as the reaper (test binaries and rigctl cannot).
static SELF_REAPS: AtomicBool = AtomicBool::new(false);

/// A started reaper: the write end rigd keeps open for good.
#[derive(Debug)]
pub(crate) struct Reaper {
    _pipe: OwnedFd,
}

/// Call first thing in rigd's `main`: when this process was started as the
/// reaper, runs it and returns the exit code; else returns `None` (and
/// notes that this executable can be the reaper).
pub fn dispatch() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(REAP_ARG)) {
        SELF_REAPS.store(true, Ordering::Relaxed);
        return None;
    }
    let args: Vec<OsString> = args.collect();
    match Job::parse(&args) {
        Some(job) => {
            job.run(io::stdin().lock());
            Some(ExitCode::SUCCESS)
        }
        None => {
            error!(?args, "reaper: bad arguments");
            Some(ExitCode::from(2))
        }
    }
}

/// Starts the reaper for `protection`, if this executable can be one.
pub(crate) fn start(protection: &Protection, state_dir: &Path) -> io::Result<Option<Reaper>> {
    if !SELF_REAPS.load(Ordering::Relaxed) {
        return Ok(None);
    }
    let exe = if Path::new("/proc/self/exe").exists() {
        // Still this binary even if it was rebuilt (replaced) since.
        PathBuf::from("/proc/self/exe")
    } else {
        std::env::current_exe()?
    };
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let mut cmd = Command::new(exe);
    cmd.arg(REAP_ARG)
        .arg(protection.id())
        .arg(std::process::id().to_string())
        .arg(procfs::own_start().to_string())
        .arg(state_dir)
        .args(protection.cgroup())
        .stdin(Stdio::from(read))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // Not rigd's child (a double fork: the forked child forks again and
    // fails on purpose, its child goes on to exec), so that it is nobody's
    // business among rigd's children and never a zombie of rigd; and in its
    // own session, so that a Ctrl-C or a kill of rigd's process group does
    // not take it along.
    // SAFETY: fork(2) and setsid(2) in the forked child, both
    // async-signal-safe; errors are io::Errors from raw errnos. The
    // intermediate child returns an error, which std reports to rigd before
    // exiting the intermediate child with _exit.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| match nix::unistd::fork()? {
            nix::unistd::ForkResult::Parent { .. } => Err(Errno::ECANCELED.into()),
            nix::unistd::ForkResult::Child => {
                nix::unistd::setsid()?;
                Ok(())
            }
        });
    }
    match cmd.spawn() {
        Err(e) if e.raw_os_error() == Some(Errno::ECANCELED as i32) => {
            Ok(Some(Reaper { _pipe: write }))
        }
        Err(e) => Err(e),
        // The first child always fails; should it exec after all, it is a
        // reaper too (only rigd's child).
        Ok(_) => Ok(Some(Reaper { _pipe: write })),
    }
}

/// What one reaper watches over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The [`Protection::id`] of rigd's protection.
    pub instance: String,
    pub rigd_pid: u32,
    /// rigd's start time (`/proc/PID/stat` field 22).
    pub rigd_start: u64,
    /// rigd's child records.
    pub state_dir: PathBuf,
    /// rigd's cgroup, if it uses one.
    pub cgroup: Option<PathBuf>,
}

impl Job {
    fn parse(args: &[OsString]) -> Option<Job> {
        let [instance, pid, start, state_dir, rest @ ..] = args else {
            return None;
        };
        Some(Job {
            instance: instance.to_str()?.to_owned(),
            rigd_pid: pid.to_str()?.parse().ok()?,
            rigd_start: start.to_str()?.parse().ok()?,
            state_dir: state_dir.into(),
            cgroup: match rest {
                [] => None,
                [dir] => Some(dir.into()),
                _ => return None,
            },
        })
    }

    /// Waits on `pipe` until rigd is gone, then [`Job::reap`]s (unless told
    /// to exit with a `q`).
    pub fn run(&self, mut pipe: impl Read) {
        let mut buf = [0u8; 64];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) if buf[..n].contains(&b'q') => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!(error = %e, "reaper: cannot read the pipe; taking rigd for gone");
                    break;
                }
            }
        }
        let deadline = Instant::now() + RIGD_EXIT_WAIT;
        while self.rigd_running() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        let killed = self.reap();
        if killed > 0 {
            info!(
                rigd_pid = self.rigd_pid,
                killed, "reaper: killed what rigd's services left"
            );
        }
    }

    fn rigd_running(&self) -> bool {
        procfs::stat(self.rigd_pid).is_some_and(|s| !s.is_zombie() && s.start == self.rigd_start)
    }

    /// Kills everything of rigd's that is left; returns how many process
    /// groups, processes and non-empty cgroups it signalled.
    pub fn reap(&self) -> usize {
        let mut killed = 0;
        if let Some(dir) = &self.cgroup {
            if contain::cgroup_populated(dir) {
                killed += 1;
            }
            contain::end_cgroup_tree(dir, KILL_WAIT);
        }
        killed += super::sweep_orphans(&self.state_dir);
        let prefix = format!("{}.", self.instance);
        let matches = |v: &OsStr| v.as_bytes().starts_with(prefix.as_bytes());
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let n = contain::kill_marked(&matches);
            killed += n;
            if n == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(POLL);
        }
        killed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let args: Vec<OsString> = ["1-2-0", "10", "20", "/tmp/s", "/sys/fs/cgroup/x"]
            .into_iter()
            .map(OsString::from)
            .collect();
        let job = Job::parse(&args).expect("parses");
        assert_eq!(job.instance, "1-2-0");
        assert_eq!((job.rigd_pid, job.rigd_start), (10, 20));
        assert_eq!(job.cgroup.as_deref(), Some(Path::new("/sys/fs/cgroup/x")));
        assert_eq!(Job::parse(&args[..4]).expect("no cgroup").cgroup, None);
        assert_eq!(Job::parse(&args[..3]), None);
    }
}
