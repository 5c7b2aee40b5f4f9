//! On-disk records of running children, so that a rigd started after a crashed
//! (or SIGKILLed) one can kill the process groups the old one left behind.
//!
//! `PR_SET_PDEATHSIG` takes care of each direct child, but not of what that
//! child started (a shell script's sub-processes): those survive in the
//! child's process group, and only a record of the group lets the next rigd
//! find them.
//!
//! One file per child, `child-<pid>.rec` in the state directory, as
//! `key=value` lines.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, getpgrp};
use tracing::{debug, info, warn};

use super::procfs;

const PREFIX: &str = "child-";
const SUFFIX: &str = ".rec";

/// What rigd writes down about one running child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildRecord {
    /// Service name, for logs.
    pub service: String,
    /// Pid of the child (the process group leader).
    pub pid: u32,
    /// Its process group id (equal to `pid`: each child leads its own group).
    pub pgid: u32,
    /// Start time of the child (clock ticks after boot, `/proc/PID/stat`
    /// field 22), to notice when the group id has been recycled; 0 if unknown.
    pub child_start: u64,
    /// Pid of the rigd that started the child.
    pub rigd_pid: u32,
    /// Start time of that rigd, so that a recycled pid is not taken for it;
    /// 0 if unknown.
    pub rigd_start: u64,
}

impl ChildRecord {
    /// A record of child `pid`, leading group `pgid`, started by this process.
    pub fn for_this_process(service: &str, pid: u32, pgid: u32) -> ChildRecord {
        ChildRecord {
            service: service.to_owned(),
            pid,
            pgid,
            child_start: procfs::stat(pid).map_or(0, |s| s.start),
            rigd_pid: std::process::id(),
            rigd_start: procfs::own_start(),
        }
    }

    /// The record's file name inside the state directory.
    pub fn file_name(&self) -> String {
        format!("{PREFIX}{}{SUFFIX}", self.pid)
    }

    /// Writes the record into `dir`, returning the file's path.
    pub fn write(&self, dir: &Path) -> io::Result<PathBuf> {
        let path = dir.join(self.file_name());
        fs::write(&path, self.to_text())?;
        Ok(path)
    }

    /// Reads a record written by [`ChildRecord::write`].
    pub fn read(path: &Path) -> io::Result<ChildRecord> {
        let text = fs::read_to_string(path)?;
        ChildRecord::parse(&text)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed child record"))
    }

    fn to_text(&self) -> String {
        let mut text = String::new();
        // Service names come from user specs: keep them on one line.
        let service = self.service.replace(['\n', '\r'], " ");
        let _ = writeln!(text, "service={service}");
        let _ = writeln!(text, "pid={}", self.pid);
        let _ = writeln!(text, "pgid={}", self.pgid);
        let _ = writeln!(text, "child_start={}", self.child_start);
        let _ = writeln!(text, "rigd_pid={}", self.rigd_pid);
        let _ = writeln!(text, "rigd_start={}", self.rigd_start);
        text
    }

    fn parse(text: &str) -> Option<ChildRecord> {
        let mut service = None;
        let (mut pid, mut pgid, mut child_start, mut rigd_pid, mut rigd_start) =
            (None, None, None, None, None);
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "service" => service = Some(value.to_owned()),
                "pid" => pid = value.parse().ok(),
                "pgid" => pgid = value.parse().ok(),
                "child_start" => child_start = value.parse().ok(),
                "rigd_pid" => rigd_pid = value.parse().ok(),
                "rigd_start" => rigd_start = value.parse().ok(),
                _ => {}
            }
        }
        Some(ChildRecord {
            service: service?,
            pid: pid?,
            pgid: pgid?,
            child_start: child_start?,
            rigd_pid: rigd_pid?,
            rigd_start: rigd_start?,
        })
    }
}

/// Kills the process groups recorded in `state_dir` by a rigd that is no
/// longer running, and deletes those records; records of a running rigd
/// (this one, or another sharing the directory) are left alone. Returns how
/// many process groups it killed (groups already gone are not counted).
///
/// Call it when rigd starts, before spawning anything. A missing directory is
/// not an error (nothing to sweep); unreadable records are deleted.
pub fn sweep_orphans(state_dir: &Path) -> usize {
    let entries = match fs::read_dir(state_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return 0,
        Err(e) => {
            warn!(dir = %state_dir.display(), error = %e, "cannot read the state directory");
            return 0;
        }
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_record = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX));
        if !is_record {
            continue;
        }
        let record = match ChildRecord::read(&path) {
            Ok(record) => record,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "removing an unreadable child record");
                remove_record(&path);
                continue;
            }
        };
        if rigd_running(record.rigd_pid, record.rigd_start) {
            continue;
        }
        if kill_orphaned_group(&record) {
            killed += 1;
        }
        remove_record(&path);
    }
    killed
}

/// Whether the rigd that wrote a record still runs.
fn rigd_running(pid: u32, start: u64) -> bool {
    if pid == std::process::id() && (start == 0 || start == procfs::own_start()) {
        return true;
    }
    if !procfs::available() {
        // Without /proc we cannot tell a recycled pid from the old rigd: err on
        // the side of not killing another rigd's children.
        return i32::try_from(pid).is_ok_and(|p| kill(Pid::from_raw(p), None).is_ok());
    }
    match procfs::stat(pid) {
        None => false,
        Some(stat) => !stat.is_zombie() && (start == 0 || stat.start == start),
    }
}

fn kill_orphaned_group(record: &ChildRecord) -> bool {
    let Some(pgid) = i32::try_from(record.pgid).ok().filter(|&g| g > 1) else {
        warn!(service = %record.service, pgid = record.pgid, "ignoring a child record with an invalid process group");
        return false;
    };
    if pgid == getpgrp().as_raw() {
        warn!(service = %record.service, pgid, "ignoring a child record naming rigd's own process group");
        return false;
    }
    // While a process group has members its id cannot be handed out as a new
    // pid, so a live process with pid == pgid but a different start time means
    // the old group is gone and the id now belongs to someone else.
    if record.child_start != 0
        && let Some(stat) = procfs::stat(record.pgid)
        && stat.start != record.child_start
    {
        debug!(service = %record.service, pgid, "recorded process group id was recycled; not killing");
        return false;
    }
    let group = Pid::from_raw(pgid);
    // Only zombies left (or nothing): not a group to kill.
    if !procfs::group_alive(group) {
        return false;
    }
    match killpg(group, Signal::SIGKILL) {
        Ok(()) => {
            info!(service = %record.service, pgid, rigd_pid = record.rigd_pid, "killed a process group left by a previous rigd");
            true
        }
        Err(Errno::ESRCH) => false,
        Err(e) => {
            warn!(service = %record.service, pgid, error = %e, "cannot kill a process group left by a previous rigd");
            false
        }
    }
}

/// Deletes a record (a child's, once its process group is gone).
pub(crate) fn remove_record(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), error = %e, "cannot remove a child record");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_text_round_trips() {
        let record = ChildRecord {
            service: "web\nfront".into(),
            pid: 10,
            pgid: 10,
            child_start: 77,
            rigd_pid: 3,
            rigd_start: 5,
        };
        let parsed = ChildRecord::parse(&record.to_text()).expect("parses");
        assert_eq!(parsed.service, "web front");
        assert_eq!((parsed.pid, parsed.pgid, parsed.child_start), (10, 10, 77));
        assert_eq!((parsed.rigd_pid, parsed.rigd_start), (3, 5));
    }

    #[test]
    fn incomplete_record_is_rejected() {
        assert_eq!(ChildRecord::parse("service=x\npid=1\n"), None);
        assert_eq!(
            ChildRecord::parse(
                "service=x\npid=one\npgid=1\nchild_start=0\nrigd_pid=1\nrigd_start=0\n"
            ),
            None
        );
    }

    #[test]
    fn this_process_counts_as_running() {
        assert!(rigd_running(std::process::id(), procfs::own_start()));
        assert!(!rigd_running(std::process::id(), procfs::own_start() + 1));
    }
}
