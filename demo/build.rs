//! Compiles proto/demo/v1/catalog.proto into Rust at build time.
//!
//! protox parses the .proto in pure Rust because there is no `protoc` on the
//! build machines; tonic-prost-build then generates the messages, the client
//! and the server from the resulting descriptor set.

const PROTO: &str = "proto/demo/v1/catalog.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
