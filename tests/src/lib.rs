//! rig's integration harness: real upstreams on `127.0.0.1:0`, a running rigd, metric matchers.
//!
//! Tests live in `tests/tests/*.rs` and build their world from these helpers, which read like a
//! spec: a tcp echo, an http upstream, a gRPC upstream, an edge proxy in front of one of them.

pub mod eventually;
pub mod http_upstream;
pub mod prom;
pub mod rigd;
pub mod tcp_upstream;
