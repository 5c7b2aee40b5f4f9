//! The `rig.v1` gRPC API (see `proto/rig/v1/rig.proto`), generated at build time by protox and
//! tonic-prost-build.

mod chaos;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("rig.v1");

    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/rig_v1_descriptor.bin"));
}

impl v1::EnvironmentState {
    /// The state as rigctl shows it and `--json` prints it: `starting`, `up`, `degraded`,
    /// `stopping` (`unknown` for a value this build does not know).
    pub fn label(self) -> &'static str {
        use v1::EnvironmentState::*;
        match self {
            Unspecified => "unknown",
            Starting => "starting",
            Up => "up",
            Degraded => "degraded",
            Stopping => "stopping",
        }
    }
}

impl v1::ServiceState {
    /// The state as rigctl shows it and `--json` prints it: `pending`, `starting`, `ready`,
    /// `failed`, `exited`, `stopped` (`unknown` for a value this build does not know).
    pub fn label(self) -> &'static str {
        use v1::ServiceState::*;
        match self {
            Unspecified => "unknown",
            Pending => "pending",
            Starting => "starting",
            Ready => "ready",
            Failed => "failed",
            Exited => "exited",
            Stopped => "stopped",
        }
    }
}
