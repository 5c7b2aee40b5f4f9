//! rigd: the control plane daemon.
//!
//! [`start`] binds one loopback address and serves on it both the `rig.v1` gRPC API (plus
//! `grpc.health.v1` and server reflection) and plain HTTP: `/metrics` (Prometheus text),
//! `/healthz` and `/events` (Server-Sent Events). Environments live in [`crate::registry`]; the gRPC
//! services in [`grpc`]; the HTTP endpoints and the token check in [`http`].

pub mod grpc;
pub mod guard;
pub mod http;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::serve::ListenerExt;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rig_proxy::EventSender;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::client::DaemonAddr;
use crate::eventlog::EventLog;
use crate::presets::{self, Preset};
use crate::registry::runtime::LocalProcesses;
use crate::registry::{Deps, Registry, spawn_event_pump};
use crate::secret::Secret;

/// The default address rigd listens on and rigctl calls (one constant, in [`crate::client`]).
pub use crate::client::DEFAULT_ADDR;

/// How rigd is configured (flags and environment variables of the `rigd` binary).
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where to serve gRPC and HTTP. Non-loopback addresses need a token.
    pub listen: SocketAddr,
    /// When set, every call must carry `authorization: Bearer <token>`.
    pub token: Option<Secret>,
    /// Where rigd keeps its records of child processes (for the orphan sweep) and its log.
    pub state_dir: PathBuf,
    /// Extra presets (`*.toml`) beside the built-in ones; a file named like a built-in wins.
    pub presets_dir: Option<PathBuf>,
    /// How many events the log keeps for replay (`Watch` from a sequence number, SSE
    /// `Last-Event-ID`). About 1 KiB each.
    pub events_retained: usize,
}

/// The default of [`DaemonConfig::events_retained`].
pub const DEFAULT_EVENTS_RETAINED: usize = 20_000;

impl DaemonConfig {
    /// `RIG_ADDR` or 127.0.0.1:7447, `RIG_TOKEN`, and the default state directory.
    pub fn local_default() -> DaemonConfig {
        let listen = std::env::var("RIG_ADDR")
            .ok()
            .and_then(|a| parse_addr(&a).ok())
            .unwrap_or_else(|| DEFAULT_ADDR.parse().expect("valid default address"));
        DaemonConfig {
            listen,
            token: std::env::var("RIG_TOKEN").ok().and_then(Secret::non_empty),
            state_dir: default_state_dir(),
            presets_dir: None,
            events_retained: DEFAULT_EVENTS_RETAINED,
        }
    }
}

/// Where rigd listens: `host:port` or `http://host:port` as rigctl's `--addr` takes it (one
/// parser, [`DaemonAddr`]), where the host is an IP address or `localhost`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let addr: DaemonAddr = s
        .parse()
        .map_err(|e: crate::client::ClientError| e.to_string())?;
    addr.socket_addr().ok_or_else(|| {
        format!(
            "invalid address {s:?}: rigd listens on an IP address or localhost (e.g. 127.0.0.1:7447), not on {:?}",
            addr.host()
        )
    })
}

/// `$XDG_RUNTIME_DIR/rig`, or `/tmp/rig-$UID`.
pub fn default_state_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("rig"),
        _ => std::env::temp_dir().join(format!("rig-{}", nix::unistd::getuid())),
    }
}

/// Why rigd could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "refusing to listen on {0}: it is not a loopback address; set RIG_TOKEN (or --token) so callers must authenticate"
    )]
    InsecureListen(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("presets: {0}")]
    Presets(String),
}

/// State shared by the gRPC services, the HTTP endpoints and the environments.
#[derive(Debug)]
pub struct Shared {
    pub envs: Registry,
    pub log: Arc<EventLog>,
    pub proxy_events: EventSender,
    pub presets: Vec<Preset>,
    pub prometheus: PrometheusHandle,
    pub token: Option<Secret>,
    pub state_dir: PathBuf,
    pub shutdown: CancellationToken,
}

/// A running rigd.
#[derive(Debug)]
pub struct DaemonHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl DaemonHandle {
    /// The address rigd serves on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// State, for in-process use and tests.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Bring every environment down, then stop serving.
    pub async fn shutdown(self) {
        self.shared.envs.down_all().await;
        self.shared.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
    }
}

fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0,
                    ],
                )
                .expect("non-empty bucket list");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (embedding programs, tests); rigd then
            // still renders its own view.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            rig_proxy::metrics::describe();
            describe_control_metrics();
            handle
        })
        .clone()
}

fn describe_control_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!("rig_environments", "Environments running in this rigd");
    describe_gauge!("rig_service_up", "1 while a service's process runs, else 0");
    describe_gauge!(
        "rig_service_ready",
        "1 once a service passed its readiness check"
    );
    describe_counter!(
        "rig_chaos_changes_total",
        "Chaos policy changes applied to edges"
    );
    describe_counter!("rig_events_total", "Events logged by rigd");
    describe_counter!(
        "rig_events_evicted_total",
        "Events dropped from the log's replay to keep it under its byte budget"
    );
    describe_counter!(
        "rig_service_log_lines_dropped_total",
        "Service output lines rigd dropped: over the per-service rate (reason=rate) or with the log queue full (reason=queue_full)"
    );
    describe_counter!(
        "rig_service_exits_total",
        "Services that exited while their environment was up"
    );
}

/// Start rigd: check the configuration, sweep orphans of a previous rigd, bind, and serve.
pub async fn start(cfg: DaemonConfig) -> Result<DaemonHandle, DaemonError> {
    match rig_proxy::limits::raise_nofile_limit() {
        Ok((soft, _)) => tracing::info!("connection budget: {soft} file descriptors"),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    if !cfg.listen.ip().is_loopback() && cfg.token.is_none() {
        return Err(DaemonError::InsecureListen(cfg.listen));
    }
    let children_dir = cfg.state_dir.join("children");
    let swept = crate::supervisor::init(&children_dir).map_err(|source| DaemonError::StateDir {
        path: children_dir.clone(),
        source,
    })?;
    if swept > 0 {
        tracing::warn!(swept, "killed process groups left by a previous rigd");
    }
    let protection =
        crate::supervisor::protect(&children_dir, &crate::supervisor::CgroupChoice::from_env());
    tracing::info!("orphan protection: {protection}");

    let mut all_presets = presets::builtin();
    if let Some(dir) = &cfg.presets_dir {
        let extra = presets::load_dir(dir).map_err(|e| DaemonError::Presets(e.to_string()))?;
        for p in extra {
            all_presets.retain(|b| b.name != p.name);
            all_presets.push(p);
        }
        all_presets.sort_by(|a, b| a.name.cmp(&b.name));
    }

    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| DaemonError::Bind {
        addr: cfg.listen,
        source,
    })?;

    let log = Arc::new(EventLog::new(
        cfg.events_retained,
        crate::eventlog::DEFAULT_EVENTS_BUDGET,
        65_536,
    ));
    let proxy_events = EventSender::new(65_536);
    let deps = Deps {
        log: log.clone(),
        proxy_events: proxy_events.clone(),
        runtime: Arc::new(LocalProcesses {
            children_dir: children_dir.clone(),
        }),
    };
    let shared = Arc::new(Shared {
        envs: Registry::new(deps.clone()),
        log,
        proxy_events,
        presets: all_presets,
        prometheus: prometheus(),
        token: cfg.token.clone(),
        state_dir: cfg.state_dir.clone(),
        shutdown: CancellationToken::new(),
    });
    // Registered at once (adding 0 keeps another in-process rigd's count): /metrics is never empty.
    metrics::gauge!("rig_environments").increment(0.0);
    spawn_event_pump(&deps, shared.shutdown.clone());
    spawn_metrics_upkeep(&shared);

    let app = http::router(shared.clone()).layer(axum::middleware::from_fn_with_state(
        guard::Guard {
            listen: addr,
            shared: shared.clone(),
        },
        guard::guard,
    ));
    let shutdown = shared.shutdown.clone();
    let server = tokio::spawn(async move {
        // Small gRPC answers go out at once instead of waiting on Nagle.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let serve = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "rigd server stopped");
        }
    });
    tracing::info!(%addr, token = cfg.token.is_some(), "rigd listening");
    Ok(DaemonHandle {
        addr,
        shared,
        server,
    })
}

/// How often rigd hands the memory it has freed back to the system ([`return_freed_memory`]).
const MEMORY_TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Histograms accumulate samples until a scrape drains them; drain them on a timer too, so a
/// rigd nobody scrapes does not grow. On the same timer, memory freed after a burst (of
/// connections, of events) goes back to the system.
fn spawn_metrics_upkeep(shared: &Arc<Shared>) {
    let handle = shared.prometheus.clone();
    let stop = shared.shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut trim = tokio::time::interval(MEMORY_TRIM_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => handle.run_upkeep(),
                _ = trim.tick() => {
                    let _ = tokio::task::spawn_blocking(return_freed_memory).await;
                }
            }
        }
    });
}

/// glibc's allocator keeps the pages a burst of connections freed, for reuse, so rigd's RSS
/// stayed at its peak after the burst (measured: 14 MiB idle, 65 MiB with 10,000 connections
/// open, still 65 MiB after they closed). `malloc_trim(0)` returns the free pages at the top of
/// every arena; it costs well under a millisecond on an idle heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn return_freed_memory() {
    // SAFETY: malloc_trim takes no pointers and is thread-safe (it locks each arena).
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_freed_memory() {}

/// The `rigd` binary's body: start, wait for SIGINT or SIGTERM, bring everything down.
pub async fn run(cfg: DaemonConfig) -> Result<(), DaemonError> {
    let handle = start(cfg).await?;
    // The line scripts and rigctl's autostart wait for.
    println!("rigd listening on {}", handle.local_addr());
    wait_for_signal().await;
    tracing::info!("shutting down: bringing environments down");
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_are_parsed_as_rigctl_parses_them() {
        let ok = |s: &str| parse_addr(s).unwrap().to_string();
        assert_eq!(ok("127.0.0.1:7447"), "127.0.0.1:7447");
        assert_eq!(ok(" http://localhost:7447/ "), "127.0.0.1:7447");
        assert_eq!(ok("[::1]:9"), "[::1]:9");
        assert_eq!(ok(DEFAULT_ADDR), DEFAULT_ADDR);
        let e = parse_addr("example.com:80").unwrap_err();
        assert!(
            e.contains("IP address or localhost") && e.contains("example.com"),
            "{e}"
        );
        let e = parse_addr("127.0.0.1").unwrap_err();
        assert!(e.contains("expected host:port"), "{e}");
        let e = parse_addr("https://127.0.0.1:1").unwrap_err();
        assert!(e.contains("unsupported scheme"), "{e}");
    }
}
