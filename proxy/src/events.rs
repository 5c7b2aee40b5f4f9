//! What the data plane tells the world: one event per request or connection phase.
//!
//! Events go to a bounded [`tokio::sync::broadcast`] channel: sending never waits, and a
//! subscriber that falls behind is told how many events it missed (`RecvError::Lagged(n)`), so a
//! slow reader can never slow traffic down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::policy::Protocol;

/// Who an edge connects: labels for events and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeInfo {
    /// The environment the edge belongs to.
    pub env: String,
    /// The edge's name, `SOURCE/EGRESS`.
    pub edge: String,
    /// The calling service.
    pub source: String,
    /// The egress name on the calling service.
    pub egress: String,
    /// The called service.
    pub target: String,
    /// The called service's ingress.
    pub ingress: String,
    /// The protocol spoken.
    pub protocol: Protocol,
}

impl EdgeInfo {
    /// Labels for a standalone edge (tests, benchmarks): `env` is `-`, the edge is `source/target`.
    pub fn standalone(source: &str, target: &str, protocol: Protocol) -> Self {
        EdgeInfo {
            env: "-".into(),
            edge: format!("{source}/{target}"),
            source: source.into(),
            egress: target.into(),
            target: target.into(),
            ingress: "default".into(),
            protocol,
        }
    }
}

/// The kind of fault that acted on a request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    Latency,
    Error,
    Hang,
    Partition,
    Bandwidth,
    Reset,
    Slicer,
    LimitData,
    SlowClose,
}

impl FaultKind {
    /// The `fault` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Latency => "latency",
            FaultKind::Error => "error",
            FaultKind::Hang => "hang",
            FaultKind::Partition => "partition",
            FaultKind::Bandwidth => "bandwidth",
            FaultKind::Reset => "reset",
            FaultKind::Slicer => "slicer",
            FaultKind::LimitData => "limit_data",
            FaultKind::SlowClose => "slow_close",
        }
    }
}

/// One http/grpc request as the proxy saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestInfo {
    /// Unique per edge, increasing.
    pub request_id: u64,
    pub method: String,
    pub path: String,
    /// gRPC service and method, from the path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_method: Option<String>,
    /// HTTP status (`"200"`) or gRPC code name (`"UNAVAILABLE"`); none before the answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// From the request's arrival to the end of the response.
    #[serde(
        rename = "latency_seconds",
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_secs"
    )]
    pub latency: Option<Duration>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Faults injected into this request, in the order they acted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<FaultKind>,
    /// Why the request failed, for `request.failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One tcp connection as the proxy saw it (http/grpc edges report connections too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// Unique per edge, increasing.
    pub connection_id: u64,
    pub peer: SocketAddr,
    /// Client → target.
    pub bytes_upstream: u64,
    /// Target → client.
    pub bytes_downstream: u64,
    #[serde(
        rename = "duration_seconds",
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_secs"
    )]
    pub duration: Option<Duration>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<FaultKind>,
    /// Why it closed, when not a normal close by either side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What happened.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
pub enum EventKind {
    #[serde(rename = "request.started")]
    RequestStarted(RequestInfo),
    #[serde(rename = "request.completed")]
    RequestCompleted(RequestInfo),
    #[serde(rename = "request.failed")]
    RequestFailed(RequestInfo),
    #[serde(rename = "connection.opened")]
    ConnectionOpened(ConnectionInfo),
    #[serde(rename = "connection.closed")]
    ConnectionClosed(ConnectionInfo),
    /// The policy's `ttl` ran out and the edge went back to no chaos.
    #[serde(rename = "chaos.expired")]
    ChaosExpired { version: u64 },
}

impl EventKind {
    /// The event's type name (`request.completed`).
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::RequestStarted(_) => "request.started",
            EventKind::RequestCompleted(_) => "request.completed",
            EventKind::RequestFailed(_) => "request.failed",
            EventKind::ConnectionOpened(_) => "connection.opened",
            EventKind::ConnectionClosed(_) => "connection.closed",
            EventKind::ChaosExpired { .. } => "chaos.expired",
        }
    }
}

/// An event from an edge.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyEvent {
    #[serde(with = "unix_secs")]
    pub time: SystemTime,
    pub edge: Arc<EdgeInfo>,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Where edges send events. Cloning is cheap; all clones feed the same channel.
#[derive(Debug, Clone)]
pub struct EventSender {
    tx: broadcast::Sender<Arc<ProxyEvent>>,
}

impl EventSender {
    /// A channel that keeps at most `capacity` events for its slowest subscriber.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        EventSender { tx }
    }

    /// Subscribe from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ProxyEvent>> {
        self.tx.subscribe()
    }

    /// Send, never waiting; without subscribers the event is dropped.
    pub fn send(&self, edge: &Arc<EdgeInfo>, kind: EventKind) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let _ = self.tx.send(Arc::new(ProxyEvent {
            time: SystemTime::now(),
            edge: edge.clone(),
            kind,
        }));
    }

    /// Is anybody listening? Lets hot paths skip building events nobody reads.
    pub fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }
}

impl Default for EventSender {
    fn default() -> Self {
        EventSender::new(4096)
    }
}

mod opt_secs {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_f64(d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let secs: Option<f64> = serde::Deserialize::deserialize(d)?;
        secs.map(|s| Duration::try_from_secs_f64(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

mod unix_secs {
    use std::time::SystemTime;
    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        s.serialize_f64(secs)
    }
}
