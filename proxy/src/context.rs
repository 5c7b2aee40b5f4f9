//! The per-edge context every connection of an edge shares: identity, target, the policy cell,
//! the event and metric sinks, and the edge's shutdown signal and task tracker.
//!
//! Layer: above [`crate::snapshot`] and [`crate::limits`]; below the protocols ([`crate::tcp`],
//! [`crate::http`]), which take it from the [`crate::Edge`] that dispatches to them. It never
//! names the protocols or the edge, so neither ever imports the other the wrong way round.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::events::{EdgeInfo, EventSender};
use crate::metrics::EdgeMetrics;
use crate::snapshot::PolicyCell;

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
    /// A context for an edge that has not served anything yet.
    pub fn new(
        info: Arc<EdgeInfo>,
        target: SocketAddr,
        cell: Arc<PolicyCell>,
        events: EventSender,
        metrics: EdgeMetrics,
    ) -> Self {
        EdgeCtx {
            info,
            target,
            cell,
            events,
            metrics,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            next_id: AtomicU64::new(0),
        }
    }

    /// The span of one connection, where its logs (and later its OpenTelemetry trace) hang.
    ///
    /// A root span, not a child of the edge's listener span: an edge lives as long as its
    /// environment, and a trace per connection is what a tracing backend can show. Debug level:
    /// at rigd's default `info` it is disabled, which costs one check of the callsite's cached
    /// interest and evaluates none of the fields (nothing is formatted).
    pub fn connection_span(&self, id: u64, peer: SocketAddr) -> tracing::Span {
        tracing::debug_span!(
            parent: None,
            "connection",
            env = %self.info.env,
            edge = %self.info.edge,
            protocol = %self.info.protocol,
            conn = id,
            %peer,
        )
    }

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
