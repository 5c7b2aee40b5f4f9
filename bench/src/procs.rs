//! Child processes of a benchmark: spawned (optionally pinned with `taskset`), read line by line,
//! stopped on drop, and measured through `/proc`.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::{Instant, sleep, timeout};

/// Where a benchmark keeps its scratch files (configs, logs of child processes).
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    pub fn create() -> Result<WorkDir> {
        let path = std::env::temp_dir().join(format!("rig-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(WorkDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Which CPUs a process may run on, as `taskset -c` takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cpus {
    Any,
    Core0,
    Core1,
}

impl Cpus {
    fn list(self) -> Option<&'static str> {
        match self {
            Cpus::Any => None,
            Cpus::Core0 => Some("0"),
            Cpus::Core1 => Some("1"),
        }
    }
}

/// A command to start: program, arguments, environment, pinning.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cpus: Cpus,
    /// Keep stdin open as a pipe (for the proxy server's command protocol).
    pub stdin: bool,
}

impl Spec {
    pub fn new(name: &str, program: impl Into<PathBuf>) -> Spec {
        Spec {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            cpus: Cpus::Any,
            stdin: false,
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Spec {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Spec {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Spec {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn pin(mut self, cpus: Cpus) -> Spec {
        self.cpus = cpus;
        self
    }

    pub fn with_stdin(mut self) -> Spec {
        self.stdin = true;
        self
    }
}

/// A running child. Killed (SIGKILL) when dropped while still running; [`Proc::stop`] ends it
/// gracefully.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    pid: u32,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
    stdin: Option<ChildStdin>,
    stderr_log: PathBuf,
}

impl Proc {
    /// Start `spec`; its stderr goes to `NAME.stderr.log` in `work`.
    pub fn spawn(spec: Spec, work: &WorkDir) -> Result<Proc> {
        let stderr_log = work.file(&format!("{}.stderr.log", spec.name));
        let err_file = std::fs::File::create(&stderr_log)
            .with_context(|| format!("creating {}", stderr_log.display()))?;
        // taskset execs the program, so the pid we get is the program's own (for /proc reads).
        let mut cmd = match spec.cpus.list() {
            Some(list) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(list).arg(&spec.program);
                c
            }
            None => Command::new(&spec.program),
        };
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err_file))
            .stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({})", spec.name, spec.program.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("{} exited at once", spec.name))?;
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        let stdin = child.stdin.take();
        Ok(Proc {
            name: spec.name,
            child,
            pid,
            stdout,
            stdin,
            stderr_log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The last lines the child wrote to stderr, for error messages.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// The next line on stdout, waiting at most `within`.
    pub async fn line(&mut self, within: Duration) -> Result<String> {
        let name = self.name.clone();
        let Some(out) = self.stdout.as_mut() else {
            bail!("{name}: stdout is not captured");
        };
        match timeout(within, out.next_line()).await {
            Ok(Ok(Some(l))) => Ok(l),
            Ok(Ok(None)) => Err(anyhow!(
                "{name} closed its stdout (exited?); stderr:\n{}",
                self.stderr_tail()
            )),
            Ok(Err(e)) => Err(anyhow!("{name}: reading stdout: {e}")),
            Err(_) => Err(anyhow!(
                "{name}: no output within {within:?}; stderr:\n{}",
                self.stderr_tail()
            )),
        }
    }

    /// Read stdout lines until one contains `needle`; returns it.
    pub async fn line_containing(&mut self, needle: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self.line(left).await?;
            if l.contains(needle) {
                return Ok(l);
            }
        }
    }

    /// Read and drop the rest of stdout in the background, so a chatty child never blocks on a
    /// full pipe.
    pub fn discard_stdout(&mut self) {
        if let Some(mut out) = self.stdout.take() {
            tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
        }
    }

    /// Send one command line on stdin and return the answer line.
    pub async fn command(&mut self, line: &str, within: Duration) -> Result<String> {
        let name = self.name.clone();
        let Some(stdin) = self.stdin.as_mut() else {
            bail!("{name}: stdin is not a pipe");
        };
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .with_context(|| format!("{name}: writing a command"))?;
        stdin.flush().await?;
        let answer = self.line(within).await?;
        match answer.strip_prefix("ok") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => Err(anyhow!("{name}: {line:?} failed: {answer}")),
        }
    }

    /// Wait for the child to exit by itself (bounded), returning its stdout lines.
    pub async fn wait_output(mut self, within: Duration) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        let deadline = Instant::now() + within;
        if let Some(out) = self.stdout.as_mut() {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match timeout(left, out.next_line()).await {
                    Ok(Ok(Some(l))) => lines.push(l),
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => bail!("{}: reading stdout: {e}", self.name),
                    Err(_) => bail!("{}: did not finish within {within:?}", self.name),
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let status = timeout(left.max(Duration::from_secs(1)), self.child.wait())
            .await
            .map_err(|_| anyhow!("{}: did not exit", self.name))??;
        if !status.success() {
            bail!(
                "{} failed ({status}); stderr:\n{}",
                self.name,
                self.stderr_tail()
            );
        }
        Ok(lines)
    }

    /// Poll until `addr` accepts a tcp connection, failing early if this process exits.
    pub async fn wait_port(&mut self, addr: SocketAddr, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "{} exited ({status}) before listening on {addr}; stderr:\n{}",
                    self.name,
                    self.stderr_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!("{}: nothing listens on {addr} after {within:?}", self.name);
            }
            sleep(Duration::from_millis(2)).await;
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub async fn stop(mut self, grace: Duration) {
        drop(self.stdin.take());
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if timeout(grace, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// A port that was free a moment ago (for programs that need a number: iperf3, nginx, HAProxy).
pub fn free_port() -> Result<u16> {
    let l = StdListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Resident memory of a process, in KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in {path}"))
}

/// Is `program` on PATH?
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Raise the soft open-files limit to the hard one: the memory benchmark holds thousands of
/// sockets, and children inherit the limit.
pub fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
