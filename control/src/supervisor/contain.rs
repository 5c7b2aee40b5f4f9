//! Keeping hold of everything a service starts, even what leaves its process
//! group (`setsid` daemons), so that stopping the service or losing rigd
//! ends all of it.
//!
//! Two mechanisms, chosen once per rigd ([`Protection::new`]):
//! - **cgroup v2** (preferred): each service runs in its own cgroup
//!   `<base>/rig-<instance>/s<seq>-<service>`. The child joins it in
//!   `pre_exec`, before `exec`, so every descendant is born inside; a process
//!   cannot leave a cgroup by `setsid` or double-forking. Stopping writes
//!   `cgroup.kill` (SIGKILL to every member, atomically against forks), waits
//!   for `cgroup.events` to say `populated 0`, then removes the cgroup. Per
//!   service rather than per environment, so that a service that exits or is
//!   stopped on its own takes its daemons with it, while the rest of the
//!   environment runs on; the per-rigd parent lets the reaper end all of
//!   rigd's services with one `cgroup.kill`.
//! - **process groups + environment marker** (no writable cgroup v2): every
//!   service gets `RIG_INSTANCE=<instance>.<seq>` in its environment, which its
//!   descendants inherit; stopping sweeps `/proc/*/environ` for that exact
//!   value. A process that clears its environment escapes this one.

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{debug, warn};

use super::procfs;

/// The variable every service (and so all it starts) carries:
/// `<rigd pid>-<rigd start time>-<n>.<child seq>`.
pub const MARKER_VAR: &str = "RIG_INSTANCE";
/// Turns cgroups off (`off`) or names the cgroup v2 directory to create
/// rigd's cgroup under; unset or `auto`: try rigd's own cgroup, then
/// `/sys/fs/cgroup/unified`, then `/sys/fs/cgroup`.
pub const CGROUP_ENV: &str = "RIG_CGROUP";
/// How long to wait for killed processes to be gone.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// How often to look whether killed processes are gone.
const POLL: Duration = Duration::from_millis(20);
/// Prefix of the per-rigd cgroup's name.
const CGROUP_PREFIX: &str = "rig-";

/// Where rigd may put its cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CgroupChoice {
    /// The first writable cgroup v2 of: rigd's own cgroup, `/sys/fs/cgroup/unified`,
    /// `/sys/fs/cgroup`.
    #[default]
    Auto,
    /// No cgroups: process groups and the environment marker only.
    Off,
    /// Under this cgroup v2 directory only.
    Under(PathBuf),
}

impl CgroupChoice {
    /// From [`CGROUP_ENV`]: `off` (or `0`, `no`, `false`), `auto` (or unset),
    /// else a directory.
    pub fn from_env() -> CgroupChoice {
        match std::env::var_os(CGROUP_ENV) {
            None => CgroupChoice::Auto,
            Some(v) => match v.to_str().map(str::trim) {
                Some("" | "auto") => CgroupChoice::Auto,
                Some("off" | "0" | "no" | "false") => CgroupChoice::Off,
                _ => CgroupChoice::Under(PathBuf::from(v)),
            },
        }
    }
}

/// The orphan protection of one rigd (or one test): its instance id and, when
/// cgroup v2 is usable, its cgroup.
///
/// Dropping it kills what is left in its cgroup and removes it (rigd keeps
/// its for good; tests drop theirs).
#[derive(Debug)]
pub struct Protection {
    id: String,
    cgroup: Option<PathBuf>,
    /// Why there is no cgroup (for the start-up line).
    no_cgroup: Option<String>,
    seq: AtomicU64,
}

impl Protection {
    /// Detects the mechanism: a cgroup per `choice` if one can be created and a
    /// child moved into it, else the environment marker.
    pub fn new(choice: &CgroupChoice) -> Protection {
        let id = instance_id();
        let (cgroup, no_cgroup) = match find_cgroup(choice, &id) {
            Ok(dir) => (Some(dir), None),
            Err(why) => (None, Some(why)),
        };
        Protection {
            id,
            cgroup,
            no_cgroup,
            seq: AtomicU64::new(0),
        }
    }

    /// This instance's id: the prefix of every [`MARKER_VAR`] value it hands out.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The per-rigd cgroup, when cgroup v2 is in force.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// Where the next child of `service` goes: its marker and, with cgroups,
    /// its own cgroup (created here) and the open `cgroup.procs` it joins by.
    pub(crate) fn place(&self, service: &str) -> Placement {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let marker = format!("{}.{seq}", self.id);
        let cgroup = self.cgroup.as_ref().and_then(|root| {
            let dir = root.join(format!("s{seq}-{}", cgroup_safe(service)));
            match open_new_cgroup(&dir) {
                Ok(procs) => Some((dir, procs)),
                Err(e) => {
                    warn!(service, dir = %dir.display(), error = %e, "cannot create the service's cgroup; falling back to the environment marker");
                    let _ = fs::remove_dir(&dir);
                    None
                }
            }
        });
        let (cgroup, procs) = cgroup.unzip();
        Placement {
            marker,
            cgroup,
            procs,
        }
    }
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.cgroup, &self.no_cgroup) {
            (Some(dir), _) => write!(f, "cgroup v2 at {}", dir.display()),
            (None, why) => write!(
                f,
                "process groups + environment marker {MARKER_VAR} ({})",
                why.as_deref().unwrap_or("no writable cgroup v2")
            ),
        }
    }
}

impl Drop for Protection {
    fn drop(&mut self) {
        if let Some(dir) = &self.cgroup {
            end_cgroup_tree(dir, KILL_WAIT);
        }
    }
}

/// Where one child goes (see [`Protection::place`]).
#[derive(Debug)]
pub(crate) struct Placement {
    /// The child's [`MARKER_VAR`] value.
    pub marker: String,
    /// The child's own cgroup, if any.
    pub cgroup: Option<PathBuf>,
    /// `cgroup.procs` of it, opened before the fork so that the child only
    /// has to write(2) to it.
    pub procs: Option<OwnedFd>,
}

/// `<pid>-<start>-<n>`: unique among live processes (pid and start time) and
/// among the protections of one process (n).
fn instance_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        procfs::own_start(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A service name as a cgroup name part: no '/', no newline, not too long.
fn cgroup_safe(service: &str) -> String {
    service
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

fn open_new_cgroup(dir: &Path) -> io::Result<OwnedFd> {
    fs::create_dir(dir)?;
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))?;
    Ok(procs.into())
}

/// Tries the candidates of `choice` in order; the error says why none fit.
fn find_cgroup(choice: &CgroupChoice, id: &str) -> Result<PathBuf, String> {
    let candidates = match choice {
        CgroupChoice::Off => return Err(format!("cgroups turned off by {CGROUP_ENV}=off")),
        CgroupChoice::Under(dir) => vec![dir.clone()],
        CgroupChoice::Auto => {
            let mut dirs: Vec<PathBuf> = own_cgroup().into_iter().collect();
            for d in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
                if !dirs.iter().any(|x| x == Path::new(d)) {
                    dirs.push(d.into());
                }
            }
            dirs
        }
    };
    let mut why = Vec::new();
    for base in candidates {
        match try_base(&base, id) {
            Ok(dir) => return Ok(dir),
            Err(e) => {
                debug!(base = %base.display(), error = %e, "cgroup v2 not usable here");
                why.push(format!("{}: {e}", base.display()));
            }
        }
    }
    Err(format!("no writable cgroup v2: {}", why.join("; ")))
}

/// rigd's own cgroup as a directory: the `0::` line of `/proc/self/cgroup`
/// under the cgroup2 mount point.
fn own_cgroup() -> Option<PathBuf> {
    let cgroup = fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next() == Some("cgroup2"))
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })?;
    Some(mount.join(rel.trim_start_matches('/')))
}

/// Creates rigd's cgroup under `base` and checks a child can join it.
fn try_base(base: &Path, id: &str) -> io::Result<PathBuf> {
    if !base.join("cgroup.controllers").exists() {
        return Err(io::Error::other("not a cgroup v2 directory"));
    }
    sweep_stale_cgroups(base);
    let dir = base.join(format!("{CGROUP_PREFIX}{id}"));
    fs::create_dir(&dir)?;
    let checked = if dir.join("cgroup.kill").exists() {
        probe_join(&dir)
    } else {
        Err(io::Error::other(
            "no cgroup.kill (Linux 5.14 or later needed)",
        ))
    };
    if let Err(e) = checked {
        let _ = fs::remove_dir(&dir);
        return Err(e);
    }
    Ok(dir)
}

/// Forks a child that joins a cgroup under `dir` the way services will, and
/// exits before exec: a cgroup we may create but not move into is no use.
#[allow(unsafe_code)]
fn probe_join(dir: &Path) -> io::Result<()> {
    let probe = dir.join("probe");
    let procs = open_new_cgroup(&probe)?;
    let mut cmd = Command::new("/");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: runs in the forked child: one write(2), async-signal-safe; the
    // result is an io::Error from a raw errno either way. Having joined, the
    // child fails on purpose with ECANCELED, so it never executes anything
    // (std then reports that errno to the parent and the child exits).
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::write(&procs, b"0")?;
            Err(Errno::ECANCELED.into())
        });
    }
    let result = cmd.spawn();
    let _ = fs::remove_dir(&probe);
    match result {
        Err(e) if e.raw_os_error() == Some(Errno::ECANCELED as i32) => Ok(()),
        Err(e) => Err(e),
        Ok(mut child) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(io::Error::other("the probe child went on to exec"))
        }
    }
}

/// Kills and removes the cgroups of rigds that are gone (whose reaper could
/// not clean up, or that ran without one).
fn sweep_stale_cgroups(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(CGROUP_PREFIX)) else {
            continue;
        };
        let mut parts = rest.split('-');
        let (Some(pid), Some(start)) = (
            parts.next().and_then(|p| p.parse::<u32>().ok()),
            parts.next().and_then(|s| s.parse::<u64>().ok()),
        ) else {
            continue;
        };
        let alive = procfs::stat(pid).is_some_and(|s| !s.is_zombie() && s.start == start);
        if !alive {
            debug!(cgroup = %entry.path().display(), "removing the cgroup of a rigd that is gone");
            end_cgroup_tree(&entry.path(), KILL_WAIT);
        }
    }
}

/// SIGKILLs every process in `dir` and below (`cgroup.kill`).
pub(crate) fn kill_cgroup(dir: &Path) -> io::Result<()> {
    fs::write(dir.join("cgroup.kill"), b"1")
}

/// Whether `dir` or a cgroup below it still has a process (`cgroup.events`).
/// A cgroup that is gone is not populated.
pub(crate) fn cgroup_populated(dir: &Path) -> bool {
    match fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => events.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => false,
    }
}

/// Removes `dir` and the cgroups below it (deepest first); they must be empty.
pub(crate) fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(cgroup = %dir.display(), error = %e, "cannot remove a cgroup");
    }
}

/// Kill, wait (up to `wait`) until empty, remove: blocking, for the reaper
/// and drops. Returns whether it emptied in time.
pub(crate) fn end_cgroup_tree(dir: &Path, wait: Duration) -> bool {
    if !dir.exists() {
        return true;
    }
    if let Err(e) = kill_cgroup(dir) {
        warn!(cgroup = %dir.display(), error = %e, "cannot write cgroup.kill");
    }
    let deadline = Instant::now() + wait;
    while cgroup_populated(dir) {
        if Instant::now() >= deadline {
            warn!(cgroup = %dir.display(), "cgroup still populated after cgroup.kill");
            return false;
        }
        std::thread::sleep(POLL);
    }
    remove_cgroup_tree(dir);
    true
}

/// Kills and removes a service's cgroup once its process group is gone:
/// whatever is still inside left the group (a `setsid` daemon).
pub(crate) async fn end_service_cgroup(service: &str, dir: &Path) {
    if cgroup_populated(dir) {
        debug!(service, cgroup = %dir.display(), "processes outside the group left: cgroup.kill");
        if let Err(e) = kill_cgroup(dir) {
            warn!(service, cgroup = %dir.display(), error = %e, "cannot write cgroup.kill");
        }
        let deadline = tokio::time::Instant::now() + KILL_WAIT;
        while cgroup_populated(dir) {
            if tokio::time::Instant::now() >= deadline {
                warn!(service, cgroup = %dir.display(), "cgroup still populated after cgroup.kill");
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }
    remove_cgroup_tree(dir);
}

/// SIGKILLs every process (but this one) whose [`MARKER_VAR`] matches; returns
/// how many it signalled.
pub(crate) fn kill_marked(matches: &dyn Fn(&OsStr) -> bool) -> usize {
    let me = std::process::id();
    let mut killed = 0;
    for pid in procfs::pids_with_env(MARKER_VAR, matches) {
        if pid == me {
            continue;
        }
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        if kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    killed
}

/// Kills the processes carrying exactly `marker` until none is left (or
/// [`KILL_WAIT`] passes): what of a service left its process group.
pub(crate) async fn end_marked(service: &str, marker: &str) {
    let matches = |v: &OsStr| v == OsStr::new(marker);
    let deadline = tokio::time::Instant::now() + KILL_WAIT;
    loop {
        let killed = kill_marked(&matches);
        if killed == 0 {
            return;
        }
        debug!(
            service,
            killed, "killed processes of the service outside its process group"
        );
        if tokio::time::Instant::now() >= deadline {
            warn!(
                service,
                "processes carrying the service's marker survived SIGKILL"
            );
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_become_safe_cgroup_names() {
        assert_eq!(cgroup_safe("web/api\n1"), "web_api_1");
        assert_eq!(cgroup_safe(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn off_means_the_marker() {
        let p = Protection::new(&CgroupChoice::Off);
        assert!(p.cgroup().is_none());
        assert!(
            p.to_string()
                .starts_with("process groups + environment marker")
        );
        let a = p.place("a");
        let b = p.place("a");
        assert_ne!(a.marker, b.marker);
        assert!(a.marker.starts_with(&format!("{}.", p.id())));
    }

    #[test]
    fn a_directory_that_is_no_cgroup_is_refused() {
        let p = Protection::new(&CgroupChoice::Under(std::env::temp_dir()));
        assert!(p.cgroup().is_none());
        assert!(p.to_string().contains("not a cgroup v2 directory"), "{p}");
    }
}
