//! Measurement 5, memory: VmRSS of a process running rig edges, before and after opening idle
//! proxied connections and starting edges; HAProxy's the same way as a peer figure.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{StreamExt, TryStreamExt, stream};

use crate::client::{EchoConn, HttpConn};
use crate::ext::{Ctx, ProxyServer, Upstream, haproxy};
use crate::procs::{Cpus, rss_kib};
use crate::report::{Row, kib};

/// How many connections are opened at once while filling.
const PARALLEL: usize = 64;

/// Open `n` tcp connections to `addr`, each with one echo round trip so the proxy has dialled the
/// target too, and keep them open.
async fn open_echo(addr: SocketAddr, n: usize) -> Result<Vec<EchoConn>> {
    stream::iter(0..n)
        .map(|_| async move {
            let mut c = EchoConn::connect(addr).await?;
            c.round_trip(b"x").await?;
            Ok::<_, anyhow::Error>(c)
        })
        .buffer_unordered(PARALLEL)
        .try_collect()
        .await
}

/// Open `n` HTTP/1.1 connections to `addr`, each with one request, and keep them open.
async fn open_http(addr: SocketAddr, n: usize) -> Result<Vec<HttpConn>> {
    stream::iter(0..n)
        .map(|_| async move {
            let mut c = HttpConn::connect(addr).await?;
            let a = c.get("/").await?;
            anyhow::ensure!(a.status == 200, "GET / via {addr} answered {}", a.status);
            Ok::<_, anyhow::Error>(c)
        })
        .buffer_unordered(PARALLEL)
        .try_collect()
        .await
}

/// KiB of RSS `pid` gains per connection while `n` connections are open.
async fn per_conn_echo(pid: u32, addr: SocketAddr, n: usize) -> Result<f64> {
    // Warm up: the first connections grow the runtime's and allocator's pools once.
    drop(open_echo(addr, PARALLEL).await?);
    let before = rss_kib(pid)?;
    let conns = open_echo(addr, n).await?;
    let after = rss_kib(pid)?;
    drop(conns);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

pub async fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let n_conns = ctx.scale(2000, 200);
    let n_edges = ctx.scale(200, 20);
    let upstream = Upstream::start(ctx, Cpus::Any).await?;

    // A fresh process for each figure, so memory freed by one is not reused by the next.
    let mut proxy = ProxyServer::start(ctx, "mem-rig-tcp", Cpus::Any).await?;
    let tcp_edge = proxy.edge("tcp", upstream.echo, "").await?;
    let tcp_kib = per_conn_echo(proxy.pid(), tcp_edge, n_conns)
        .await
        .context("idle tcp connections through rig")?;
    proxy.stop().await;

    let mut proxy = ProxyServer::start(ctx, "mem-rig-http", Cpus::Any).await?;
    let http_edge = proxy.edge("http", upstream.http, "").await?;
    drop(open_http(http_edge, PARALLEL).await?);
    let before = rss_kib(proxy.pid())?;
    let conns = open_http(http_edge, n_conns)
        .await
        .context("idle http connections through rig")?;
    let after = rss_kib(proxy.pid())?;
    drop(conns);
    proxy.stop().await;
    let http_kib = after.saturating_sub(before) as f64 / n_conns as f64;

    let (hap, hap_addr) =
        haproxy(ctx, "mem-haproxy", "tcp", upstream.echo, Some(1), Cpus::Any).await?;
    let hap_kib = per_conn_echo(hap.pid(), hap_addr, n_conns)
        .await
        .context("idle tcp connections through HAProxy")?;
    hap.stop(Duration::from_secs(5)).await;

    let mut proxy = ProxyServer::start(ctx, "mem-rig-edges", Cpus::Any).await?;
    // One edge of each kind first, so the per-edge figure excludes one-time set-up.
    proxy.edges(1, "tcp", upstream.echo).await?;
    proxy.edges(1, "http", upstream.http).await?;
    let start_rss = rss_kib(proxy.pid())?;
    let mut per_edge = Vec::new();
    for (protocol, target) in [("tcp", upstream.echo), ("http", upstream.http)] {
        let before = rss_kib(proxy.pid())?;
        proxy.edges(n_edges, protocol, target).await?;
        let after = rss_kib(proxy.pid())?;
        per_edge.push(after.saturating_sub(before) as f64 / n_edges as f64);
    }
    let end_rss = rss_kib(proxy.pid())?;
    proxy.stop().await;
    upstream.stop().await;

    println!(
        "memory: tcp conn {} (HAProxy {}), http conn {}, tcp edge {}, http edge {}",
        kib(tcp_kib),
        kib(hap_kib),
        kib(http_kib),
        kib(per_edge[0]),
        kib(per_edge[1])
    );
    Ok(vec![
        Row::new(format!(
            "RSS per idle proxied tcp connection ({n_conns} open, passthrough)"
        ))
        .rig(kib(tcp_kib))
        .baselines(format!("HAProxy (tcp mode, 1 thread) {}", kib(hap_kib)))
        .ratio(format!("rig÷HAProxy {:.2}", tcp_kib / hap_kib.max(0.001)))
        .target("≤ 16 KiB", tcp_kib <= 16.0),
        Row::new(format!(
            "RSS per idle proxied HTTP/1.1 keep-alive connection ({n_conns} open)"
        ))
        .rig(kib(http_kib)),
        Row::new(format!(
            "RSS per idle edge ({n_edges} tcp edges, then {n_edges} http edges)"
        ))
        .rig(format!(
            "tcp {}, http {}",
            kib(per_edge[0]),
            kib(per_edge[1])
        ))
        .baselines(format!(
            "process RSS {} with 2 edges → {} with {} edges",
            kib(start_rss as f64),
            kib(end_rss as f64),
            2 + 2 * n_edges
        )),
    ])
}
