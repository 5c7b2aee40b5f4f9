//! The environment registry: the domain core of rigd. It brings specs up and down, holds the
//! running environments and changes their chaos, speaking domain types ([`view`]) and one
//! error enum ([`RegistryError`]); never protobuf or gRPC (a test in
//! `control/tests/registry_boundary.rs` checks). The transports in `daemon/` map both.
//!
//! - [`environments`]: the registry and its bring-up phases;
//! - [`wiring`]: pure, a service of a spec plus the addresses rigd allocated → what the
//!   service is launched with;
//! - [`runtime`]: how a service runs ([`runtime::Runtime`], [`runtime::ServiceRuntime`]), local
//!   processes today ([`runtime::LocalProcesses`]), containers next;
//! - [`view`]: states, views, selectors, bring-up steps;
//! - [`error`]: [`RegistryError`] and its [`ErrorKind`].

pub mod environments;
pub mod error;
pub mod runtime;
pub mod view;
pub mod wiring;

pub use environments::{Deps, Env, Progress, Registry, spawn_event_pump};
pub use error::{ErrorKind, RegistryError};
