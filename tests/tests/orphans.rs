//! Nothing a service started outlives rigd: children, grandchildren and `setsid` daemons are
//! gone within moments of a `kill -9` of rigd, and at once after `rigctl down`, with cgroup v2
//! and with the fallback (process groups + environment marker, forced by `RIG_CGROUP=off`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rig_tests::rigd::{Rigd, TempDir, alive, bin};

/// How long after `kill -9` of rigd its services' processes may still run.
const AFTER_KILL: Duration = Duration::from_secs(5);
/// The README figure: processes left this long after `kill -9`.
const MEASURE_AT: Duration = Duration::from_secs(3);

/// A rigd (`RIG_CGROUP=off` when `cgroups` is false) and its start-up "orphan protection" line.
fn start_rigd(cgroups: bool) -> (Rigd, String) {
    let state = TempDir::new("orphans");
    let mut cmd = Command::new(bin("rigd"));
    cmd.args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state.path())
        .env_remove("RIG_ADDR")
        .env_remove("RIG_TOKEN")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("RIG_CGROUP", if cgroups { "auto" } else { "off" })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn rigd");
    let stderr = child.stderr.take().expect("rigd stderr");
    let (line_tx, line_rx) = mpsc::channel();
    // Drain stderr for good (rigd must never block on it), passing on the protection line.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some((_, what)) = line.split_once("orphan protection: ") {
                let _ = line_tx.send(what.to_string());
            }
            eprintln!("rigd: {line}");
        }
    });
    let mut lines = BufReader::new(child.stdout.take().expect("rigd stdout")).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(a) = l.strip_prefix("rigd listening on ") {
                    break a.trim().parse().expect("rigd printed an address");
                }
            }
            _ => panic!("rigd exited before listening: {:?}", child.wait()),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let protection = line_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("rigd logs its orphan protection before listening");
    (
        Rigd {
            addr,
            child,
            token: None,
            state,
        },
        protection,
    )
}

/// Whether a writable cgroup v2 is there for rigd to use (so the cgroup tests must get it).
fn cgroup_v2_writable() -> bool {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .any(|d| {
            let d = std::path::Path::new(d);
            d.join("cgroup.controllers").exists()
                && nix::unistd::access(d, nix::unistd::AccessFlags::W_OK).is_ok()
        })
}

/// Durations no other process uses, so that `/proc` shows exactly this test's sleeps.
fn durations(test: u32) -> [u32; 3] {
    let base = 200_000 + (std::process::id() % 10_000) * 40 + test * 4;
    [base, base + 1, base + 2]
}

/// A spec whose one service starts a background child, a `setsid` daemon, then becomes a third.
fn write_spec(dir: &TempDir, d: [u32; 3]) -> PathBuf {
    let spec = dir.path().join("orphans.toml");
    let text = format!(
        r#"
name = "orphans"
[services.tree]
command = ["sh", "-c", "sleep {} & setsid sleep {} & exec sleep {}"]
"#,
        d[0], d[1], d[2]
    );
    std::fs::write(&spec, text).expect("write spec");
    spec
}

/// The pids of live `sleep N` processes, for each N in `d` (0 when there is none).
fn sleeps(d: [u32; 3]) -> Vec<u32> {
    let want: Vec<Vec<u8>> = d
        .iter()
        .map(|n| format!("sleep\0{n}\0").into_bytes())
        .collect();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && want.contains(&cmdline)
            && alive(pid)
        {
            found.push(pid);
        }
    }
    found
}

/// Polls until all three sleeps run; returns their pids.
fn wait_running(d: [u32; 3]) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pids = sleeps(d);
        if pids.len() == 3 {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "the service's sleeps did not all start: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn up(rigd: &Rigd, test: u32) -> ([u32; 3], Vec<u32>, TempDir) {
    let dir = TempDir::new("orphans-spec");
    let d = durations(test);
    let spec = write_spec(&dir, d);
    rigd.ok(&["up", spec.to_str().expect("utf-8 path"), "--detach"]);
    let pids = wait_running(d);
    (d, pids, dir)
}

fn check_protection(line: &str, cgroups: bool) {
    if !cgroups {
        assert!(
            line.starts_with("process groups + environment marker"),
            "{line}"
        );
    } else if cgroup_v2_writable() {
        assert!(line.starts_with("cgroup v2 at "), "{line}");
    }
    assert!(
        line.ends_with("; reaper running"),
        "rigd starts a reaper: {line}"
    );
}

/// The rigd's cgroup directory, from its protection line.
fn rigd_cgroup(line: &str) -> Option<PathBuf> {
    let rest = line.strip_prefix("cgroup v2 at ")?;
    Some(PathBuf::from(rest.split(';').next()?.trim()))
}

fn kill_9_leaves_nothing(test: u32, cgroups: bool) {
    let (mut rigd, line) = start_rigd(cgroups);
    check_protection(&line, cgroups);
    let (d, pids, _dir) = up(&rigd, test);
    rigd.child.kill().expect("kill -9 rigd");
    let killed_at = Instant::now();
    rigd.child.wait().expect("reap rigd");
    let mut at_mark = None;
    loop {
        let left = sleeps(d);
        if at_mark.is_none() && killed_at.elapsed() >= MEASURE_AT {
            at_mark = Some(left.len());
        }
        if left.is_empty() {
            break;
        }
        assert!(
            killed_at.elapsed() < AFTER_KILL,
            "still running {AFTER_KILL:?} after kill -9 of rigd: {left:?} (of {pids:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mechanism = if cgroups { "cgroup" } else { "marker" };
    println!(
        "orphans ({mechanism}): all 3 gone {:?} after kill -9; orphans {MEASURE_AT:?} after kill -9 = {}",
        killed_at.elapsed(),
        at_mark.unwrap_or(0)
    );
    if let Some(cg) = rigd_cgroup(&line) {
        let deadline = Instant::now() + AFTER_KILL;
        while cg.exists() {
            assert!(
                Instant::now() < deadline,
                "{} not removed by the reaper",
                cg.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn down_leaves_nothing(test: u32, cgroups: bool) {
    let (rigd, line) = start_rigd(cgroups);
    check_protection(&line, cgroups);
    let (d, pids, _dir) = up(&rigd, test);
    rigd.ok(&["down"]);
    // `down` returns once the services are stopped: nothing may run any more, not even the
    // setsid daemon.
    assert_eq!(
        sleeps(d),
        Vec::<u32>::new(),
        "left after down (of {pids:?})"
    );
    if let Some(cg) = rigd_cgroup(&line) {
        let subdirs: Vec<_> = std::fs::read_dir(&cg)
            .expect("rigd's cgroup stays while rigd runs")
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        assert_eq!(
            subdirs,
            Vec::<PathBuf>::new(),
            "service cgroups removed on stop"
        );
    }
}

#[test]
fn kill_9_of_rigd_leaves_no_process_with_cgroups() {
    kill_9_leaves_nothing(0, true);
}

#[test]
fn kill_9_of_rigd_leaves_no_process_without_cgroups() {
    kill_9_leaves_nothing(1, false);
}

#[test]
fn down_leaves_no_process_with_cgroups() {
    down_leaves_nothing(2, true);
}

#[test]
fn down_leaves_no_process_without_cgroups() {
    down_leaves_nothing(3, false);
}
