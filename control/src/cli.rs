//! rigctl: the command line for rigd.
//!
//! [`run`] parses the arguments and runs one command against rigd's gRPC API. Output comes from
//! the pure functions in [`render`], so tests check what users see without a daemon. Errors are
//! anyhow here (this is the binary's path); their messages are printed as `error: …` by
//! `src/bin/rigctl.rs`.

mod chaos;
mod daemon;
mod demo;
pub mod render;
mod up;

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::anyhow;
use clap::{Args, Parser, Subcommand};
use rig_proto::v1 as pb;
use serde_json::Value;

use crate::client::{Client, DaemonAddr};
use crate::secret::Secret;

pub use chaos::{
    ChaosSetArgs, EdgeArgs, has_fault, parse_header, read_chaos_file, set_chaos_request,
};
pub use daemon::{DAEMON_STOP_TIMEOUT, DaemonCommand, QuietExit, pid_file, recorded_rigd};
pub use demo::{DemoArgs, demo, find_demo_spec};
pub use render::*;
pub use up::{UpArgs, state_dir, up_request};

/// rigctl: proxy the traffic between local services and inject chaos per edge.
#[derive(Parser, Debug)]
#[command(name = "rigctl", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Where rigd listens: host:port or http://host:port
    #[arg(long, env = "RIG_ADDR", default_value = crate::client::DEFAULT_ADDR, global = true)]
    pub addr: DaemonAddr,
    /// Bearer token for rigd (visible to other local users in the process list: prefer
    /// RIG_TOKEN or --token-file)
    #[arg(long, env = "RIG_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<Secret>,
    /// Read the token from the first line of FILE, which only its owner may read (mode 0600)
    #[arg(long, env = "RIG_TOKEN_FILE", value_name = "FILE", global = true,
          conflicts_with = "token", value_parser = crate::secret::parse_token_file)]
    pub token_file: Option<Secret>,
    /// Which environment, when several run. Read from RIGCTL_ENV, not RIG_ENV: rig sets RIG_ENV
    /// in every service it starts, so a rigctl run by a service would inherit it.
    #[arg(long = "env", env = "RIGCTL_ENV", value_name = "NAME", global = true)]
    pub env: Option<String>,
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    pub json: bool,
}

impl GlobalArgs {
    /// The token, if one is set and not empty (an empty RIG_TOKEN means none).
    pub fn token(&self) -> Option<&str> {
        crate::secret::resolve(self.token.as_ref(), self.token_file.as_ref()).map(Secret::expose)
    }

    pub fn env(&self) -> Option<&str> {
        self.env.as_deref().filter(|e| !e.is_empty())
    }

    async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.addr, self.token()).await?)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start the environment a spec file describes, then follow its logs (Ctrl-C stops it)
    Up(UpArgs),
    /// Stop an environment
    Down {
        /// The environment (default: --env, or the only one running)
        #[arg(value_name = "ENV")]
        name: Option<String>,
    },
    /// Services and edges of an environment
    #[command(visible_alias = "ps")]
    Status {
        /// The environment (default: --env, or the only one running)
        // Not `env`: that id is the global `--env`, and a clash makes clap refuse `ps --env X`.
        #[arg(value_name = "ENV")]
        name: Option<String>,
    },
    /// Running environments
    #[command(visible_alias = "list")]
    Ls,
    /// Change faults on edges, live
    #[command(subcommand)]
    Chaos(ChaosCommand),
    /// What happened: requests, connections, services, chaos changes
    Events(EventsArgs),
    /// A service's output
    Logs(LogsArgs),
    /// A guided tour on the demo environment
    Demo(DemoArgs),
    /// The rigd at --addr: is one running, stop the one `up --detach` started
    #[command(subcommand)]
    Daemon(DaemonCommand),
}

#[derive(Subcommand, Debug)]
pub enum ChaosCommand {
    /// Replace the chaos on edges
    Set(Box<ChaosSetArgs>),
    /// Show the chaos in force
    Get(EdgeArgs),
    /// Back to no chaos
    Clear(EdgeArgs),
    /// Named chaos policies
    #[command(subcommand)]
    Preset(PresetCommand),
}

#[derive(Subcommand, Debug)]
pub enum PresetCommand {
    /// The presets rigd knows
    List,
    /// Apply a preset to edges
    Apply {
        /// The preset's name
        name: String,
        #[command(flatten)]
        target: EdgeArgs,
    },
}

#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct EventsArgs {
    /// Keep printing new events
    #[arg(long, short)]
    pub follow: bool,
    /// Only events of this service
    #[arg(long, value_name = "S")]
    pub service: Option<String>,
    /// Only events of this edge
    #[arg(long, value_name = "E")]
    pub edge: Option<String>,
    /// Only events whose type starts with this, e.g. request. (repeatable)
    #[arg(long = "type", value_name = "PREFIX")]
    pub types: Vec<String>,
    /// Only events after this sequence number
    #[arg(long, value_name = "SEQ")]
    pub since: Option<u64>,
}

#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct LogsArgs {
    /// The service
    pub service: String,
    /// Keep printing new lines
    #[arg(long, short)]
    pub follow: bool,
}

/// The Watch request `rigctl events` sends: replay what rigd retains (after --since), then
/// follow when asked.
pub fn events_request(args: &EventsArgs, env: Option<&str>) -> pb::WatchRequest {
    pb::WatchRequest {
        after_seq: args.since.unwrap_or(0),
        only_new: false,
        follow: args.follow,
        types: args.types.clone(),
        env: env.unwrap_or_default().to_string(),
        service: args.service.clone().unwrap_or_default(),
        edge: args.edge.clone().unwrap_or_default(),
    }
}

/// The Watch request `rigctl logs` sends: the retained lines, then new ones with --follow.
pub fn logs_request(args: &LogsArgs, env: Option<&str>) -> pb::WatchRequest {
    pb::WatchRequest {
        after_seq: 0,
        only_new: false,
        follow: args.follow,
        types: vec!["service.log".to_string()],
        env: env.unwrap_or_default().to_string(),
        service: args.service.clone(),
        edge: String::new(),
    }
}

/// Parse the process arguments and run the command.
pub async fn run() -> anyhow::Result<()> {
    run_with(Cli::parse()).await
}

/// Run an already parsed command line.
pub async fn run_with(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    match &cli.command {
        Command::Up(args) => up::up(g, args).await,
        Command::Down { name } => down(g, name.as_deref()).await,
        Command::Status { name } => status(g, name.as_deref()).await,
        Command::Ls => list(g).await,
        Command::Chaos(cmd) => chaos_command(g, cmd).await,
        Command::Events(args) => events(g, args).await,
        Command::Logs(args) => logs(g, args).await,
        Command::Demo(args) => demo(g, args).await,
        Command::Daemon(cmd) => daemon::daemon_command(g, cmd).await,
    }
}

/// Write to stdout; a closed pipe (`rigctl events | head`) surfaces as an io error the binary
/// treats as a quiet exit.
pub(crate) fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

pub(crate) fn emit_json(v: &Value) -> anyhow::Result<()> {
    emit(&serde_json::to_string_pretty(v)?)
}

/// ANSI colours only on a terminal, and never when NO_COLOR is set (https://no-color.org).
pub(crate) fn use_colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

pub(crate) fn rpc(client: &Client, status: tonic::Status) -> anyhow::Error {
    anyhow!(client.describe(&status))
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

fn env_or<'a>(positional: Option<&'a str>, g: &'a GlobalArgs) -> &'a str {
    positional.or(g.env()).unwrap_or_default()
}

async fn down(g: &GlobalArgs, env: Option<&str>) -> anyhow::Result<()> {
    let client = g.client().await?;
    let resp = client
        .environments()
        .down(pb::DownRequest {
            env: env_or(env, g).to_string(),
        })
        .await
        .map_err(|s| rpc(&client, s))?
        .into_inner();
    if g.json {
        emit_json(&down_json(&resp))
    } else {
        emit(&render_down(&resp))
    }
}

async fn status(g: &GlobalArgs, env: Option<&str>) -> anyhow::Result<()> {
    let client = g.client().await?;
    let resp = client
        .environments()
        .status(pb::StatusRequest {
            env: env_or(env, g).to_string(),
        })
        .await
        .map_err(|s| rpc(&client, s))?
        .into_inner();
    if g.json {
        emit_json(&status_json(&resp))
    } else {
        emit(&render_status(&resp))
    }
}

async fn list(g: &GlobalArgs) -> anyhow::Result<()> {
    let client = g.client().await?;
    let resp = client
        .environments()
        .list(pb::ListRequest {})
        .await
        .map_err(|s| rpc(&client, s))?
        .into_inner();
    if g.json {
        emit_json(&Value::Array(
            resp.environments.iter().map(status_json).collect(),
        ))
    } else {
        emit(&render_env_list(&resp.environments, now_unix()))
    }
}

async fn chaos_command(g: &GlobalArgs, cmd: &ChaosCommand) -> anyhow::Result<()> {
    let (client, resp) = match cmd {
        ChaosCommand::Set(args) => {
            // Build the request first: a usage mistake should not need a running daemon.
            let req = set_chaos_request(args, g.env())?;
            let client = g.client().await?;
            let resp = client.chaos().set(req).await;
            (client, resp)
        }
        ChaosCommand::Get(target) => {
            let client = g.client().await?;
            let req = pb::GetChaosRequest {
                selector: Some(target.selector(g.env())),
            };
            let resp = client.chaos().get(req).await;
            (client, resp)
        }
        ChaosCommand::Clear(target) => {
            let client = g.client().await?;
            let req = pb::ClearChaosRequest {
                selector: Some(target.selector(g.env())),
            };
            let resp = client.chaos().clear(req).await;
            (client, resp)
        }
        ChaosCommand::Preset(PresetCommand::Apply { name, target }) => {
            let client = g.client().await?;
            let req = pb::ApplyPresetRequest {
                selector: Some(target.selector(g.env())),
                preset: name.clone(),
            };
            let resp = client.chaos().apply_preset(req).await;
            (client, resp)
        }
        ChaosCommand::Preset(PresetCommand::List) => {
            let client = g.client().await?;
            let presets = client
                .chaos()
                .list_presets(pb::ListPresetsRequest {})
                .await
                .map_err(|s| rpc(&client, s))?
                .into_inner();
            return if g.json {
                emit_json(&presets_json(&presets))
            } else {
                emit(&render_presets(&presets))
            };
        }
    };
    let resp = resp.map_err(|s| rpc(&client, s))?.into_inner();
    if g.json {
        emit_json(&chaos_json(&resp))
    } else {
        emit(&render_chaos(&resp))
    }
}

async fn events(g: &GlobalArgs, args: &EventsArgs) -> anyhow::Result<()> {
    let client = g.client().await?;
    let mut stream = client
        .events()
        .watch(events_request(args, g.env()))
        .await
        .map_err(|s| rpc(&client, s))?
        .into_inner();
    while let Some(ev) = stream.message().await.map_err(|s| rpc(&client, s))? {
        if g.json {
            emit(&serde_json::to_string(&event_json(&ev))?)?;
        } else {
            emit(&render_event(&ev))?;
        }
    }
    Ok(())
}

async fn logs(g: &GlobalArgs, args: &LogsArgs) -> anyhow::Result<()> {
    let client = g.client().await?;
    let mut stream = client
        .events()
        .watch(logs_request(args, g.env()))
        .await
        .map_err(|s| rpc(&client, s))?
        .into_inner();
    while let Some(ev) = stream.message().await.map_err(|s| rpc(&client, s))? {
        if ev.r#type != "service.log" {
            continue;
        }
        if g.json {
            emit(&serde_json::to_string(&event_json(&ev))?)?;
        } else {
            emit(&log_text(&ev))?;
        }
    }
    Ok(())
}

/// Where a file lives, made absolute: `specs/demo.toml` → `/home/me/rig/specs`.
pub(crate) fn absolute_dir(file: &std::path::Path) -> PathBuf {
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parent
        .canonicalize()
        .or_else(|_| std::path::absolute(&parent))
        .unwrap_or(parent)
}
