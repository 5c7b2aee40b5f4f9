//! Measurement 8, flood: rigd's memory and CPU while one service writes to stdout without pause
//! for 20 s, short lines (`yes`) and then, on a fresh rigd, 20 kB lines; RSS sampled every
//! 100 ms, and how long `rigctl down` takes then. rigd drains the pipe whatever happens and drops the lines over the per-service rate,
//! so its memory should level off at what its bounds allow (the event log's byte budget, the
//! log queue), and its CPU should go back to idle after down. `RIG_BENCH_FLOOD_SECS` overrides
//! the 20 s.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::time::{Instant, sleep};

use crate::control::Rigd;
use crate::ext::Ctx;
use crate::procs;
use crate::report::Row;

/// How often rigd's RSS is sampled while the service floods.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// After down, rigd's CPU is watched in windows this long until one shows it idle.
const IDLE_WINDOW: Duration = Duration::from_secs(1);
/// rigd counts as idle in a window where it used at most this many clock ticks.
const IDLE_TICKS: u64 = 5;
/// How long after down rigd has to go idle.
const IDLE_WITHIN: Duration = Duration::from_secs(10);

/// utime + stime of `/proc/PID/stat`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the ")" closing the command name start at field 3; utime, stime are 14, 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {i} of {path}"))
    };
    Ok(tick(14)? + tick(15)?)
}

/// Clock ticks per second in /proc (USER_HZ, which Linux fixes at 100 for user space).
const USER_HZ: f64 = 100.0;

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// One kind of flood: a label for the table and the shell command of the service.
struct Flood {
    what: &'static str,
    command: &'static str,
}

/// Short lines (`yes`), and 20 kB lines, which rigd cuts at its 16 KiB line limit: the event
/// log then reaches its byte budget rather than its count of events.
const FLOODS: [Flood; 2] = [
    Flood {
        what: "`yes`",
        command: "exec yes rig-flood-line",
    },
    Flood {
        what: "20 kB lines",
        command: "exec yes \"$(head -c 20000 /dev/zero | tr '\\0' x)\"",
    },
];

pub async fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let rigctl = ctx.bin_dir.join("rigctl");
    if !rigctl.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p rig-control`",
            rigctl.display()
        );
    }
    let mut rows = Vec::new();
    // A fresh rigd per kind, so the first one's retained events do not count in the second.
    for flood in &FLOODS {
        let rigd = Rigd::start(ctx, "rigd-flood").await?;
        let result = measure(ctx, &rigd, &rigctl, flood).await;
        let _ = rigd.down("flood").await;
        rigd.stop().await;
        rows.extend(result?);
    }
    Ok(rows)
}

async fn measure(
    ctx: &Ctx,
    rigd: &Rigd,
    rigctl: &std::path::Path,
    flood: &Flood,
) -> Result<Vec<Row>> {
    let secs = std::env::var("RIG_BENCH_FLOOD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ctx.scale(20, 3));
    let pid = rigd.proc.pid();
    let spec = json!({
        "name": "flood",
        "services": { "flood": { "command": ["sh", "-c", flood.command] } },
    });
    let before = procs::rss_kib(pid)?;
    let cpu0 = cpu_ticks(pid)?;
    let (_, up) = rigd.up(&spec, ctx.work.path()).await?;
    let t0 = Instant::now();
    let window = Duration::from_secs(secs);
    let mut peak = before;
    // (seconds into the flood, RSS) at each whole second, to show whether it levels off.
    let mut by_second = Vec::new();
    while t0.elapsed() < window {
        sleep(SAMPLE_EVERY).await;
        let rss = procs::rss_kib(pid)?;
        peak = peak.max(rss);
        let s = t0.elapsed().as_secs();
        if by_second.last().is_none_or(|&(last, _)| s > last) {
            by_second.push((s, rss));
        }
    }
    let flood_took = t0.elapsed().as_secs_f64();
    let cpu_flood = (cpu_ticks(pid)? - cpu0) as f64 / USER_HZ / flood_took;
    let during = procs::rss_kib(pid)?;

    let t_down = Instant::now();
    let out = tokio::process::Command::new(rigctl)
        .args(["--addr", &rigd.addr, "down", "flood"])
        .env_remove("RIG_TOKEN")
        .env_remove("RIGCTL_ENV")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", rigctl.display()))?;
    let down = t_down.elapsed();
    if !out.status.success() {
        bail!(
            "rigctl down failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Watch rigd's CPU in 1 s windows until one shows it idle (bounded).
    let idle_deadline = Instant::now() + IDLE_WITHIN;
    let mut windows = Vec::new();
    loop {
        let c = cpu_ticks(pid)?;
        sleep(IDLE_WINDOW).await;
        let used = cpu_ticks(pid)? - c;
        windows.push(used);
        if used <= IDLE_TICKS || Instant::now() >= idle_deadline {
            break;
        }
    }
    let idle = windows.last().is_some_and(|&u| u <= IDLE_TICKS);
    let after = procs::rss_kib(pid)?;
    let curve = by_second
        .iter()
        .filter(|(s, _)| s % 5 == 0 || *s + 1 == secs)
        .map(|(s, r)| format!("{s}s {}", mib(*r)))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "flood ({}): Up {:.3} s; rigd VmRSS before {}, peak {}, at the end of {secs} s {}, after down {}; \
         by second: {curve}; rigd CPU while flooding {:.0}% of a core; rigctl down {:.3} s; \
         rigd clock ticks per second after down: {windows:?}",
        flood.what,
        up.as_secs_f64(),
        mib(before),
        mib(peak),
        mib(during),
        mib(after),
        cpu_flood * 100.0,
        down.as_secs_f64(),
    );
    Ok(vec![
        Row::new(format!(
            "rigd VmRSS while one service floods stdout for {secs} s ({}, sampled every 100 ms)",
            flood.what
        ))
        .rig(format!(
            "before {}, peak {}, after down {}",
            mib(before),
            mib(peak),
            mib(after)
        ))
        .baselines(format!("by second: {curve}"))
        .ratio(format!(
            "peak +{} over before; rigd CPU {:.0}% of a core while flooding",
            mib(peak.saturating_sub(before)),
            cpu_flood * 100.0
        ))
        .target(
            "peak ≤ before + 96 MiB (event log 64 + log queue 16 + 16)",
            peak <= before + 96 * 1024,
        ),
        Row::new(format!(
            "`rigctl down` of the flooding environment ({}), then rigd's CPU",
            flood.what
        ))
        .rig(format!("down {:.3} s", down.as_secs_f64()))
        .ratio(format!("clock ticks per 1 s after down: {windows:?}"))
        .target("down < 5 s, then idle", down.as_secs_f64() < 5.0 && idle),
    ])
}
