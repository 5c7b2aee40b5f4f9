//! A real rigd as a child process on `127.0.0.1:0`, and rigctl calls against it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root (where `specs/` and `Cargo.toml` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The directory cargo puts this profile's binaries in (`target/debug`).
pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps.
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("exe dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// The path of one of the workspace's binaries (`rigd`, `rigctl`, `rig-demo`). Builds them once
/// if this test run did not (e.g. `cargo test -p rig-tests` alone).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = bin_dir().join(name);
    if !path.exists() {
        BUILT.get_or_init(|| {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "rig-control", "-p", "rig-demo", "--bins"])
                .current_dir(workspace_root())
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build of the rig binaries failed");
        });
    }
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A unique scratch directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "rig-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until the rigd `child` (its stdout piped) says "rigd listening on ADDR" and returns
/// ADDR; then keeps draining its stdout so it never blocks on a full pipe. Panics if rigd exits
/// first.
pub fn wait_listening(child: &mut Child) -> SocketAddr {
    let stdout = child.stdout.take().expect("rigd stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(a) = l.strip_prefix("rigd listening on ") {
                    break a.trim().parse().expect("rigd printed an address");
                }
            }
            _ => {
                let status = child.wait().expect("wait rigd");
                panic!("rigd exited before listening: {status}");
            }
        }
    };
    std::thread::spawn(move || for _ in lines {});
    addr
}

/// A running rigd child process. Killed on drop (SIGKILL, like a crash; its services then die
/// by their parent-death signal).
#[derive(Debug)]
pub struct Rigd {
    pub addr: SocketAddr,
    pub child: Child,
    pub token: Option<String>,
    pub state: TempDir,
}

impl Rigd {
    /// Start rigd on 127.0.0.1:0 with its own state directory.
    pub fn start() -> Rigd {
        Rigd::start_with(&[], None)
    }

    /// Start rigd with extra args and an optional token (passed as RIG_TOKEN).
    pub fn start_with(args: &[&str], token: Option<&str>) -> Rigd {
        let state = TempDir::new("rigd");
        let mut cmd = Command::new(bin("rigd"));
        cmd.args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state.path())
            .args(args)
            .env_remove("RIG_ADDR")
            .env_remove("RIG_TOKEN")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(t) = token {
            cmd.env("RIG_TOKEN", t);
        }
        let mut child = cmd.spawn().expect("spawn rigd");
        let addr = wait_listening(&mut child);
        Rigd {
            addr,
            child,
            token: token.map(str::to_string),
            state,
        }
    }

    /// Run rigctl against this rigd and wait for it.
    pub fn rigctl(&self, args: &[&str]) -> Output {
        self.rigctl_cmd(args).output().expect("run rigctl")
    }

    /// A rigctl command aimed at this rigd (for callers that need to stream its output).
    pub fn rigctl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("rigctl"));
        cmd.arg("--addr")
            .arg(self.addr.to_string())
            .args(args)
            .env_remove("RIG_ENV")
            .env("NO_COLOR", "1")
            .current_dir(workspace_root());
        match &self.token {
            Some(t) => cmd.env("RIG_TOKEN", t),
            None => cmd.env_remove("RIG_TOKEN"),
        };
        cmd
    }

    /// rigctl that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.rigctl(args);
        assert!(
            out.status.success(),
            "rigctl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// rigctl with `--json` that must succeed; returns the parsed output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("rigctl {args:?} printed no JSON ({e}): {out}"))
    }

    /// `http://ADDR`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Rigd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Is a process alive (and not a zombie)?
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state is the field after the ")" closing the command name.
            let state = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some(Some('Z')) | Some(Some('X')))
        }
        Err(_) => false,
    }
}

/// Wait (bounded) until none of `pids` is alive; panics naming the survivors.
pub fn assert_all_gone(pids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes still alive after {within:?}: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain blocking HTTP GET of `url` (status, body); status 0 with the error as body when no
/// answer came. Usable inside or outside an async runtime.
pub fn http_get(url: &str, token: Option<&str>) -> (u16, String) {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(get(url, token))
        })
        .join()
        .expect("http_get thread")
    })
}

/// An HTTP GET of `url` (status, body); status 0 with the error as body when no answer came.
pub async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::get(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Empty::new()).expect("request");
    let resp = match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return (0, format!("error: {e}")),
        Err(_) => return (0, "error: timeout".into()),
    };
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}
