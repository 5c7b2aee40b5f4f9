//! Process supervision against real child processes (`/bin/sh` scripts).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use rig_control::supervisor::{
    Child, ChildRecord, ExitInfo, LOG_QUEUE_LINES, LogLine, MAX_LINE_BYTES, ProcessSpec,
    RECENT_LOG_LINES, SpawnError, Stream, init, sweep_orphans,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc::{Receiver, channel};
use tokio::time::{Instant, sleep, timeout};

/// Generous bound for anything that should take milliseconds, on a loaded
/// 2-core machine.
const WAIT: Duration = Duration::from_secs(20);

fn sh(name: &str, script: &str) -> ProcessSpec {
    let mut spec = ProcessSpec::new(name, ["sh", "-c", script]);
    spec.stop_grace = Duration::from_secs(10);
    spec
}

async fn recv_line(rx: &mut Receiver<LogLine>) -> LogLine {
    timeout(WAIT, rx.recv())
        .await
        .expect("a log line in time")
        .expect("log channel open")
}

/// Whether process `pid` no longer runs (a zombie counts as gone: it only
/// waits for its parent to reap it).
fn gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(text) => text
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

async fn wait_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !gone(pid) {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) still running"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

fn records_in(dir: &Path) -> Vec<PathBuf> {
    let mut records: Vec<PathBuf> = fs::read_dir(dir)
        .expect("state dir readable")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "rec"))
        .collect();
    records.sort();
    records
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "rig-supervisor-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn output_of_both_streams_arrives_and_stop_terminates_with_sigterm() {
    let (tx, mut rx) = channel(LOG_QUEUE_LINES);
    let child = Child::spawn(sh("web", "echo hello; echo oops >&2; sleep 30"), tx).expect("spawn");
    let mut seen = BTreeSet::new();
    while seen.len() < 2 {
        let line = recv_line(&mut rx).await;
        assert_eq!(line.service, "web");
        seen.insert((line.stream, line.line));
    }
    assert_eq!(
        seen,
        BTreeSet::from([
            (Stream::Stdout, "hello".to_owned()),
            (Stream::Stderr, "oops".to_owned())
        ])
    );
    assert_eq!(child.try_exit(), None, "still sleeping");

    let started = Instant::now();
    let info = child.stop().await;
    assert_eq!(info, ExitInfo::Signaled(15));
    assert_eq!(info.to_string(), "killed by signal 15 (SIGTERM)");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped within the grace period"
    );
    assert_eq!(child.try_exit(), Some(info));
    assert!(gone(child.pid()));
}

#[tokio::test]
async fn a_child_ignoring_sigterm_is_killed_after_the_grace_period() {
    let (tx, mut rx) = channel(LOG_QUEUE_LINES);
    let mut spec = sh("stubborn", "trap '' TERM; echo ready; sleep 30");
    spec.stop_grace = Duration::from_millis(300);
    let child = Child::spawn(spec, tx).expect("spawn");
    assert_eq!(
        recv_line(&mut rx).await.line,
        "ready",
        "TERM is ignored from here on"
    );

    let started = Instant::now();
    let info = child.stop().await;
    let took = started.elapsed();
    assert_eq!(info, ExitInfo::Signaled(9));
    assert_eq!(info.to_string(), "killed by signal 9 (SIGKILL)");
    assert!(
        took >= Duration::from_millis(300),
        "waited the grace period first, took {took:?}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(gone(child.pid()));
}

#[tokio::test]
async fn stop_reaches_grandchildren() {
    let (tx, mut rx) = channel(LOG_QUEUE_LINES);
    let child = Child::spawn(sh("script", "sleep 30 & echo $!; wait"), tx).expect("spawn");
    let grandchild: u32 = recv_line(&mut rx).await.line.parse().expect("pid printed");
    assert!(!gone(grandchild), "grandchild runs");

    child.stop().await;
    wait_gone(grandchild, "grandchild after stop").await;
}

#[tokio::test]
async fn when_a_child_exits_the_rest_of_its_group_is_stopped() {
    let (tx, mut rx) = channel(LOG_QUEUE_LINES);
    let child = Child::spawn(sh("leaver", "sleep 30 & echo $!"), tx).expect("spawn");
    let grandchild: u32 = recv_line(&mut rx).await.line.parse().expect("pid printed");
    assert_eq!(
        timeout(WAIT, child.wait_exit()).await.expect("exits"),
        ExitInfo::Exited(0)
    );
    // wait_exit resolves only once the group is gone.
    assert!(gone(grandchild), "grandchild left behind");
}

#[tokio::test]
async fn dropping_a_running_child_kills_its_group() {
    let (tx, mut rx) = channel(LOG_QUEUE_LINES);
    let child = Child::spawn(sh("dropped", "sleep 30 & echo $!; wait"), tx).expect("spawn");
    let grandchild: u32 = recv_line(&mut rx).await.line.parse().expect("pid printed");
    let pid = child.pid();
    drop(child);
    wait_gone(pid, "child after drop").await;
    wait_gone(grandchild, "grandchild after drop").await;
}

#[tokio::test]
async fn wait_exit_reports_the_exit_code_to_every_waiter() {
    let (tx, _rx) = channel(LOG_QUEUE_LINES);
    let child = Child::spawn(sh("failing", "exit 3"), tx).expect("spawn");
    let (a, b) = timeout(WAIT, async {
        tokio::join!(child.wait_exit(), child.wait_exit())
    })
    .await
    .expect("exits");
    assert_eq!((a, b), (ExitInfo::Exited(3), ExitInfo::Exited(3)));
    assert_eq!(a.to_string(), "exited with code 3");
    assert_eq!(child.try_exit(), Some(ExitInfo::Exited(3)));
    // Stop after the end (and twice) only reports how it ended.
    assert_eq!(child.stop().await, ExitInfo::Exited(3));
    assert_eq!(child.stop().await, ExitInfo::Exited(3));
}

#[tokio::test]
async fn concurrent_stops_agree() {
    let (tx, mut rx) = channel(LOG_QUEUE_LINES);
    let child = Child::spawn(sh("twice", "echo up; sleep 30"), tx).expect("spawn");
    recv_line(&mut rx).await;
    let (a, b) = timeout(WAIT, async { tokio::join!(child.stop(), child.stop()) })
        .await
        .expect("stops");
    assert_eq!(a, ExitInfo::Signaled(15));
    assert_eq!(a, b);
}

#[tokio::test]
async fn a_missing_program_is_an_error_naming_service_and_program() {
    let (tx, _rx) = channel(LOG_QUEUE_LINES);
    let err = Child::spawn(
        ProcessSpec::new("web", ["rig-dem-no-such-program"]),
        tx.clone(),
    )
    .expect_err("nothing to run");
    assert!(matches!(err, SpawnError::NotFound { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(
            "service web: cannot start \"rig-dem-no-such-program\": No such file or directory (searched PATH "
        ),
        "{message}"
    );
    let exe_dir = std::env::current_exe()
        .expect("exe")
        .parent()
        .expect("dir")
        .display()
        .to_string();
    assert!(
        message.contains(&exe_dir),
        "PATH searched includes the executable's directory: {message}"
    );

    let err =
        Child::spawn(ProcessSpec::new("api", ["./no/such/file"]), tx.clone()).expect_err("missing");
    assert!(
        err.to_string()
            .starts_with("service api: cannot start \"./no/such/file\": "),
        "{err}"
    );

    let err = Child::spawn(ProcessSpec::new("none", Vec::<String>::new()), tx).expect_err("empty");
    assert_eq!(err.to_string(), "service none: empty command line");
}

#[tokio::test]
async fn a_bad_working_directory_is_an_error() {
    let (tx, _rx) = channel(LOG_QUEUE_LINES);
    let mut spec = sh("lost", "true");
    spec.cwd = Some("/nonexistent/rig-supervisor".into());
    let err = Child::spawn(spec, tx).expect_err("no such cwd");
    assert!(matches!(err, SpawnError::Cwd { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("service lost: cannot use working directory"),
        "{err}"
    );
}

#[tokio::test]
async fn recent_logs_keeps_the_tail_of_both_streams() {
    let (tx, mut rx) = channel(LOG_QUEUE_LINES);
    let script = "i=0; while [ $i -lt 200 ]; do echo line $i; i=$((i+1)); done; echo done >&2";
    let child = Child::spawn(sh("chatty", script), tx).expect("spawn");
    assert_eq!(
        timeout(WAIT, child.wait_exit()).await.expect("exits"),
        ExitInfo::Exited(0)
    );

    let recent = child.recent_logs();
    assert_eq!(recent.len(), RECENT_LOG_LINES);
    let expected: Vec<String> = (151..200)
        .map(|i| format!("line {i}"))
        .chain(["done".to_owned()])
        .collect();
    let got: Vec<String> = recent.iter().map(|l| l.line.clone()).collect();
    assert_eq!(got, expected);
    assert_eq!(recent.last().map(|l| l.stream), Some(Stream::Stderr));

    // The channel got everything, in order per stream.
    let mut stdout = Vec::new();
    while let Ok(line) = rx.try_recv() {
        if line.stream == Stream::Stdout {
            stdout.push(line.line);
        }
    }
    let all: Vec<String> = (0..200).map(|i| format!("line {i}")).collect();
    assert_eq!(stdout, all);
}

#[tokio::test]
async fn long_lines_are_cut() {
    let (tx, mut rx) = channel(LOG_QUEUE_LINES);
    let script = "head -c 100000 /dev/zero | tr '\\0' x; echo; echo after";
    let child = Child::spawn(sh("long", script), tx).expect("spawn");
    let first = recv_line(&mut rx).await.line;
    assert_eq!(first.trim_end_matches('…'), "x".repeat(MAX_LINE_BYTES));
    assert!(first.ends_with('…'), "cut lines are marked");
    assert_eq!(recv_line(&mut rx).await.line, "after");
    child.stop().await;
}

#[tokio::test]
async fn environment_is_inherited_then_extended_and_path_starts_with_the_exe_dir() {
    let (tx, mut rx) = channel(LOG_QUEUE_LINES);
    let mut spec = sh("envy", "echo \"$GREETING\"; echo \"$HOME\"; echo \"$PATH\"");
    spec.env.insert("GREETING".into(), "hi there".into());
    spec.env.insert("PATH".into(), "/usr/bin:/bin".into());
    let child = Child::spawn(spec, tx).expect("spawn");
    assert_eq!(recv_line(&mut rx).await.line, "hi there");
    assert_eq!(
        recv_line(&mut rx).await.line,
        std::env::var("HOME").unwrap_or_default()
    );
    let exe_dir = std::env::current_exe()
        .expect("exe")
        .parent()
        .expect("dir")
        .display()
        .to_string();
    assert_eq!(
        recv_line(&mut rx).await.line,
        format!("{exe_dir}:/usr/bin:/bin")
    );
    assert_eq!(
        timeout(WAIT, child.wait_exit()).await.expect("exits"),
        ExitInfo::Exited(0)
    );
}

#[tokio::test]
async fn a_program_next_to_the_executable_is_found_without_path() {
    // This test binary stands for `rig-demo` built next to `rigd`.
    let exe = std::env::current_exe().expect("exe");
    let name = exe
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned();
    let (tx, mut rx) = channel(LOG_QUEUE_LINES);
    let mut spec = ProcessSpec::new("self", [name.as_str(), "--list"]);
    spec.env.insert("PATH".into(), "/nonexistent".into());
    let child = Child::spawn(spec, tx).expect("found next to the executable");
    assert_eq!(
        timeout(WAIT, child.wait_exit()).await.expect("exits"),
        ExitInfo::Exited(0)
    );
    let mut listed = Vec::new();
    while let Ok(line) = rx.try_recv() {
        listed.push(line.line);
    }
    assert!(
        listed
            .iter()
            .any(|l| l == "a_program_next_to_the_executable_is_found_without_path: test"),
        "{listed:?}"
    );
}

#[tokio::test]
async fn a_relative_program_resolves_against_the_working_directory() {
    let dir = TempDir::new("cwd");
    fs::create_dir(dir.path().join("bin")).expect("mkdir");
    let script = dir.path().join("bin/run.sh");
    fs::write(&script, "#!/bin/sh\necho \"ran in $(pwd -P)\"\n").expect("write script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");

    let (tx, mut rx) = channel(LOG_QUEUE_LINES);
    let mut spec = ProcessSpec::new("local", ["./bin/run.sh"]);
    spec.cwd = Some(dir.path().to_path_buf());
    let child = Child::spawn(spec, tx).expect("spawn");
    let real = fs::canonicalize(dir.path()).expect("canonical");
    assert_eq!(
        recv_line(&mut rx).await.line,
        format!("ran in {}", real.display())
    );
    assert_eq!(
        timeout(WAIT, child.wait_exit()).await.expect("exits"),
        ExitInfo::Exited(0)
    );
}

#[tokio::test]
async fn a_record_exists_while_the_child_runs() {
    let dir = TempDir::new("record");
    let (tx, mut rx) = channel(LOG_QUEUE_LINES);
    let child =
        Child::spawn_recorded(sh("db", "echo up; sleep 30"), tx, Some(dir.path())).expect("spawn");
    recv_line(&mut rx).await;
    let records = records_in(dir.path());
    assert_eq!(records.len(), 1, "{records:?}");
    let record = ChildRecord::read(&records[0]).expect("readable record");
    assert_eq!(record.service, "db");
    assert_eq!((record.pid, record.pgid), (child.pid(), child.pid()));
    assert_eq!(record.rigd_pid, std::process::id());
    assert_ne!(record.rigd_start, 0);
    assert_ne!(record.child_start, 0);

    child.stop().await;
    assert_eq!(
        records_in(dir.path()),
        Vec::<PathBuf>::new(),
        "record removed after stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_outlives_the_thread_that_spawned_it() {
    let handle = tokio::runtime::Handle::current();
    let (tx, _rx) = channel(LOG_QUEUE_LINES);
    let child = std::thread::spawn(move || {
        let _runtime = handle.enter();
        Child::spawn(sh("orphan-thread", "sleep 30"), tx)
    })
    .join()
    .expect("thread finished")
    .expect("spawn");
    // That thread is gone. Had it forked the child, the death signal (which
    // follows the forking thread) would kill the child right away.
    let waited = timeout(Duration::from_millis(500), child.wait_exit()).await;
    assert!(waited.is_err(), "child died with the thread: {waited:?}");
    assert!(!gone(child.pid()));
    child.stop().await;
}

struct SweepOnDrop<'a>(&'a Path);

impl Drop for SweepOnDrop<'_> {
    fn drop(&mut self) {
        sweep_orphans(self.0);
    }
}

const HELPER_ENV: &str = "RIG_SUPERVISOR_TEST_HELPER_STATE_DIR";

/// Plays rigd for `sigkilled_rigd_takes_its_children_along_and_the_sweep_gets_the_rest`,
/// in a separate process: starts a child that starts a grandchild, prints both
/// pids, and waits to be killed.
#[tokio::test]
#[ignore = "helper process for another test; does nothing on its own"]
async fn death_signal_helper() {
    let Some(dir) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    assert_eq!(init(Path::new(&dir)).expect("init"), 0);
    let (tx, mut rx) = channel(LOG_QUEUE_LINES);
    let child = Child::spawn(sh("victim", "sleep 60 & echo $!; wait"), tx).expect("spawn");
    let grandchild = recv_line(&mut rx).await.line;
    println!("PIDS {} {grandchild}", child.pid());
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn sigkilled_rigd_takes_its_children_along_and_the_sweep_gets_the_rest() {
    let dir = TempDir::new("death");
    // Should an assertion fail, still take down what the helper left.
    let _sweep = SweepOnDrop(dir.path());
    let mut helper = tokio::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "death_signal_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start helper");
    let mut lines = BufReader::new(helper.stdout.take().expect("piped")).lines();
    let (child, grandchild) = timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read helper output") {
            // libtest prints "test death_signal_helper ... " without a newline first.
            if let Some((_, pids)) = line.split_once("PIDS ") {
                let (a, b) = pids.split_once(' ').expect("two pids");
                return (
                    a.parse::<u32>().expect("pid"),
                    b.parse::<u32>().expect("pid"),
                );
            }
        }
        panic!("helper ended without printing pids");
    })
    .await
    .expect("helper printed pids in time");
    assert!(!gone(child) && !gone(grandchild));
    let records = records_in(dir.path());
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        ChildRecord::read(&records[0]).expect("record").rigd_pid,
        helper.id().expect("helper pid")
    );

    helper.start_kill().expect("SIGKILL helper");
    let status = helper.wait().await.expect("helper reaped");
    assert_eq!(status.signal(), Some(9));

    wait_gone(child, "child of a SIGKILLed rigd").await;
    // The death signal reaches only the direct child...
    assert!(
        !gone(grandchild),
        "grandchild should have survived until the sweep"
    );
    // ...the next rigd's sweep gets the rest.
    assert_eq!(sweep_orphans(dir.path()), 1);
    wait_gone(grandchild, "grandchild after the sweep").await;
    assert_eq!(records_in(dir.path()), Vec::<PathBuf>::new());
    assert_eq!(sweep_orphans(dir.path()), 0, "nothing left to sweep");
}

/// A process group started without supervision (as if by a rigd that is
/// gone); SIGKILLed when dropped, so a failing test leaves nothing behind.
struct StrayGroup(std::process::Child);

impl StrayGroup {
    fn start(script: &str) -> StrayGroup {
        let child = std::process::Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn stray");
        StrayGroup(child)
    }

    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for StrayGroup {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.0.id()) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

async fn wait_killed(group: &mut StrayGroup, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = group.0.try_wait().expect("try_wait") {
            assert_eq!(status.signal(), Some(9), "{what}: {status:?}");
            return;
        }
        assert!(Instant::now() < deadline, "{what} still running");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sweep_kills_only_groups_of_a_rigd_that_is_gone() {
    let dir = TempDir::new("sweep");
    let state = dir.path();

    // A pid that no longer runs, as the recorded rigd.
    let mut exited = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let dead_rigd = exited.id();
    exited.wait().expect("reap true");

    let mut orphan = StrayGroup::start("sleep 30");
    let mut record = ChildRecord::for_this_process("orphan", orphan.id(), orphan.id());
    record.rigd_pid = dead_rigd;
    record.write(state).expect("write record");

    // Our own pid, but another start time: a recycled pid, not the rigd that
    // wrote the record.
    let mut recycled = StrayGroup::start("sleep 30 & echo $!; wait");
    let grandchild: u32 = {
        let mut out = std::io::BufReader::new(recycled.0.stdout.take().expect("piped"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).expect("read pid");
        line.trim().parse().expect("pid")
    };
    let mut record = ChildRecord::for_this_process("recycled", recycled.id(), recycled.id());
    record.rigd_start += 1;
    record.write(state).expect("write record");

    // Recorded by this (running) process: not an orphan.
    let mut alive = StrayGroup::start("sleep 30");
    let alive_record = ChildRecord::for_this_process("alive", alive.id(), alive.id())
        .write(state)
        .expect("write record");

    fs::write(state.join("child-1.rec"), "not a record").expect("write junk");
    fs::write(state.join("notes.txt"), "not mine").expect("write other file");

    assert_eq!(sweep_orphans(state), 2);
    wait_killed(&mut orphan, "orphan of a dead rigd").await;
    wait_killed(&mut recycled, "orphan of a recycled rigd pid").await;
    wait_gone(grandchild, "grandchild in an orphaned group").await;

    assert_eq!(
        alive.0.try_wait().expect("try_wait"),
        None,
        "a running rigd's child is left alone"
    );
    assert_eq!(records_in(state), vec![alive_record]);
    assert!(state.join("notes.txt").exists());
    assert_eq!(sweep_orphans(state), 0);

    drop(alive);
    assert_eq!(sweep_orphans(&state.join("missing")), 0);
}
