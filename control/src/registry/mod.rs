//! The environment registry's domain layer: pure functions and types that speak specs and
//! addresses, never protobuf or gRPC (a test in `control/tests/registry_boundary.rs` checks).
//!
//! So far: [`wiring`], which turns a service of a spec plus the addresses rigd allocated into
//! what the service is launched with.

pub mod wiring;
