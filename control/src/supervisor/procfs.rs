//! The little of `/proc` the supervisor needs: process start times (to tell a
//! live process from a recycled pid), process-group membership, and the
//! environment marker of a process.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::signal::killpg;
use nix::unistd::Pid;

/// The fields of `/proc/PID/stat` the supervisor uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// One-letter state: `R`, `S`, `Z` (zombie), ...
    pub state: char,
    pub pgrp: i32,
    /// Start time in clock ticks after boot: with the pid, it names one process
    /// for good, since a recycled pid gets a later start time.
    pub start: u64,
}

impl ProcStat {
    pub(crate) fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Parses the text of a `/proc/PID/stat` file.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    // Field 2, the command name, is in parentheses and may itself contain spaces
    // and parentheses: the fixed fields start after the *last* ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state), so field N is `fields[N - 3]`.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// The stat of a process, or `None` when it does not exist (or `/proc` is not
/// readable).
pub(crate) fn stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// This process's start time, or 0 when `/proc` cannot tell.
pub(crate) fn own_start() -> u64 {
    fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|text| parse_stat(&text))
        .map_or(0, |stat| stat.start)
}

pub(crate) fn available() -> bool {
    Path::new("/proc/self/stat").exists()
}

/// Whether process group `pgid` still has a member that is not a zombie.
pub(crate) fn group_alive(pgid: Pid) -> bool {
    match killpg(pgid, None) {
        Err(Errno::ESRCH) => false,
        // The group exists, but zombies count as members until their (new)
        // parent reaps them: only a live member means there is work to do.
        _ => live_member(pgid.as_raw()).unwrap_or(true),
    }
}

fn live_member(pgid: i32) -> Option<bool> {
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(stat) = stat(pid)
            && stat.pgrp == pgid
            && !stat.is_zombie()
        {
            return Some(true);
        }
    }
    Some(false)
}

/// The live processes whose environment (as they were started with) has
/// `var` with a value that `matches`. Processes whose environment cannot be
/// read (another user's, or gone meanwhile) are skipped.
pub(crate) fn pids_with_env(var: &str, matches: &dyn Fn(&OsStr) -> bool) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut prefix = var.as_bytes().to_vec();
    prefix.push(b'=');
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let hit = environ
            .split(|&b| b == 0)
            .filter_map(|kv| kv.strip_prefix(prefix.as_slice()))
            .any(|value| matches(OsStr::from_bytes(value)));
        if hit && stat(pid).is_some_and(|s| !s.is_zombie()) {
            found.push(pid);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_whose_command_has_spaces_and_parens() {
        let line = "4242 (my (odd) prog) S 1 4240 4240 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: 'S',
                pgrp: 4240,
                start: 987654
            })
        );
    }

    #[test]
    fn rejects_truncated_stat() {
        assert_eq!(parse_stat("12 (x) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_stat_matches_this_process() {
        let me = stat(std::process::id()).expect("own /proc entry");
        assert_eq!(me.start, own_start());
        assert!(!me.is_zombie());
        assert_eq!(me.pgrp, nix::unistd::getpgrp().as_raw());
    }
}
