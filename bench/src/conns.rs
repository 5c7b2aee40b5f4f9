//! Measurement 7, connections: how many concurrent tcp connections one edge of a real rigd
//! carries at the default limits (rigd raises its soft `RLIMIT_NOFILE` to the hard limit), each
//! with a `PING`/`PONG` round trip to a `rig-demo kv` so both sides are connected, and rigd's
//! VmRSS and descriptors before, while all are open, and after they close, over three bursts.
//! Then the same with `--events-retained 1`, which shows what rigd's event log (two events per
//! connection) holds of that memory. `RIG_BENCH_CONNS` overrides the number of connections.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{StreamExt, stream};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep};

use crate::control::Rigd;
use crate::ext::Ctx;
use crate::procs;
use crate::report::Row;

/// How many connections are being opened at once.
const PARALLEL: usize = 64;

/// Bursts after the first, to see whether memory freed by one is reused by the next.
const BURSTS_AGAIN: usize = 2;

/// How long to wait for rigd to close its side of the connections.
const CLOSE_WITHIN: Duration = Duration::from_secs(30);

/// One connection through the edge with one round trip; kept open.
async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let mut c = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    c.write_all(b"PING\n").await?;
    let mut b = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(20), c.read_exact(&mut b))
        .await
        .map_err(|_| anyhow!("no PONG within 20 s"))??;
    if &b != b"PONG\n" {
        bail!("answered {b:?}");
    }
    Ok(c)
}

fn fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("/proc/{pid}/fd"))?
        .count())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Open `n` connections (`PARALLEL` at a time), read rigd's descriptors and RSS with all of
/// them open, and close them: (opened, errors, fds, RSS KiB).
async fn burst(addr: SocketAddr, n: usize, pid: u32) -> Result<(usize, Vec<String>, usize, u64)> {
    let results: Vec<Result<TcpStream>> = stream::iter(0..n)
        .map(|_| connect(addr))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut conns = Vec::with_capacity(n);
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(c) => conns.push(c),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let fds_open = fds(pid)?;
    let rss = procs::rss_kib(pid)?;
    Ok((conns.len(), errors, fds_open, rss))
}

/// Wait until rigd has closed its side of the connections (it does when it reads the clients'
/// FIN): its descriptors back to about `fds_before`.
async fn close_wait(pid: u32, fds_before: usize) -> Result<()> {
    let deadline = Instant::now() + CLOSE_WITHIN;
    while fds(pid)? > fds_before + 16 {
        if Instant::now() > deadline {
            bail!(
                "rigd still holds {} descriptors {CLOSE_WITHIN:?} after the clients closed",
                fds(pid)?
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub async fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let n = std::env::var("RIG_BENCH_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ctx.scale(10_000, 1_000));
    let demo = ctx.bin_dir.join("rig-demo");
    if !demo.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p rig-demo`",
            demo.display()
        );
    }
    let mut rows = Vec::new();
    for (label, args) in [
        ("", &[][..]),
        (", --events-retained 1", &["--events-retained", "1"][..]),
    ] {
        let rigd = Rigd::start_with(ctx, "rigd-conns", args).await?;
        let result = measure(ctx, &rigd, &demo, n, label).await;
        let _ = rigd.down("conns").await;
        rigd.stop().await;
        rows.extend(result?);
    }
    Ok(rows)
}

async fn measure(
    ctx: &Ctx,
    rigd: &Rigd,
    demo: &std::path::Path,
    n: usize,
    label: &str,
) -> Result<Vec<Row>> {
    let spec = json!({
        "name": "conns",
        "services": {
            "store": {
                "command": [demo.display().to_string(), "kv"],
                "ingresses": { "default": { "protocol": "tcp" } },
            },
            "client": {
                "command": [ctx.exe.display().to_string(), "idle"],
                "egresses": { "store": { "service": "store" } },
            },
        },
    });
    let (env, _) = rigd.up(&spec, ctx.work.path()).await?;
    let edge = env
        .edges
        .iter()
        .find(|e| e.edge == "client/store")
        .ok_or_else(|| anyhow!("no edge client/store in {:?}", env.edges))?;
    let addr: SocketAddr = edge
        .proxy_address
        .parse()
        .with_context(|| format!("proxy address {:?}", edge.proxy_address))?;
    let pid = rigd.proc.pid();
    let limit = std::fs::read_to_string(format!("/proc/{pid}/limits"))?
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| {
            l.split_whitespace()
                .skip(3)
                .take(2)
                .collect::<Vec<_>>()
                .join("/")
        })
        .unwrap_or_default();

    let rss_before = procs::rss_kib(pid)?;
    let fds_before = fds(pid)?;
    let t0 = Instant::now();
    let (open, errors, fds_open, rss_open) = burst(addr, n, pid).await?;
    let took = t0.elapsed();
    close_wait(pid, fds_before).await?;
    let rss_after = procs::rss_kib(pid)?;
    // More bursts: memory freed by the first should be reused, not added to.
    let mut again = Vec::new();
    for _ in 0..BURSTS_AGAIN {
        let (_, errs, _, rss) = burst(addr, n, pid).await?;
        close_wait(pid, fds_before).await?;
        again.push((errs.len(), rss, procs::rss_kib(pid)?));
    }
    let again_errors: usize = again.iter().map(|a| a.0).sum();
    let rss_again = again
        .iter()
        .map(|a| mib(a.1))
        .collect::<Vec<_>>()
        .join(", ");
    let rss_again_after = again.last().map(|a| a.2).unwrap_or(rss_after);
    // rigd hands freed memory back every 10 s (malloc_trim): watch RSS for 15 s after the last
    // close and keep its lowest reading.
    let mut rss_settled = procs::rss_kib(pid)?;
    let watch_until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < watch_until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_settled = rss_settled.min(procs::rss_kib(pid)?);
    }
    let per_conn_fds = fds_open.saturating_sub(fds_before) as f64 / open.max(1) as f64;
    // What the descriptor limit allows: rigd's own descriptors, then 2 per connection.
    let hard: usize = limit
        .split('/')
        .nth(1)
        .and_then(|h| h.parse().ok())
        .unwrap_or(0);
    let capacity = hard.saturating_sub(fds_before) / 2;
    let per_conn_kib = rss_open.saturating_sub(rss_before) as f64 / open.max(1) as f64;
    println!(
        "conns{label}: {open} of {n} open ({} errors, {again_errors} in the second burst) in {:.1} s, rigd nofile {limit}; \
         rigd fds {fds_before} → {fds_open} ({per_conn_fds:.2}/conn); RSS {} → {} ({per_conn_kib:.1} KiB/conn) → {} after close → {} all open again → {} after close → {} 15 s later",
        errors.len(),
        took.as_secs_f64(),
        mib(rss_before),
        mib(rss_open),
        mib(rss_after),
        rss_again,
        mib(rss_again_after),
        mib(rss_settled),
    );
    if let Some(e) = errors.first() {
        println!("conns{label}: first error: {e}");
    }
    let ok = open == n && errors.is_empty() && again_errors == 0;
    Ok(vec![
        Row::new(format!(
            "concurrent tcp connections through one rigd edge{label} (rigd nofile soft/hard {limit}; PING/PONG to rig-demo kv, {PARALLEL} opening at a time)"
        ))
        .rig(format!("{open} open, {} errors", errors.len() + again_errors))
        .baselines(format!(
            "rigd fds {fds_before} → {fds_open} ({per_conn_fds:.2} per connection); the limit allows ({hard} − {fds_before}) / 2 = {capacity}"
        ))
        .target("≥ 10,000 with 0 errors", ok && open >= 10_000),
        Row::new(format!("rigd VmRSS around {n} concurrent tcp connections{label}"))
            .rig(format!(
                "before {}, all open {}, after close {}; {BURSTS_AGAIN} more bursts: all open {}, after close {}, 15 s later {}",
                mib(rss_before),
                mib(rss_open),
                mib(rss_after),
                rss_again,
                mib(rss_again_after),
                mib(rss_settled),
            ))
            .ratio(format!("{per_conn_kib:.1} KiB per open connection")),
    ])
}
