//! `rigctl daemon status` and `rigctl daemon stop`: the rigd at --addr, and the background rigd
//! that `rigctl up --detach` started.
//!
//! `up --detach` records the rigd it starts in a pid file in the state directory, one per
//! address (`rigd-127.0.0.1-7447.pid`), as dockerd keeps `docker.pid`. `daemon stop` sends that
//! process SIGTERM, which rigd answers as it answers Ctrl-C: it brings every environment down
//! (each service gets its stop grace) and exits; then `stop` waits for it to be gone. A signal
//! rather than an RPC: the API has no call that ends rigd, and one would let any holder of the
//! token end it from afar, while a signal only works for the user who owns it. A pid is only
//! trusted when that process is still a rigd listening on the same address, so a stale file
//! whose pid was reused never gets a process killed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::Subcommand;
use rig_proto::v1 as pb;
use serde_json::{Value, json};

use super::{GlobalArgs, emit, emit_json, now_unix, render_env_list, status_json};
use crate::client::{Client, ClientError};

/// How long `rigctl daemon stop` waits for rigd to bring its environments down and exit. Each
/// service may take its `stop_grace` (default 5 s) and services stop in reverse dependency
/// order, so this leaves room for a few levels of them.
pub const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum DaemonCommand {
    /// Is a rigd answering at --addr: its address, pid (when `up --detach` started it) and
    /// environments. Exits 3 when none answers
    Status,
    /// Stop the background rigd that `rigctl up --detach` started at --addr, and with it its
    /// environments
    Stop,
}

/// An exit without an `error:` line: the command already said what it had to (`daemon status`
/// with no rigd exits 3, as `systemctl status` does for a unit that is not running).
#[derive(Debug, thiserror::Error)]
#[error("exit {0}")]
pub struct QuietExit(pub u8);

/// The pid file of the rigd `up --detach` started on `listen`.
pub fn pid_file(state_dir: &Path, listen: SocketAddr) -> PathBuf {
    let ip = listen.ip().to_string().replace(':', "_");
    state_dir.join(format!("rigd-{ip}-{}.pid", listen.port()))
}

/// Record a background rigd (written by `up --detach` once it answers).
pub(crate) fn write_pid_file(state_dir: &Path, listen: SocketAddr, pid: u32) -> anyhow::Result<()> {
    let path = pid_file(state_dir, listen);
    std::fs::write(&path, format!("{pid}\n"))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The pid in `listen`'s pid file, if that process is still a rigd listening on `listen`.
pub fn recorded_rigd(state_dir: &Path, listen: SocketAddr) -> Option<u32> {
    let text = std::fs::read_to_string(pid_file(state_dir, listen)).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    is_rigd_on(pid, listen).then_some(pid)
}

/// Whether process `pid` runs `rigd … --listen <listen>` (and is not a zombie).
fn is_rigd_on(pid: u32, listen: SocketAddr) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_rigd = args
        .first()
        .and_then(|a0| Path::new(std::str::from_utf8(a0).ok()?).file_name())
        .is_some_and(|n| n == "rigd");
    let listen = listen.to_string();
    let on_addr = args
        .windows(2)
        .any(|w| w[0] == b"--listen" && w[1] == listen.as_bytes());
    is_rigd && on_addr && alive(pid)
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the ")" that closes the command name.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X') | None
        ),
        Err(_) => false,
    }
}

pub(crate) async fn daemon_command(g: &GlobalArgs, cmd: &DaemonCommand) -> anyhow::Result<()> {
    match cmd {
        DaemonCommand::Status => status(g).await,
        DaemonCommand::Stop => stop(g).await,
    }
}

async fn status(g: &GlobalArgs) -> anyhow::Result<()> {
    let listen = g.addr.resolve().await?;
    let dir = super::state_dir();
    let client = match Client::connect(&g.addr, g.token()).await {
        Ok(c) => c,
        Err(ClientError::NoDaemon { .. }) => {
            if g.json {
                emit_json(&json!({ "running": false, "address": g.addr.to_string() }))?;
            } else {
                emit(&format!("no rigd is running at {}", g.addr))?;
            }
            return Err(QuietExit(3).into());
        }
        Err(e) => return Err(e.into()),
    };
    let envs = client
        .environments()
        .list(pb::ListRequest {})
        .await
        .map_err(|s| super::rpc(&client, s))?
        .into_inner()
        .environments;
    let pid = recorded_rigd(&dir, listen);
    let log = dir.join("rigd.log");
    if g.json {
        return emit_json(&json!({
            "running": true,
            "address": g.addr.to_string(),
            "pid": pid,
            "log": pid.map(|_| log.display().to_string()),
            "environments": envs.iter().map(status_json).collect::<Vec<Value>>(),
        }));
    }
    let who = match pid {
        Some(pid) => format!(
            "pid {pid}, started by `rigctl up --detach`, log {}",
            log.display()
        ),
        None => "not started by `rigctl up --detach`, pid unknown".to_string(),
    };
    let mut out = format!("rigd is running at {} ({who})\n", g.addr);
    if envs.is_empty() {
        out.push_str("no environments\n");
    } else {
        out.push('\n');
        out.push_str(&render_env_list(&envs, now_unix()));
    }
    emit(&out)
}

async fn stop(g: &GlobalArgs) -> anyhow::Result<()> {
    let listen = g.addr.resolve().await?;
    let dir = super::state_dir();
    let file = pid_file(&dir, listen);
    let pid = recorded_rigd(&dir, listen);
    let client = match Client::connect(&g.addr, g.token()).await {
        Ok(c) => Some(c),
        Err(ClientError::NoDaemon { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let Some(pid) = pid else {
        // A file whose process is gone (or is no rigd any more) only misleads.
        let _ = std::fs::remove_file(&file);
        if client.is_none() {
            // Nothing to do is not a failure, as with `docker compose down` twice.
            return done(g, None, &[], &format!("no rigd is running at {}", g.addr));
        }
        bail!(
            "the rigd at {} was not started by `rigctl up --detach` (no pid file {}): stop it \
             where it runs (Ctrl-C), or send it SIGTERM",
            g.addr,
            file.display()
        );
    };
    // What goes down with it, for the message; rigd's answer is not needed to stop it.
    let mut envs = Vec::new();
    if let Some(c) = &client
        && let Ok(resp) = c.environments().list(pb::ListRequest {}).await
    {
        envs = resp
            .into_inner()
            .environments
            .into_iter()
            .map(|e| e.name)
            .collect();
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .with_context(|| format!("cannot signal rigd (pid {pid})"))?;
    let deadline = Instant::now() + DAEMON_STOP_TIMEOUT;
    while alive(pid) {
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "rigd (pid {pid}) did not exit within {}s of SIGTERM; see {} (`kill -9 {pid}` ends \
                 it, and its services with it)",
                DAEMON_STOP_TIMEOUT.as_secs(),
                dir.join("rigd.log").display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_file(&file);
    let what = if envs.is_empty() {
        String::new()
    } else {
        format!(" and its environments: {}", envs.join(", "))
    };
    done(
        g,
        Some(pid),
        &envs,
        &format!("stopped rigd at {} (pid {pid}){what}", g.addr),
    )
}

fn done(g: &GlobalArgs, pid: Option<u32>, envs: &[String], text: &str) -> anyhow::Result<()> {
    if g.json {
        emit_json(&json!({
            "address": g.addr.to_string(),
            "stopped": pid.is_some(),
            "pid": pid,
            "environments": envs,
        }))
    } else {
        emit(text)
    }
}
