//! One edge proxy: a listener, the policy in force, and the connections it serves.
//!
//! The policy lives in a [`tokio::sync::watch`] channel of [`Active`] snapshots. Every request
//! and every tcp chunk reads the current snapshot, so a new policy is in force for the next one
//! as soon as [`Edge::set_chaos`] returns; tasks held by a delay, a hang or a blackhole wait on
//! the same channel and are released at once when the policy changes.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Normal};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::events::{EdgeInfo, EventKind, EventSender};
use crate::metrics::EdgeMetrics;
use crate::policy::{BandwidthFault, ChaosPolicy, ChaosSpec, Delay, PolicyError, Protocol};

/// Errors starting an edge.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listener: {0}")]
    Listener(#[source] std::io::Error),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// What an edge needs to start.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Labels for events and metrics.
    pub info: EdgeInfo,
    /// The only address this edge forwards to.
    pub target: SocketAddr,
    /// The chaos in force at start.
    pub chaos: ChaosSpec,
}

/// A token-bucket pair for the two directions.
#[derive(Debug)]
pub struct Limiters {
    pub upstream: Option<Limiter>,
    pub downstream: Option<Limiter>,
}

/// A byte-rate limiter (governor's GCRA) with its burst size, so callers can split large chunks.
#[derive(Debug)]
pub struct Limiter {
    limiter: DefaultDirectRateLimiter,
    burst: u32,
}

impl Limiter {
    /// `rate` bytes per second, with a burst of 1/20 s worth of bytes (at least 1 KiB, at most
    /// 1 MiB) so throttled streams stay smooth.
    pub fn new(rate: u64) -> Self {
        let rate32 = u32::try_from(rate.max(1)).unwrap_or(u32::MAX);
        let burst = (rate / 20).clamp(1024, 1 << 20).min(rate32 as u64) as u32;
        let burst = burst.max(1);
        let quota = Quota::per_second(NonZeroU32::new(rate32).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Limiter {
            limiter: RateLimiter::direct(quota),
            burst,
        }
    }

    /// Wait until `n` bytes may pass.
    pub async fn acquire(&self, mut n: usize) {
        while n > 0 {
            let take = n.min(self.burst as usize);
            let k = NonZeroU32::new(take as u32).unwrap_or(NonZeroU32::MIN);
            // `take <= burst`, so this cannot be InsufficientCapacity.
            let _ = self.limiter.until_n_ready(k).await;
            n -= take;
        }
    }

    /// The largest chunk that passes in one step.
    pub fn burst(&self) -> usize {
        self.burst as usize
    }
}

impl Limiters {
    pub fn new(bw: &BandwidthFault) -> Self {
        Limiters {
            upstream: bw.upstream.map(Limiter::new),
            downstream: bw.downstream.map(Limiter::new),
        }
    }
}

/// A policy snapshot in force on an edge.
#[derive(Debug)]
pub struct Active {
    /// Increases by one with every change, starting at 1 for the policy the edge started with.
    pub version: u64,
    /// The policy as the user wrote it.
    pub spec: ChaosSpec,
    /// The policy the data plane runs.
    pub policy: ChaosPolicy,
    /// Edge-wide bandwidth limiters (absent when the limit is per connection).
    pub limiters: Option<Limiters>,
    rng: Mutex<StdRng>,
}

impl Active {
    fn new(version: u64, spec: ChaosSpec, policy: ChaosPolicy) -> Self {
        let rng = match policy.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let limiters = policy
            .bandwidth
            .filter(|b| !b.per_connection)
            .map(|b| Limiters::new(&b));
        Active {
            version,
            spec,
            policy,
            limiters,
            rng: Mutex::new(rng),
        }
    }

    fn with_rng<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut rng)
    }

    /// A Bernoulli draw: true with probability `rate`. Rates 0 and 1 draw nothing, so they do
    /// not shift a seeded sequence.
    pub fn roll(&self, rate: f64) -> bool {
        if rate <= 0.0 {
            return false;
        }
        if rate >= 1.0 {
            return true;
        }
        self.with_rng(|r| r.random_bool(rate))
    }

    /// Draw a delay from the policy's latency; `None` when there is no latency.
    pub fn sample_latency(&self) -> Option<Duration> {
        let lat = self.policy.latency?;
        Some(self.sample(lat.delay))
    }

    fn sample(&self, delay: Delay) -> Duration {
        match delay {
            Delay::Uniform { base, jitter } => {
                if jitter.is_zero() {
                    return base;
                }
                let j = jitter.as_secs_f64();
                let off = self.with_rng(|r| r.random_range(-j..=j));
                Duration::try_from_secs_f64((base.as_secs_f64() + off).max(0.0))
                    .unwrap_or(Duration::MAX)
            }
            Delay::Normal { mean, stddev } => {
                let d = Normal::new(mean.as_secs_f64(), stddev.as_secs_f64())
                    .map(|n| self.with_rng(|r| n.sample(r)))
                    .unwrap_or(mean.as_secs_f64());
                Duration::try_from_secs_f64(d.max(0.0)).unwrap_or(Duration::MAX)
            }
            Delay::LogNormal { p50, p99 } => {
                // ln X ~ N(mu, sigma): median e^mu, p99 e^(mu + 2.3263 sigma).
                let mu = p50.as_secs_f64().ln();
                let sigma = (p99.as_secs_f64().ln() - mu) / 2.326_347_874;
                let d = LogNormal::new(mu, sigma)
                    .map(|n| self.with_rng(|r| n.sample(r)))
                    .unwrap_or(p50.as_secs_f64());
                Duration::try_from_secs_f64(d.max(0.0)).unwrap_or(Duration::MAX)
            }
        }
    }

    /// Pick an HTTP status from the weighted list of the error fault (503 when none).
    pub fn pick_status(&self) -> u16 {
        let Some(err) = &self.policy.error else {
            return 503;
        };
        if err.statuses.len() == 1 {
            return err.statuses[0].0;
        }
        let total: u64 = err.statuses.iter().map(|(_, w)| *w as u64).sum();
        let mut x = self.with_rng(|r| r.random_range(0..total.max(1)));
        for (s, w) in &err.statuses {
            if x < *w as u64 {
                return *s;
            }
            x -= *w as u64;
        }
        err.statuses[0].0
    }

    /// A uniform draw in `lo..=hi`, from the policy's RNG (for the slicer).
    pub fn range(&self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        self.with_rng(|r| r.random_range(lo..=hi))
    }
}

/// The policy holder of one edge.
#[derive(Debug)]
pub struct PolicyCell {
    protocol: Protocol,
    tx: watch::Sender<Arc<Active>>,
    // Serialises setters so versions are assigned in order.
    set_lock: Mutex<()>,
    info: Arc<EdgeInfo>,
    events: EventSender,
    metrics: EdgeMetrics,
}

impl PolicyCell {
    fn new(
        protocol: Protocol,
        spec: ChaosSpec,
        info: Arc<EdgeInfo>,
        events: EventSender,
        metrics: EdgeMetrics,
    ) -> Result<Arc<Self>, PolicyError> {
        let policy = spec.validate(protocol)?;
        let ttl = policy.ttl;
        let (tx, _) = watch::channel(Arc::new(Active::new(1, spec, policy)));
        metrics.policy_version(1);
        let cell = Arc::new(PolicyCell {
            protocol,
            tx,
            set_lock: Mutex::new(()),
            info,
            events,
            metrics,
        });
        if let Some(ttl) = ttl {
            cell.schedule_revert(1, ttl);
        }
        Ok(cell)
    }

    /// The snapshot in force now.
    pub fn current(&self) -> Arc<Active> {
        self.tx.borrow().clone()
    }

    /// A receiver that wakes on every change (for held requests and open connections).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Active>> {
        self.tx.subscribe()
    }

    /// Validate and install `spec`; returns the new snapshot. On error nothing changes.
    pub fn set(self: &Arc<Self>, spec: ChaosSpec) -> Result<Arc<Active>, PolicyError> {
        let policy = spec.validate(self.protocol)?;
        let ttl = policy.ttl;
        let active = {
            let _g = self.set_lock.lock().unwrap_or_else(|e| e.into_inner());
            let version = self.tx.borrow().version + 1;
            let active = Arc::new(Active::new(version, spec, policy));
            self.tx.send_replace(active.clone());
            active
        };
        self.metrics.policy_version(active.version);
        if let Some(ttl) = ttl {
            self.schedule_revert(active.version, ttl);
        }
        tracing::debug!(edge = %self.info.edge, version = active.version, "chaos policy set");
        Ok(active)
    }

    fn schedule_revert(self: &Arc<Self>, version: u64, ttl: Duration) {
        let weak = Arc::downgrade(self);
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            tokio::time::sleep(ttl).await;
            let Some(cell) = weak.upgrade() else { return };
            let reverted = {
                let _g = cell.set_lock.lock().unwrap_or_else(|e| e.into_inner());
                if cell.tx.borrow().version != version {
                    None
                } else {
                    let v = version + 1;
                    let active = Arc::new(Active::new(v, ChaosSpec::default(), ChaosPolicy::default()));
                    cell.tx.send_replace(active);
                    Some(v)
                }
            };
            if let Some(v) = reverted {
                cell.metrics.policy_version(v);
                tracing::info!(edge = %cell.info.edge, version = v, "chaos ttl expired; policy cleared");
                cell.events.send(&cell.info, EventKind::ChaosExpired { version: v });
            }
        });
    }
}

/// Everything a protocol's serve loop needs; shared by all its connections.
#[derive(Debug)]
pub struct EdgeCtx {
    pub info: Arc<EdgeInfo>,
    pub target: SocketAddr,
    pub cell: Arc<PolicyCell>,
    pub events: EventSender,
    pub metrics: EdgeMetrics,
    /// Cancelled when the edge stops: every connection task ends.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks so `Edge::shutdown` can wait for them.
    pub tracker: TaskTracker,
    next_id: AtomicU64,
}

impl EdgeCtx {
    /// A fresh id for a request or connection on this edge.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Wait until `d` has passed, or until the policy changes to one whose version differs from
/// `version` (the hold is released, e.g. by clearing chaos), or until the edge stops.
/// Returns true if the full duration elapsed.
pub async fn hold(ctx: &EdgeCtx, version: u64, d: Option<Duration>) -> bool {
    let mut rx = ctx.cell.subscribe();
    let changed = async {
        loop {
            if rx.borrow_and_update().version != version {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let sleep = async {
        match d {
            // Precise to well under a millisecond: injected latency must be what was asked.
            Some(d) => crate::timer::sleep_until(tokio::time::Instant::now() + d).await,
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = sleep => true,
        _ = changed => false,
        _ = ctx.shutdown.cancelled() => false,
    }
}

/// A running edge proxy. Dropping it without [`Edge::shutdown`] also stops it.
#[derive(Debug)]
pub struct Edge {
    ctx: Arc<EdgeCtx>,
    addr: SocketAddr,
    protocol: Protocol,
}

impl Edge {
    /// Bind `listen` (use port 0 for any free port) and start serving.
    pub async fn bind(
        config: EdgeConfig,
        listen: SocketAddr,
        events: EventSender,
    ) -> Result<Edge, ProxyError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ProxyError::Bind {
                addr: listen,
                source,
            })?;
        Edge::start(config, listener, events)
    }

    /// Serve on a listener bound by the caller (rigd allocates ports by binding them first, so
    /// no other process can take a port between allocation and use).
    pub fn start(
        config: EdgeConfig,
        listener: TcpListener,
        events: EventSender,
    ) -> Result<Edge, ProxyError> {
        Edge::start_with(config, listener, events, crate::http::HttpLimits::default())
    }

    /// [`Edge::start`] with the time and size limits of an http / grpc edge set by the caller
    /// (tests lower them; a tcp edge ignores them).
    pub fn start_with(
        config: EdgeConfig,
        listener: TcpListener,
        events: EventSender,
        http_limits: crate::http::HttpLimits,
    ) -> Result<Edge, ProxyError> {
        let addr = listener.local_addr().map_err(ProxyError::Listener)?;
        let protocol = config.info.protocol;
        let info = Arc::new(config.info);
        let metrics = EdgeMetrics::new(&info);
        let cell = PolicyCell::new(
            protocol,
            config.chaos,
            info.clone(),
            events.clone(),
            metrics.clone(),
        )?;
        let ctx = Arc::new(EdgeCtx {
            info,
            target: config.target,
            cell,
            events,
            metrics,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            next_id: AtomicU64::new(0),
        });
        let span = tracing::info_span!("edge", edge = %ctx.info.edge, env = %ctx.info.env, %protocol, listen = %addr, target = %ctx.target);
        tracing::info!(parent: &span, "edge proxy listening");
        let serve_ctx = ctx.clone();
        let fut = async move {
            match protocol {
                Protocol::Tcp => crate::tcp::serve(listener, serve_ctx).await,
                Protocol::Http | Protocol::Grpc => {
                    crate::http::serve(listener, serve_ctx, http_limits).await
                }
            }
        };
        ctx.tracker
            .spawn(tracing::Instrument::instrument(fut, span));
        Ok(Edge {
            ctx,
            addr,
            protocol,
        })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the edge forwards to.
    pub fn target(&self) -> SocketAddr {
        self.ctx.target
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub fn info(&self) -> &Arc<EdgeInfo> {
        &self.ctx.info
    }

    /// Validate and install a new policy. It is in force for the next request or tcp chunk when
    /// this returns; the returned number is its version. On error the old policy stays.
    pub fn set_chaos(&self, spec: ChaosSpec) -> Result<u64, PolicyError> {
        self.ctx.cell.set(spec).map(|a| a.version)
    }

    /// Go back to no chaos; releases held requests at once. Returns the new version.
    pub fn clear_chaos(&self) -> u64 {
        // An empty spec always validates.
        self.ctx
            .cell
            .set(ChaosSpec::default())
            .map(|a| a.version)
            .unwrap_or_else(|_| self.ctx.cell.current().version)
    }

    /// The policy in force and its version.
    pub fn chaos(&self) -> (u64, ChaosSpec) {
        let a = self.ctx.cell.current();
        (a.version, a.spec.clone())
    }

    /// Stop: close the listener and every connection, and wait for their tasks to end.
    pub async fn shutdown(self) {
        self.ctx.shutdown.cancel();
        self.ctx.tracker.close();
        self.ctx.tracker.wait().await;
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.ctx.shutdown.cancel();
    }
}
