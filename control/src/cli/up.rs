//! `rigctl up`: send a spec to rigd (starting rigd when none answers), print progress, then stay
//! in the foreground following logs until Ctrl-C brings the environment down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use rig_proto::v1 as pb;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::debug;

use super::{
    GlobalArgs, LogPrefixer, emit, emit_json, event_json, log_text, now_unix, render_down,
    render_progress, render_status, rpc, status_json, use_colour,
};
use crate::client::{Client, ClientError, DaemonAddr};
use crate::secret::Secret;

/// How long a freshly started background rigd gets to answer.
const DETACHED_START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Debug, Clone, PartialEq)]
pub struct UpArgs {
    /// The spec file (.toml or .json)
    pub file: PathBuf,
    /// Return once the environment is up; starts a background rigd if none runs
    #[arg(long, short)]
    pub detach: bool,
}

/// The `UpRequest` for a spec file: its text, its format by extension, the path as given and its
/// directory made absolute.
pub fn up_request(file: &Path) -> anyhow::Result<pb::UpRequest> {
    let format = match file.extension().and_then(|e| e.to_str()) {
        Some(ext) if ext.eq_ignore_ascii_case("toml") => "toml",
        Some(ext) if ext.eq_ignore_ascii_case("json") => "json",
        _ => bail!(
            "cannot tell the format of {}: name it *.toml or *.json",
            file.display()
        ),
    };
    // Bounded: a spec over the limit is refused here, naming the file, not by gRPC's message
    // limit halfway through the call.
    let spec = crate::spec::read_spec_text(file).map_err(|e| anyhow!("{e}"))?;
    Ok(pb::UpRequest {
        spec,
        format: format.to_string(),
        origin: file.display().to_string(),
        base_dir: super::absolute_dir(file).display().to_string(),
    })
}

/// rigd's state directory, where a background rigd's log goes: `RIG_STATE_DIR` (as rigd reads
/// it), else `$XDG_RUNTIME_DIR/rig`, else `/tmp/rig-$UID`.
pub fn state_dir() -> PathBuf {
    match std::env::var_os("RIG_STATE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => crate::daemon::default_state_dir(),
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, as one stream. Installed once, before the first await that a
/// Ctrl-C should interrupt, so none is lost between phases.
pub(crate) struct Interrupts {
    int: Signal,
    term: Signal,
}

impl Interrupts {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Interrupts {
            int: signal(SignalKind::interrupt()).context("cannot handle Ctrl-C")?,
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    pub(crate) async fn next(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }

    /// Run `fut` (the orderly shutdown after a first Ctrl-C); a second Ctrl-C exits at once.
    pub(crate) async fn or_exit<T>(&mut self, fut: impl Future<Output = T>) -> T {
        tokio::select! {
            v = fut => v,
            _ = self.next() => {
                eprintln!("interrupted again: exiting now");
                std::process::exit(130);
            }
        }
    }
}

/// A daemon running inside this process: `rigctl up` without --detach when none answered.
pub(crate) struct EmbeddedDaemon {
    handle: crate::daemon::DaemonHandle,
}

/// THE one place rigctl depends on the daemon module: start rigd in-process on `listen`.
async fn start_embedded(
    listen: SocketAddr,
    token: Option<&str>,
) -> anyhow::Result<(EmbeddedDaemon, SocketAddr)> {
    let cfg = crate::daemon::DaemonConfig {
        listen,
        token: token.and_then(Secret::non_empty),
        state_dir: state_dir(),
        ..crate::daemon::DaemonConfig::local_default()
    };
    let handle = crate::daemon::start(cfg)
        .await
        .with_context(|| format!("cannot start rigd on {listen}"))?;
    let addr = handle.local_addr();
    Ok((EmbeddedDaemon { handle }, addr))
}

impl EmbeddedDaemon {
    async fn shutdown(self) {
        self.handle.shutdown().await;
    }
}

/// A connection to rigd, and the daemon itself when it runs in this process.
pub(crate) struct Session {
    pub(crate) client: Client,
    embedded: Option<EmbeddedDaemon>,
}

impl Session {
    /// Stop the embedded daemon, if any; a no-op against an external rigd.
    pub(crate) async fn shutdown(self) {
        if let Some(d) = self.embedded {
            d.shutdown().await;
        }
    }
}

/// What to do when no rigd answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Autostart {
    /// A background rigd that outlives this command.
    Detached,
    /// rigd inside this process: Ctrl-C ends everything.
    Embedded,
}

/// Connect to rigd at --addr, starting one when nothing listens there.
pub(crate) async fn connect_or_start(g: &GlobalArgs, how: Autostart) -> anyhow::Result<Session> {
    match Client::connect(&g.addr, g.token()).await {
        Ok(client) => {
            return Ok(Session {
                client,
                embedded: None,
            });
        }
        Err(ClientError::NoDaemon { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let listen = g.addr.resolve().await?;
    match how {
        Autostart::Detached => {
            let client = start_detached(&g.addr, listen, g.token()).await?;
            Ok(Session {
                client,
                embedded: None,
            })
        }
        Autostart::Embedded => {
            eprintln!("no rigd at {}: running one in this process", g.addr);
            let (daemon, addr) = start_embedded(listen, g.token()).await?;
            match Client::connect(&DaemonAddr::from(addr), g.token()).await {
                Ok(client) => Ok(Session {
                    client,
                    embedded: Some(daemon),
                }),
                Err(e) => {
                    daemon.shutdown().await;
                    Err(e.into())
                }
            }
        }
    }
}

/// Start `rigd --listen ADDR` from next to this executable, in its own process group with its
/// output appended to `<state dir>/rigd.log`, and wait until it answers.
async fn start_detached(
    addr: &DaemonAddr,
    listen: SocketAddr,
    token: Option<&str>,
) -> anyhow::Result<Client> {
    use std::os::unix::process::CommandExt as _;

    let exe = std::env::current_exe().context("cannot locate the rigctl executable")?;
    let rigd = exe.with_file_name("rigd");
    if !rigd.is_file() {
        bail!(
            "no rigd answers at {addr} and there is no {} to start (start rigd yourself)",
            rigd.display()
        );
    }
    let dir = state_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log_path = dir.join("rigd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(&rigd);
    cmd.arg("--listen")
        .arg(listen.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a Ctrl-C in this terminal must not reach it.
        .process_group(0);
    if let Some(t) = token {
        // The environment, not argv: argv is visible to every user in `ps`.
        cmd.env("RIG_TOKEN", t);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", rigd.display()))?;
    eprintln!(
        "no rigd at {addr}: started {} (pid {}, log {}; `rigctl daemon stop` stops it)",
        rigd.display(),
        child.id(),
        log_path.display()
    );
    let deadline = Instant::now() + DETACHED_START_TIMEOUT;
    loop {
        match Client::connect(addr, token).await {
            Ok(c) => {
                // For `rigctl daemon status` and `rigctl daemon stop`.
                super::daemon::write_pid_file(&dir, listen, child.id())?;
                return Ok(c);
            }
            Err(ClientError::NoDaemon { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(status) = child.try_wait().context("cannot check on rigd")? {
            bail!(
                "rigd exited before answering ({status}); see {}",
                log_path.display()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "rigd did not answer at {addr} within {}s; see {}",
                DETACHED_START_TIMEOUT.as_secs(),
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Progress goes to stdout, or to stderr when stdout carries JSON.
fn progress(json: bool, line: &str) -> anyhow::Result<()> {
    if json {
        eprintln!("{line}");
        Ok(())
    } else {
        emit(line)
    }
}

async fn stream_up(
    client: &Client,
    req: pb::UpRequest,
    json: bool,
    env_name: &mut Option<String>,
) -> anyhow::Result<pb::EnvironmentStatus> {
    let mut stream = client
        .environments()
        .up(req)
        .await
        .map_err(|s| rpc(client, s))?
        .into_inner();
    let mut started: HashMap<String, Instant> = HashMap::new();
    let mut status = None;
    // The service whose failure a progress line already showed, with why and its last log
    // lines: the error that ends the call says it again, so it is not repeated.
    let mut shown_failure: Option<String> = None;
    loop {
        let p = match stream.message().await {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(s) => {
                return Err(match (&shown_failure, env_name.as_deref()) {
                    (Some(service), Some(env)) if !service.is_empty() => {
                        anyhow!("{env} did not come up: {service} failed (see above)")
                    }
                    (Some(_), _) => {
                        let msg = client.describe(&s);
                        anyhow!("{}", msg.lines().next().unwrap_or_default())
                    }
                    (None, _) => rpc(client, s),
                });
            }
        };
        if p.state == "failed" {
            shown_failure = Some(p.service.clone());
        }
        if !p.env.is_empty() {
            *env_name = Some(p.env.clone());
        }
        let elapsed = match p.state.as_str() {
            "starting" => {
                started.insert(p.service.clone(), Instant::now());
                None
            }
            "ready" => started.get(&p.service).map(Instant::elapsed),
            _ => None,
        };
        if let Some(line) = render_progress(&p, elapsed) {
            progress(json, &line)?;
        }
        if let Some(env) = p.environment {
            status = Some(env);
        }
    }
    status.ok_or_else(|| anyhow!("rigd ended `up` without reporting the environment"))
}

/// Send the spec and print progress; Ctrl-C meanwhile brings down what started. Returns the
/// environment once it is up; on any error the embedded daemon (if any) is stopped.
pub(crate) async fn bring_up(
    session: Session,
    req: pb::UpRequest,
    json: bool,
    interrupts: &mut Interrupts,
) -> anyhow::Result<(Session, pb::EnvironmentStatus)> {
    let mut env_name = None;
    let outcome = tokio::select! {
        r = stream_up(&session.client, req, json, &mut env_name) => Some(r),
        _ = interrupts.next() => None,
    };
    match outcome {
        Some(Ok(env)) => Ok((session, env)),
        Some(Err(e)) => {
            session.shutdown().await;
            Err(e)
        }
        None => {
            if let Some(env) = env_name {
                eprintln!("interrupted: stopping {env}");
                let client = session.client.clone();
                let down = interrupts
                    .or_exit(client.environments().down(pb::DownRequest { env }))
                    .await;
                if let Err(s) = down {
                    debug!(error = %s, "down after an interrupted up");
                }
            }
            interrupts.or_exit(session.shutdown()).await;
            Err(anyhow!("interrupted"))
        }
    }
}

enum FollowEnd {
    Interrupted,
    EnvironmentDown,
    StreamEnded,
    Failed(anyhow::Error),
}

/// Print the environment's logs like `docker compose up` until Ctrl-C (→ Down, exit 0) or the
/// environment goes down by other means. `since` (Unix seconds) skips lines from before this
/// `up`, which rigd may still retain from an earlier run of the same environment.
pub(crate) async fn follow_foreground(
    g: &GlobalArgs,
    session: Session,
    env: &pb::EnvironmentStatus,
    since: f64,
    interrupts: &mut Interrupts,
) -> anyhow::Result<()> {
    let client = session.client.clone();
    let mut prefixer = LogPrefixer::new(env.services.iter().map(|s| s.name.as_str()), use_colour());
    let req = pb::WatchRequest {
        after_seq: 0,
        only_new: false,
        follow: true,
        types: vec![
            "service.log".to_string(),
            "service.".to_string(),
            "environment.".to_string(),
        ],
        env: env.name.clone(),
        service: String::new(),
        edge: String::new(),
    };
    let mut events = client.events();
    let watch = tokio::select! {
        w = events.watch(req) => Some(w),
        _ = interrupts.next() => None,
    };
    let end = match watch {
        None => FollowEnd::Interrupted,
        Some(Err(s)) => FollowEnd::Failed(rpc(&client, s)),
        Some(Ok(resp)) => {
            let mut stream = resp.into_inner();
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = interrupts.next() => break FollowEnd::Interrupted,
                };
                let ev = match msg {
                    Ok(Some(ev)) => ev,
                    Ok(None) => break FollowEnd::StreamEnded,
                    Err(s) => break FollowEnd::Failed(rpc(&client, s)),
                };
                if ev.time < since {
                    continue;
                }
                if let Err(e) = print_follow_event(g.json, &mut prefixer, &ev) {
                    break FollowEnd::Failed(e);
                }
                if ev.r#type == "environment.down" {
                    break FollowEnd::EnvironmentDown;
                }
            }
        }
    };
    match end {
        FollowEnd::Interrupted => {
            eprintln!("stopping {}…", env.name);
            let down = interrupts
                .or_exit(client.environments().down(pb::DownRequest {
                    env: env.name.clone(),
                }))
                .await;
            let result = match down {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    if g.json {
                        emit_json(&super::down_json(&resp))
                    } else {
                        emit(&render_down(&resp))
                    }
                }
                Err(s) => Err(rpc(&client, s)),
            };
            interrupts.or_exit(session.shutdown()).await;
            result
        }
        FollowEnd::EnvironmentDown => {
            session.shutdown().await;
            Ok(())
        }
        FollowEnd::StreamEnded => {
            session.shutdown().await;
            Err(anyhow!("rigd stopped sending events for {}", env.name))
        }
        FollowEnd::Failed(e) => {
            session.shutdown().await;
            Err(e)
        }
    }
}

fn print_follow_event(
    json: bool,
    prefixer: &mut LogPrefixer,
    ev: &pb::Event,
) -> anyhow::Result<()> {
    if json {
        return emit(&serde_json::to_string(&event_json(ev))?);
    }
    let t = ev.r#type.as_str();
    let text = |fallback: &str| {
        if ev.message.is_empty() {
            fallback.to_string()
        } else {
            ev.message.clone()
        }
    };
    match t {
        "service.log" => emit(&prefixer.line(&ev.service, &log_text(ev))),
        // `up` already printed these as progress.
        "service.starting" | "service.ready" | "environment.up" => Ok(()),
        "service.failed" => emit(&format!("✖ {}", text(&format!("{} failed", ev.service)))),
        "environment.down" => emit(&text(&format!("environment {} is down", ev.env))),
        "events.lagged" => {
            eprintln!("warning: {}", text("some log lines were dropped"));
            Ok(())
        }
        _ if t.starts_with("service.") => {
            let what = t.trim_start_matches("service.");
            emit(&text(&format!("{} {what}", ev.service)))
        }
        _ => Ok(()),
    }
}

/// `rigctl up FILE [--detach]`.
pub(crate) async fn up(g: &GlobalArgs, args: &UpArgs) -> anyhow::Result<()> {
    let req = up_request(&args.file)?;
    let mut interrupts = Interrupts::new()?;
    let how = if args.detach {
        Autostart::Detached
    } else {
        Autostart::Embedded
    };
    let session = connect_or_start(g, how).await?;
    let since = now_unix();
    let (session, env) = bring_up(session, req, g.json, &mut interrupts).await?;
    if g.json {
        emit_json(&status_json(&env))?;
    } else {
        emit(&format!("\n{}", render_status(&env)))?;
    }
    if args.detach {
        return Ok(());
    }
    if !g.json {
        eprintln!("following logs of {} (Ctrl-C stops it)", env.name);
    }
    follow_foreground(g, session, &env, since, &mut interrupts).await
}
