//! rigd's gRPC API called directly, with rigd embedded in the test process (as `rigctl up` embeds
//! it when none runs): Up streams progress, Chaos validates before it changes anything, Events
//! replays and follows, promtool accepts /metrics.

use std::time::Duration;

use rig_control::daemon::{self, DaemonConfig};
use rig_proto::v1 as pb;
use rig_tests::rigd::{TempDir, bin_dir, http_get};

const SPEC: &str = r#"
name = "api"
seed = 11

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
chaos = { latency = "1ms" }
"#;

async fn start(state: &TempDir) -> daemon::DaemonHandle {
    // Services are found next to the rigd executable; here that is the test binary's target dir.
    rig_tests::rigd::bin("rig-demo");
    // rigd puts its own directory first on its services' PATH; embedded in a test, that is
    // target/debug/deps, so add target/debug (where rig-demo is) to this process's PATH.
    let path = std::env::var("PATH").unwrap_or_default();
    if !path
        .split(':')
        .any(|p| p == bin_dir().to_str().unwrap_or(""))
    {
        set_path(&format!("{}:{path}", bin_dir().display()));
    }
    daemon::start(DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: None,
        state_dir: state.path().to_path_buf(),
        presets_dir: None,
        events_retained: daemon::DEFAULT_EVENTS_RETAINED,
    })
    .await
    .expect("rigd starts")
}

#[allow(unsafe_code)]
fn set_path(v: &str) {
    // SAFETY: nextest runs each test in its own process, and this runs before rigd starts any
    // thread that reads the environment.
    unsafe { std::env::set_var("PATH", v) };
}

async fn up(addr: std::net::SocketAddr, spec: &str) -> Result<Vec<pb::UpProgress>, tonic::Status> {
    let mut c = pb::environments_client::EnvironmentsClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let mut stream = c
        .up(pb::UpRequest {
            spec: spec.into(),
            format: "toml".into(),
            origin: "api.toml".into(),
            base_dir: std::env::temp_dir().display().to_string(),
        })
        .await?
        .into_inner();
    let mut steps = Vec::new();
    while let Some(step) = stream.message().await? {
        steps.push(step);
    }
    Ok(steps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_streams_progress_and_chaos_is_validated_first() {
    let state = TempDir::new("api");
    let rigd = start(&state).await;
    let addr = rigd.local_addr();

    let steps = up(addr, SPEC).await.expect("up");
    let ready: Vec<&str> = steps
        .iter()
        .filter(|s| s.state == "ready")
        .map(|s| s.service.as_str())
        .collect();
    assert_eq!(
        ready,
        vec!["store", "catalog"],
        "dependency order: {steps:?}"
    );
    let last = steps.last().expect("a final step");
    assert_eq!(last.state, "up");
    let env = last.environment.as_ref().expect("final status");
    assert_eq!(env.edges.len(), 1);
    let edge = &env.edges[0];
    assert_eq!(edge.edge, "catalog/store");
    assert_eq!(edge.chaos_version, 1);
    assert_eq!(edge.chaos.as_ref().unwrap().latency.as_deref(), Some("1ms"));
    assert!(
        edge.chaos.as_ref().unwrap().seed.is_some(),
        "the environment's seed is derived per edge"
    );

    let mut chaos = pb::chaos_client::ChaosClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let sel = |edges: &[&str]| {
        Some(pb::EdgeSelector {
            env: String::new(),
            edges: edges.iter().map(|s| s.to_string()).collect(),
            to: String::new(),
        })
    };
    // A field that does not apply to tcp: refused, nothing changes.
    let err = chaos
        .set(pb::SetChaosRequest {
            selector: sel(&["catalog/store"]),
            chaos: Some(pb::ChaosSpec {
                status: Some(503),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("status"), "{}", err.message());
    let got = chaos
        .get(pb::GetChaosRequest { selector: sel(&[]) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.edges[0].version, 1, "policy unchanged");

    // A valid change returns the version in force.
    let set = chaos
        .set(pb::SetChaosRequest {
            selector: sel(&["catalog/*"]),
            chaos: Some(pb::ChaosSpec {
                bandwidth: Some("1MiB/s".into()),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.edges[0].version, 2);

    // An unknown edge names the edges there are.
    let err = chaos
        .set(pb::SetChaosRequest {
            selector: sel(&["web/store"]),
            chaos: Some(pb::ChaosSpec {
                latency: Some("1ms".into()),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("catalog/store"), "{}", err.message());

    // Presets apply per protocol.
    let presets = chaos
        .list_presets(pb::ListPresetsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = presets.presets.iter().map(|p| p.name.as_str()).collect();
    for want in [
        "healthy",
        "slow-network",
        "flaky",
        "degraded",
        "error",
        "partition",
        "bandwidth-constrained",
        "blackhole",
        "chaos",
    ] {
        assert!(names.contains(&want), "preset {want} in {names:?}");
    }
    let applied = chaos
        .apply_preset(pb::ApplyPresetRequest {
            selector: sel(&["*"]),
            preset: "flaky".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.edges[0].version, 3);

    // The event log has the story in order, and chaos.changed carries old and new.
    let mut events = pb::events_client::EventsClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut stream = events
        .watch(pb::WatchRequest {
            types: vec![
                "service.ready".into(),
                "environment.".into(),
                "chaos.changed".into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    let mut chaos_data = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        if e.r#type == "chaos.changed" {
            chaos_data.push(serde_json::from_str::<serde_json::Value>(&e.data_json).unwrap());
        }
        kinds.push(e.r#type);
    }
    assert_eq!(
        kinds,
        vec![
            "service.ready",
            "service.ready",
            "environment.up",
            "chaos.changed",
            "chaos.changed"
        ]
    );
    assert_eq!(chaos_data[0]["old"]["latency"], "1ms");
    assert_eq!(chaos_data[0]["new"]["bandwidth"], "1MiB/s");
    assert_eq!(chaos_data[1]["cause"], "preset flaky");

    // promtool, Prometheus' own linter, accepts the scrape.
    let (code, text) = http_get(&format!("http://{addr}/metrics"), None);
    assert_eq!(code, 200);
    assert!(text.contains("rig_edge_policy_version"), "{text}");
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/test.sh (Debian package prometheus)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics complained:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mut envs = pb::environments_client::EnvironmentsClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let down = envs
        .down(pb::DownRequest { env: "api".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(down.stopped.len(), 2);
    let list = envs.list(pb::ListRequest {}).await.unwrap().into_inner();
    assert!(list.environments.is_empty());
    tokio::time::timeout(Duration::from_secs(10), rigd.shutdown())
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rigd_serves_grpc_health_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let state = TempDir::new("api-health");
    let rigd = start(&state).await;
    let url = format!("http://{}", rigd.local_addr());
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "rig.v1.Environments", "rig.v1.Chaos", "rig.v1.Events"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e}"));
        assert_eq!(
            resp.get_ref().status,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream
        .message()
        .await
        .unwrap()
        .expect("a reflection answer");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer: {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "rig.v1.Environments",
        "rig.v1.Chaos",
        "rig.v1.Events",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    rigd.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_error_is_invalid_argument_with_the_line() {
    let state = TempDir::new("api-bad");
    let rigd = start(&state).await;
    let bad = SPEC.replace("protocol = \"grpc\"", "protocol = \"grcp\"");
    let err = up(rigd.local_addr(), &bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("api.toml"), "{}", err.message());
    assert!(err.message().contains("grcp"), "{}", err.message());
    rigd.shutdown().await;
}

/// Every name a call carries is bounded: an oversized one is InvalidArgument naming the field,
/// quoting only a preview of the value, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_names_in_every_call_are_refused_naming_the_field() {
    let state = TempDir::new("api-names");
    let d = start(&state).await;
    let addr = d.local_addr();
    let url = format!("http://{addr}");
    let long = "n".repeat(100_000);
    let mut envs = pb::environments_client::EnvironmentsClient::connect(url.clone())
        .await
        .unwrap();
    let mut chaos = pb::chaos_client::ChaosClient::connect(url.clone())
        .await
        .unwrap();
    let mut events = pb::events_client::EventsClient::connect(url).await.unwrap();
    let sel = |f: &dyn Fn(&mut pb::EdgeSelector)| {
        let mut s = pb::EdgeSelector::default();
        f(&mut s);
        Some(s)
    };
    let cases: Vec<(&str, tonic::Status)> = vec![
        (
            "env",
            envs.down(pb::DownRequest { env: long.clone() })
                .await
                .unwrap_err(),
        ),
        (
            "env",
            envs.status(pb::StatusRequest { env: long.clone() })
                .await
                .unwrap_err(),
        ),
        (
            "selector.env",
            chaos
                .set(pb::SetChaosRequest {
                    selector: sel(&|s| s.env = long.clone()),
                    chaos: Some(pb::ChaosSpec::default()),
                })
                .await
                .unwrap_err(),
        ),
        (
            "selector.to",
            chaos
                .get(pb::GetChaosRequest {
                    selector: sel(&|s| s.to = long.clone()),
                })
                .await
                .unwrap_err(),
        ),
        (
            "selector.edges[1]",
            chaos
                .clear(pb::ClearChaosRequest {
                    selector: sel(&|s| s.edges = vec!["a/b".into(), long.clone()]),
                })
                .await
                .unwrap_err(),
        ),
        (
            "selector.edges",
            chaos
                .clear(pb::ClearChaosRequest {
                    selector: sel(&|s| s.edges = vec!["*".into(); 10_000]),
                })
                .await
                .unwrap_err(),
        ),
        (
            "preset",
            chaos
                .apply_preset(pb::ApplyPresetRequest {
                    selector: None,
                    preset: long.clone(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "origin",
            envs.up(pb::UpRequest {
                spec: SPEC.into(),
                format: "toml".into(),
                origin: long.clone(),
                base_dir: "/tmp".into(),
            })
            .await
            .unwrap_err(),
        ),
        (
            "spec",
            envs.up(pb::UpRequest {
                spec: "#".repeat(2 << 20),
                format: "toml".into(),
                origin: "big.toml".into(),
                base_dir: "/tmp".into(),
            })
            .await
            .unwrap_err(),
        ),
    ];
    let watch = |f: &dyn Fn(&mut pb::WatchRequest)| {
        let mut w = pb::WatchRequest::default();
        f(&mut w);
        w
    };
    let mut cases = cases;
    for (field, req) in [
        ("env", watch(&|w| w.env = long.clone())),
        ("service", watch(&|w| w.service = long.clone())),
        ("edge", watch(&|w| w.edge = long.clone())),
        ("types[0]", watch(&|w| w.types = vec![long.clone()])),
        (
            "types",
            watch(&|w| w.types = vec!["request.".into(); 10_000]),
        ),
    ] {
        cases.push((field, events.watch(req).await.unwrap_err()));
    }
    for (field, status) in cases {
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{field}: {status:?}"
        );
        let msg = status.message();
        assert!(msg.starts_with(&format!("{field}: ")), "{field}: {msg}");
        assert!(
            msg.len() < 300,
            "{field}: the message quotes the whole value"
        );
    }
    let listed = envs.list(pb::ListRequest {}).await.unwrap().into_inner();
    assert!(listed.environments.is_empty(), "nothing was started");
    d.shutdown().await;
}
