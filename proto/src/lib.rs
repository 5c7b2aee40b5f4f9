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
