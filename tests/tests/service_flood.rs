//! Services that flood their output cannot flood rigd: a real rigd runs one service writing short
//! lines without pause (`yes`) and one writing 20 kB lines without pause, and over a fixed
//! measuring window its memory stays under the sum of its documented bounds, the lines over the
//! per-service rate are dropped and counted on /metrics, `rigctl down` returns promptly, and
//! afterwards rigd goes back to idle (its CPU time stops growing).

use std::time::{Duration, Instant};

use rig_control::eventlog::DEFAULT_EVENTS_BUDGET;
use rig_control::supervisor::{LOG_QUEUE_LINES, MAX_LINE_BYTES, RECENT_LOG_LINES};
use rig_tests::prom;
use rig_tests::rigd::{Rigd, TempDir, http_get};

/// How long at least the services flood while rigd's RSS is sampled (a measuring window, not a
/// wait for something to happen).
const FLOOD_WINDOW: Duration = Duration::from_secs(5);
/// The window goes on, if need be, until the event log evicts, for at most this long.
const FULL_WITHIN: Duration = Duration::from_secs(30);
/// ...and for this long after it evicted, while evicted lines' memory is reused.
const AFTER_FULL: Duration = Duration::from_secs(2);
/// How often VmRSS is sampled during the window.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Allocator and runtime slack on top of rigd's documented bounds: freed line buffers are not
/// all returned to the kernel at once, and each reader task has its own read buffer.
const SLACK_BYTES: u64 = 32 << 20;
/// `rigctl down` must return within this (the services stop on SIGTERM at once).
const DOWN_WITHIN: Duration = Duration::from_secs(5);
/// After down, rigd's CPU time is measured over this window...
const IDLE_WINDOW: Duration = Duration::from_secs(1);
/// ...and may grow by at most this many clock ticks (usually 10 ms each, so 5% of one core):
/// an idle rigd only wakes for its timers.
const IDLE_TICKS: u64 = 5;
/// rigd must be idle by this long after down.
const IDLE_WITHIN: Duration = Duration::from_secs(5);

/// `VmRSS` of `/proc/PID/status`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// utime + stime of `/proc/PID/stat`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // The fields after the ")" closing the command name start at field 3 (state); utime and
    // stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').expect("stat has a comm").1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> u64 { fields[i - 3].parse().expect("a tick count") };
    tick(14) + tick(15)
}

/// `rig_events_evicted_total`: events dropped to keep the log under its byte budget.
fn evicted(rigd: &Rigd) -> f64 {
    let (code, metrics) = http_get(&rigd.url("/metrics"), None);
    assert_eq!(code, 200, "GET /metrics: {metrics}");
    prom::value(&metrics, "rig_events_evicted_total", &[])
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

#[test]
fn flooding_services_keep_rigd_bounded_counted_and_quick_to_stop() {
    let rigd = Rigd::start();
    let pid = rigd.child.id();
    let dir = TempDir::new("flood");
    // The long line is built by the shell so the spec stays small; `yes` repeats its argument.
    // 20,000 bytes is over MAX_LINE_BYTES, so every line is cut, and short enough that even a
    // debug rigd reads more lines than the rate lets through in the window.
    let spec = dir.path().join("flood.toml");
    std::fs::write(
        &spec,
        r#"
name = "flood"
[services.short]
command = ["sh", "-c", "exec yes rig-flood-line"]
[services.long]
command = ["sh", "-c", "exec yes \"$(head -c 20000 /dev/zero | tr '\\0' x)\""]
"#,
    )
    .unwrap();
    let baseline = rss_bytes(pid);
    rigd.ok(&["up", spec.to_str().unwrap(), "--detach"]);

    // What rigd may hold of the output, by its documented bounds: the retained events (the
    // lines become `service.log` events), the log queue full of cut lines, and each service's
    // ring of recent lines.
    let bound = baseline
        + DEFAULT_EVENTS_BUDGET as u64
        + (LOG_QUEUE_LINES * MAX_LINE_BYTES) as u64
        + 2 * (RECENT_LOG_LINES * MAX_LINE_BYTES) as u64
        + SLACK_BYTES;
    // The window runs at least FLOOD_WINDOW and until AFTER_FULL past the moment the event log
    // is at its byte budget (it evicts), so the peak is measured with every bound reached and
    // the log's memory being reused, however fast this machine reads the pipes.
    let start = Instant::now();
    let mut peak = baseline;
    let mut full_at = None;
    while start.elapsed() < FLOOD_WINDOW || full_at.is_none_or(|t| start.elapsed() < t + AFTER_FULL)
    {
        std::thread::sleep(SAMPLE_EVERY);
        peak = peak.max(rss_bytes(pid));
        assert!(
            peak <= bound,
            "rigd's RSS {:.1} MiB went over {:.1} MiB (baseline {:.1} MiB) after {:?} of flooding",
            mib(peak),
            mib(bound),
            mib(baseline),
            start.elapsed()
        );
        if full_at.is_none() && evicted(&rigd) > 0.0 {
            full_at = Some(start.elapsed());
        }
        assert!(
            start.elapsed() < FULL_WITHIN,
            "the event log did not reach its byte budget within {FULL_WITHIN:?} of flooding"
        );
    }
    eprintln!(
        "rigd RSS: baseline {:.1} MiB, peak {:.1} MiB over {:?} of flooding, the event log full after {full_at:?} (bound {:.1} MiB)",
        mib(baseline),
        mib(peak),
        start.elapsed(),
        mib(bound)
    );

    let (code, metrics) = http_get(&rigd.url("/metrics"), None);
    assert_eq!(code, 200, "GET /metrics: {metrics}");
    let dropped = |service: &str, reason: Option<&str>| {
        let mut want = vec![("env", "flood"), ("service", service)];
        want.extend(reason.map(|r| ("reason", r)));
        prom::value(&metrics, "rig_service_log_lines_dropped_total", &want)
    };
    // `yes` writes far more than LOG_LINES_PER_SEC short lines a second, so the rate drops them.
    assert!(
        dropped("short", Some("rate")) > 0.0,
        "no lines of short dropped for the rate:\n{metrics}"
    );
    // rigd reads the long lines at most a few thousand a second (every byte is scanned for the
    // newline), which may stay under the rate's burst in a debug build; then the event log
    // cannot take 16 KiB lines as fast as both services offer them and the queue drops them.
    assert!(
        dropped("long", None) > 0.0,
        "no lines of long dropped, for the rate or the queue:\n{metrics}"
    );

    let t0 = Instant::now();
    rigd.ok(&["down", "flood"]);
    let down = t0.elapsed();
    assert!(down < DOWN_WITHIN, "rigctl down took {down:?}");

    // The queued lines (at most LOG_QUEUE_LINES) are still becoming events for a moment after
    // down; then rigd must go quiet. Each window is a measurement; the deadline bounds the drain.
    let deadline = Instant::now() + IDLE_WITHIN;
    let mut windows = Vec::new();
    loop {
        let before = cpu_ticks(pid);
        std::thread::sleep(IDLE_WINDOW);
        let used = cpu_ticks(pid) - before;
        windows.push(used);
        if used <= IDLE_TICKS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rigd did not go idle within {IDLE_WITHIN:?} of down: clock ticks used per {IDLE_WINDOW:?}: {windows:?} (idle is at most {IDLE_TICKS})"
        );
    }
    eprintln!(
        "rigctl down took {down:?}; rigd's clock ticks per {IDLE_WINDOW:?} after: {windows:?}"
    );
}
