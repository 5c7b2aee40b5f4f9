//! The policy in force on one edge, as snapshots the data plane reads.
//!
//! The policy lives in a [`tokio::sync::watch`] channel of [`Active`] snapshots held by the
//! edge's [`PolicyCell`]. Every request and every tcp chunk reads the current snapshot, so a new
//! policy is in force for the next one as soon as [`PolicyCell::set`] returns; tasks held by a
//! delay, a hang or a blackhole wait on the same channel and are released at once when the
//! policy changes. A snapshot also owns what its policy needs at run time: the seeded RNG and
//! the edge-wide bandwidth [`Limiters`].
//!
//! Layer: above [`crate::policy`], [`crate::events`] and [`crate::metrics`]; below the
//! connection context and the protocols. It never names them.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Normal};
use tokio::sync::watch;

use crate::events::{EdgeInfo, EventKind, EventSender};
use crate::metrics::EdgeMetrics;
use crate::policy::{
    BandwidthFault, ChaosPolicy, ChaosSpec, Delay, PolicyError, Protocol, ValidChaos,
};

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
    pub(crate) fn new(version: u64, spec: ChaosSpec, policy: ChaosPolicy) -> Self {
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
    pub(crate) fn new(
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
        Ok(self.install(spec.validated(self.protocol)?))
    }

    /// Install a policy validated for this cell's protocol (the caller checks the protocol).
    pub fn install(self: &Arc<Self>, valid: ValidChaos) -> Arc<Active> {
        let (spec, policy) = valid.into_parts();
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
        active
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
