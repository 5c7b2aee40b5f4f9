//! `rigctl demo`: bring up the demo environment and walk through live traffic, a preset, the
//! metrics and clearing, then stay in the foreground like `rigctl up`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use rig_proto::v1 as pb;

use super::up::{self, Autostart, Interrupts, Session};
use super::{
    GlobalArgs, Tally, emit, metrics_lines, now_unix, render_chaos, render_status, rpc,
    tcp_edge_counters,
};
use crate::client::{Client, DaemonAddr, root_cause};

/// The edge the tour makes flaky, when the spec has it.
const DEMO_EDGE: &str = "web/catalog";
const DEMO_PRESET: &str = "flaky";
const METRICS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Debug, Clone, PartialEq)]
pub struct DemoArgs {
    /// The demo spec (default: specs/demo.toml here, or in the repository rigctl was built in)
    #[arg(long, value_name = "PATH")]
    pub spec: Option<PathBuf>,
    /// How long each step watches traffic
    #[arg(long, value_name = "D", default_value = "5s", value_parser = humantime::parse_duration)]
    pub step: Duration,
}

/// The demo spec: `explicit` if given, else `<cwd>/specs/demo.toml`, else
/// `<exe dir>/../../specs/demo.toml` (the repository, for a binary in target/release).
pub fn find_demo_spec(
    explicit: Option<&Path>,
    cwd: &Path,
    exe: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("cannot read {}: no such file", p.display());
    }
    let mut tried = vec![cwd.join("specs").join("demo.toml")];
    if let Some(dir) = exe.and_then(Path::parent) {
        tried.push(dir.join("../../specs/demo.toml"));
    }
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let list = tried
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    bail!("cannot find the demo spec (looked at {list}); pass --spec PATH")
}

fn headline(n: u32, text: &str) -> anyhow::Result<()> {
    emit(&format!("\n── {n}/5  {text}"))
}

/// Tally the traffic on every edge of `env` for `dur`: requests from the events of http and
/// grpc edges; connections and bytes of tcp edges (which carry no requests) from their counters
/// in `/metrics` before and after the same window.
async fn watch_tally(
    g: &GlobalArgs,
    client: &Client,
    env: &str,
    dur: Duration,
) -> anyhow::Result<Tally> {
    let req = pb::WatchRequest {
        after_seq: 0,
        only_new: true,
        follow: true,
        types: vec!["request.completed".into(), "request.failed".into()],
        env: env.to_string(),
        service: String::new(),
        edge: String::new(),
    };
    let mut stream = client
        .events()
        .watch(req)
        .await
        .map_err(|s| rpc(client, s))?
        .into_inner();
    // After the watch is open, so the window the counters cover is the events' window.
    let before = tcp_edge_counters(&fetch_metrics(client.addr(), g.token()).await?, env);
    let mut tally = Tally::new();
    let deadline = tokio::time::Instant::now() + dur;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_elapsed) => break,
            Ok(Ok(Some(ev))) => tally.record(&ev),
            Ok(Ok(None)) => break,
            Ok(Err(s)) => return Err(rpc(client, s)),
        }
    }
    let after = tcp_edge_counters(&fetch_metrics(client.addr(), g.token()).await?, env);
    tally.set_tcp(
        after
            .iter()
            .map(|(edge, now)| {
                let then = before.get(edge).copied().unwrap_or_default();
                (edge.clone(), now.since(&then))
            })
            .collect(),
    );
    Ok(tally)
}

/// GET `http://<addr>/metrics` with a plain HTTP/1 client.
async fn fetch_metrics(addr: &DaemonAddr, token: Option<&str>) -> anyhow::Result<String> {
    use hyper::body::Body as _;
    use hyper_util::client::legacy::Client as HttpClient;
    use hyper_util::rt::TokioExecutor;

    let url = format!("{}/metrics", addr.http_base());
    let mut req = http::Request::get(&url);
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(String::new())
        .with_context(|| format!("cannot build a request for {url}"))?;
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<String>();
    let fetch = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| anyhow!("cannot fetch {url}: {}", root_cause(&e)))?;
        if !resp.status().is_success() {
            bail!("{url} answered {}", resp.status());
        }
        let mut body = resp.into_body();
        let mut bytes = Vec::new();
        while let Some(frame) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.map_err(|e| anyhow!("cannot read {url}: {}", root_cause(&e)))?;
            if let Ok(data) = frame.into_data() {
                bytes.extend_from_slice(&data);
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    tokio::time::timeout(METRICS_TIMEOUT, fetch)
        .await
        .map_err(|_| anyhow!("{url} did not answer within {}s", METRICS_TIMEOUT.as_secs()))?
}

/// The edge to make flaky: `web/catalog`, else the first http or grpc edge.
fn demo_edge(env: &pb::EnvironmentStatus) -> Option<String> {
    env.edges
        .iter()
        .find(|e| e.edge == DEMO_EDGE)
        .or_else(|| {
            env.edges
                .iter()
                .find(|e| e.protocol == "http" || e.protocol == "grpc")
        })
        .map(|e| e.edge.clone())
}

/// The tour's steps 1–4, between `up` and following logs.
async fn tour(
    g: &GlobalArgs,
    client: &Client,
    env: &pb::EnvironmentStatus,
    step: Duration,
) -> anyhow::Result<()> {
    let secs = step.as_secs_f64();
    headline(
        1,
        &format!("live traffic: every request through every edge for {secs:.0}s"),
    )?;
    emit(&watch_tally(g, client, &env.name, step).await?.render())?;

    let edge = demo_edge(env).ok_or_else(|| anyhow!("the demo needs an http or grpc edge"))?;
    let selector = pb::EdgeSelector {
        env: env.name.clone(),
        edges: vec![edge.clone()],
        to: String::new(),
    };
    headline(
        2,
        &format!("chaos: preset `{DEMO_PRESET}` on {edge}, live, no restart"),
    )?;
    let applied = client
        .chaos()
        .apply_preset(pb::ApplyPresetRequest {
            selector: Some(selector.clone()),
            preset: DEMO_PRESET.to_string(),
        })
        .await
        .map_err(|s| rpc(client, s))?
        .into_inner();
    emit(&render_chaos(&applied))?;
    if let Some(v) = applied.edges.first().map(|e| e.version) {
        emit(&format!(
            "version {v} is in force; watching {secs:.0}s of traffic again"
        ))?;
    }
    emit(&watch_tally(g, client, &env.name, step).await?.render())?;

    headline(3, "metrics: rigd serves Prometheus metrics per edge")?;
    let scrape = fetch_metrics(client.addr(), g.token()).await?;
    let lines = metrics_lines(&scrape, &env.name);
    if lines.is_empty() {
        emit(&format!("(no request metrics for {} yet)", env.name))?;
    } else {
        emit(&lines.join("\n"))?;
    }

    headline(4, &format!("clear: {edge} back to no chaos"))?;
    let cleared = client
        .chaos()
        .clear(pb::ClearChaosRequest {
            selector: Some(selector),
        })
        .await
        .map_err(|s| rpc(client, s))?
        .into_inner();
    emit(&render_chaos(&cleared))?;

    headline(5, "your turn")?;
    emit(&format!(
        "the demo environment is still running: try `rigctl chaos set {edge} --latency 300ms`, \
         `rigctl events --follow`, `curl {}/metrics`; Ctrl-C stops it",
        client.addr().http_base()
    ))?;
    Ok(())
}

/// `rigctl demo`: up (starting rigd in-process if none runs), the tour, then follow logs until
/// Ctrl-C brings the environment down.
pub async fn demo(g: &GlobalArgs, args: &DemoArgs) -> anyhow::Result<()> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let exe = std::env::current_exe().ok();
    let spec = find_demo_spec(args.spec.as_deref(), &cwd, exe.as_deref())?;
    let req = up::up_request(&spec)?;
    let mut interrupts = Interrupts::new()?;
    let session: Session = up::connect_or_start(g, Autostart::Embedded).await?;
    let (session, env) = up::bring_up(session, req, false, &mut interrupts).await?;
    emit(&format!("\n{}", render_status(&env)))?;

    let client = session.client.clone();
    let toured = tokio::select! {
        r = tour(g, &client, &env, args.step) => Some(r),
        _ = interrupts.next() => None,
    };
    match toured {
        Some(Ok(())) => {}
        // Stop what the tour started before reporting why it failed, as on Ctrl-C.
        Some(Err(e)) => {
            let _ = client
                .environments()
                .down(pb::DownRequest {
                    env: env.name.clone(),
                })
                .await;
            session.shutdown().await;
            return Err(e);
        }
        None => {
            eprintln!("stopping {}…", env.name);
            let down = interrupts
                .or_exit(client.environments().down(pb::DownRequest {
                    env: env.name.clone(),
                }))
                .await;
            interrupts.or_exit(session.shutdown()).await;
            down.map_err(|s| rpc(&client, s))?;
            return Ok(());
        }
    }
    // Only lines from now on: the tour's minutes of logs would bury its last message.
    let since = now_unix();
    up::follow_foreground(g, session, &env, since, &mut interrupts).await
}
