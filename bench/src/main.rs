//! `rig-bench`: the figures in rig's README, each measured against a baseline in the same run.
//!
//! Every subcommand starts what it needs (rig edges in a child process of this same binary,
//! nginx, HAProxy, iperf3, wrk, rigd), runs a bounded load against 127.0.0.1 only, prints a
//! markdown table with absolute numbers and ratios, and stops everything it started. `all` runs
//! them in turn and ends with one summary table. `scripts/bench.sh` installs the tools, builds in
//! release mode and runs `all`; `bench/README.md` explains the method.

mod client;
mod conns;
mod control;
mod ext;
mod flood;
mod helpers;
mod http;
mod memory;
mod procs;
mod report;
mod tcp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::ext::Ctx;
use crate::report::Row;

#[derive(Debug, Parser)]
#[command(
    name = "rig-bench",
    about = "Benchmarks of rig against a direct connection and HAProxy"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Every measurement below, then one summary table.
    All(Opts),
    /// 1. tcp throughput (iperf3): rig ÷ direct, 1 and 8 streams, splice and copy paths, HAProxy.
    Tcp(Opts),
    /// 2. HTTP/1.1 keep-alive requests/s (wrk -t2 -c64): direct, rig, HAProxy.
    Http(Opts),
    /// 3. Added latency per HTTP request, one connection, everything on core 0.
    Latency(Opts),
    /// 4. Accuracy of a 50 ms latency fault, http and tcp.
    Accuracy(Opts),
    /// 5. RSS per idle proxied connection and per idle edge.
    Memory(Opts),
    /// 6. Control plane through rigd: Chaos.Set, Up of a 50-service chain, event stream.
    Control(Opts),
    /// 7. Concurrent tcp connections through one rigd edge, and rigd's memory around them.
    Conns(Opts),
    /// 8. rigd's memory and CPU while a service floods stdout, and `rigctl down` after.
    Flood(Opts),

    /// Run rig edges, driven by commands on stdin (internal).
    #[command(hide = true)]
    ProxyServer,
    /// Serve HTTP on $PORT (or any port) and a tcp echo (internal).
    #[command(hide = true)]
    Upstream,
    /// Sequential latency client; prints JSON statistics (internal).
    #[command(hide = true)]
    Client {
        #[arg(long)]
        http: Option<SocketAddr>,
        #[arg(long)]
        echo: Option<SocketAddr>,
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        #[arg(short, default_value_t = 1000)]
        n: usize,
    },
    /// Do nothing until SIGTERM (internal: a service for rigd).
    #[command(hide = true)]
    Idle,
}

#[derive(Debug, Clone, Args)]
struct Opts {
    /// Where rigd and rig-demo are (default: this binary's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Also write the result table (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Short runs to check that everything works; the figures are not meaningful.
    #[arg(long)]
    quick: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        // The latency client runs one connection strictly sequentially: a current-thread
        // runtime keeps it to one thread, with no cross-thread wake-ups to measure.
        Cmd::Client {
            http,
            echo,
            warmup,
            n,
        } => current_thread().and_then(|rt| rt.block_on(helpers::client(http, echo, warmup, n))),
        // The roles that stand in for rigd and services use tokio's default multi-threaded
        // runtime, as rigd does: one worker per CPU the process may run on (taskset narrows it).
        Cmd::ProxyServer => multi_thread().and_then(|rt| rt.block_on(helpers::proxy_server())),
        Cmd::Upstream => multi_thread().and_then(|rt| rt.block_on(helpers::upstream())),
        Cmd::Idle => current_thread().and_then(|rt| rt.block_on(helpers::idle())),
        cmd => multi_thread().and_then(|rt| rt.block_on(bench(cmd))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rig-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn current_thread() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn multi_thread() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

const SECTIONS: [&str; 8] = [
    "tcp throughput",
    "HTTP requests/s",
    "added latency",
    "latency accuracy",
    "memory",
    "control plane",
    "connections",
    "output flood",
];

async fn section(i: usize, ctx: &Ctx) -> Result<Vec<Row>> {
    match i {
        0 => tcp::run(ctx).await,
        1 => http::rps(ctx).await,
        2 => http::latency(ctx).await,
        3 => http::accuracy(ctx).await,
        4 => memory::run(ctx).await,
        5 => control::run(ctx).await,
        6 => conns::run(ctx).await,
        _ => flood::run(ctx).await,
    }
}

async fn bench(cmd: Cmd) -> Result<()> {
    let (opts, pick): (Opts, &[usize]) = match cmd {
        Cmd::All(o) => (o, &[0, 1, 2, 3, 4, 5, 6, 7]),
        Cmd::Tcp(o) => (o, &[0]),
        Cmd::Http(o) => (o, &[1]),
        Cmd::Latency(o) => (o, &[2]),
        Cmd::Accuracy(o) => (o, &[3]),
        Cmd::Memory(o) => (o, &[4]),
        Cmd::Control(o) => (o, &[5]),
        Cmd::Conns(o) => (o, &[6]),
        Cmd::Flood(o) => (o, &[7]),
        _ => unreachable!("helper roles are dispatched in main"),
    };
    procs::raise_nofile();
    let exe = std::env::current_exe().context("locating this binary")?;
    let bin_dir = match opts.bin_dir {
        // Absolute, because rigd resolves service commands against the spec's directory.
        Some(d) => {
            std::fs::canonicalize(&d).with_context(|| format!("--bin-dir {}", d.display()))?
        }
        None => exe
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let ctx = Ctx {
        exe,
        bin_dir,
        work: procs::WorkDir::create()?,
        quick: opts.quick,
    };
    let mut all = Vec::new();
    for &i in pick {
        let name = SECTIONS[i];
        println!("\n## {name}\n");
        let started = std::time::Instant::now();
        let rows = match section(i, &ctx).await {
            Ok(rows) => rows,
            Err(e) => vec![Row::failed(name, format!("{e:#}"))],
        };
        println!("\n{}", report::table(&rows));
        println!("({name}: {:.0} s)", started.elapsed().as_secs_f64());
        all.extend(rows);
    }
    let table = report::table(&all);
    if pick.len() > 1 {
        println!("\n## Summary\n\n{table}");
    }
    if let Some(out) = &opts.out {
        std::fs::write(out, &table).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
