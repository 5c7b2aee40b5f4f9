//! rig's data plane: one protocol-aware proxy per edge of an environment.
//!
//! Execution starts at [`Edge::bind`] / [`Edge::start`]: the edge serves its listener with the
//! protocol's loop ([`tcp`] or [`http`], which also speaks gRPC), reading the chaos policy in force
//! from its [`snapshot::PolicyCell`] for every request or chunk. [`events`] and [`metrics`] are
//! what the edge reports.
//!
//! The modules are layers; each imports only the ones below it (`tests/layering.rs` checks it):
//!
//! ```text
//! edge        Edge: builds the context, dispatches the listener to a protocol
//!   │
//! tcp/ http/  the protocols' accept loops, connections and requests
//!   │
//! context     EdgeCtx (shared by an edge's connections), hold
//!   │
//! snapshot    PolicyCell, Active snapshots, bandwidth limiters
//! limits      file-descriptor limits and shedding
//!   │
//! policy, events, metrics, timer
//! ```

pub mod context;
pub mod edge;
pub mod events;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod snapshot;
pub mod tcp;
mod timer;

pub use edge::{Edge, EdgeConfig, ProxyError};
pub use events::{EdgeInfo, EventKind, EventSender, FaultKind, ProxyEvent};
pub use policy::{ChaosPolicy, ChaosSpec, PolicyError, Protocol};

/// The header rig puts on every response it makes up itself (injected faults, upstream
/// failures), so users can tell them from real ones. Its value names the reason
/// (`fault=error`, `fault=hang`, `upstream=unreachable`).
pub const INJECTED_HEADER: &str = "x-rig-injected";
