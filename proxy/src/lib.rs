//! rig's data plane: one protocol-aware proxy per edge of an environment.
//!
//! Execution starts at [`Edge::bind`] / [`Edge::start`]: the edge serves its listener with the
//! protocol's loop ([`tcp`] or [`http`], which also speaks gRPC), reading the chaos policy in force
//! from its [`edge::PolicyCell`] for every request or chunk. [`policy`] holds the chaos policy as
//! plain validated data, shared with the control plane; [`events`] and [`metrics`] are what the
//! edge reports.

pub mod edge;
pub mod events;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod tcp;
mod timer;

pub use edge::{Edge, EdgeConfig, ProxyError};
pub use events::{EdgeInfo, EventKind, EventSender, FaultKind, ProxyEvent};
pub use policy::{ChaosPolicy, ChaosSpec, PolicyError, Protocol};

/// The header rig puts on every response it makes up itself (injected faults, upstream
/// failures), so users can tell them from real ones. Its value names the reason
/// (`fault=error`, `fault=hang`, `upstream=unreachable`).
pub const INJECTED_HEADER: &str = "x-rig-injected";
