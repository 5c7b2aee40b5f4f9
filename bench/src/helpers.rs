//! The bench binary's hidden roles, each run as its own (often pinned) child process:
//!
//! * `proxy-server`: rig edges as rigd runs them (Prometheus recorder installed, an event
//!   subscriber draining events), driven by one-line commands on stdin;
//! * `upstream`: a small static HTTP server and a tcp echo server;
//! * `client`: a sequential latency client that prints its statistics as JSON;
//! * `idle`: a process that does nothing until SIGTERM (a service for rigd to supervise).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use rig_proxy::{ChaosSpec, Edge, EdgeConfig, EdgeInfo, EventSender, Protocol};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};

use crate::client::{Stats, Target, measure};

/// The body the HTTP upstream serves (nginx serves the same).
pub const BODY: &str = "hello from the bench upstream\n";

/// Install the metrics recorder as rigd does (histogram buckets for `_seconds`), and run its
/// upkeep every 5 s as a Prometheus scrape would (without it histogram samples pile up).
fn install_metrics() -> Result<()> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ],
        )
        .map_err(|e| anyhow!("prometheus buckets: {e}"))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| anyhow!("metrics recorder: {e}"))?;
    rig_proxy::metrics::describe();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            handle.run_upkeep();
        }
    });
    Ok(())
}

/// Events drained from the edges, and how many the drainer missed.
#[derive(Debug, Default)]
struct Drained {
    events: AtomicU64,
    lagged: AtomicU64,
}

fn drain_events(events: &EventSender) -> Arc<Drained> {
    let counts = Arc::new(Drained::default());
    let mut rx = events.subscribe();
    let c = counts.clone();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    // Touch the event as a consumer would, so it is not optimised into nothing.
                    std::hint::black_box(ev.kind.name());
                    c.events.fetch_add(1, Ordering::Relaxed);
                }
                Err(RecvError::Lagged(n)) => {
                    c.lagged.fetch_add(n, Ordering::Relaxed);
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    counts
}

fn parse_protocol(s: &str) -> Result<Protocol> {
    s.parse().map_err(|e: String| anyhow!(e))
}

fn parse_chaos(json: &str) -> Result<ChaosSpec> {
    if json.trim().is_empty() {
        return Ok(ChaosSpec::default());
    }
    serde_json::from_str(json).with_context(|| format!("chaos {json:?}"))
}

/// `proxy-server`: serve commands from stdin, one answer line each (`ok ...` or `err ...`):
///
/// * `edge PROTOCOL TARGET [CHAOS_JSON]` → `ok ID ADDR`
/// * `edges N PROTOCOL TARGET` → `ok N` (for the memory benchmark)
/// * `chaos ID CHAOS_JSON` → `ok VERSION`
/// * `events` → `ok DRAINED LAGGED`
///
/// It exits when stdin closes.
pub async fn proxy_server() -> Result<()> {
    install_metrics()?;
    let events = EventSender::new(65_536);
    let drained = drain_events(&events);
    let mut edges: Vec<Edge> = Vec::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let listen: SocketAddr = "127.0.0.1:0".parse()?;
    while let Some(line) = lines.next_line().await? {
        let mut words = line.splitn(4, ' ');
        let cmd = words.next().unwrap_or_default();
        let answer: Result<String> = async {
            match cmd {
                "edge" => {
                    let protocol = parse_protocol(words.next().unwrap_or_default())?;
                    let target: SocketAddr = words.next().unwrap_or_default().parse()?;
                    let chaos = parse_chaos(words.next().unwrap_or_default())?;
                    let info = EdgeInfo::standalone("bench", "target", protocol);
                    let edge = Edge::bind(
                        EdgeConfig {
                            info,
                            target,
                            chaos,
                        },
                        listen,
                        events.clone(),
                    )
                    .await?;
                    let addr = edge.local_addr();
                    edges.push(edge);
                    Ok(format!("{} {addr}", edges.len() - 1))
                }
                "edges" => {
                    let n: usize = words.next().unwrap_or_default().parse()?;
                    let protocol = parse_protocol(words.next().unwrap_or_default())?;
                    let target: SocketAddr = words.next().unwrap_or_default().parse()?;
                    for i in 0..n {
                        let info = EdgeInfo::standalone(&format!("bench{i}"), "target", protocol);
                        let config = EdgeConfig {
                            info,
                            target,
                            chaos: ChaosSpec::default(),
                        };
                        edges.push(Edge::bind(config, listen, events.clone()).await?);
                    }
                    Ok(n.to_string())
                }
                "chaos" => {
                    let id: usize = words.next().unwrap_or_default().parse()?;
                    let rest: Vec<&str> = words.collect();
                    let chaos = parse_chaos(&rest.join(" "))?;
                    let edge = edges.get(id).ok_or_else(|| anyhow!("no edge {id}"))?;
                    Ok(edge.set_chaos(chaos)?.to_string())
                }
                "events" => Ok(format!(
                    "{} {}",
                    drained.events.load(Ordering::Relaxed),
                    drained.lagged.load(Ordering::Relaxed)
                )),
                other => bail!("unknown command {other:?}"),
            }
        }
        .await;
        let out = match answer {
            Ok(a) => format!("ok {a}\n"),
            Err(e) => format!("err {e:#}\n"),
        };
        stdout.write_all(out.as_bytes()).await?;
        stdout.flush().await?;
    }
    for e in edges {
        e.shutdown().await;
    }
    Ok(())
}

/// `upstream`: an HTTP server on `$PORT` (any port when unset) answering every request with
/// [`BODY`], and a tcp echo server on any port. Prints `http ADDR` and `echo ADDR`.
pub async fn upstream() -> Result<()> {
    let port: u16 = match std::env::var("PORT") {
        Ok(p) if !p.is_empty() => p.parse().context("PORT")?,
        _ => 0,
    };
    let http = TcpListener::bind(("127.0.0.1", port)).await?;
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    println!("http {}", http.local_addr()?);
    println!("echo {}", echo.local_addr()?);
    tokio::spawn(serve_echo(echo));
    tokio::spawn(serve_http(http));
    wait_for_term().await;
    Ok(())
}

async fn serve_http(listener: TcpListener) {
    let body = Bytes::from_static(BODY.as_bytes());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: hyper::Request<Incoming>| {
                let body = body.clone();
                async move {
                    let mut resp = hyper::Response::new(Full::new(body));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn serve_echo(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(echo(stream));
    }
}

async fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn wait_for_term() {
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `idle`: wait for SIGTERM or SIGINT, then exit 0.
pub async fn idle() -> Result<()> {
    wait_for_term().await;
    Ok(())
}

/// `client`: measure and print one JSON line of [`Stats`].
pub async fn client(
    http: Option<SocketAddr>,
    echo: Option<SocketAddr>,
    warmup: usize,
    n: usize,
) -> Result<()> {
    let target = match (http, echo) {
        (Some(a), None) => Target::Http(a),
        (None, Some(a)) => Target::Echo(a),
        _ => bail!("give exactly one of --http and --echo"),
    };
    let stats: Stats = measure(target, warmup, n, Duration::from_secs(120)).await?;
    println!("{}", serde_json::to_string(&stats)?);
    Ok(())
}
