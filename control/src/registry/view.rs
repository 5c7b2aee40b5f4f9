//! What the registry reports, as plain domain types: the state enums, a view of an environment
//! (what `rigctl ps` shows), a selector of edges, and the steps of a bring-up. Transports turn
//! them into their own messages.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use rig_proxy::policy::{ChaosSpec, Protocol};

use crate::spec::Format;

/// The life cycle of an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvState {
    /// Its services are being started.
    Starting,
    /// Every service is ready.
    Up,
    /// A service exited on its own while the environment was up.
    Degraded,
    /// Being brought down.
    Stopping,
}

/// The life cycle of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    /// Waiting for the services it depends on.
    Pending,
    /// Started, not yet ready.
    Starting,
    /// Passed its readiness checks.
    Ready,
    /// Did not start or did not become ready.
    Failed,
    /// Exited on its own after it was ready.
    Exited,
    /// Stopped by rig.
    Stopped,
}

impl EnvState {
    pub fn as_str(self) -> &'static str {
        match self {
            EnvState::Starting => "starting",
            EnvState::Up => "up",
            EnvState::Degraded => "degraded",
            EnvState::Stopping => "stopping",
        }
    }
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Pending => "pending",
            ServiceState::Starting => "starting",
            ServiceState::Ready => "ready",
            ServiceState::Failed => "failed",
            ServiceState::Exited => "exited",
            ServiceState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for EnvState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A spec to bring up, as a caller hands it over.
#[derive(Debug, Clone)]
pub struct SpecSource {
    pub text: String,
    pub format: Format,
    /// Where the spec came from (a file name), for errors.
    pub origin: String,
    /// Relative `cwd`s resolve against this directory.
    pub base_dir: PathBuf,
}

/// Which edges a chaos call acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// Empty: the only running environment.
    pub env: String,
    /// `SOURCE/EGRESS`, `SOURCE/*` or `*`; empty means `*`.
    pub edges: Vec<String>,
    /// Only edges whose target service is this one (empty: any).
    pub to: String,
}

/// Where a bring-up is: one step per service state change, then the environment.
#[derive(Debug, Clone)]
pub struct UpStep {
    pub env: String,
    /// Empty for a step of the environment as a whole.
    pub service: String,
    /// `proxies-ready`, a [`ServiceState`] (`starting`, `ready`, `failed`) or `up`.
    pub state: &'static str,
    pub message: String,
    pub last_logs: Vec<String>,
    /// On the last step: the environment that is up.
    pub environment: Option<EnvView>,
}

/// An environment as `status` reports it.
#[derive(Debug, Clone)]
pub struct EnvView {
    pub name: String,
    pub state: EnvState,
    pub origin: String,
    pub started_at: SystemTime,
    pub services: Vec<ServiceView>,
    pub edges: Vec<EdgeView>,
}

#[derive(Debug, Clone)]
pub struct ServiceView {
    pub name: String,
    pub state: ServiceState,
    pub pid: Option<u32>,
    pub ingresses: Vec<IngressView>,
    /// Why it exited or failed, when it did.
    pub exit: Option<String>,
    pub command: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct IngressView {
    pub name: String,
    pub protocol: Protocol,
    pub address: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct EdgeView {
    /// `SOURCE/EGRESS`.
    pub edge: String,
    pub source: String,
    pub egress: String,
    pub target: String,
    pub ingress: String,
    pub protocol: Protocol,
    /// Where the source is told to connect: the proxy, or the target when not observed.
    pub wired_address: SocketAddr,
    pub target_address: SocketAddr,
    pub observed: bool,
    pub chaos: EdgeChaos,
}

/// The chaos in force on one edge.
#[derive(Debug, Clone)]
pub struct EdgeChaos {
    pub env: String,
    pub edge: String,
    pub protocol: Protocol,
    pub version: u64,
    pub spec: ChaosSpec,
}
