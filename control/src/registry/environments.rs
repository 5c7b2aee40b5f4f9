//! Environments: bring a spec's services up in dependency order behind one proxy per edge,
//! watch them, change their chaos, bring them down. Speaks domain types only
//! ([`super::view`], [`RegistryError`]); the transports map them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use rig_proxy::events::EventSender;
use rig_proxy::policy::{ChaosSpec, PolicyError, Protocol};
use rig_proxy::{Edge, EdgeConfig, EdgeInfo, ProxyEvent};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::RegistryError;
use super::runtime::{Launch, Runtime, ServiceRuntime};
use super::view::{
    EdgeChaos, EdgeView, EnvState, EnvView, IngressView, Selector, ServiceState, ServiceView,
    SpecSource, UpStep,
};
use super::wiring;
use crate::eventlog::{EventLog, NewEvent};
use crate::events::EventData;
use crate::probe::wait_ready;
use crate::spec::{self, Readiness, Spec, derive_seed};
use crate::supervisor::{LOG_QUEUE_LINES, LogLine, LogOutput};

/// What the registry needs from the daemon around it.
#[derive(Debug, Clone)]
pub struct Deps {
    /// Where life-cycle, log and chaos events go.
    pub log: Arc<EventLog>,
    /// Where the edges' proxies send their events.
    pub proxy_events: EventSender,
    /// How services run.
    pub runtime: Arc<dyn Runtime>,
}

/// The running environments, by name.
#[derive(Debug)]
pub struct Registry {
    deps: Deps,
    envs: tokio::sync::Mutex<BTreeMap<String, Arc<Env>>>,
}

/// One running environment.
#[derive(Debug)]
pub struct Env {
    pub name: String,
    pub origin: String,
    pub seed: Option<u64>,
    pub started_at: SystemTime,
    state: Mutex<EnvState>,
    log: Arc<EventLog>,
    /// Services in start order.
    services: Vec<Arc<ServiceRt>>,
    order: Vec<Vec<String>>,
    edges: BTreeMap<String, EdgeRt>,
    cancel: CancellationToken,
}

#[derive(Debug)]
struct ServiceRt {
    name: String,
    /// What to run (the result of wiring).
    launch: Launch,
    ingresses: Vec<(String, Protocol, SocketAddr, Readiness)>,
    /// The running service, once started.
    runtime: Mutex<Option<Arc<dyn ServiceRuntime>>>,
    state: Mutex<ServiceState>,
    exit: Mutex<Option<String>>,
}

#[derive(Debug)]
struct EdgeRt {
    name: String,
    source: String,
    egress: String,
    target: String,
    ingress: String,
    protocol: Protocol,
    target_addr: SocketAddr,
    /// The address the source is told to use: the proxy's, or the target's when not observed.
    wired_addr: SocketAddr,
    proxy: Option<Edge>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forward proxy events into the event log, until `stop`.
pub fn spawn_event_pump(deps: &Deps, stop: CancellationToken) {
    let mut rx = deps.proxy_events.subscribe();
    let log = deps.log.clone();
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.recv() => r,
            };
            match ev {
                Ok(ev) => {
                    log.publish(proxy_event(&ev));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    log.publish(NewEvent::service(
                        "",
                        "",
                        EventData::EventsLagged {
                            missed: n,
                            resume_after: None,
                        },
                    ));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

fn proxy_event(ev: &ProxyEvent) -> NewEvent {
    NewEvent {
        env: ev.edge.env.clone(),
        service: ev.edge.source.clone(),
        edge: ev.edge.edge.clone(),
        data: EventData::from(ev),
    }
}

/// Where an `up` reports progress.
pub type Progress = mpsc::Sender<UpStep>;

async fn report(
    progress: &Progress,
    env: &str,
    service: &str,
    state: &'static str,
    message: String,
) {
    let _ = progress
        .send(UpStep {
            env: env.into(),
            service: service.into(),
            state,
            message,
            last_logs: Vec::new(),
            environment: None,
        })
        .await;
}

fn publish(log: &EventLog, env: &str, service: &str, data: EventData) {
    log.publish(NewEvent::service(env, service, data));
}

/// "1 edge proxy listening", "3 edge proxies listening".
fn proxies_listening(n: usize) -> String {
    let noun = if n == 1 { "proxy" } else { "proxies" };
    format!("{n} edge {noun} listening")
}

async fn free_port() -> std::io::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0").await
}

impl Registry {
    pub fn new(deps: Deps) -> Registry {
        Registry {
            deps,
            envs: tokio::sync::Mutex::default(),
        }
    }

    /// Bring a spec up. Progress goes to `progress`; on error everything started is stopped
    /// again before this returns.
    pub async fn up(&self, src: SpecSource, progress: Progress) -> Result<Arc<Env>, RegistryError> {
        let origin = src.origin.as_str();
        let base_dir = src.base_dir.as_path();
        // Relative `cwd`s resolve against the spec file's directory, as `spec::load` does.
        let spec = spec::parse_in_dir(&src.text, src.format, origin, base_dir)?;
        spec::check_ports(&spec)?;

        // Claim the name first, so two concurrent `up`s of one name cannot both start.
        let claim = CancellationToken::new();
        {
            let mut envs = self.envs.lock().await;
            if envs.contains_key(&spec.name) {
                return Err(RegistryError::AlreadyRunning(spec.name.clone()));
            }
            envs.insert(
                spec.name.clone(),
                Arc::new(placeholder(&spec, origin, &self.deps, claim.clone())),
            );
        }
        let result = self.start(&spec, origin, base_dir, &progress, claim).await;
        let mut envs = self.envs.lock().await;
        match result {
            Ok(env) => {
                envs.insert(spec.name.clone(), env.clone());
                metrics::gauge!("rig_environments").set(envs.len() as f64);
                Ok(env)
            }
            Err(e) => {
                envs.remove(&spec.name);
                Err(e)
            }
        }
    }

    /// The bring-up, in its phases: allocate addresses, start the edge proxies, wire each
    /// service, launch level by level (each waiting for readiness), then watch.
    async fn start(
        &self,
        spec: &Spec,
        origin: &str,
        base_dir: &Path,
        progress: &Progress,
        cancel: CancellationToken,
    ) -> Result<Arc<Env>, RegistryError> {
        let deps = &self.deps;
        let (mut held, addrs) = allocate(spec).await?;
        let edges = start_proxies(deps, spec, &addrs).await?;
        let observed = edges.values().filter(|e| e.proxy.is_some()).count();
        report(
            progress,
            &spec.name,
            "",
            "proxies-ready",
            proxies_listening(observed),
        )
        .await;
        let services = wire(spec, &addrs, &edges, base_dir)?;
        let env = Arc::new(Env {
            services,
            order: spec.order.clone(),
            edges,
            ..placeholder(spec, origin, deps, cancel)
        });
        if let Err(e) = launch(deps, &env, &mut held, progress).await {
            *lock(&env.state) = EnvState::Stopping;
            stop_env(&env).await;
            let reason = match &e {
                RegistryError::ServiceFailed { message, .. } => message.clone(),
                e => e.to_string(),
            };
            publish(
                &deps.log,
                &env.name,
                "",
                EventData::EnvironmentDown {
                    reason: Some(reason),
                    stopped: None,
                },
            );
            return Err(e);
        }
        *lock(&env.state) = EnvState::Up;
        watch(&env);
        publish(
            &deps.log,
            &env.name,
            "",
            EventData::EnvironmentUp {
                origin: origin.to_string(),
                services: env.services.len() as u64,
                edges: env.edges.len() as u64,
            },
        );
        let _ = progress
            .send(UpStep {
                env: env.name.clone(),
                service: String::new(),
                state: "up",
                message: format!("{} is up", env.name),
                last_logs: Vec::new(),
                environment: Some(env.status()),
            })
            .await;
        Ok(env)
    }

    /// Bring an environment down; `name` empty means the only one.
    pub async fn down(&self, name: &str) -> Result<(String, Vec<String>), RegistryError> {
        let env = {
            let mut envs = self.envs.lock().await;
            let name = resolve_name(&envs, name)?;
            // A placeholder: its `up` is still running and will finish or undo it.
            if envs[&name].services.is_empty() && *lock(&envs[&name].state) == EnvState::Starting {
                return Err(RegistryError::StillStarting(name));
            }
            let env = envs.remove(&name).expect("resolved name exists");
            metrics::gauge!("rig_environments").set(envs.len() as f64);
            env
        };
        *lock(&env.state) = EnvState::Stopping;
        let stopped = stop_env(&env).await;
        publish(
            &self.deps.log,
            &env.name,
            "",
            EventData::EnvironmentDown {
                reason: None,
                stopped: Some(stopped.clone()),
            },
        );
        Ok((env.name.clone(), stopped))
    }

    /// Bring every environment down (rigd shutting down).
    pub async fn down_all(&self) {
        let names: Vec<String> = self.envs.lock().await.keys().cloned().collect();
        for n in names {
            let _ = self.down(&n).await;
        }
    }

    pub async fn list(&self) -> Vec<Arc<Env>> {
        self.envs.lock().await.values().cloned().collect()
    }

    /// One environment; `name` empty means the only one.
    pub async fn get(&self, name: &str) -> Result<Arc<Env>, RegistryError> {
        let envs = self.envs.lock().await;
        let name = resolve_name(&envs, name)?;
        Ok(envs[&name].clone())
    }
}

/// Ports listening for ingresses, held until their service starts (so that no other process
/// takes them meanwhile), by (service, ingress).
type Held = HashMap<(String, String), TcpListener>;
/// The address of every ingress, by (service, ingress).
type IngressAddrs = HashMap<(String, String), SocketAddr>;

/// Phase 1: every ingress gets its address (a fixed port, or a free one held open).
async fn allocate(spec: &Spec) -> Result<(Held, IngressAddrs), RegistryError> {
    let mut held = Held::new();
    let mut addrs = IngressAddrs::new();
    for svc in spec.services.values() {
        for ing in svc.ingresses.values() {
            let key = (svc.name.clone(), ing.name.clone());
            let addr = match ing.port {
                Some(p) => SocketAddr::from(([127, 0, 0, 1], p)),
                None => {
                    let port_error = |source| RegistryError::Port {
                        what: "port",
                        source,
                    };
                    let l = free_port().await.map_err(port_error)?;
                    let a = l.local_addr().map_err(port_error)?;
                    held.insert(key.clone(), l);
                    a
                }
            };
            addrs.insert(key, addr);
        }
    }
    Ok((held, addrs))
}

/// Phase 2: every observed edge gets a proxy listening on a free port.
async fn start_proxies(
    deps: &Deps,
    spec: &Spec,
    addrs: &IngressAddrs,
) -> Result<BTreeMap<String, EdgeRt>, RegistryError> {
    let mut edges = BTreeMap::new();
    for (svc, eg) in spec.edges() {
        let edge_name = format!("{}/{}", svc.name, eg.name);
        let target_addr = addrs[&(eg.service.clone(), eg.ingress.clone())];
        let (proxy, wired_addr) = if eg.observe {
            let listener = free_port().await.map_err(|source| RegistryError::Port {
                what: "proxy port",
                source,
            })?;
            let info = EdgeInfo {
                env: spec.name.clone(),
                edge: edge_name.clone(),
                source: svc.name.clone(),
                egress: eg.name.clone(),
                target: eg.service.clone(),
                ingress: eg.ingress.clone(),
                protocol: eg.protocol,
            };
            let config = EdgeConfig {
                info,
                target: target_addr,
                chaos: eg.chaos.clone(),
            };
            let edge = Edge::start(config, listener, deps.proxy_events.clone()).map_err(|e| {
                RegistryError::Edge {
                    edge: edge_name.clone(),
                    message: e.to_string(),
                }
            })?;
            let a = edge.local_addr();
            (Some(edge), a)
        } else {
            (None, target_addr)
        };
        edges.insert(
            edge_name.clone(),
            EdgeRt {
                name: edge_name,
                source: svc.name.clone(),
                egress: eg.name.clone(),
                target: eg.service.clone(),
                ingress: eg.ingress.clone(),
                protocol: eg.protocol,
                target_addr,
                wired_addr,
                proxy,
            },
        );
    }
    Ok(edges)
}

/// Phase 3: each service's environment, command and working directory ([`wiring`], pure), in
/// start order.
fn wire(
    spec: &Spec,
    addrs: &IngressAddrs,
    edges: &BTreeMap<String, EdgeRt>,
    base_dir: &Path,
) -> Result<Vec<Arc<ServiceRt>>, RegistryError> {
    let wired = wiring::Addresses {
        ingresses: addrs.clone(),
        edges: edges
            .values()
            .map(|e| {
                let w = wiring::WiredEdge {
                    addr: e.wired_addr,
                    target: e.target_addr,
                    observed: e.proxy.is_some(),
                };
                (e.name.clone(), w)
            })
            .collect(),
    };
    let mut services = Vec::new();
    for name in spec.order.iter().flatten() {
        let svc = &spec.services[name];
        let wiring::ServiceLaunch { env, command, cwd } =
            wiring::service_env(spec, svc, &wired, base_dir, |k| std::env::var(k).ok())?;
        let ingresses = svc
            .ingresses
            .values()
            .map(|ing| {
                let addr = addrs[&(svc.name.clone(), ing.name.clone())];
                (ing.name.clone(), ing.protocol, addr, ing.ready.clone())
            })
            .collect();
        services.push(Arc::new(ServiceRt {
            launch: Launch {
                service: svc.name.clone(),
                command,
                cwd,
                env,
                stop_grace: svc.stop_grace,
            },
            name: svc.name.clone(),
            ingresses,
            runtime: Mutex::new(None),
            state: Mutex::new(ServiceState::Pending),
            exit: Mutex::new(None),
        }));
    }
    Ok(services)
}

/// Phase 4: start level by level, the services of one level in parallel, each released from
/// its held ports just before it starts and waited for until ready. The logs of every service
/// become `service.log` events.
async fn launch(
    deps: &Deps,
    env: &Arc<Env>,
    held: &mut Held,
    progress: &Progress,
) -> Result<(), RegistryError> {
    let log_tx = spawn_log_pump(deps, &env.name);
    for level in &env.order {
        let mut starts = Vec::new();
        for name in level {
            let Some(svc) = env.services.iter().find(|s| &s.name == name).cloned() else {
                continue;
            };
            for (ing, ..) in &svc.ingresses {
                held.remove(&(svc.name.clone(), ing.clone()));
            }
            let deps = deps.clone();
            let env_name = env.name.clone();
            let progress = progress.clone();
            let log_tx = log_tx.clone();
            starts.push(tokio::spawn(async move {
                start_service(&deps, &env_name, &svc, &progress, log_tx).await
            }));
        }
        let mut failure = None;
        for s in starts {
            let r = s
                .await
                .unwrap_or_else(|e| Err(RegistryError::Task(e.to_string())));
            if let Err(e) = r {
                failure = failure.or(Some(e));
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
    }
    Ok(())
}

/// The task that turns the lines of an environment's services into `service.log` events; its
/// channel holds at most [`LOG_QUEUE_LINES`] (the supervisor drops and counts the rest).
fn spawn_log_pump(deps: &Deps, env_name: &str) -> mpsc::Sender<LogLine> {
    let (log_tx, mut log_rx) = mpsc::channel::<LogLine>(LOG_QUEUE_LINES);
    let log = deps.log.clone();
    let env_name = env_name.to_string();
    tokio::spawn(async move {
        while let Some(line) = log_rx.recv().await {
            let stream = format!("{:?}", line.stream).to_ascii_lowercase();
            log.publish(NewEvent::service(
                &env_name,
                &line.service,
                EventData::ServiceLog {
                    stream,
                    line: line.line,
                },
            ));
        }
    });
    log_tx
}

/// Phase 5: watch every service for an exit of its own: the service is `exited`, the
/// environment `degraded`, and an event says how it ended with its last lines.
fn watch(env: &Arc<Env>) {
    for svc in &env.services {
        let Some(rt) = lock(&svc.runtime).clone() else {
            continue;
        };
        let svc = svc.clone();
        let env = env.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = env.cancel.cancelled() => {}
                why = rt.wait_exit() => {
                    if env.cancel.is_cancelled() {
                        return;
                    }
                    *lock(&svc.state) = ServiceState::Exited;
                    *lock(&svc.exit) = Some(why.clone());
                    *lock(&env.state) = EnvState::Degraded;
                    let labels = [("env", env.name.clone()), ("service", svc.name.clone())];
                    metrics::gauge!("rig_service_up", &labels).set(0.0);
                    metrics::gauge!("rig_service_ready", &labels).set(0.0);
                    metrics::counter!("rig_service_exits_total", &labels).increment(1);
                    let logs = rt.recent_logs();
                    let last = logs[logs.len().saturating_sub(10)..].to_vec();
                    let data = EventData::ServiceFailed { reason: None, exit: Some(why), last_logs: last };
                    publish(&env.log, &env.name, &svc.name, data);
                }
            }
        });
    }
}

fn resolve_name(envs: &BTreeMap<String, Arc<Env>>, name: &str) -> Result<String, RegistryError> {
    if !name.is_empty() {
        if envs.contains_key(name) {
            return Ok(name.to_string());
        }
        return Err(RegistryError::NoSuchEnvironment {
            name: name.to_string(),
            running: envs.keys().cloned().collect(),
        });
    }
    match envs.len() {
        0 => Err(RegistryError::NoEnvironment),
        1 => Ok(envs.keys().next().cloned().unwrap_or_default()),
        _ => Err(RegistryError::Ambiguous(envs.keys().cloned().collect())),
    }
}

/// An environment with no services yet: what holds its name while it starts.
fn placeholder(spec: &Spec, origin: &str, deps: &Deps, cancel: CancellationToken) -> Env {
    Env {
        name: spec.name.clone(),
        origin: origin.into(),
        seed: spec.seed,
        started_at: SystemTime::now(),
        state: Mutex::new(EnvState::Starting),
        log: deps.log.clone(),
        services: Vec::new(),
        order: Vec::new(),
        edges: BTreeMap::new(),
        cancel,
    }
}

async fn start_service(
    deps: &Deps,
    env_name: &str,
    svc: &Arc<ServiceRt>,
    progress: &Progress,
    logs: mpsc::Sender<LogLine>,
) -> Result<(), RegistryError> {
    let log = &deps.log;
    let started = Instant::now();
    let command = svc.launch.command.clone();
    *lock(&svc.state) = ServiceState::Starting;
    report(progress, env_name, &svc.name, "starting", command.join(" ")).await;
    publish(
        log,
        env_name,
        &svc.name,
        EventData::ServiceStarting { command },
    );
    let rt = match deps
        .runtime
        .start(&svc.launch, LogOutput::new(logs, env_name))
    {
        Ok(rt) => rt,
        Err(why) => {
            let msg = format!("service {} failed to start: {why}", svc.name);
            return Err(fail(log, env_name, svc, progress, msg, Vec::new()).await);
        }
    };
    *lock(&svc.runtime) = Some(rt.clone());
    let labels = [("env", env_name.to_string()), ("service", svc.name.clone())];
    metrics::gauge!("rig_service_up", &labels).set(1.0);

    for (ing, protocol, addr, ready) in &svc.ingresses {
        tokio::select! {
            r = wait_ready(*protocol, *addr, ready) => {
                if let Err(why) = r {
                    let msg = format!("service {} is not ready on ingress {ing} ({protocol} {addr}): {why}", svc.name);
                    return Err(fail(log, env_name, svc, progress, msg, rt.recent_logs()).await);
                }
            }
            exit = rt.wait_exit() => {
                let msg = format!("service {} {exit} before it was ready", svc.name);
                return Err(fail(log, env_name, svc, progress, msg, rt.recent_logs()).await);
            }
        }
    }
    *lock(&svc.state) = ServiceState::Ready;
    metrics::gauge!("rig_service_ready", &labels).set(1.0);
    let addrs: Vec<String> = svc
        .ingresses
        .iter()
        .map(|(_, _, a, _)| a.to_string())
        .collect();
    let msg = format!(
        "{} ready ({}) {:.2}s",
        svc.name,
        if addrs.is_empty() {
            "no ingress".to_string()
        } else {
            addrs.join(", ")
        },
        started.elapsed().as_secs_f64()
    );
    publish(
        log,
        env_name,
        &svc.name,
        EventData::ServiceReady {
            pid: rt.pid().unwrap_or(0),
            addresses: addrs,
            ready_seconds: started.elapsed().as_secs_f64(),
        },
    );
    report(progress, env_name, &svc.name, "ready", msg).await;
    Ok(())
}

async fn fail(
    log: &EventLog,
    env_name: &str,
    svc: &ServiceRt,
    progress: &Progress,
    msg: String,
    logs: Vec<String>,
) -> RegistryError {
    *lock(&svc.state) = ServiceState::Failed;
    *lock(&svc.exit) = Some(msg.clone());
    let tail: Vec<String> = logs.iter().rev().take(20).rev().cloned().collect();
    publish(
        log,
        env_name,
        &svc.name,
        EventData::ServiceFailed {
            reason: Some(msg.clone()),
            exit: None,
            last_logs: tail.clone(),
        },
    );
    let _ = progress
        .send(UpStep {
            env: env_name.into(),
            service: svc.name.clone(),
            state: ServiceState::Failed.as_str(),
            message: msg.clone(),
            last_logs: tail.clone(),
            environment: None,
        })
        .await;
    RegistryError::ServiceFailed {
        message: msg,
        last_logs: tail,
    }
}

/// Stop services in reverse start order, then close the proxies. Returns the stopped names.
async fn stop_env(env: &Arc<Env>) -> Vec<String> {
    env.cancel.cancel();
    let mut stopped = Vec::new();
    let levels: Vec<&Vec<String>> = if env.order.is_empty() {
        Vec::new()
    } else {
        env.order.iter().rev().collect()
    };
    for level in levels {
        let mut stops = Vec::new();
        for name in level {
            let Some(svc) = env.services.iter().find(|s| &s.name == name).cloned() else {
                continue;
            };
            let Some(rt) = lock(&svc.runtime).take() else {
                continue;
            };
            let log = env.log.clone();
            let env_name = env.name.clone();
            stops.push(tokio::spawn(async move {
                let exit = rt.stop().await;
                *lock(&svc.state) = ServiceState::Stopped;
                metrics::gauge!("rig_service_up", "env" => env_name.clone(), "service" => svc.name.clone()).set(0.0);
                metrics::gauge!("rig_service_ready", "env" => env_name.clone(), "service" => svc.name.clone()).set(0.0);
                publish(&log, &env_name, &svc.name, EventData::ServiceStopped { exit, grace_seconds: svc.launch.stop_grace.as_secs_f64() });
                svc.name.clone()
            }));
        }
        for s in stops {
            if let Ok(name) = s.await {
                stopped.push(name);
            }
        }
    }
    for e in env.edges.values() {
        if let Some(p) = &e.proxy {
            p.clear_chaos();
        }
    }
    stopped
}

// ---------------------------------------------------------------------------------------------
// Chaos on edges.
// ---------------------------------------------------------------------------------------------

/// Which edges a selector names.
fn select<'a>(env: &'a Env, selector: &Selector) -> Result<Vec<&'a EdgeRt>, RegistryError> {
    let patterns: Vec<&str> = if selector.edges.is_empty() {
        vec!["*"]
    } else {
        selector.edges.iter().map(String::as_str).collect()
    };
    let mut out: Vec<&EdgeRt> = Vec::new();
    for pat in &patterns {
        let matched: Vec<&EdgeRt> = env
            .edges
            .values()
            .filter(|e| match *pat {
                "*" => true,
                p if p.ends_with("/*") => e.source == p[..p.len() - 2],
                p => e.name == p,
            })
            .filter(|e| selector.to.is_empty() || e.target == selector.to)
            .collect();
        if matched.is_empty() {
            return Err(RegistryError::NoSuchEdge {
                pattern: pat.to_string(),
                to: (!selector.to.is_empty()).then(|| selector.to.clone()),
                env: env.name.clone(),
                known: env.edges.keys().cloned().collect(),
            });
        }
        for m in matched {
            if !out.iter().any(|o| o.name == m.name) {
                out.push(m);
            }
        }
    }
    Ok(out)
}

fn edge_chaos(env: &Env, e: &EdgeRt) -> EdgeChaos {
    let (version, spec) = e.proxy.as_ref().map(|p| p.chaos()).unwrap_or_default();
    EdgeChaos {
        env: env.name.clone(),
        edge: e.name.clone(),
        protocol: e.protocol,
        version,
        spec,
    }
}

impl Env {
    /// Replace the chaos of the selected edges with `per_protocol(protocol)`. Everything is
    /// validated before anything changes.
    pub fn set_chaos(
        &self,
        selector: &Selector,
        cause: &str,
        per_protocol: impl Fn(Protocol) -> ChaosSpec,
    ) -> Result<Vec<EdgeChaos>, RegistryError> {
        let edges = select(self, selector)?;
        let mut plan = Vec::new();
        for e in &edges {
            let Some(proxy) = &e.proxy else {
                return Err(RegistryError::NotObserved(e.name.clone()));
            };
            let mut spec = per_protocol(e.protocol);
            if spec.seed.is_none()
                && !spec.is_empty()
                && let Some(seed) = self.seed
            {
                spec.seed = Some(derive_seed(seed, &e.source, &e.egress));
            }
            let valid = spec.validated(e.protocol).map_err(|source: PolicyError| {
                RegistryError::Policy {
                    edge: e.name.clone(),
                    protocol: e.protocol,
                    source,
                }
            })?;
            plan.push((*e, proxy, valid));
        }
        let mut out = Vec::new();
        // Each policy was validated once, above; installing it cannot fail on its content.
        for (e, proxy, valid) in plan {
            let (old_version, old) = proxy.chaos();
            let spec = valid.spec().clone();
            let version = proxy.install(valid).map_err(|err| RegistryError::Edge {
                edge: e.name.clone(),
                message: err.to_string(),
            })?;
            metrics::counter!("rig_chaos_changes_total", "env" => self.name.clone(), "edge" => e.name.clone()).increment(1);
            self.log.publish(NewEvent {
                env: self.name.clone(),
                service: e.source.clone(),
                edge: e.name.clone(),
                data: EventData::ChaosChanged {
                    old: Box::new(old),
                    old_version,
                    new: Box::new(spec),
                    version,
                    cause: cause.to_string(),
                },
            });
            out.push(edge_chaos(self, e));
        }
        Ok(out)
    }

    pub fn get_chaos(&self, selector: &Selector) -> Result<Vec<EdgeChaos>, RegistryError> {
        Ok(select(self, selector)?
            .into_iter()
            .map(|e| edge_chaos(self, e))
            .collect())
    }

    /// The environment as `status` reports it.
    pub fn status(&self) -> EnvView {
        EnvView {
            name: self.name.clone(),
            state: *lock(&self.state),
            origin: self.origin.clone(),
            started_at: self.started_at,
            services: self
                .services
                .iter()
                .map(|s| ServiceView {
                    name: s.name.clone(),
                    state: *lock(&s.state),
                    pid: lock(&s.runtime).as_ref().and_then(|r| r.pid()),
                    ingresses: s
                        .ingresses
                        .iter()
                        .map(|(n, p, a, _)| IngressView {
                            name: n.clone(),
                            protocol: *p,
                            address: *a,
                        })
                        .collect(),
                    exit: lock(&s.exit).clone(),
                    command: s.launch.command.clone(),
                })
                .collect(),
            edges: self
                .edges
                .values()
                .map(|e| EdgeView {
                    edge: e.name.clone(),
                    source: e.source.clone(),
                    egress: e.egress.clone(),
                    target: e.target.clone(),
                    ingress: e.ingress.clone(),
                    protocol: e.protocol,
                    wired_address: e.wired_addr,
                    target_address: e.target_addr,
                    observed: e.proxy.is_some(),
                    chaos: edge_chaos(self, e),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_counts_proxies_in_singular_and_plural() {
        assert_eq!(proxies_listening(0), "0 edge proxies listening");
        assert_eq!(proxies_listening(1), "1 edge proxy listening");
        assert_eq!(proxies_listening(2), "2 edge proxies listening");
    }
}
