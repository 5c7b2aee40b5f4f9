//! End to end: a real rigd process, real services (rig-demo), rigctl as a user runs it, traffic
//! from a real client, /metrics read back.

use std::path::PathBuf;
use std::time::Duration;

use rig_proto::v1 as pb;
use rig_tests::prom;
use rig_tests::rigd::{Rigd, TempDir, alive, assert_all_gone, http_get};

/// A three-service chain: web (http) → catalog (grpc) → store (tcp).
fn chain_spec(dir: &TempDir, name: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"
name = "{name}"

[services.store]
command = ["rig-demo", "kv"]
[services.store.ingresses.default]
protocol = "tcp"

[services.catalog]
command = ["rig-demo", "catalog"]
[services.catalog.ingresses.default]
protocol = "grpc"
[services.catalog.egresses.store]
service = "store"

[services.web]
command = ["rig-demo", "web"]
[services.web.ingresses.default]
protocol = "http"
ready = {{ path = "/healthz", timeout = "20s" }}
[services.web.egresses.catalog]
service = "catalog"
{extra}
"#
    );
    let path = dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write spec");
    path
}

fn status(rigd: &Rigd, env: &str) -> pb::EnvironmentStatus {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = pb::environments_client::EnvironmentsClient::connect(rigd.url(""))
            .await
            .expect("connect to rigd");
        c.status(pb::StatusRequest { env: env.into() })
            .await
            .expect("status")
            .into_inner()
    })
}

fn pids(st: &pb::EnvironmentStatus) -> Vec<u32> {
    st.services
        .iter()
        .map(|s| s.pid)
        .filter(|p| *p != 0)
        .collect()
}

fn ingress(st: &pb::EnvironmentStatus, service: &str) -> String {
    st.services
        .iter()
        .find(|s| s.name == service)
        .and_then(|s| s.ingresses.first())
        .map(|i| i.address.clone())
        .unwrap_or_else(|| panic!("no ingress for {service}"))
}

fn metric(rigd: &Rigd, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (code, body) = http_get(&rigd.url("/metrics"), rigd.token.as_deref());
    assert_eq!(code, 200, "GET /metrics: {body}");
    prom::value(&body, name, labels)
}

#[test]
fn up_traffic_chaos_metrics_down() {
    let rigd = Rigd::start();
    let dir = TempDir::new("e2e");
    let spec = chain_spec(&dir, "shop", "");
    let out = rigd.ok(&["up", spec.to_str().unwrap(), "--detach"]);
    assert!(out.contains("web"), "up output names the services: {out}");

    let st = status(&rigd, "shop");
    assert_eq!(st.state(), pb::EnvironmentState::Up);
    let all = pids(&st);
    assert_eq!(all.len(), 3, "three services running: {st:?}");
    for p in &all {
        assert!(alive(*p));
    }
    // Every edge is wired through a proxy, not to the target directly.
    for e in &st.edges {
        assert!(e.observed);
        assert_ne!(e.proxy_address, e.target_address, "{e:?}");
    }

    let web = format!("http://{}", ingress(&st, "web"));
    let (code, body) = http_get(&format!("{web}/items/item-7"), None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("item-7"), "{body}");

    // Break the grpc edge: in force when the command returns.
    let out = rigd.ok(&[
        "chaos",
        "set",
        "web/catalog",
        "--error-rate",
        "1",
        "--grpc-code",
        "UNAVAILABLE",
    ]);
    assert!(out.contains("web/catalog"), "{out}");
    let (code, body) = http_get(&format!("{web}/items/item-7"), None);
    assert_eq!(
        code, 502,
        "the injected UNAVAILABLE reaches web as a gRPC error: {body}"
    );
    assert!(body.contains("UNAVAILABLE"), "{body}");

    let env = [("env", "shop"), ("edge", "web/catalog")];
    let injected = metric(
        &rigd,
        "rig_edge_faults_injected_total",
        &[env[0], env[1], ("fault", "error")],
    );
    assert!(injected >= 1.0, "faults counted: {injected}");
    let unavailable = metric(
        &rigd,
        "rig_edge_requests_total",
        &[env[0], env[1], ("status", "UNAVAILABLE")],
    );
    assert!(
        unavailable >= 1.0,
        "requests by status counted: {unavailable}"
    );
    let ok = metric(
        &rigd,
        "rig_edge_requests_total",
        &[env[0], env[1], ("status", "OK")],
    );
    assert!(ok >= 1.0, "the request before chaos was counted OK: {ok}");
    let tcp_bytes = metric(
        &rigd,
        "rig_edge_bytes_total",
        &[
            ("env", "shop"),
            ("edge", "catalog/store"),
            ("direction", "upstream"),
        ],
    );
    assert!(tcp_bytes > 0.0, "the tcp edge counted bytes: {tcp_bytes}");

    // The invalid change is refused and the policy in force stays.
    let bad = rigd.rigctl(&["chaos", "set", "web/catalog", "--error-rate", "2"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("error_rate"),
        "the error names the field: {err}"
    );
    let (code, _) = http_get(&format!("{web}/items/item-7"), None);
    assert_eq!(code, 502, "the old policy is still in force");

    rigd.ok(&["chaos", "clear", "web/catalog"]);
    let (code, body) = http_get(&format!("{web}/items/item-7"), None);
    assert_eq!(code, 200, "clear takes effect at once: {body}");

    let out = rigd.ok(&["down", "shop"]);
    assert!(out.contains("shop") || out.contains("web"), "{out}");
    assert_all_gone(&all, Duration::from_secs(10));
    let list = rigd.ok(&["ls"]);
    assert!(!list.contains("shop"), "the environment is gone: {list}");
}

#[test]
fn sigkill_of_rigd_takes_its_services_with_it() {
    let mut rigd = Rigd::start();
    let dir = TempDir::new("e2e-kill");
    let spec = chain_spec(&dir, "doomed", "");
    rigd.ok(&["up", spec.to_str().unwrap(), "--detach"]);
    let all = pids(&status(&rigd, "doomed"));
    assert_eq!(all.len(), 3);
    rigd.child.kill().expect("SIGKILL rigd");
    let _ = rigd.child.wait();
    assert_all_gone(&all, Duration::from_secs(10));
}

#[test]
fn a_failing_service_reports_why_and_leaves_nothing_running() {
    let rigd = Rigd::start();
    let dir = TempDir::new("e2e-fail");
    let spec = chain_spec(
        &dir,
        "broken",
        r#"
[services.bad]
command = ["sh", "-c", "echo 'config missing: DATABASE_URL' >&2; exit 3"]
[services.bad.ingresses.default]
protocol = "tcp"
[services.bad.egresses.web]
service = "web"
"#,
    );
    let out = rigd.rigctl(&["up", spec.to_str().unwrap(), "--detach"]);
    assert!(!out.status.success(), "up must fail");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("bad"), "names the service: {all}");
    assert!(all.contains("code 3"), "says why: {all}");
    assert!(
        all.contains("config missing: DATABASE_URL"),
        "shows its last log lines: {all}"
    );
    // Nothing half-started: the environment is not listed and no child of rigd remains.
    let list = rigd.ok(&["ls"]);
    assert!(!list.contains("broken"), "{list}");
    let children = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        rigd.child.id(),
        rigd.child.id()
    ))
    .unwrap_or_default();
    let left: Vec<u32> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| alive(*p))
        .collect();
    assert_all_gone(&left, Duration::from_secs(10));
}

#[test]
fn an_invalid_spec_names_file_line_and_field_and_starts_nothing() {
    let rigd = Rigd::start();
    let dir = TempDir::new("e2e-invalid");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "name = \"bad\"\n\n[services.web]\ncommand = [\"rig-demo\", \"web\"]\n[services.web.ingresses.default]\nprotocol = \"http\"\n[services.web.egresses.db]\nservice = \"postgres\"\n",
    )
    .unwrap();
    let out = rigd.rigctl(&["up", path.to_str().unwrap(), "--detach"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml"), "names the file: {err}");
    assert!(err.contains(":8"), "names the line: {err}");
    assert!(err.contains("postgres"), "names the value: {err}");
    let list = rigd.ok(&["ls"]);
    assert!(!list.contains("bad"), "{list}");
}

#[test]
fn environments_are_isolated_and_names_unique() {
    let rigd = Rigd::start();
    let dir = TempDir::new("e2e-two");
    let a = chain_spec(&dir, "alpha", "");
    let b = chain_spec(&dir, "beta", "");
    rigd.ok(&["up", a.to_str().unwrap(), "--detach"]);
    rigd.ok(&["up", b.to_str().unwrap(), "--detach"]);
    let again = rigd.rigctl(&["up", a.to_str().unwrap(), "--detach"]);
    assert!(!again.status.success(), "a second alpha is refused");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    // Chaos on one environment does not touch the other.
    let sa = status(&rigd, "alpha");
    let sb = status(&rigd, "beta");
    let wa = format!("http://{}/items/item-1", ingress(&sa, "web"));
    let wb = format!("http://{}/items/item-1", ingress(&sb, "web"));
    // web/catalog is grpc: `--status` does not apply and is refused, naming the field.
    let bad = rigd.rigctl(&[
        "--env",
        "alpha",
        "chaos",
        "set",
        "web/catalog",
        "--status",
        "503",
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("status"));
    rigd.ok(&[
        "--env",
        "alpha",
        "chaos",
        "set",
        "web/catalog",
        "--grpc-code",
        "INTERNAL",
    ]);
    assert_eq!(http_get(&wa, None).0, 502);
    assert_eq!(http_get(&wb, None).0, 200);
    // Without --env, rigctl must ask which one.
    let amb = rigd.rigctl(&["chaos", "get"]);
    assert!(!amb.status.success());
    assert!(String::from_utf8_lossy(&amb.stderr).contains("--env"));
    let pa = pids(&sa);
    let pb = pids(&sb);
    rigd.ok(&["down", "alpha"]);
    assert_all_gone(&pa, Duration::from_secs(10));
    assert!(pb.iter().all(|p| alive(*p)), "beta keeps running");
    assert_eq!(http_get(&wb, None).0, 200);
    rigd.ok(&["down", "beta"]);
    assert_all_gone(&pb, Duration::from_secs(10));
}

#[test]
fn services_get_their_wiring_in_env_vars() {
    let rigd = Rigd::start();
    let dir = TempDir::new("e2e-env");
    let out = dir.path().join("env.txt");
    let text = format!(
        r#"
name = "wiring"
[services.store]
command = ["rig-demo", "kv"]
[services.store.ingresses.default]
protocol = "tcp"
[services.store.ingresses.admin]
protocol = "http"
ready = false

[services.probe]
command = ["sh", "-c", "env > {out}.tmp && mv {out}.tmp {out} && exec sleep 600", "--", "${{DB_ADDR}}"]
[services.probe.egresses.db]
service = "store"
ingress = "default"
[services.probe.egresses.admin-api]
service = "store"
ingress = "admin"
observe = false
"#,
        out = out.display()
    );
    let spec = dir.path().join("wiring.toml");
    std::fs::write(&spec, text).unwrap();
    rigd.ok(&["up", spec.to_str().unwrap(), "--detach"]);
    let st = status(&rigd, "wiring");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !out.exists() {
        assert!(std::time::Instant::now() < deadline, "probe wrote no env");
        std::thread::sleep(Duration::from_millis(20));
    }
    let env: std::collections::HashMap<String, String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let db = st
        .edges
        .iter()
        .find(|e| e.edge == "probe/db")
        .expect("edge probe/db");
    let admin = st
        .edges
        .iter()
        .find(|e| e.edge == "probe/admin-api")
        .expect("edge probe/admin-api");
    assert_eq!(
        env["DB_ADDR"], db.proxy_address,
        "observed edges point at the proxy"
    );
    assert_eq!(
        format!("{}:{}", env["DB_HOST"], env["DB_PORT"]),
        db.proxy_address
    );
    assert!(!env.contains_key("DB_URL"), "no URL for a tcp egress");
    assert!(!admin.observed);
    assert_eq!(
        env["ADMIN_API_URL"],
        format!("http://{}", admin.target_address),
        "observe = false wires the target itself"
    );
    assert_eq!(env["RIG_SERVICE"], "probe");
    assert_eq!(env["RIG_ENV"], "wiring");
    let wiring: serde_json::Value =
        serde_json::from_str(&env["RIG_WIRING"]).expect("RIG_WIRING is JSON");
    assert_eq!(wiring["egresses"]["db"]["addr"], db.proxy_address.as_str());
    // The store's two ingresses: HOST/PORT only for `default`, prefixed otherwise.
    let store = st.services.iter().find(|s| s.name == "store").unwrap();
    assert!(store.ingresses.iter().any(|i| i.name == "admin"));
    rigd.ok(&["down"]);
}

#[test]
fn a_token_guards_every_call() {
    let refused = std::process::Command::new(rig_tests::rigd::bin("rigd"))
        .args(["--listen", "0.0.0.0:0"])
        .env_remove("RIG_TOKEN")
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "non-loopback without a token is refused"
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("RIG_TOKEN"));

    let rigd = Rigd::start_with(&[], Some("s3cret"));
    assert_eq!(http_get(&rigd.url("/metrics"), None).0, 401);
    assert_eq!(http_get(&rigd.url("/metrics"), Some("wrong")).0, 401);
    assert_eq!(http_get(&rigd.url("/metrics"), Some("s3cret")).0, 200);
    rigd.ok(&["ls"]);
    let mut anon = rigd.rigctl_cmd(&["ls"]);
    anon.env_remove("RIG_TOKEN");
    let out = anon.output().unwrap();
    assert!(!out.status.success(), "rigctl without the token is refused");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("token")
    );
}

#[test]
fn events_are_served_as_sse_and_resume_from_last_event_id() {
    let rigd = Rigd::start();
    let dir = TempDir::new("e2e-sse");
    let spec = chain_spec(&dir, "sse", "");
    rigd.ok(&["up", spec.to_str().unwrap(), "--detach"]);
    rigd.ok(&["down", "sse"]);
    // The log now holds the whole life of the environment; read it over SSE with a resume point.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let text = rt.block_on(async {
        use http_body_util::BodyExt;
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let req = http::Request::get(rigd.url("/events?types=service.ready,environment."))
            .header("last-event-id", "1")
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = client.request(req).await.expect("GET /events");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut text = String::new();
        // Read frames until the environment.down event arrives (bounded).
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    text.push_str(&String::from_utf8_lossy(&data));
                    if text.contains("event: environment.down") {
                        break;
                    }
                }
            }
        })
        .await;
        text
    });
    assert!(text.contains("event: service.ready"), "{text}");
    assert!(text.contains("event: environment.up"), "{text}");
    assert!(text.contains("event: environment.down"), "{text}");
    assert!(!text.contains("id: 1\n"), "resumed after id 1: {text}");
    assert!(
        !text.contains("service.starting"),
        "filtered by type: {text}"
    );
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Read lines from a child's stdout on a thread, so the test can wait for one with a deadline.
fn line_reader(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_for_line(
    rx: &std::sync::mpsc::Receiver<String>,
    want: impl Fn(&str) -> bool,
    seen: &mut Vec<String>,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = want(&l);
                seen.push(l);
                if hit {
                    return;
                }
            }
            Err(_) => panic!("no such line within 20s; saw:\n{}", seen.join("\n")),
        }
    }
}

fn interrupt(child: &std::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
}

fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(std::time::Instant::now() < deadline, "rigctl did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn foreground_up_prefixes_logs_and_ctrl_c_brings_the_environment_down() {
    let rigd = Rigd::start();
    let dir = TempDir::new("e2e-fg");
    let spec = chain_spec(&dir, "fg", "");
    let mut up = rigd
        .rigctl_cmd(&["up", spec.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = line_reader(up.stdout.take().unwrap());
    let mut seen = Vec::new();
    // The services' own output, prefixed by their names, as `docker compose up` shows it.
    wait_for_line(
        &lines,
        |l| l.starts_with("web") && l.contains('|') && l.contains("listening on"),
        &mut seen,
    );
    let all = pids(&status(&rigd, "fg"));
    assert_eq!(all.len(), 3);
    // `rigctl logs` replays a service's lines.
    let logs = rigd.ok(&["logs", "store"]);
    assert!(logs.contains("listening on"), "{logs}");

    interrupt(&up);
    let st = wait_exit(&mut up);
    assert!(st.success(), "Ctrl-C is a clean exit: {st}");
    assert_all_gone(&all, Duration::from_secs(10));
    assert!(!rigd.ok(&["ls"]).contains("fg"));
}

#[test]
fn up_runs_rigd_embedded_when_none_answers() {
    let dir = TempDir::new("e2e-embed");
    let spec = chain_spec(&dir, "embedded", "");
    let addr = format!("127.0.0.1:{}", free_port());
    let rigctl = rig_tests::rigd::bin("rigctl");
    let mut up = std::process::Command::new(&rigctl)
        .args(["--addr", &addr, "up", spec.to_str().unwrap()])
        .env("RIG_STATE_DIR", dir.path())
        .env_remove("RIG_TOKEN")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = line_reader(up.stdout.take().unwrap());
    let mut seen = Vec::new();
    wait_for_line(
        &lines,
        |l| l.contains("embedded is up") || l.contains("environment embedded is up"),
        &mut seen,
    );
    // Another rigctl reaches the embedded rigd on the same address and can change chaos live.
    let other = std::process::Command::new(&rigctl)
        .args([
            "--addr",
            &addr,
            "chaos",
            "set",
            "web/catalog",
            "--latency",
            "5ms",
        ])
        .env_remove("RIG_TOKEN")
        .output()
        .unwrap();
    assert!(
        other.status.success(),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    interrupt(&up);
    assert!(wait_exit(&mut up).success());
    // The embedded rigd went with it.
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "nothing listens on {addr} any more"
    );
}

#[test]
fn up_detach_starts_a_background_rigd_when_none_answers() {
    let dir = TempDir::new("e2e-bg");
    let spec = chain_spec(&dir, "background", "");
    let addr = format!("127.0.0.1:{}", free_port());
    let rigctl = |args: &[&str]| {
        std::process::Command::new(rig_tests::rigd::bin("rigctl"))
            .arg("--addr")
            .arg(&addr)
            .args(args)
            .env("RIG_STATE_DIR", dir.path())
            .env_remove("RIG_TOKEN")
            .output()
            .unwrap()
    };
    let out = rigctl(&["up", spec.to_str().unwrap(), "--detach"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // rigctl has exited; the environment lives on in the background rigd.
    let ls = rigctl(&["ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("background"));
    // `daemon status` names the background rigd, its pid and its environment.
    let st = rigctl(&["--json", "daemon", "status"]);
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).expect("JSON");
    assert_eq!(st["running"], true, "{st}");
    assert_eq!(st["address"], addr.as_str(), "{st}");
    assert_eq!(st["environments"][0]["name"], "background", "{st}");
    let rigd_pid = st["pid"].as_u64().expect("the pid of the rigd up started") as u32;
    let text = String::from_utf8_lossy(&rigctl(&["daemon", "status"]).stdout).into_owned();
    assert!(
        text.starts_with(&format!("rigd is running at {addr} (pid {rigd_pid}")),
        "{text}"
    );
    assert!(text.contains("background"), "{text}");
    // That pid listens on the address: it is rigd's, not a guess.
    let cmdline = std::fs::read(format!("/proc/{rigd_pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains(&addr));
    let ps = rigctl(&["--json", "ps"]);
    assert!(ps.status.success());
    let ps: serde_json::Value = serde_json::from_slice(&ps.stdout).expect("ps --json prints JSON");
    let mut service_pids = Vec::new();
    collect_pids(&ps, &mut service_pids);
    assert_eq!(service_pids.len(), 3, "{ps}");

    // `daemon stop` ends it and its environment, and returns once they are gone.
    let stop = rigctl(&["daemon", "stop"]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&stop.stdout).trim_end(),
        format!("stopped rigd at {addr} (pid {rigd_pid}) and its environments: background")
    );
    assert!(!alive(rigd_pid), "rigd is gone when stop returns");
    assert_all_gone(&service_pids, Duration::from_secs(5));
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "nothing listens on {addr}"
    );
    assert!(
        dir.path().join("rigd.log").exists(),
        "the background rigd logs to the state dir"
    );
    // Afterwards: status says none runs (exit 3), a second stop has nothing to do (exit 0).
    let st = rigctl(&["daemon", "status"]);
    assert_eq!(st.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&st.stdout).trim_end(),
        format!("no rigd is running at {addr}")
    );
    let again = rigctl(&["daemon", "stop"]);
    assert!(again.status.success());
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim_end(),
        format!("no rigd is running at {addr}")
    );
}

#[test]
fn daemon_status_and_stop_of_a_rigd_started_by_hand() {
    let rigd = Rigd::start();
    let dir = TempDir::new("e2e-hand");
    let spec = chain_spec(&dir, "hand", "");
    rigd.ok(&["up", "--detach", spec.to_str().unwrap()]);
    let cmd = |args: &[&str]| {
        rigd.rigctl_cmd(args)
            .env("RIG_STATE_DIR", dir.path())
            .output()
            .unwrap()
    };
    let st = cmd(&["daemon", "status"]);
    assert!(st.status.success());
    let text = String::from_utf8_lossy(&st.stdout).into_owned();
    assert!(
        text.starts_with(&format!(
            "rigd is running at {} (not started by `rigctl up --detach`, pid unknown)",
            rigd.addr
        )),
        "{text}"
    );
    assert!(text.contains("hand"), "{text}");
    // rigctl did not start it, so it will not guess which process to signal.
    let stop = cmd(&["daemon", "stop"]);
    assert_eq!(stop.status.code(), Some(1));
    let err = String::from_utf8_lossy(&stop.stderr);
    assert!(
        err.contains("was not started by `rigctl up --detach`"),
        "{err}"
    );
    assert!(alive(rigd.child.id()), "rigd still runs");
    // A pid file whose pid is not that rigd (here: the test itself) is not trusted either.
    std::fs::write(
        rig_control::cli::pid_file(dir.path(), rigd.addr),
        format!("{}\n", std::process::id()),
    )
    .unwrap();
    assert_eq!(cmd(&["daemon", "stop"]).status.code(), Some(1));
    assert!(alive(rigd.child.id()));
}

#[test]
fn sizes_in_chaos_print_as_numbers_of_bytes() {
    let rigd = Rigd::start();
    let dir = TempDir::new("e2e-sizes");
    let spec = chain_spec(&dir, "sizes", "");
    rigd.ok(&["up", "--detach", spec.to_str().unwrap()]);
    let out = rigd.ok(&[
        "chaos",
        "set",
        "catalog/store",
        "--error-rate",
        "0.1",
        "--reset-after",
        "64KiB",
    ]);
    assert!(out.contains("reset_after = 65536"), "{out}");
    let ps = rigd.ok(&["ps"]);
    assert!(ps.contains("reset_after = 65536"), "{ps}");
    let got = rigd.json(&["chaos", "get", "catalog/store"]);
    assert_eq!(got[0]["chaos"]["reset_after"], 65536, "{got}");
}

fn collect_pids(v: &serde_json::Value, out: &mut Vec<u32>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v.as_u64()) {
                    ("pid", Some(p)) if p != 0 => out.push(p as u32),
                    _ => collect_pids(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_pids(v, out)),
        _ => {}
    }
}

/// The columns of the table row of `edge` in `text` (the first table that has one).
fn row<'a>(text: &'a [String], edge: &str) -> Option<Vec<&'a str>> {
    text.iter()
        .find(|l| l.split_whitespace().next() == Some(edge))
        .map(|l| l.split_whitespace().collect())
}

#[test]
fn the_demo_counts_failures_and_shows_every_edge() {
    let dir = TempDir::new("e2e-demo");
    let addr = format!("127.0.0.1:{}", free_port());
    let spec = rig_tests::rigd::workspace_root().join("specs/demo.toml");
    let mut demo = std::process::Command::new(rig_tests::rigd::bin("rigctl"))
        .args(["--addr", &addr, "demo", "--step", "4s", "--spec"])
        .arg(&spec)
        .env("RIG_STATE_DIR", dir.path())
        .env_remove("RIG_TOKEN")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = line_reader(demo.stdout.take().unwrap());
    // A failed assertion must not leave the demo (and its embedded rigd) running.
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let guard = KillOnDrop(demo.id());
    let mut seen = Vec::new();
    wait_for_line(&lines, |l| l.contains("── 3/5"), &mut seen);
    let step1_at = seen.iter().position(|l| l.contains("── 1/5")).unwrap();
    let step2_at = seen.iter().position(|l| l.contains("── 2/5")).unwrap();
    let (step1, step2) = (&seen[step1_at..step2_at], &seen[step2_at..]);
    // Every edge, the tcp one included (it carries connections and bytes, not requests).
    for edge in ["traffic/web", "web/catalog"] {
        assert!(
            row(step1, edge).is_some(),
            "{edge} in step 1:\n{}",
            seen.join("\n")
        );
    }
    let store = row(step1, "catalog/store")
        .unwrap_or_else(|| panic!("the tcp edge in step 1:\n{}", seen.join("\n")));
    assert_ne!(
        store[3..5],
        ["0", "B"],
        "bytes went to the store: {store:?}"
    );
    assert!(row(step2, "catalog/store").is_some(), "{}", seen.join("\n"));
    // FAILED counts every answer that is a failure (5xx, UNAVAILABLE...), not only the requests
    // rig could not answer at all.
    let mut failures_seen = 0;
    for edge in ["traffic/web", "web/catalog"] {
        let cols = row(step2, edge).unwrap_or_else(|| panic!("{edge}:\n{}", seen.join("\n")));
        let failed: u64 = cols[2].parse().unwrap();
        let failing_statuses: u64 = cols[3..]
            .iter()
            .filter_map(|c| c.split_once('×'))
            // Statuses are 503 or UNAVAILABLE; the FAULTS column's kinds are lowercase.
            .filter(|(s, _)| !s.chars().any(|c| c.is_ascii_lowercase()))
            .filter(|(s, _)| rig_control::cli::status_is_failure(s))
            .map(|(_, n)| n.parse::<u64>().unwrap())
            .sum();
        assert!(
            failed >= failing_statuses,
            "{edge}: FAILED {failed} but {failing_statuses} failing answers: {cols:?}"
        );
        failures_seen += failed;
    }
    // 10% of ~80 calls per edge fail under `flaky`: none at all is a broken count.
    assert!(failures_seen > 0, "{}", seen.join("\n"));
    interrupt(&demo);
    let exit = wait_exit(&mut demo);
    // Reaped: its pid may belong to another process now.
    std::mem::forget(guard);
    assert!(exit.success());
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "the demo's embedded rigd is gone"
    );
}

#[test]
fn metrics_with_no_environment_is_not_an_empty_page() {
    let rigd = Rigd::start();
    let (code, body) = http_get(&rigd.url("/metrics"), None);
    assert_eq!(code, 200, "{body}");
    // A scrape of an idle rigd still says something: how many environments run (none).
    assert_eq!(prom::value(&body, "rig_environments", &[]), 0.0, "{body}");
    assert!(body.contains("# TYPE rig_environments gauge"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_say_what_failed_in_words_not_library_jargon() {
    let rigctl = |addr: String| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(rig_tests::rigd::bin("rigctl"))
                .args(["--addr", &addr, "ls"])
                .env_remove("RIG_TOKEN")
                .output()
                .unwrap()
        })
    };
    let jargon = [
        "client error",
        "transport error",
        "grpc-status",
        "os error",
        "(Connect)",
    ];
    // Nothing listens.
    let nobody = format!("127.0.0.1:{}", free_port());
    let out = rigctl(nobody.clone()).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.starts_with(&format!(
            "error: cannot connect to rigd at {nobody}: connection refused"
        )),
        "{err}"
    );
    // Something that is not rigd listens: a plain HTTP server.
    let web = rig_tests::http_upstream::HttpUpstream::start()
        .await
        .unwrap();
    let out = rigctl(web.addr().to_string()).await.unwrap();
    let other = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1));
    assert!(other.contains(&web.addr().to_string()), "{other}");
    assert!(other.contains("rigd"), "{other}");
    for word in jargon {
        assert!(!err.contains(word), "{word:?} in {err}");
        assert!(!other.contains(word), "{word:?} in {other}");
    }
}

#[test]
fn a_service_that_cannot_start_is_named_once_with_its_reason_once() {
    let rigd = Rigd::start();
    let dir = TempDir::new("e2e-nostart");
    let path = dir.path().join("nostart.toml");
    std::fs::write(
        &path,
        "name = \"nostart\"\n[services.catalog]\ncommand = [\"rig-no-such-program\"]\n\
         [services.catalog.ingresses.default]\nprotocol = \"grpc\"\n",
    )
    .unwrap();
    let out = rigd.rigctl(&["up", "--detach", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed = stdout
        .lines()
        .find(|l| l.starts_with('✖'))
        .unwrap_or_else(|| panic!("a failure line: {stdout}"));
    assert!(
        failed.starts_with("✖ catalog failed to start: cannot start \"rig-no-such-program\""),
        "{failed}"
    );
    assert_eq!(failed.matches("catalog").count(), 1, "{failed}");
    // The reason is on the line above; the error does not say it again.
    assert_eq!(
        stderr.trim_end(),
        "error: nostart did not come up: catalog failed (see above)"
    );
}
