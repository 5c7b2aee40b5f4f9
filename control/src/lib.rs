//! rig's control plane: rigd, the daemon, and rigctl, its CLI.
//!
//! Execution starts in the thin binaries `src/bin/rigd.rs` (→ `daemon::run`) and
//! `src/bin/rigctl.rs` (→ `cli::run`).

pub mod cli;
pub mod client;
pub mod daemon;
pub mod eventlog;
pub mod events;
pub mod presets;
pub mod probe;
pub mod registry;
pub mod secret;
pub mod spec;
pub mod supervisor;
