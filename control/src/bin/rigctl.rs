//! rigctl: the command line for rigd. Everything happens in [`rig_control::cli::run`].
//!
//! Exit codes: 0 ok, 1 the operation failed, 2 usage error (clap), 3 `daemon status`: no rigd
//! is running.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    // `rigctl __reap ...`: the reaper of a rigd embedded in `rigctl up` (see
    // rig_control::supervisor).
    if let Some(code) = rig_control::supervisor::reaper_dispatch() {
        return code;
    }
    match rig_control::cli::run().await {
        Ok(()) => ExitCode::SUCCESS,
        // `rigctl events | head`: the reader left, which is not a failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        // The command already printed what it had to (`daemon status` with no rigd: 3).
        Err(e) if e.is::<rig_control::cli::QuietExit>() => ExitCode::from(
            e.downcast_ref::<rig_control::cli::QuietExit>()
                .map_or(1, |q| q.0),
        ),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
