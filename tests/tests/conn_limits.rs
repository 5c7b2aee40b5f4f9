//! Connections against file-descriptor limits, through a real rigd child whose limits are set
//! with `prlimit` (util-linux), to a `rig-demo kv` service (a separate process, answering
//! `PING` with `PONG`; it keeps the limits it started with, so it is never the bottleneck):
//!
//! * an idle proxied connection costs rigd 2 descriptors (its two sockets; splice pipes are held
//!   only while bytes move), plus a constant for the pipe pool;
//! * 5,000 concurrent connections through one edge all succeed when rigd starts with a soft
//!   limit of 1,024 (rigd raises it to the hard limit);
//! * with a low hard limit every connection is relayed or refused cleanly (never left hanging),
//!   the refusals are counted on /metrics and logged, and afterwards the edge relays again.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use rig_proto::v1 as pb;
use rig_tests::eventually::eventually;
use rig_tests::prom;
use rig_tests::rigd::{Rigd, TempDir, bin, http_get, wait_listening};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The splice pipes rigd may keep pooled while connections are idle (2 descriptors each; the
/// pool keeps at most 64, `rig_proxy` tcp/splice.rs `POOL_IDLE_MAX`), plus a little slack for
/// whatever else rigd opens meanwhile (log files, a scrape).
const FD_CONSTANT: usize = 2 * 64 + 16;

/// A connection neither relayed nor refused within this counts as hung (generous: a debug rigd
/// on a loaded 2-core machine answers in milliseconds).
const ROUND_TRIP_WITHIN: Duration = Duration::from_secs(10);

/// How many connections are being opened at once.
const PARALLEL: usize = 64;

/// A rigd child started under `prlimit --nofile=SOFT:HARD`, and the lines it wrote to stderr.
struct LimitedRigd {
    rigd: Rigd,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl LimitedRigd {
    fn start(soft: u64, hard: u64) -> LimitedRigd {
        let state = TempDir::new("rigd-limits");
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={soft}:{hard}"))
            .arg("--")
            .arg(bin("rigd"))
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state.path())
            .env_remove("RIG_ADDR")
            .env_remove("RIG_TOKEN")
            // RIG_TEST_RIGD_LOG=warn,rig_proxy=debug shows what the edge does.
            .env(
                "RUST_LOG",
                std::env::var("RIG_TEST_RIGD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // prlimit sets the limits on itself and execs rigd: the child's pid is rigd's.
        let mut child = cmd
            .spawn()
            .expect("run prlimit (util-linux) to start rigd under a file-descriptor limit");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().expect("rigd stderr");
        std::thread::spawn({
            let stderr = stderr.clone();
            move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("rigd: {line}");
                    stderr.lock().expect("stderr lines").push(line);
                }
            }
        });
        let addr = wait_listening(&mut child);
        LimitedRigd {
            rigd: Rigd {
                addr,
                child,
                token: None,
                state,
            },
            stderr,
        }
    }

    fn pid(&self) -> u32 {
        self.rigd.child.id()
    }

    /// Descriptors rigd has open now.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read rigd's /proc/PID/fd")
            .count()
    }

    /// rigd's `(soft, hard)` RLIMIT_NOFILE, from /proc/PID/limits.
    fn nofile(&self) -> (u64, u64) {
        let limits =
            std::fs::read_to_string(format!("/proc/{}/limits", self.pid())).expect("limits");
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("Max open files line");
        let mut nums = line
            .split_whitespace()
            .filter_map(|w| w.parse::<u64>().ok());
        (nums.next().expect("soft"), nums.next().expect("hard"))
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (code, body) = http_get(&self.rigd.url("/metrics"), None);
        assert_eq!(code, 200, "GET /metrics: {body}");
        prom::value(&body, name, labels)
    }

    /// Set rigd's RLIMIT_NOFILE now (its services keep theirs).
    fn set_limit(&self, soft: u64, hard: u64) {
        let out = Command::new("prlimit")
            .arg(format!("--pid={}", self.pid()))
            .arg(format!("--nofile={soft}:{hard}"))
            .output()
            .expect("run prlimit");
        assert!(out.status.success(), "prlimit: {out:?}");
        assert_eq!(self.nofile(), (soft, hard));
    }

    /// Bring up an environment whose one edge, `client/echo`, proxies to a `rig-demo kv`;
    /// returns the edge's proxy address.
    async fn edge(&self, dir: &TempDir) -> SocketAddr {
        let spec = format!(
            r#"
name = "conns"

[services.echo]
command = [{demo:?}, "kv"]
[services.echo.ingresses.default]
protocol = "tcp"

[services.client]
command = ["sleep", "3600"]
[services.client.egresses.echo]
service = "echo"
"#,
            demo = bin("rig-demo").display().to_string()
        );
        let path: PathBuf = dir.path().join("conns.toml");
        std::fs::write(&path, spec).expect("write spec");
        self.rigd
            .ok(&["up", path.to_str().expect("utf-8 path"), "--detach"]);
        let st = status(&self.rigd, "conns").await;
        let edge = st
            .edges
            .iter()
            .find(|e| e.edge == "client/echo")
            .unwrap_or_else(|| panic!("no edge client/echo in {:?}", st.edges));
        edge.proxy_address.parse().expect("proxy address")
    }
}

async fn status(rigd: &Rigd, env: &str) -> pb::EnvironmentStatus {
    let mut c = pb::environments_client::EnvironmentsClient::connect(rigd.url(""))
        .await
        .expect("connect to rigd");
    c.status(pb::StatusRequest { env: env.into() })
        .await
        .expect("status")
        .into_inner()
}

/// What became of one connection through the edge.
enum Outcome {
    /// The echo came back; the connection is kept open.
    Relayed(TcpStream),
    /// Refused cleanly: connect failed, or the connection was reset or closed before the echo.
    Refused(String),
    /// Neither within the time allowed: not clean.
    Hung,
}

/// Connect through `addr` and make one echo round trip.
async fn round_trip(addr: SocketAddr) -> Outcome {
    let attempt = async {
        let mut c = match TcpStream::connect(addr).await {
            Ok(c) => c,
            Err(e) => return Outcome::Refused(format!("connect: {e}")),
        };
        if let Err(e) = c.write_all(b"PING\n").await {
            return Outcome::Refused(format!("write: {e}"));
        }
        let mut b = [0u8; 5];
        match c.read_exact(&mut b).await {
            Ok(_) if &b == b"PONG\n" => Outcome::Relayed(c),
            Ok(_) => Outcome::Refused(format!("echoed {b:?}")),
            Err(e) => Outcome::Refused(format!("read: {e}")),
        }
    };
    tokio::time::timeout(ROUND_TRIP_WITHIN, attempt)
        .await
        .unwrap_or(Outcome::Hung)
}

/// Open `n` connections through `addr`, `PARALLEL` at a time, each with one round trip, and
/// keep those that were relayed open.
async fn open(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, Vec<String>, usize) {
    let outcomes: Vec<Outcome> = stream::iter(0..n)
        .map(|_| round_trip(addr))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let (mut relayed, mut refused, mut hung) = (Vec::new(), Vec::new(), 0);
    for o in outcomes {
        match o {
            Outcome::Relayed(c) => relayed.push(c),
            Outcome::Refused(why) => refused.push(why),
            Outcome::Hung => hung += 1,
        }
    }
    (relayed, refused, hung)
}

/// This process needs a descriptor for each client connection; returns the hard limit.
fn raise_own_limit(need: u64) -> u64 {
    let (soft, hard) = rig_proxy::limits::raise_nofile_limit().expect("raise RLIMIT_NOFILE");
    assert!(
        soft >= need,
        "this test needs an fd limit of at least {need} (hard limit is {hard}; run with a higher `ulimit -Hn`)"
    );
    hard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_proxied_connection_costs_rigd_two_fds() {
    const N: usize = 1000;
    let hard = raise_own_limit(2 * N as u64 + 1024);
    let rigd = LimitedRigd::start(hard, hard);
    let dir = TempDir::new("conn-fds");
    let addr = rigd.edge(&dir).await;
    // Warm up once (the runtime's and the pipe pool's one-time descriptors), then measure.
    drop(open(addr, PARALLEL).await);
    eventually(
        "the warm-up connections close",
        Duration::from_secs(10),
        || async { (rigd.metric("rig_edge_connections_open", &[]) == 0.0).then_some(()) },
    )
    .await;
    let before = rigd.fds();
    let (conns, refused, hung) = open(addr, N).await;
    assert_eq!((conns.len(), hung), (N, 0), "refused: {refused:?}");
    let during = rigd.fds();
    let pipes = rigd.metric("rig_edge_splice_pipes_open", &[]);
    let added = during.saturating_sub(before);
    eprintln!(
        "rigd fds: {before} before, {during} with {N} idle connections: {:.2} per connection ({pipes} splice pipes open)",
        added as f64 / N as f64
    );
    assert!(
        added <= 2 * N + FD_CONSTANT,
        "{N} idle connections cost rigd {added} descriptors, more than 2 each + {FD_CONSTANT}"
    );
    drop(conns);
    eventually(
        "rigd closes the connections' descriptors",
        Duration::from_secs(10),
        || async { (rigd.fds() <= before + FD_CONSTANT).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_connections_through_one_edge_with_a_soft_limit_of_1024() {
    const N: usize = 5000;
    let hard = raise_own_limit(2 * N as u64 + 1024);
    let rigd = LimitedRigd::start(1024, hard);
    assert_eq!(rigd.nofile(), (hard, hard), "rigd raised its soft limit");
    let dir = TempDir::new("conn-5k");
    let addr = rigd.edge(&dir).await;
    let (conns, refused, hung) = open(addr, N).await;
    assert_eq!(
        (conns.len(), refused.len(), hung),
        (N, 0, 0),
        "all relayed; refused: {:?}",
        &refused[..refused.len().min(5)]
    );
    let open_now = rigd.metric("rig_edge_connections_open", &[("edge", "client/echo")]);
    assert_eq!(open_now, N as f64, "the edge has them all open");
    assert_eq!(
        rigd.metric(
            "rig_edge_connections_refused_total",
            &[("reason", "fd_limit")]
        ),
        0.0
    );
    drop(conns);
    eventually(
        "the edge closes them all",
        Duration::from_secs(20),
        || async {
            (rigd.metric("rig_edge_connections_open", &[("edge", "client/echo")]) == 0.0)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_low_hard_limit_connections_are_relayed_or_refused_counted_and_the_edge_recovers() {
    const N: usize = 400;
    const LOW: u64 = 200;
    let hard = raise_own_limit(2 * N as u64 + 1024);
    let rigd = LimitedRigd::start(hard, hard);
    let dir = TempDir::new("conn-low");
    let addr = rigd.edge(&dir).await;
    // A low hard limit on rigd alone, once its service has started with its own: room for
    // rigd's descriptors and some dozens of connections, not for N.
    rigd.set_limit(LOW, LOW);
    let (conns, refused, hung) = open(addr, N).await;
    eprintln!(
        "low limit: {} relayed, {} refused, {hung} hung",
        conns.len(),
        refused.len()
    );
    assert_eq!(
        hung, 0,
        "every connection relayed or refused, none left hanging"
    );
    assert!(!conns.is_empty(), "some connections relayed");
    assert!(!refused.is_empty(), "some connections refused");
    drop(conns);

    let counted = rigd.metric(
        "rig_edge_connections_refused_total",
        &[("reason", "fd_limit")],
    );
    assert!(counted > 0.0, "refusals counted on /metrics: {counted}");
    let logged = rigd
        .stderr
        .lock()
        .expect("stderr lines")
        .iter()
        .any(|l| l.contains("out of file descriptors"));
    assert!(logged, "rigd logs that it ran out of file descriptors");

    // Afterwards the edge relays again, every time.
    eventually("the edge relays again", Duration::from_secs(10), || async {
        matches!(round_trip(addr).await, Outcome::Relayed(_)).then_some(())
    })
    .await;
    let (again, refused, hung) = open(addr, 20).await;
    assert_eq!(
        (again.len(), hung),
        (20, 0),
        "after the burst all relayed: {refused:?}"
    );
}
