//! Measurements 2 (HTTP/1.1 keep-alive requests/s with wrk), 3 (added latency per request) and
//! 4 (accuracy of injected latency).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};

use crate::client::Stats;
use crate::ext::{Ctx, HttpUpstream, ProxyServer, Upstream, haproxy, latency_client};
use crate::procs::{self, Cpus, Proc, Spec};
use crate::report::{Row, median, ms, rate, us};

/// What wrk reported.
#[derive(Debug, Clone, Copy, Default)]
struct Wrk {
    rps: f64,
    /// Non-2xx/3xx responses plus socket errors.
    errors: u64,
}

async fn wrk(ctx: &Ctx, addr: SocketAddr, secs: u32) -> Result<Wrk> {
    let bin = procs::which("wrk").ok_or_else(|| anyhow!("wrk is not installed"))?;
    let spec = Spec::new("wrk", bin).args([
        "-t2".to_string(),
        "-c64".into(),
        format!("-d{secs}s"),
        "--timeout".into(),
        "5s".into(),
        format!("http://{addr}/"),
    ]);
    let out = Proc::spawn(spec, &ctx.work)?
        .wait_output(Duration::from_secs(secs as u64 + 30))
        .await?;
    let mut w = Wrk::default();
    for l in &out {
        let l = l.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            w.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if w.rps == 0.0 {
        bail!("wrk via {addr} reported no requests/s:\n{}", out.join("\n"));
    }
    Ok(w)
}

/// Requests/s (measurement 2): the proxy (rig or HAProxy, one thread) on core 0, the upstream
/// on core 1, wrk (two threads) free on both.
pub async fn rps(ctx: &Ctx) -> Result<Vec<Row>> {
    let upstream = HttpUpstream::start(ctx, "rps-upstream", Cpus::Core1).await?;
    let mut proxy = ProxyServer::start(ctx, "rps-rig", Cpus::Core0).await?;
    let rig_addr = proxy.edge("http", upstream.addr, "").await?;
    let (hap, hap_addr) = haproxy(
        ctx,
        "rps-haproxy",
        "http",
        upstream.addr,
        Some(1),
        Cpus::Core0,
    )
    .await?;

    let secs = ctx.scale(5, 1);
    // Interleaved rounds, median per path (see tcp.rs).
    let rounds = ctx.scale(3, 1);
    let paths = [
        ("direct", upstream.addr),
        ("rig", rig_addr),
        ("HAProxy", hap_addr),
    ];
    if !ctx.quick {
        for (_, addr) in paths {
            // Warm up connections, caches and the allocator; not measured.
            wrk(ctx, addr, 1).await?;
        }
    }
    let mut runs: [Vec<f64>; 3] = Default::default();
    let mut errors = 0;
    for round in 1..=rounds {
        for (i, (name, addr)) in paths.iter().enumerate() {
            let w = wrk(ctx, *addr, secs).await?;
            println!(
                "http {name}, round {round}: {:.0} req/s, {} errors",
                w.rps, w.errors
            );
            runs[i].push(w.rps);
            errors += w.errors;
        }
    }
    let (events, lagged) = proxy.events().await?;
    proxy.stop().await;
    hap.stop(Duration::from_secs(5)).await;
    let what = upstream.what;
    upstream.stop().await;

    let [direct, rig, hap] = runs.map(|mut r| median(&mut r));
    let vs_hap = rig / hap;
    let mut rows = vec![
        Row::new(format!(
            "HTTP/1.1 keep-alive req/s (wrk -t2 -c64 -d{secs}s, median of {rounds}, upstream {what})"
        ))
        .rig(rate(rig))
        .baselines(format!("direct {}, HAProxy {}", rate(direct), rate(hap)))
        .ratio(format!(
            "rig÷HAProxy {vs_hap:.2} (rig÷direct {:.2}, HAProxy÷direct {:.2})",
            rig / direct,
            hap / direct
        ))
        .target("rig ≥ HAProxy", vs_hap >= 1.0 && errors == 0),
    ];
    rows.push(
        Row::new("events drained by the rig edge's subscriber during the wrk runs")
            .rig(format!("{events} events, {lagged} lagged"))
            .ratio(format!("{errors} wrk errors over all paths")),
    );
    Ok(rows)
}

/// Added latency (measurement 3), one connection, one request at a time, everything on core 0.
pub async fn latency(ctx: &Ctx) -> Result<Vec<Row>> {
    let upstream = HttpUpstream::start(ctx, "lat-upstream", Cpus::Core0).await?;
    let mut proxy = ProxyServer::start(ctx, "lat-rig", Cpus::Core0).await?;
    let rig_addr = proxy.edge("http", upstream.addr, "").await?;
    let (hap, hap_addr) = haproxy(
        ctx,
        "lat-haproxy",
        "http",
        upstream.addr,
        Some(1),
        Cpus::Core0,
    )
    .await?;

    let n = ctx.scale(20_000, 2_000);
    let warmup = ctx.scale(1_000, 100);
    let mut stats = Vec::new();
    for (name, addr) in [
        ("direct", upstream.addr),
        ("rig", rig_addr),
        ("HAProxy", hap_addr),
    ] {
        let s = latency_client(ctx, "lat-client", ("--http", addr), warmup, n, Cpus::Core0).await?;
        println!(
            "latency {name}: p50 {} p90 {} p99 {} (n={})",
            us(s.p50),
            us(s.p90),
            us(s.p99),
            s.n
        );
        stats.push(s);
    }
    proxy.stop().await;
    hap.stop(Duration::from_secs(5)).await;
    let what = upstream.what;
    upstream.stop().await;

    let [direct, rig, hap]: [Stats; 3] = [stats[0], stats[1], stats[2]];
    let added50 = rig.p50 - direct.p50;
    let added99 = rig.p99 - direct.p99;
    Ok(vec![
        Row::new(format!(
            "added latency per HTTP request, p50 (1 conn, N={n}, all on core 0, upstream {what})"
        ))
        .rig(format!("p50 {}", us(rig.p50)))
        .baselines(format!(
            "direct {}, HAProxy {}",
            us(direct.p50),
            us(hap.p50)
        ))
        .ratio(format!(
            "rig +{} (HAProxy +{})",
            us(added50),
            us(hap.p50 - direct.p50)
        ))
        .target("added p50 ≤ 50 µs", added50 <= 50.0),
        Row::new("added latency per HTTP request, p99 (same run)")
            .rig(format!("p99 {}", us(rig.p99)))
            .baselines(format!(
                "direct {}, HAProxy {}",
                us(direct.p99),
                us(hap.p99)
            ))
            .ratio(format!(
                "rig +{} (HAProxy +{})",
                us(added99),
                us(hap.p99 - direct.p99)
            )),
    ])
}

/// Accuracy (measurement 4) of a 50 ms latency fault on an http edge and (upstream only) on a
/// tcp edge.
pub async fn accuracy(ctx: &Ctx) -> Result<Vec<Row>> {
    const CONFIGURED_US: f64 = 50_000.0;
    let upstream = HttpUpstream::start(ctx, "acc-upstream", Cpus::Core0).await?;
    let echo = Upstream::start(ctx, Cpus::Core0).await?;
    let mut proxy = ProxyServer::start(ctx, "acc-rig", Cpus::Core0).await?;
    let http_edge = proxy
        .edge("http", upstream.addr, r#"{"latency":"50ms"}"#)
        .await?;
    let tcp_edge = proxy
        .edge(
            "tcp",
            echo.echo,
            r#"{"latency":"50ms","latency_direction":"upstream"}"#,
        )
        .await?;

    let n = ctx.scale(500, 40);
    let mut rows = Vec::new();
    let cases = [
        (
            "http",
            ("--http", upstream.addr),
            ("--http", http_edge),
            "request",
        ),
        (
            "tcp",
            ("--echo", echo.echo),
            ("--echo", tcp_edge),
            "echo round trip",
        ),
    ];
    for (proto, direct_t, rig_t, what) in cases {
        let article = if proto == "http" { "an" } else { "a" };
        let direct = latency_client(ctx, "acc-client", direct_t, 20, n, Cpus::Core0).await?;
        let rig = latency_client(ctx, "acc-client", rig_t, 2, n, Cpus::Core0).await?;
        let err50 = (rig.p50 - CONFIGURED_US - direct.p50).abs();
        let err99 = (rig.p99 - CONFIGURED_US - direct.p99).abs();
        println!(
            "accuracy {proto}: measured p50 {} p99 {}, direct p50 {} p99 {}",
            ms(rig.p50),
            ms(rig.p99),
            ms(direct.p50),
            ms(direct.p99)
        );
        rows.push(
            Row::new(format!("latency = \"50ms\" on {article} {proto} edge, p50 error ({n} sequential {what}s, all on core 0)"))
                .rig(format!("p50 {}", ms(rig.p50)))
                .baselines(format!("direct p50 {}", ms(direct.p50)))
                .ratio(format!("|error| {}", ms(err50)))
                .target("≤ 1 ms", err50 <= 1000.0),
        );
        rows.push(
            Row::new(format!(
                "latency = \"50ms\" on {article} {proto} edge, p99 error"
            ))
            .rig(format!("p99 {}", ms(rig.p99)))
            .baselines(format!("direct p99 {}", ms(direct.p99)))
            .ratio(format!("|error| {}", ms(err99)))
            .target("≤ 2 ms", err99 <= 2000.0),
        );
    }
    proxy.stop().await;
    echo.stop().await;
    upstream.stop().await;
    Ok(rows)
}
