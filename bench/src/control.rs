//! Measurement 6, the control plane, through a real rigd: (b) `Up` of a 50-service chain
//! against starting the same processes directly, and rigd's memory with them idle; (a)
//! `Chaos.Set` round trips verified in the data plane, and the whole `rigctl chaos set` command
//! against `rigctl --version`; (c) events delivered to an `Events.Watch` follower.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rig_proto::v1 as pb;
use rig_proto::v1::chaos_client::ChaosClient;
use rig_proto::v1::environments_client::EnvironmentsClient;
use rig_proto::v1::events_client::EventsClient;
use serde_json::json;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tonic::transport::Channel;

use crate::client::{HttpConn, Stats};
use crate::ext::Ctx;
use crate::procs::{self, Proc, Spec};
use crate::report::{Row, ms, rate};

const CHAIN: usize = 50;

/// A rigd child and a gRPC channel to it.
pub(crate) struct Rigd {
    pub(crate) proc: Proc,
    /// `127.0.0.1:PORT`, what rigctl's `--addr` takes.
    pub(crate) addr: String,
    channel: Channel,
}

impl Rigd {
    pub(crate) async fn start(ctx: &Ctx, name: &str) -> Result<Rigd> {
        Rigd::start_with(ctx, name, &[]).await
    }

    /// Start rigd with extra arguments.
    pub(crate) async fn start_with(ctx: &Ctx, name: &str, args: &[&str]) -> Result<Rigd> {
        let bin = ctx.bin_dir.join("rigd");
        if !bin.is_file() {
            bail!(
                "{} is missing: build it with `cargo build --release -p rig-control`",
                bin.display()
            );
        }
        let state = ctx.work.file(&format!("{name}-state"));
        let spec = Spec::new(name, bin)
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state.display().to_string())
            .args(args.iter().copied())
            .env("RUST_LOG", "warn");
        let mut proc = Proc::spawn(spec, &ctx.work)?;
        let line = proc
            .line_containing("rigd listening on", Duration::from_secs(20))
            .await?;
        proc.discard_stdout();
        let addr = line
            .rsplit(' ')
            .next()
            .ok_or_else(|| anyhow!("rigd said {line:?}"))?
            .trim()
            .to_string();
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            .with_context(|| format!("connecting to rigd at {addr}"))?;
        Ok(Rigd {
            proc,
            addr,
            channel,
        })
    }

    fn envs(&self) -> EnvironmentsClient<Channel> {
        EnvironmentsClient::new(self.channel.clone())
    }

    /// `Up` a spec (JSON); returns the final status and how long the call took.
    pub(crate) async fn up(
        &self,
        spec: &serde_json::Value,
        base: &Path,
    ) -> Result<(pb::EnvironmentStatus, Duration)> {
        let req = pb::UpRequest {
            spec: spec.to_string(),
            format: "json".into(),
            origin: "rig-bench".into(),
            base_dir: base.display().to_string(),
        };
        let t0 = Instant::now();
        let mut stream = self.envs().up(req).await?.into_inner();
        loop {
            let msg = timeout(Duration::from_secs(120), stream.message())
                .await
                .map_err(|_| anyhow!("Up made no progress for 120 s"))??;
            match msg {
                Some(p) => {
                    if let Some(env) = p.environment {
                        return Ok((env, t0.elapsed()));
                    }
                    if p.state == "failed" {
                        bail!("Up: {} failed: {} {:?}", p.service, p.message, p.last_logs);
                    }
                }
                None => bail!("Up ended without a final status"),
            }
        }
    }

    pub(crate) async fn down(&self, env: &str) -> Result<()> {
        self.envs()
            .down(pb::DownRequest { env: env.into() })
            .await?;
        Ok(())
    }

    pub(crate) async fn stop(self) {
        // SIGTERM: rigd brings every environment down before it exits.
        self.proc.stop(Duration::from_secs(20)).await;
    }
}

pub async fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    // A fresh rigd for the chain, so its memory figure is not inflated by the event log the
    // event benchmark fills.
    let rigd = Rigd::start(ctx, "rigd-chain").await?;
    match chain(ctx, &rigd).await {
        Ok(r) => rows.extend(r),
        Err(e) => rows.push(Row::failed("Up of a 50-service chain", format!("{e:#}"))),
    }
    rigd.stop().await;

    let rigd = Rigd::start(ctx, "rigd-chaos").await?;
    let result = chaos_and_events(ctx, &rigd).await;
    rigd.stop().await;
    rows.extend(result?);
    Ok(rows)
}

/// (b): the chain started directly, then through rigd.
async fn chain(ctx: &Ctx, rigd: &Rigd) -> Result<Vec<Row>> {
    let demo = ctx.bin_dir.join("rig-demo");
    if !demo.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p rig-demo`",
            demo.display()
        );
    }
    let direct = start_chain_directly(&demo).await?;

    let mut services = serde_json::Map::new();
    for i in 0..CHAIN {
        let mut svc = json!({
            "command": [demo.display().to_string(), "kv"],
            "ingresses": { "default": { "protocol": "tcp" } },
        });
        if i > 0 {
            svc["egresses"] = json!({ "prev": { "service": format!("s{:02}", i - 1) } });
        }
        services.insert(format!("s{i:02}"), svc);
    }
    let spec = json!({ "name": "chain", "services": services });
    let (env, up) = rigd.up(&spec, ctx.work.path()).await?;
    let ready = env
        .services
        .iter()
        .filter(|s| s.state() == pb::ServiceState::Ready)
        .count();
    let observed = env.edges.iter().filter(|e| e.observed).count();
    // Idle for a moment, as "services and edges idle" means, then read rigd's memory.
    sleep(Duration::from_secs(2)).await;
    let rss = procs::rss_kib(rigd.proc.pid())? as f64 / 1024.0;
    rigd.down("chain").await?;

    let overhead = up.as_secs_f64() - direct.as_secs_f64();
    println!(
        "chain: direct {:.3} s, rigd Up {:.3} s ({ready} ready, {observed} proxied edges), rigd RSS {rss:.1} MiB",
        direct.as_secs_f64(),
        up.as_secs_f64()
    );
    let complete = ready == CHAIN && observed == CHAIN - 1;
    Ok(vec![
        Row::new(format!(
            "Up of a {CHAIN}-service chain (rig-demo kv, tcp ingress, {} edges)",
            CHAIN - 1
        ))
        .rig(format!(
            "Up {:.3} s ({ready} ready, {observed} proxied edges)",
            up.as_secs_f64()
        ))
        .baselines(format!(
            "same processes started and polled directly, in order: {:.3} s",
            direct.as_secs_f64()
        ))
        .ratio(format!("rigd overhead +{overhead:.3} s"))
        .target("overhead ≤ 1 s", overhead <= 1.0 && complete),
        Row::new(format!(
            "rigd VmRSS with {CHAIN} services and {} edges idle",
            CHAIN - 1
        ))
        .rig(format!("{rss:.1} MiB"))
        .target("≤ 64 MiB", rss <= 64.0),
    ])
}

/// Start `CHAIN` `rig-demo kv` one after the other, each polled until it accepts a connection
/// (every millisecond), as rigd must; returns the total time. The processes are stopped again.
async fn start_chain_directly(demo: &Path) -> Result<Duration> {
    let mut children = Vec::new();
    let t0 = Instant::now();
    for _ in 0..CHAIN {
        let port = procs::free_port()?;
        let child = tokio::process::Command::new(demo)
            .arg("kv")
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", demo.display()))?;
        children.push(child);
        wait_accepting(procs::local(port)).await?;
    }
    let took = t0.elapsed();
    for c in &mut children {
        if let Some(pid) = c.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for c in &mut children {
        if timeout(Duration::from_secs(5), c.wait()).await.is_err() {
            let _ = c.kill().await;
        }
    }
    Ok(took)
}

async fn wait_accepting(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() >= deadline {
            bail!("rig-demo kv did not listen on {addr} within 10 s");
        }
        sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

fn selector(edge: &str) -> Option<pb::EdgeSelector> {
    Some(pb::EdgeSelector {
        env: "bench".into(),
        edges: vec![edge.into()],
        to: String::new(),
    })
}

/// (a) and (c) on one environment: an HTTP upstream (the bench binary) and an idle client whose
/// egress to it is the edge under test.
async fn chaos_and_events(ctx: &Ctx, rigd: &Rigd) -> Result<Vec<Row>> {
    let exe = ctx.exe.display().to_string();
    let spec = json!({
        "name": "bench",
        "services": {
            "up": {
                "command": [exe, "upstream"],
                "ingresses": { "default": { "protocol": "http", "ready": { "path": "/" } } },
            },
            "client": {
                "command": [exe, "idle"],
                "egresses": { "up": { "service": "up" } },
            },
        },
    });
    let (env, _) = rigd.up(&spec, ctx.work.path()).await?;
    let edge = env
        .edges
        .iter()
        .find(|e| e.edge == "client/up")
        .ok_or_else(|| anyhow!("no edge client/up in {:?}", env.edges))?;
    let proxy: SocketAddr = edge
        .proxy_address
        .parse()
        .with_context(|| format!("proxy address {:?}", edge.proxy_address))?;

    let mut rows = Vec::new();
    rows.push(chaos_set(ctx, rigd, proxy).await?);
    rows.push(rigctl_chaos_set(ctx, rigd).await?);
    rows.push(events(ctx, rigd, proxy).await?);
    rows.push(
        Row::new(
            "rigd VmRSS after the event run (the log retains the last 20,000 events by default)",
        )
        .rig(format!(
            "{:.1} MiB",
            procs::rss_kib(rigd.proc.pid())? as f64 / 1024.0
        )),
    );
    rigd.down("bench").await?;
    Ok(rows)
}

/// (a) `Chaos.Set` alternating two error statuses; after each call one request through the edge
/// must see the new one.
async fn chaos_set(ctx: &Ctx, rigd: &Rigd, proxy: SocketAddr) -> Result<Row> {
    let mut chaos = ChaosClient::new(rigd.channel.clone());
    let mut conn = HttpConn::connect(proxy).await?;
    let n = ctx.scale(500, 50);
    let warmup = 20;
    let mut samples = Vec::with_capacity(n);
    let mut wrong = 0usize;
    for i in 0..warmup + n {
        let status = if i % 2 == 0 { 503 } else { 429 };
        let req = pb::SetChaosRequest {
            selector: selector("client/up"),
            chaos: Some(pb::ChaosSpec {
                status: Some(status),
                ..Default::default()
            }),
        };
        let t0 = Instant::now();
        chaos.set(req).await.context("Chaos.Set")?;
        let dt = t0.elapsed();
        let got = match conn.get("/").await {
            Ok(a) => a,
            Err(_) => {
                // rig may close a connection it answered itself; one fresh try.
                conn = HttpConn::connect(proxy).await?;
                conn.get("/").await?
            }
        };
        if u32::from(got.status) != status || got.injected.is_none() {
            wrong += 1;
        }
        if i >= warmup {
            samples.push(dt);
        }
    }
    chaos
        .clear(pb::ClearChaosRequest {
            selector: selector("client/up"),
        })
        .await?;
    let s = Stats::of(&mut samples);
    println!(
        "Chaos.Set: p50 {} p99 {} max {} ({wrong} requests saw the wrong policy)",
        ms(s.p50),
        ms(s.p99),
        ms(s.max)
    );
    Ok(Row::new(format!(
        "Chaos.Set round trip until in force ({n} calls alternating 2 policies, each verified by a request)"
    ))
    .rig(format!("p50 {}, p99 {}", ms(s.p50), ms(s.p99)))
    .ratio(format!("{wrong} of {n} requests saw the wrong policy"))
    .target("p99 ≤ 10 ms", s.p99 <= 10_000.0 && wrong == 0))
}

/// `rigctl chaos set` as a user runs it: the whole command, from spawning the process to its
/// exit (start-up, connect, the RPC, output), alternating two statuses. Sequential, so each run
/// has the machine to itself.
async fn rigctl_chaos_set(ctx: &Ctx, rigd: &Rigd) -> Result<Row> {
    let rigctl = ctx.bin_dir.join("rigctl");
    if !rigctl.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p rig-control`",
            rigctl.display()
        );
    }
    let n = ctx.scale(200, 20);
    let warmup = 10;
    // Baseline: the same binary started and exiting without talking to rigd (`--version`),
    // interleaved with the real runs so both see the same machine.
    let mut samples = Vec::with_capacity(n);
    let mut bare = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let status = if i % 2 == 0 { "503" } else { "429" };
        let set = run_timed(
            &rigctl,
            &[
                "--addr",
                &rigd.addr,
                "--env",
                "bench",
                "chaos",
                "set",
                "client/up",
                "--status",
                status,
            ],
        )
        .await?;
        let version = run_timed(&rigctl, &["--version"]).await?;
        if i >= warmup {
            samples.push(set);
            bare.push(version);
        }
    }
    ChaosClient::new(rigd.channel.clone())
        .clear(pb::ClearChaosRequest {
            selector: selector("client/up"),
        })
        .await?;
    let s = Stats::of(&mut samples);
    let b = Stats::of(&mut bare);
    let ratio = s.p99 / s.p50.max(1.0);
    println!(
        "rigctl chaos set: p50 {} p90 {} p99 {} max {} (p99/p50 {ratio:.2}); rigctl --version: p50 {} p99 {}",
        ms(s.p50),
        ms(s.p90),
        ms(s.p99),
        ms(s.max),
        ms(b.p50),
        ms(b.p99)
    );
    Ok(Row::new(format!(
        "`rigctl chaos set` whole command, process start to exit ({n} sequential runs alternating 2 statuses)"
    ))
    .rig(format!("p50 {}, p99 {}", ms(s.p50), ms(s.p99)))
    .baselines(format!(
        "`rigctl --version` (start and exit only): p50 {}, p99 {}",
        ms(b.p50),
        ms(b.p99)
    ))
    .ratio(format!(
        "p99/p50 {ratio:.2}; connect + RPC + exit adds {} at p50",
        ms(s.p50 - b.p50)
    ))
    .target("p99/p50 ≤ 2", ratio <= 2.0))
}

/// Run `program args` to its exit; how long it took. Fails if it fails.
async fn run_timed(program: &Path, args: &[&str]) -> Result<Duration> {
    let t0 = Instant::now();
    let out = tokio::process::Command::new(program)
        .args(args)
        .env_remove("RIG_TOKEN")
        .env_remove("RIGCTL_ENV")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    let dt = t0.elapsed();
    if !out.status.success() {
        bail!(
            "{} {args:?} failed ({}): {}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dt)
}

/// What the follower saw.
#[derive(Debug, Default)]
struct Followed {
    events: AtomicU64,
    completed: AtomicU64,
    gaps: AtomicU64,
    lagged: AtomicU64,
    /// Microseconds after the follower started that the last event arrived.
    last_at_us: AtomicU64,
}

/// (c) Drive paced requests through the edge while a follower watches.
async fn events(ctx: &Ctx, rigd: &Rigd, proxy: SocketAddr) -> Result<Row> {
    const CONNS: usize = 16;
    // Two events per request (started, completed): 6,000 req/s drive 12,000 events/s.
    const REQ_PER_SEC: f64 = 6_000.0;
    let secs = ctx.scale(5.0, 1.0);

    let mut watch = EventsClient::new(rigd.channel.clone())
        .watch(pb::WatchRequest {
            only_new: true,
            follow: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let seen = Arc::new(Followed::default());
    let t0 = Instant::now();
    let follower = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut last_seq = 0u64;
            while let Ok(Some(e)) = watch.message().await {
                if e.r#type == "events.lagged" {
                    seen.lagged.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if last_seq != 0 && e.seq != last_seq + 1 {
                    seen.gaps.fetch_add(1, Ordering::Relaxed);
                }
                last_seq = e.seq;
                if e.r#type == "request.completed" {
                    seen.completed.fetch_add(1, Ordering::Relaxed);
                }
                seen.events.fetch_add(1, Ordering::Relaxed);
                seen.last_at_us
                    .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        })
    };

    // Paced load: connection j sends its k-th request at start + (k * CONNS + j) / REQ_PER_SEC.
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for j in 0..CONNS {
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = HttpConn::connect(proxy).await?;
            let mut bad = 0u64;
            for k in 0u64.. {
                let due = start
                    + Duration::from_secs_f64((k as f64 * CONNS as f64 + j as f64) / REQ_PER_SEC);
                if due >= end {
                    break;
                }
                sleep_until(due).await;
                let a = conn.get("/").await?;
                if a.status != 200 {
                    bad += 1;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<u64, anyhow::Error>(bad)
        }));
    }
    let mut bad = 0;
    for t in tasks {
        bad += t.await.map_err(|e| anyhow!("load task: {e}"))??;
    }
    let load_took = start.elapsed().as_secs_f64();
    let requests = sent.load(Ordering::Relaxed);

    // Wait (bounded) for the follower to see every request complete.
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.completed.load(Ordering::Relaxed) < requests && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
    follower.abort();
    let events = seen.events.load(Ordering::Relaxed);
    let completed = seen.completed.load(Ordering::Relaxed);
    let gaps = seen.gaps.load(Ordering::Relaxed);
    let lagged = seen.lagged.load(Ordering::Relaxed);
    let missing = requests.saturating_sub(completed);
    let start_us = start.duration_since(t0).as_micros() as u64;
    let span = (seen
        .last_at_us
        .load(Ordering::Relaxed)
        .saturating_sub(start_us)) as f64
        / 1e6;
    let delivered = events as f64 / span.max(load_took);
    let driven = 2.0 * requests as f64 / load_took;
    println!(
        "events: {requests} requests ({bad} not 200) in {load_took:.2} s, follower got {events} events \
         ({completed} request.completed) at {delivered:.0}/s; gaps {gaps}, lagged {lagged}, missing {missing}"
    );
    let lost = gaps + lagged + missing;
    Ok(Row::new(format!(
        "Events.Watch follower, {CONNS} connections driving {} request events/s for {secs} s",
        2.0 * REQ_PER_SEC
    ))
    .rig(format!("{} delivered", rate(delivered)))
    .baselines(format!("driven {} ({requests} requests)", rate(driven)))
    .ratio(format!(
        "lost: {gaps} seq gaps, {lagged} lagged notices, {missing} requests never seen"
    ))
    .target(
        "≥ 10,000/s without loss",
        delivered >= 10_000.0 && lost == 0 && bad == 0,
    ))
}
