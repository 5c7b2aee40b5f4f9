//! One edge proxy: a listener, the policy in force, and the connections it serves.
//!
//! The top layer of the crate: [`Edge`] builds the edge's [`EdgeCtx`] and dispatches its
//! listener to the protocol's serve loop ([`crate::tcp`] or [`crate::http`]). Nothing below
//! imports this module (a test reads the sources to keep it so); the policy snapshots live in
//! [`crate::snapshot`], the shared context in [`crate::context`].

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::context::EdgeCtx;
use crate::events::{EdgeInfo, EventSender};
use crate::metrics::EdgeMetrics;
use crate::policy::{ChaosSpec, PolicyError, Protocol, ValidChaos};
use crate::snapshot::PolicyCell;

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
        let ctx = Arc::new(EdgeCtx::new(info, config.target, cell, events, metrics));
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

    /// Install a policy already validated ([`ChaosSpec::validated`]), so a caller that checks
    /// several edges before changing any validates each policy once. The policy must have been
    /// validated for this edge's protocol; returns its version.
    pub fn install(&self, valid: ValidChaos) -> Result<u64, PolicyError> {
        if valid.protocol() != self.ctx.info.protocol {
            return Err(PolicyError::new(
                "protocol",
                format!(
                    "validated for a {} edge, installed on a {} edge",
                    valid.protocol(),
                    self.ctx.info.protocol
                ),
            ));
        }
        Ok(self.ctx.cell.install(valid).version)
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
