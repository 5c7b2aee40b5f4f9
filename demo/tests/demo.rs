//! End-to-end tests: the real `rig-demo` binary, one child process per
//! service on free loopback ports, wired together through the env vars rigd
//! would inject.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rig-demo");
const READY_DEADLINE: Duration = Duration::from_secs(10);

/// A port that was free a moment ago. The tiny race with another process
/// taking it before the child binds is acceptable in tests.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// A running service. Dropping it kills the child, so a failing assert never
/// leaves an orphan process behind.
struct Service {
    name: String,
    port: u16,
    child: Child,
    log: PathBuf,
}

impl Service {
    /// Starts `rig-demo <command>` on `port` with only the given variables
    /// (a clean environment, so nothing leaks in from the developer's shell).
    fn start_on(command: &str, port: u16, envs: &[(&str, String)]) -> Self {
        let name = format!("{command}-{port}");
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.log"));
        let stderr = File::create(&log).expect("create the child's log file");
        let child = Command::new(BIN)
            .arg(command)
            .env_clear()
            .env("PORT", port.to_string())
            .env("RIG_SERVICE", command)
            .env("RIG_ENV", "test")
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn rig-demo");
        Self {
            name,
            port,
            child,
            log,
        }
    }

    /// Starts the service and waits until its port accepts connections.
    fn start(command: &str, envs: &[(&str, String)]) -> Self {
        let mut service = Self::start_on(command, free_port(), envs);
        service.wait_ready();
        service
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls the port until it accepts a connection, failing fast if the
    /// child exits and giving up at the deadline.
    fn wait_ready(&mut self) {
        let addr: SocketAddr = self.addr().parse().expect("socket addr");
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited early ({status}): {}", self.name, self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {READY_DEADLINE:?}: {}",
                self.name,
                self.logs()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the child to exit by itself, bounded by `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {timeout:?}: {}",
                self.name,
                self.logs()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// kv + catalog + web, wired like rigd would.
struct Stack {
    kv: Service,
    catalog: Service,
    web: Service,
}

fn start_stack() -> Stack {
    let kv = Service::start("kv", &[]);
    let catalog = Service::start("catalog", &[("STORE_ADDR", kv.addr())]);
    let web = Service::start("web", &[("CATALOG_URL", catalog.url())]);
    Stack { kv, catalog, web }
}

/// A minimal blocking HTTP/1.1 GET: (status, body). `Connection: close`
/// makes the end of the body the end of the stream.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to web");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .expect("a complete response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, body.to_owned())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

#[test]
fn kv_speaks_the_line_protocol() {
    let kv = Service::start("kv", &[]);
    let stream = TcpStream::connect(kv.addr()).expect("connect to kv");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set read timeout");
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    let mut ask = |command: &str| {
        writer
            .write_all(format!("{command}\n").as_bytes())
            .expect("send");
        let mut line = String::new();
        reader.read_line(&mut line).expect("answer");
        line.trim_end().to_owned()
    };
    assert_eq!(ask("PING"), "PONG");
    let item7 = ask("GET item-7");
    let value = json(item7.strip_prefix("VALUE ").expect("VALUE answer"));
    assert_eq!(value["id"], "item-7");
    assert_eq!(value["name"], "Widget 7");
    assert!(value["price_cents"].is_u64());
    assert!(ask("GET item-99").starts_with("VALUE "));
    assert_eq!(ask("GET item-100"), "NONE");
    assert_eq!(ask("SET greeting hello world"), "OK");
    assert_eq!(ask("GET greeting"), "VALUE hello world");
    assert_eq!(ask("FLY away"), "ERR unknown command");
    // Pipelined commands in one write get their answers in order.
    assert_eq!(ask("PING\nGET nope\nPING"), "PONG");
    let mut rest = String::new();
    reader.read_line(&mut rest).expect("second answer");
    reader.read_line(&mut rest).expect("third answer");
    assert_eq!(rest, "NONE\nPONG\n");
}

#[test]
fn web_serves_items_through_catalog_and_store() {
    let mut stack = start_stack();
    let web = stack.web.addr();

    assert_eq!(http_get(&web, "/healthz"), (200, "ok".to_owned()));

    let (status, body) = http_get(&web, "/items/item-7");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"item-7\""), "{body}");
    let item = json(&body);
    assert_eq!(item["name"], "Widget 7");
    assert!(item["price_cents"].is_i64(), "{body}");

    let (status, body) = http_get(&web, "/items/nope");
    assert_eq!(status, 404, "{body}");
    assert_eq!(http_get(&web, "/elsewhere").0, 404);
    assert_eq!(http_get(&web, "/items/").0, 404);

    // Store down: a prompt 502 naming the gRPC code, neither a hang nor a crash.
    let kv_port = stack.kv.port;
    drop(stack.kv);
    for _ in 0..2 {
        let started = Instant::now();
        let (status, body) = http_get(&web, "/items/item-7");
        assert_eq!(status, 502, "{body}");
        assert_eq!(json(&body)["grpc_code"], "UNAVAILABLE", "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }
    assert!(
        stack.catalog.child.try_wait().expect("try_wait").is_none(),
        "catalog died"
    );
    assert!(
        stack.web.child.try_wait().expect("try_wait").is_none(),
        "web died"
    );

    // Store back on the same address: the catalog reconnects by itself.
    let mut kv = Service::start_on("kv", kv_port, &[]);
    kv.wait_ready();
    stack.kv = kv;
    let (status, body) = http_get(&web, "/items/item-7");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn catalog_reports_serving_over_grpc_health() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let kv = Service::start("kv", &[]);
    let catalog = Service::start("catalog", &[("STORE_ADDR", kv.addr())]);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(catalog.url())
            .expect("catalog url")
            .connect()
            .await
            .expect("connect to catalog");
        let mut health = HealthClient::new(channel);
        // "" is the whole server, as probed by rigd; the service name too.
        for service in ["", "demo.v1.Catalog"] {
            let request = HealthCheckRequest {
                service: service.to_owned(),
            };
            let status = health
                .check(request)
                .await
                .expect("health check")
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
        }
    });
}

#[test]
fn traffic_reports_one_line_per_second() {
    let stack = start_stack();
    let mut traffic = Service::start(
        "traffic",
        &[
            ("WEB_URL", stack.web.url()),
            ("RATE", "20".to_owned()),
            ("DURATION", "2s".to_owned()),
        ],
    );
    let status = traffic.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "traffic failed: {}", traffic.logs());

    let mut stdout = String::new();
    traffic
        .child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        !lines.is_empty(),
        "no summary line; stderr: {}",
        traffic.logs()
    );
    for line in &lines {
        assert!(
            line.starts_with("traffic: ") && line.contains(" req/s ok="),
            "{line:?}"
        );
    }
    let ok_counts: Vec<u64> = lines
        .iter()
        .filter_map(|line| line.split(" ok=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert!(ok_counts.iter().any(|&ok| ok > 0), "{stdout}");
}

#[test]
fn signals_exit_zero_promptly() {
    // Dependencies point at a closed port: shutting down must not depend on them.
    let nowhere = "127.0.0.1:1";
    let envs = [
        ("STORE_ADDR", nowhere.to_owned()),
        ("CATALOG_URL", format!("http://{nowhere}")),
        ("WEB_URL", format!("http://{nowhere}")),
    ];
    for (command, signal) in [
        ("kv", "TERM"),
        ("catalog", "INT"),
        ("web", "TERM"),
        ("traffic", "INT"),
    ] {
        let mut service = Service::start(command, &envs);
        service.signal(signal);
        let status = service.wait_exit(Duration::from_secs(5));
        assert!(status.success(), "{command} on SIG{signal}: {status}");
    }
}

#[test]
fn missing_configuration_is_a_clear_error() {
    let output = Command::new(BIN)
        .arg("kv")
        .env_clear()
        .output()
        .expect("run rig-demo");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("PORT"));

    let output = Command::new(BIN)
        .arg("catalog")
        .env_clear()
        .env("PORT", free_port().to_string())
        .output()
        .expect("run rig-demo");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("STORE_ADDR"));

    let output = Command::new(BIN)
        .arg("bogus")
        .env_clear()
        .output()
        .expect("run rig-demo");
    assert_eq!(output.status.code(), Some(2));
}
