//! Starting what a benchmark measures or measures against: the bench binary's own roles (rig
//! edges, the hyper upstream, the latency client), nginx, HAProxy and iperf3.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use crate::client::Stats;
use crate::procs::{self, Cpus, Proc, Spec, WorkDir};

const START: Duration = Duration::from_secs(15);

/// What every benchmark needs: where binaries are, a scratch directory, the run's scale.
#[derive(Debug)]
pub struct Ctx {
    /// This binary, re-executed for its helper roles.
    pub exe: PathBuf,
    /// Where `rigd` and `rig-demo` are.
    pub bin_dir: PathBuf,
    pub work: WorkDir,
    /// Shorter runs, for checking that the benchmark works (figures are not meaningful).
    pub quick: bool,
}

impl Ctx {
    /// A spec re-executing this binary in one of its helper roles.
    pub fn role(&self, name: &str, args: &[&str]) -> Spec {
        Spec::new(name, &self.exe).args(args.iter().copied())
    }

    /// Pick the full or the quick value.
    pub fn scale<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }
}

/// The bench binary as a rig edge server (see `helpers::proxy_server`).
#[derive(Debug)]
pub struct ProxyServer {
    proc: Proc,
}

impl ProxyServer {
    pub async fn start(ctx: &Ctx, name: &str, cpus: Cpus) -> Result<ProxyServer> {
        let spec = ctx.role(name, &["proxy-server"]).pin(cpus).with_stdin();
        Ok(ProxyServer {
            proc: Proc::spawn(spec, &ctx.work)?,
        })
    }

    /// Start an edge forwarding to `target` with `chaos` (JSON of a `ChaosSpec`, "" for none).
    pub async fn edge(
        &mut self,
        protocol: &str,
        target: SocketAddr,
        chaos: &str,
    ) -> Result<SocketAddr> {
        let answer = self
            .proc
            .command(&format!("edge {protocol} {target} {chaos}"), START)
            .await?;
        let addr = answer
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| anyhow!("unexpected answer {answer:?}"))?;
        Ok(addr.parse()?)
    }

    /// Start `n` edges without chaos.
    pub async fn edges(&mut self, n: usize, protocol: &str, target: SocketAddr) -> Result<()> {
        self.proc
            .command(
                &format!("edges {n} {protocol} {target}"),
                Duration::from_secs(60),
            )
            .await
            .map(|_| ())
    }

    /// Events drained so far and events the drainer missed.
    pub async fn events(&mut self) -> Result<(u64, u64)> {
        let a = self.proc.command("events", START).await?;
        let mut w = a.split_whitespace().map(|v| v.parse::<u64>());
        match (w.next(), w.next()) {
            (Some(Ok(e)), Some(Ok(l))) => Ok((e, l)),
            _ => Err(anyhow!("unexpected answer {a:?}")),
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub async fn stop(self) {
        self.proc.stop(Duration::from_secs(5)).await;
    }
}

/// The bench binary as an HTTP + echo upstream (see `helpers::upstream`).
#[derive(Debug)]
pub struct Upstream {
    pub proc: Proc,
    pub http: SocketAddr,
    pub echo: SocketAddr,
}

impl Upstream {
    pub async fn start(ctx: &Ctx, cpus: Cpus) -> Result<Upstream> {
        let mut proc = Proc::spawn(ctx.role("upstream", &["upstream"]).pin(cpus), &ctx.work)?;
        let addr = |line: String, what: &str| -> Result<SocketAddr> {
            line.strip_prefix(what)
                .map(str::trim)
                .ok_or_else(|| anyhow!("upstream said {line:?}"))?
                .parse()
                .map_err(Into::into)
        };
        let http = addr(proc.line(START).await?, "http ")?;
        let echo = addr(proc.line(START).await?, "echo ")?;
        Ok(Upstream { proc, http, echo })
    }

    pub async fn stop(self) {
        self.proc.stop(Duration::from_secs(5)).await;
    }
}

/// A static HTTP server to proxy to: nginx (one worker) when installed, else the bench binary's
/// hyper server.
#[derive(Debug)]
pub struct HttpUpstream {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub what: &'static str,
}

impl HttpUpstream {
    pub async fn start(ctx: &Ctx, name: &str, cpus: Cpus) -> Result<HttpUpstream> {
        if let Some(nginx) = procs::which("nginx") {
            let port = procs::free_port()?;
            let dir = ctx.work.file(name);
            std::fs::create_dir_all(&dir)?;
            let d = dir.display();
            // One process, no master: one pinnable process, as the proxies get one core each.
            let body = crate::helpers::BODY.escape_default();
            let conf = format!(
                r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  default_type text/plain;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path {d};
  proxy_temp_path {d};
  server {{
    listen 127.0.0.1:{port};
    location / {{ return 200 "{body}"; }}
  }}
}}
"#
            );
            let conf_path = dir.join("nginx.conf");
            std::fs::write(&conf_path, conf)?;
            let spec = Spec::new(name, nginx)
                .args([
                    "-p".to_string(),
                    d.to_string(),
                    "-e".into(),
                    format!("{d}/startup.log"),
                ])
                .args(["-c".to_string(), conf_path.display().to_string()])
                .pin(cpus);
            let mut proc = Proc::spawn(spec, &ctx.work)?;
            let addr = procs::local(port);
            proc.wait_port(addr, START)
                .await
                .with_context(|| format!("nginx did not start; see {d}/error.log"))?;
            return Ok(HttpUpstream {
                proc,
                addr,
                what: "nginx",
            });
        }
        let up = Upstream::start(ctx, cpus).await?;
        Ok(HttpUpstream {
            proc: up.proc,
            addr: up.http,
            what: "hyper (bench binary)",
        })
    }

    pub async fn stop(self) {
        self.proc.stop(Duration::from_secs(5)).await;
    }
}

/// HAProxy in front of `target`, `mode` "http" or "tcp", with `threads` threads (None: its
/// default, one per CPU it may use).
pub async fn haproxy(
    ctx: &Ctx,
    name: &str,
    mode: &str,
    target: SocketAddr,
    threads: Option<u32>,
    cpus: Cpus,
) -> Result<(Proc, SocketAddr)> {
    let bin = procs::which("haproxy").ok_or_else(|| anyhow!("haproxy is not installed"))?;
    let port = procs::free_port()?;
    // maxconn sizes HAProxy's fd limit (about twice it), which must fit under the process's.
    let mut conf = String::from("global\n  maxconn 8000\n");
    if let Some(t) = threads {
        let _ = writeln!(conf, "  nbthread {t}");
    }
    let _ = write!(
        conf,
        "defaults\n  mode {mode}\n  timeout connect 5s\n\
         \x20 timeout client 300s\n  timeout server 300s\n"
    );
    if mode == "http" {
        // Keep-alive on both sides, and reuse idle server connections across clients.
        conf.push_str("  option http-keep-alive\n  http-reuse always\n");
    }
    let _ = write!(
        conf,
        "listen fwd\n  bind 127.0.0.1:{port}\n  server s1 {target}\n"
    );
    let path = ctx.work.file(&format!("{name}.cfg"));
    std::fs::write(&path, conf)?;
    let spec = Spec::new(name, bin)
        .args(["-db".to_string(), "-f".into(), path.display().to_string()])
        .pin(cpus);
    let mut proc = Proc::spawn(spec, &ctx.work)?;
    let addr = procs::local(port);
    proc.wait_port(addr, START).await?;
    Ok((proc, addr))
}

/// Run the bench binary's latency client pinned to `cpus`.
pub async fn latency_client(
    ctx: &Ctx,
    name: &str,
    target: (&str, SocketAddr),
    warmup: usize,
    n: usize,
    cpus: Cpus,
) -> Result<Stats> {
    let spec = ctx
        .role(name, &["client", target.0, &target.1.to_string()])
        .args([
            "--warmup".to_string(),
            warmup.to_string(),
            "-n".into(),
            n.to_string(),
        ])
        .pin(cpus);
    let proc = Proc::spawn(spec, &ctx.work)?;
    let out = proc.wait_output(Duration::from_secs(180)).await?;
    let last = out
        .last()
        .ok_or_else(|| anyhow!("{name} printed nothing"))?;
    serde_json::from_str(last).with_context(|| format!("{name} printed {last:?}"))
}
