//! What leaves a service's process group (`setsid` daemons) is still ended: on stop, with a
//! cgroup v2 and with the environment marker; and by the reaper's sweep when rigd is gone.

use std::sync::Arc;
use std::time::Duration;

use rig_control::supervisor::{CgroupChoice, Child, ProcessSpec, Protection, ReaperJob};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc::channel;
use tokio::time::{Instant, sleep, timeout};

const WAIT: Duration = Duration::from_secs(20);

fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(text) => text
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// A service that prints the pid of a `setsid` daemon it started, then waits.
fn daemonizer(name: &str) -> ProcessSpec {
    let mut spec = ProcessSpec::new(
        name,
        ["sh", "-c", "setsid sh -c 'echo $$; exec sleep 600' & wait"],
    );
    spec.stop_grace = Duration::from_secs(10);
    spec
}

async fn daemon_pid(child: &Child) -> u32 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(pid) = child
            .recent_logs()
            .iter()
            .find_map(|l| l.line.trim().parse::<u32>().ok())
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "the daemon printed no pid");
        sleep(Duration::from_millis(20)).await;
    }
}

fn other_session(pid: u32) -> bool {
    let sid = |p: u32| nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(p as i32)));
    sid(pid).expect("daemon's session") != nix::unistd::getsid(None).expect("own session")
}

async fn stop_ends_the_setsid_daemon(choice: CgroupChoice) -> Arc<Protection> {
    let protection = Arc::new(Protection::new(&choice));
    let (tx, _rx) = channel(64);
    let child = Child::spawn_protected(daemonizer("d"), tx, None, &protection).expect("spawn");
    let daemon = daemon_pid(&child).await;
    assert!(!gone(daemon));
    assert!(other_session(daemon), "the daemon left the service's group");
    timeout(WAIT, child.stop()).await.expect("stops in time");
    assert!(gone(daemon), "stop ended the setsid daemon too");
    protection
}

#[tokio::test]
async fn stop_ends_a_setsid_daemon_with_cgroups() {
    let protection = stop_ends_the_setsid_daemon(CgroupChoice::Auto).await;
    let v2 = std::path::Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists()
        || std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    if v2 && nix::unistd::getuid().is_root() {
        let dir = protection
            .cgroup()
            .expect("a cgroup on this machine")
            .to_path_buf();
        let subdirs = std::fs::read_dir(&dir)
            .expect("rigd cgroup")
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .count();
        assert_eq!(subdirs, 0, "the service's cgroup is removed");
        drop(protection);
        assert!(!dir.exists(), "dropping the protection removes its cgroup");
    }
}

#[tokio::test]
async fn stop_ends_a_setsid_daemon_with_the_marker() {
    let protection = stop_ends_the_setsid_daemon(CgroupChoice::Off).await;
    assert!(protection.cgroup().is_none());
}

#[tokio::test]
async fn the_reapers_sweep_kills_marked_processes() {
    let protection = Protection::new(&CgroupChoice::Off);
    let marker = format!("{}.77", protection.id());
    // Started outside the supervisor (as a daemon of a dead rigd's service would be left).
    let mut cmd = tokio::process::Command::new("sh");
    cmd.args(["-c", "echo $$; exec sleep 600"])
        .env(rig_control::supervisor::MARKER_VAR, &marker)
        .stdout(std::process::Stdio::piped())
        .process_group(0);
    let mut stray = cmd.spawn().expect("spawn");
    let mut out = tokio::io::BufReader::new(stray.stdout.take().expect("stdout")).lines();
    let pid: u32 = timeout(WAIT, out.next_line())
        .await
        .expect("pid in time")
        .expect("read")
        .expect("a line")
        .parse()
        .expect("a pid");
    let state = std::env::temp_dir().join(format!("rig-reap-test-{}", std::process::id()));
    std::fs::create_dir_all(&state).expect("state dir");
    let job = ReaperJob {
        instance: protection.id().to_owned(),
        rigd_pid: std::process::id(),
        rigd_start: 0,
        state_dir: state.clone(),
        cgroup: None,
    };
    assert!(job.reap() >= 1, "the sweep signalled the marked process");
    timeout(WAIT, stray.wait())
        .await
        .expect("killed")
        .expect("wait");
    assert!(gone(pid));
    // Another instance's marker is not ours to kill.
    let other = ReaperJob {
        instance: format!("{}x", protection.id()),
        ..job
    };
    assert_eq!(other.reap(), 0);
    let _ = std::fs::remove_dir_all(state);
}
