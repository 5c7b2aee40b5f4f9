//! rigd: the rig control plane daemon. Everything happens in `rig_control::daemon`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rig_control::daemon::{self, DaemonConfig};
use rig_control::secret::{self, Secret};

/// rigd serves the rig.v1 gRPC API, /metrics, /healthz and /events on one address.
#[derive(Debug, Parser)]
#[command(name = "rigd", version, about)]
struct Args {
    /// Address to listen on (gRPC and HTTP). A non-loopback address requires a token.
    #[arg(long, env = "RIG_ADDR", default_value = daemon::DEFAULT_ADDR)]
    listen: String,
    /// Require `authorization: Bearer TOKEN` on every call. Visible to other local users in
    /// the process list: prefer RIG_TOKEN or --token-file.
    #[arg(long, env = "RIG_TOKEN", hide_env_values = true)]
    token: Option<Secret>,
    /// Read the token from the first line of FILE, which only its owner may read (mode 0600).
    #[arg(long, env = "RIG_TOKEN_FILE", value_name = "FILE", conflicts_with = "token",
          value_parser = secret::parse_token_file)]
    token_file: Option<Secret>,
    /// Where rigd records its child processes (default: $XDG_RUNTIME_DIR/rig or /tmp/rig-$UID).
    #[arg(long, env = "RIG_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// A directory of extra chaos presets (*.toml).
    #[arg(long, env = "RIG_PRESETS_DIR")]
    presets_dir: Option<PathBuf>,
    /// How many events to keep for replay (`rigctl events`, `/events` with Last-Event-ID).
    #[arg(long, env = "RIG_EVENTS_RETAINED", default_value_t = daemon::DEFAULT_EVENTS_RETAINED)]
    events_retained: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // `rigd __reap ...`: rigd re-executed as its own reaper (see rig_control::supervisor).
    if let Some(code) = rig_control::supervisor::reaper_dispatch() {
        return code;
    }
    let args = Args::parse();
    let listen = match daemon::parse_addr(&args.listen) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rigd: --listen: {e}");
            return ExitCode::from(2);
        }
    };
    let token = secret::resolve(args.token.as_ref(), args.token_file.as_ref()).cloned();
    let cfg = DaemonConfig {
        listen,
        token,
        state_dir: args.state_dir.unwrap_or_else(daemon::default_state_dir),
        presets_dir: args.presets_dir,
        events_retained: args.events_retained,
    };
    match daemon::run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rigd: {e}");
            ExitCode::from(1)
        }
    }
}
