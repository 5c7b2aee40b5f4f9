//! rigctl without rigd: argument parsing, the requests it builds, what it prints, and the
//! binary's exit codes and messages against a stand-in gRPC server on 127.0.0.1:0.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use rig_control::cli::{
    ChaosCommand, Cli, Command, EdgeCounters, LogPrefixer, PresetCommand, Tally, chaos_json,
    event_json, events_request, find_demo_spec, format_bytes, format_clock, format_seconds,
    logs_request, metrics_lines, render_chaos, render_down, render_env_list, render_event,
    render_progress, render_status, set_chaos_request, status_json, tcp_edge_counters, up_request,
};
use rig_proto::v1 as pb;
use serde_json::json;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

fn parse(args: &[&str]) -> Cli {
    let mut argv = vec!["rigctl"];
    argv.extend_from_slice(args);
    match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => panic!("{args:?} should parse: {e}"),
    }
}

fn set_request(args: &[&str]) -> anyhow::Result<pb::SetChaosRequest> {
    let cli = parse(args);
    match &cli.command {
        Command::Chaos(ChaosCommand::Set(set)) => set_chaos_request(set, cli.global.env()),
        other => panic!("expected chaos set, got {other:?}"),
    }
}

fn chaos_of(args: &[&str]) -> pb::ChaosSpec {
    set_request(args).unwrap().chaos.unwrap()
}

#[test]
fn daemon_status_and_stop_parse_and_pid_files_are_per_address() {
    use rig_control::cli::{DaemonCommand, pid_file};
    assert!(matches!(
        parse(&["daemon", "status"]).command,
        Command::Daemon(DaemonCommand::Status)
    ));
    let cli = parse(&["--addr", "127.0.0.1:9000", "daemon", "stop", "--json"]);
    assert!(matches!(cli.command, Command::Daemon(DaemonCommand::Stop)));
    assert!(cli.global.json);
    let dir = std::path::Path::new("/run/rig");
    assert_eq!(
        pid_file(dir, "127.0.0.1:7447".parse().unwrap()),
        dir.join("rigd-127.0.0.1-7447.pid")
    );
    assert_eq!(
        pid_file(dir, "[::1]:7447".parse().unwrap()),
        dir.join("rigd-__1-7447.pid")
    );
}

#[test]
fn chaos_set_flags_become_the_wire_spec_as_typed() {
    let req = set_request(&[
        "chaos",
        "set",
        "web/store",
        "web/*",
        "--to",
        "store",
        "--latency",
        "200ms",
        "--jitter",
        "20ms",
        "--distribution",
        "lognormal",
        "--latency-p99",
        "1s",
        "--latency-direction",
        "downstream",
        "--error-rate",
        "0.1",
        "--status",
        "429",
        "--grpc-code",
        "RESOURCE_EXHAUSTED",
        "--grpc-message",
        "slow down",
        "--body",
        "{\"e\":1}",
        "--reset-after",
        "1KiB",
        "--hang-rate",
        "0.05",
        "--hang-for",
        "2s",
        "--hang-then",
        "timeout",
        "--direction",
        "upstream",
        "--keep-connections",
        "--bandwidth",
        "1MiB/s",
        "--bandwidth-upstream",
        "64KiB/s",
        "--bandwidth-downstream",
        "2MiB/s",
        "--bandwidth-per-connection",
        "--slow-close",
        "500ms",
        "--limit-data",
        "10KiB",
        "--match-method",
        "GET",
        "--match-method",
        "POST",
        "--match-path",
        "/api",
        "--match-header",
        "x-user: beta",
        "--match-grpc-service",
        "rig.demo.Catalog",
        "--match-grpc-method",
        "GetItem",
        "--seed",
        "42",
    ])
    .unwrap();
    assert_eq!(
        req.selector,
        Some(pb::EdgeSelector {
            env: String::new(),
            edges: vec!["web/store".into(), "web/*".into()],
            to: "store".into(),
        })
    );
    let s = |v: &str| Some(v.to_string());
    let expected = pb::ChaosSpec {
        latency: s("200ms"),
        jitter: s("20ms"),
        distribution: s("lognormal"),
        latency_p99: s("1s"),
        latency_direction: s("downstream"),
        error_rate: Some(0.1),
        status: Some(429),
        grpc_code: s("RESOURCE_EXHAUSTED"),
        grpc_message: s("slow down"),
        body: s("{\"e\":1}"),
        reset_after: s("1KiB"),
        hang_rate: Some(0.05),
        hang_for: s("2s"),
        hang_then: s("timeout"),
        direction: s("upstream"),
        keep_connections: Some(true),
        bandwidth: s("1MiB/s"),
        bandwidth_upstream: s("64KiB/s"),
        bandwidth_downstream: s("2MiB/s"),
        bandwidth_per_connection: Some(true),
        slow_close: s("500ms"),
        limit_data: s("10KiB"),
        r#match: Some(pb::Match {
            methods: vec!["GET".into(), "POST".into()],
            path_prefixes: vec!["/api".into()],
            headers: HashMap::from([("x-user".to_string(), "beta".to_string())]),
            grpc_service: s("rig.demo.Catalog"),
            grpc_method: s("GetItem"),
        }),
        seed: Some(42),
        ..Default::default()
    };
    assert_eq!(req.chaos, Some(expected));
}

#[test]
fn strings_pass_through_unvalidated_so_rigd_names_the_field() {
    // rigd validates; the CLI must not reject or rewrite what it cannot judge.
    assert_eq!(
        chaos_of(&["chaos", "set", "*", "--latency", "5xs"]).latency,
        Some("5xs".to_string())
    );
    // Only numbers are typed by clap: a non-number is a usage error (exit code 2).
    let err =
        Cli::try_parse_from(["rigctl", "chaos", "set", "*", "--error-rate", "lots"]).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("--error-rate"), "{err}");
}

#[test]
fn bare_partition_is_blackhole_and_a_mode_can_be_given() {
    let c = chaos_of(&["chaos", "set", "web/store", "--partition"]);
    assert_eq!(c.partition.as_deref(), Some("blackhole"));
    let c = chaos_of(&["chaos", "set", "--partition", "reject", "web/store"]);
    assert_eq!(c.partition.as_deref(), Some("reject"));
    // A bare --partition before the edge must not swallow the edge as its mode.
    let req = set_request(&["chaos", "set", "--partition", "web/store"]).unwrap();
    assert_eq!(
        req.chaos.and_then(|c| c.partition).as_deref(),
        Some("blackhole")
    );
    assert_eq!(req.selector.unwrap().edges, vec!["web/store".to_string()]);
}

#[test]
fn headers_are_name_colon_value_and_repeatable() {
    let c = chaos_of(&[
        "chaos",
        "set",
        "web/api",
        "--error-rate",
        "1",
        "--header",
        "Retry-After: 2",
        "--header",
        "X-Why:chaos: yes",
    ]);
    assert_eq!(
        c.headers,
        HashMap::from([
            ("Retry-After".to_string(), "2".to_string()),
            ("X-Why".to_string(), "chaos: yes".to_string()),
        ])
    );
    let err =
        Cli::try_parse_from(["rigctl", "chaos", "set", "--header", "Retry-After 2"]).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("Name: value"), "{err}");
}

#[test]
fn nothing_to_set_is_refused() {
    for args in [
        &["chaos", "set", "web/store"][..],
        &["chaos", "set", "--to", "store"],
        // Scope alone injects nothing either.
        &["chaos", "set", "*", "--seed", "3", "--for", "30s"],
        &["chaos", "set", "*", "--match-path", "/api"],
    ] {
        let err = set_request(args).unwrap_err();
        assert_eq!(
            err.to_string(),
            "nothing to set; use `rigctl chaos clear`",
            "{args:?}"
        );
    }
}

#[test]
fn for_and_ttl_set_the_ttl() {
    let c = chaos_of(&["chaos", "set", "*", "--latency", "1s", "--for", "30s"]);
    assert_eq!(c.ttl.as_deref(), Some("30s"));
    let c = chaos_of(&["chaos", "set", "*", "--latency", "1s", "--ttl", "2m"]);
    assert_eq!(c.ttl.as_deref(), Some("2m"));
}

#[test]
fn zero_edges_with_to_and_the_global_env() {
    let req = set_request(&[
        "chaos",
        "set",
        "--to",
        "store",
        "--latency",
        "1s",
        "--env",
        "shop",
    ])
    .unwrap();
    assert_eq!(
        req.selector,
        Some(pb::EdgeSelector {
            env: "shop".into(),
            edges: vec![],
            to: "store".into(),
        })
    );
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rigctl-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn from_file_is_the_base_and_flags_override_it() {
    let dir = temp_dir("from-file");
    let flat = dir.join("flaky.toml");
    std::fs::write(
        &flat,
        "latency = \"50ms\"\nerror_rate = 0.2\nheaders = { \"Retry-After\" = \"1\" }\n",
    )
    .unwrap();
    let c = chaos_of(&[
        "chaos",
        "set",
        "*",
        "--from-file",
        flat.to_str().unwrap(),
        "--latency",
        "300ms",
        "--header",
        "X-Chaos: 1",
    ]);
    assert_eq!(c.latency.as_deref(), Some("300ms"));
    assert_eq!(c.error_rate, Some(0.2));
    assert_eq!(c.headers.len(), 2);

    // A file holding a spec-like `[chaos]` table works too.
    let wrapped = dir.join("wrapped.toml");
    std::fs::write(&wrapped, "[chaos]\nhang_rate = 0.5\n").unwrap();
    let c = chaos_of(&[
        "chaos",
        "set",
        "*",
        "--from-file",
        wrapped.to_str().unwrap(),
    ]);
    assert_eq!(c.hang_rate, Some(0.5));

    // A misspelt key fails, naming the file, rather than silently injecting nothing.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "latncy = \"50ms\"\n").unwrap();
    let err =
        set_request(&["chaos", "set", "*", "--from-file", bad.to_str().unwrap()]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("bad.toml") && msg.contains("latncy"), "{msg}");

    let missing = dir.join("missing.toml");
    let err = set_request(&[
        "chaos",
        "set",
        "*",
        "--from-file",
        missing.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(format!("{err:#}").contains("missing.toml"), "{err:#}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn global_options_and_subcommands() {
    let cli = parse(&[
        "--addr",
        "http://127.0.0.1:9000",
        "--token",
        "s3cret",
        "ps",
        "--json",
    ]);
    assert_eq!(cli.global.addr.to_string(), "127.0.0.1:9000");
    assert_eq!(cli.global.token(), Some("s3cret"));
    assert!(cli.global.json);
    assert!(matches!(cli.command, Command::Status { name: None }));
    // Secrets stay out of debug output.
    assert!(!format!("{cli:?}").contains("s3cret"));

    let err = Cli::try_parse_from(["rigctl", "--addr", "nowhere", "ls"]).unwrap_err();
    assert_eq!(err.exit_code(), 2);

    let cli = parse(&[
        "chaos",
        "preset",
        "apply",
        "flaky",
        "web/catalog",
        "--to",
        "catalog",
    ]);
    match cli.command {
        Command::Chaos(ChaosCommand::Preset(PresetCommand::Apply { name, target })) => {
            assert_eq!(name, "flaky");
            assert_eq!(target.edges, vec!["web/catalog".to_string()]);
            assert_eq!(target.to.as_deref(), Some("catalog"));
        }
        other => panic!("{other:?}"),
    }

    let cli = parse(&["demo", "--step", "300ms"]);
    match cli.command {
        Command::Demo(d) => assert_eq!(d.step, Duration::from_millis(300)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn events_and_logs_requests() {
    let cli = parse(&[
        "events",
        "--follow",
        "--service",
        "web",
        "--type",
        "request.",
        "--type",
        "chaos.",
        "--since",
        "41",
        "--env",
        "demo",
    ]);
    let Command::Events(args) = &cli.command else {
        panic!("{:?}", cli.command)
    };
    assert_eq!(
        events_request(args, cli.global.env()),
        pb::WatchRequest {
            after_seq: 41,
            only_new: false,
            follow: true,
            types: vec!["request.".into(), "chaos.".into()],
            env: "demo".into(),
            service: "web".into(),
            edge: String::new(),
        }
    );
    let cli = parse(&["logs", "web", "-f"]);
    let Command::Logs(args) = &cli.command else {
        panic!("{:?}", cli.command)
    };
    let req = logs_request(args, None);
    assert_eq!(req.types, vec!["service.log".to_string()]);
    assert_eq!(
        (req.service.as_str(), req.follow, req.after_seq),
        ("web", true, 0)
    );
}

#[test]
fn up_request_reads_the_file_and_names_it_on_errors() {
    let dir = temp_dir("up");
    let spec = dir.join("shop.toml");
    std::fs::write(&spec, "name = \"shop\"\n").unwrap();
    let req = up_request(&spec).unwrap();
    assert_eq!(req.spec, "name = \"shop\"\n");
    assert_eq!(req.format, "toml");
    assert_eq!(req.origin, spec.display().to_string());
    assert!(PathBuf::from(&req.base_dir).is_absolute());
    assert_eq!(PathBuf::from(&req.base_dir), dir.canonicalize().unwrap());

    let json = dir.join("shop.json");
    std::fs::write(&json, "{}").unwrap();
    assert_eq!(up_request(&json).unwrap().format, "json");

    let yaml = dir.join("shop.yaml");
    std::fs::write(&yaml, "name: shop").unwrap();
    let err = up_request(&yaml).unwrap_err().to_string();
    assert!(err.contains("shop.yaml") && err.contains(".toml"), "{err}");

    let err = format!("{:#}", up_request(&dir.join("nope.toml")).unwrap_err());
    assert!(
        err.contains("cannot read") && err.contains("nope.toml"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn up_request_refuses_a_spec_over_the_size_limit_naming_file_and_limit() {
    let dir = temp_dir("up-big");
    let limit = rig_control::spec::MAX_SPEC_BYTES;
    // Exactly at the limit: read (a comment pads a valid header).
    let at = dir.join("at.toml");
    let head = "name = \"big\"\n#";
    let mut text = head.to_string();
    text.push_str(&"x".repeat(limit as usize - head.len()));
    std::fs::write(&at, &text).unwrap();
    assert_eq!(up_request(&at).unwrap().spec.len() as u64, limit);

    text.push('x');
    let over = dir.join("over.toml");
    std::fs::write(&over, &text).unwrap();
    let err = format!("{:#}", up_request(&over).unwrap_err());
    assert!(
        err.contains("over.toml") && err.contains(&limit.to_string()) && err.contains("1 MiB"),
        "{err}"
    );
    assert!(!err.contains("gRPC") && !err.contains("message"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_demo_spec_is_found_here_or_next_to_the_build() {
    let dir = temp_dir("demo");
    let repo = dir.join("repo");
    std::fs::create_dir_all(repo.join("specs")).unwrap();
    std::fs::create_dir_all(repo.join("target/release")).unwrap();
    std::fs::write(repo.join("specs/demo.toml"), "").unwrap();
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();

    // From the repository root.
    let found = find_demo_spec(None, &repo, None).unwrap();
    assert_eq!(found, repo.join("specs/demo.toml"));
    // From anywhere, with rigctl in target/release.
    let exe = repo.join("target/release/rigctl");
    let found = find_demo_spec(None, &elsewhere, Some(&exe)).unwrap();
    assert_eq!(
        found.canonicalize().unwrap(),
        repo.join("specs/demo.toml").canonicalize().unwrap()
    );
    // Nowhere: say where it looked and what to do.
    let err = find_demo_spec(None, &elsewhere, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--spec"), "{err}");
    // --spec wins, and must exist.
    let own = elsewhere.join("mine.toml");
    std::fs::write(&own, "").unwrap();
    assert_eq!(find_demo_spec(Some(&own), &repo, None).unwrap(), own);
    assert!(find_demo_spec(Some(&elsewhere.join("x.toml")), &repo, None).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

fn demo_status() -> pb::EnvironmentStatus {
    pb::EnvironmentStatus {
        name: "demo".into(),
        state: pb::EnvironmentState::Up as i32,
        origin: "specs/demo.toml".into(),
        started_at: 1_700_000_000.0,
        services: vec![
            pb::ServiceStatus {
                name: "store".into(),
                state: pb::ServiceState::Ready as i32,
                pid: 4242,
                ingresses: vec![pb::IngressStatus {
                    name: "default".into(),
                    protocol: "tcp".into(),
                    address: "127.0.0.1:41234".into(),
                }],
                exit: String::new(),
                command: vec!["rig-demo".into(), "store".into()],
            },
            pb::ServiceStatus {
                name: "traffic".into(),
                state: pb::ServiceState::Exited as i32,
                pid: 0,
                ingresses: vec![],
                exit: "exited with code 1".into(),
                command: vec![],
            },
        ],
        edges: vec![
            pb::EdgeStatus {
                edge: "web/store".into(),
                source: "web".into(),
                egress: "store".into(),
                target: "store".into(),
                ingress: "default".into(),
                protocol: "tcp".into(),
                proxy_address: "127.0.0.1:5001".into(),
                target_address: "127.0.0.1:41234".into(),
                observed: true,
                chaos_version: 3,
                chaos: Some(pb::ChaosSpec {
                    latency: Some("200ms".into()),
                    ..Default::default()
                }),
            },
            pb::EdgeStatus {
                edge: "traffic/web".into(),
                protocol: "http".into(),
                proxy_address: "127.0.0.1:5002".into(),
                target_address: "127.0.0.1:8080".into(),
                observed: false,
                chaos_version: 0,
                chaos: Some(pb::ChaosSpec::default()),
                ..Default::default()
            },
        ],
    }
}

#[test]
fn status_shows_services_and_edges_in_columns() {
    let out = render_status(&demo_status());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "environment demo  up  specs/demo.toml");
    assert_eq!(
        lines[2],
        "SERVICE  STATE                        PID   INGRESS"
    );
    assert_eq!(
        lines[3],
        "store    ready                        4242  tcp 127.0.0.1:41234"
    );
    assert_eq!(lines[4], "traffic  exited (exited with code 1)  -     -");
    assert_eq!(
        lines[6],
        "EDGE         PROTOCOL  ROUTE                             OBSERVED  CHAOS"
    );
    assert_eq!(
        lines[7],
        "web/store    tcp       127.0.0.1:5001 → 127.0.0.1:41234  yes       v3 latency = \"200ms\""
    );
    assert_eq!(
        lines[8],
        "traffic/web  http      direct → 127.0.0.1:8080           no        -"
    );

    let v = status_json(&demo_status());
    assert_eq!(
        v["services"][0]["ingresses"][0]["address"],
        "127.0.0.1:41234"
    );
    assert_eq!(v["edges"][0]["chaos"], json!({ "latency": "200ms" }));
    assert_eq!(v["edges"][0]["chaos_version"], 3);
}

#[test]
fn env_list_counts_ready_services_and_age() {
    let out = render_env_list(&[demo_status()], 1_700_000_000.0 + 312.0);
    assert_eq!(
        out,
        "NAME  STATE  SERVICES   EDGES  UP     ORIGIN\n\
         demo  up     1/2 ready  2      5m12s  specs/demo.toml\n"
    );
    assert_eq!(render_env_list(&[], 0.0), "no environments running\n");
}

#[test]
fn chaos_lines_per_edge_with_version() {
    let resp = pb::ChaosResponse {
        edges: vec![
            pb::EdgeChaos {
                env: "demo".into(),
                edge: "web/store".into(),
                protocol: "http".into(),
                version: 3,
                chaos: Some(pb::ChaosSpec {
                    latency: Some("200ms".into()),
                    error_rate: Some(0.1),
                    ..Default::default()
                }),
            },
            pb::EdgeChaos {
                env: "demo".into(),
                edge: "web/catalog".into(),
                protocol: "grpc".into(),
                version: 7,
                chaos: Some(pb::ChaosSpec::default()),
            },
        ],
    };
    let out = render_chaos(&resp);
    let mut lines = out.lines();
    let first = lines.next().unwrap();
    assert!(first.starts_with("web/store    version 3  "), "{first}");
    assert!(first.contains("latency = \"200ms\"") && first.contains("error_rate = 0.1"));
    assert_eq!(lines.next(), Some("web/catalog  version 7  no chaos"));
    assert_eq!(
        chaos_json(&resp)[0],
        json!({"env": "demo", "edge": "web/store", "protocol": "http", "version": 3,
               "chaos": {"latency": "200ms", "error_rate": 0.1}})
    );
}

#[test]
fn sizes_render_as_numbers_of_bytes_in_text_and_json() {
    let resp = pb::ChaosResponse {
        edges: vec![pb::EdgeChaos {
            env: "demo".into(),
            edge: "catalog/store".into(),
            protocol: "tcp".into(),
            version: 2,
            chaos: Some(pb::ChaosSpec {
                reset_after: Some("64KiB".into()),
                limit_data: Some("1000000".into()),
                slicer: Some(pb::Slicer {
                    average_size: "100".into(),
                    size_variation: "10".into(),
                    delay: "1ms".into(),
                }),
                bandwidth: Some("1MiB/s".into()),
                ..Default::default()
            }),
        }],
    };
    assert_eq!(
        render_chaos(&resp),
        "catalog/store  version 2  bandwidth = \"1MiB/s\", limit_data = 1000000, reset_after = 65536, \
         slicer = { average_size = 100, delay = \"1ms\", size_variation = 10 }\n"
    );
    assert_eq!(
        chaos_json(&resp)[0]["chaos"],
        json!({"bandwidth": "1MiB/s", "limit_data": 1_000_000, "reset_after": 65536,
               "slicer": {"average_size": 100, "size_variation": 10, "delay": "1ms"}})
    );
}

#[test]
fn progress_lines() {
    let p = |state: &str, service: &str, message: &str| pb::UpProgress {
        env: "demo".into(),
        service: service.into(),
        state: state.into(),
        message: message.into(),
        ..Default::default()
    };
    assert_eq!(
        render_progress(&p("starting", "store", "rig-demo store"), None),
        None
    );
    assert_eq!(
        render_progress(
            &p("ready", "store", "store ready (127.0.0.1:41234) 0.12s"),
            Some(Duration::from_millis(120))
        )
        .as_deref(),
        Some("✔ store ready (127.0.0.1:41234) 0.12s")
    );
    assert_eq!(
        render_progress(&p("ready", "store", ""), Some(Duration::from_millis(120))).as_deref(),
        Some("✔ store ready 0.12s")
    );
    let mut failed = p(
        "failed",
        "web",
        "service web exited with code 1 before it was ready",
    );
    failed.last_logs = vec!["boot".into(), "panic: no config".into()];
    assert_eq!(
        render_progress(&failed, None).as_deref(),
        Some(
            "✖ web failed: exited with code 1 before it was ready\n    boot\n    panic: no config"
        )
    );
    // rigd's "failed to start: service catalog: cannot start …" names the service twice.
    let spawn = p(
        "failed",
        "catalog",
        "failed to start: service catalog: cannot start \"nope\": No such file or directory",
    );
    assert_eq!(
        render_progress(&spawn, None).as_deref(),
        Some("✖ catalog failed to start: cannot start \"nope\": No such file or directory")
    );
    assert_eq!(
        render_progress(&p("up", "", "demo is up"), None).as_deref(),
        Some("✔ environment demo is up")
    );
    assert_eq!(
        render_down(&pb::DownResponse {
            env: "demo".into(),
            stopped: vec!["web".into(), "store".into()],
        }),
        "✔ stopped web\n✔ stopped store\nenvironment demo is down\n"
    );
}

fn event(seq: u64, kind: &str, edge: &str, message: &str, data: serde_json::Value) -> pb::Event {
    pb::Event {
        seq,
        r#type: kind.into(),
        // 2023-11-14 12:00:01.123 UTC
        time: 1_699_963_201.123,
        env: "demo".into(),
        service: "web".into(),
        edge: edge.into(),
        message: message.into(),
        data_json: data.to_string(),
    }
}

#[test]
fn events_as_lines_and_json() {
    let ev = event(
        42,
        "request.completed",
        "web/store",
        "web/store GET /items/1 200 3.2ms",
        json!({"status": "200", "latency_seconds": 0.0032}),
    );
    assert_eq!(
        render_event(&ev),
        "12:00:01.123 #42 request.completed web/store GET /items/1 200 3.2ms"
    );
    // rigd's request summaries leave the edge out; the line puts it in.
    let mut bare = ev.clone();
    bare.message = "GET /items/1 200 3.2ms".into();
    assert_eq!(
        render_event(&bare),
        "12:00:01.123 #42 request.completed web/store GET /items/1 200 3.2ms"
    );
    let mut ready = event(
        3,
        "service.ready",
        "",
        "web ready (127.0.0.1:1) 0.01s",
        json!({}),
    );
    assert_eq!(
        render_event(&ready),
        "12:00:01.123 #3 service.ready web ready (127.0.0.1:1) 0.01s"
    );
    ready.message = "listening".into();
    assert_eq!(
        render_event(&ready),
        "12:00:01.123 #3 service.ready web listening"
    );
    assert_eq!(
        event_json(&ev),
        json!({"seq": 42, "type": "request.completed", "time": 1_699_963_201.123,
               "env": "demo", "service": "web", "edge": "web/store",
               "message": "web/store GET /items/1 200 3.2ms",
               "data": {"status": "200", "latency_seconds": 0.0032}})
    );
    assert_eq!(format_clock(86_399.999_4), "23:59:59.999");
    assert_eq!(format_clock(0.0), "00:00:00.000");
    assert_eq!(format_seconds(0.0032), "3.2ms");
    assert_eq!(format_seconds(0.000_85), "850µs");
    assert_eq!(format_seconds(1.25), "1.25s");
}

#[test]
fn log_prefixes_are_padded_and_coloured_only_when_asked() {
    let mut plain = LogPrefixer::new(["web", "catalog"], false);
    assert_eq!(
        plain.line("web", "listening on :8080"),
        "web     | listening on :8080"
    );
    assert_eq!(plain.line("catalog", "ok"), "catalog | ok");
    let mut colour = LogPrefixer::new(["web", "catalog"], true);
    let web = colour.line("web", "x");
    let catalog = colour.line("catalog", "x");
    assert_eq!(web, "\x1b[36mweb     |\x1b[0m x");
    assert!(catalog.starts_with("\x1b[33mcatalog |"), "{catalog:?}");
}

/// A request event's data as rigd sends it, with `extra` fields on top.
fn request_data(kind: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut d = json!({
        "type": kind, "time": 1.0, "request_id": 1, "method": "GET", "path": "/",
        "request_bytes": 0, "response_bytes": 0,
        "edge": {"env": "demo", "edge": "web/catalog", "source": "web", "egress": "catalog",
                 "target": "catalog", "ingress": "default", "protocol": "http"},
    });
    for (k, v) in extra.as_object().expect("an object") {
        d[k] = v.clone();
    }
    d
}

#[test]
fn tally_counts_statuses_faults_and_the_median() {
    let mut t = Tally::new();
    for (i, (status, secs, faults)) in [
        ("200", 0.001, json!([])),
        ("200", 0.003, json!([])),
        ("503", 0.002, json!(["error"])),
    ]
    .into_iter()
    .enumerate()
    {
        t.record(&event(
            i as u64,
            "request.completed",
            "web/catalog",
            "",
            request_data(
                "request.completed",
                json!({"status": status, "latency_seconds": secs, "faults": faults}),
            ),
        ));
    }
    t.record(&event(
        9,
        "request.failed",
        "web/catalog",
        "",
        request_data("request.failed", json!({"error": "reset"})),
    ));
    t.record(&event(
        10,
        "connection.opened",
        "web/catalog",
        "",
        json!({}),
    ));
    // A gRPC edge: a call answered UNAVAILABLE failed; NOT_FOUND is an answer.
    for (i, code) in ["OK", "UNAVAILABLE", "NOT_FOUND"].into_iter().enumerate() {
        t.record(&event(
            20 + i as u64,
            "request.completed",
            "web/catalog-grpc",
            "",
            request_data(
                "request.completed",
                json!({"status": code, "latency_seconds": 0.001}),
            ),
        ));
    }
    assert_eq!(t.requests("web/catalog"), 4);
    assert_eq!(t.faults("web/catalog", "error"), 1);
    // The 503 answered (request.completed) and the reset (request.failed) both failed.
    assert_eq!(t.failed("web/catalog"), 2);
    assert_eq!(t.failed("web/catalog-grpc"), 1);
    assert_eq!(
        t.render(),
        "EDGE              REQUESTS  FAILED  STATUSES                        P50    FAULTS\n\
         web/catalog       4         2       200×2 503×1                     2.0ms  error×1\n\
         web/catalog-grpc  3         1       NOT_FOUND×1 OK×1 UNAVAILABLE×1  1.0ms  -\n"
    );
    assert_eq!(Tally::new().render(), "no requests seen\n");
}

#[test]
fn tally_shows_tcp_edges_from_their_counters() {
    let scrape = |conns: u64, up: u64, down: u64| {
        format!(
            "# TYPE rig_edge_bytes_total counter\n\
             rig_edge_bytes_total{{env=\"demo\",edge=\"catalog/store\",source=\"catalog\",target=\"store\",protocol=\"tcp\",direction=\"upstream\"}} {up}\n\
             rig_edge_bytes_total{{env=\"demo\",edge=\"catalog/store\",source=\"catalog\",target=\"store\",protocol=\"tcp\",direction=\"downstream\"}} {down}\n\
             rig_edge_connections_total{{env=\"demo\",edge=\"catalog/store\",source=\"catalog\",target=\"store\",protocol=\"tcp\"}} {conns}\n\
             rig_edge_connections_open{{env=\"demo\",edge=\"catalog/store\",source=\"catalog\",target=\"store\",protocol=\"tcp\"}} 2\n\
             rig_edge_connections_total{{env=\"demo\",edge=\"web/catalog\",source=\"web\",target=\"catalog\",protocol=\"grpc\"}} 5\n\
             rig_edge_connections_total{{env=\"other\",edge=\"a/b\",source=\"a\",target=\"b\",protocol=\"tcp\"}} 9\n"
        )
    };
    let before = tcp_edge_counters(&scrape(3, 1000, 500), "demo");
    let after = tcp_edge_counters(&scrape(4, 5096, 20980), "demo");
    assert_eq!(after.keys().collect::<Vec<_>>(), vec!["catalog/store"]);
    let delta = after["catalog/store"].since(&before["catalog/store"]);
    assert_eq!(
        delta,
        EdgeCounters {
            connections: 1,
            open: 2,
            bytes_upstream: 4096,
            bytes_downstream: 20480,
        }
    );
    let mut t = Tally::new();
    t.set_tcp([("catalog/store".to_string(), delta)].into());
    assert_eq!(
        t.render(),
        "TCP EDGE       CONNECTIONS  OPEN  BYTES UP  BYTES DOWN\n\
         catalog/store  1            2     4.0 KiB   20.0 KiB\n"
    );
    assert_eq!(format_bytes(512), "512 B");
    assert_eq!(format_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
}

#[test]
fn metrics_lines_of_one_environment() {
    let scrape = "\
# TYPE rig_edge_requests_total counter
rig_edge_requests_total{env=\"demo\",edge=\"web/catalog\",status=\"OK\"} 41
rig_edge_requests_total{env=\"other\",edge=\"a/b\",status=\"200\"} 9
rig_edge_requests_total_bogus{env=\"demo\"} 1
rig_edge_faults_injected_total{env=\"demo\",edge=\"web/catalog\",fault=\"error\"} 7
rig_edge_bytes_total{env=\"demo\",edge=\"web/catalog\",direction=\"upstream\"} 100
";
    assert_eq!(
        metrics_lines(scrape, "demo"),
        vec![
            "rig_edge_requests_total{env=\"demo\",edge=\"web/catalog\",status=\"OK\"} 41",
            "rig_edge_faults_injected_total{env=\"demo\",edge=\"web/catalog\",fault=\"error\"} 7",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// The binary against a stand-in rigd
// ---------------------------------------------------------------------------------------------

const TOKEN: &str = "t0ken";

/// What the stand-in received.
#[derive(Default)]
struct Seen {
    set: Vec<pb::SetChaosRequest>,
    auth: Vec<Option<String>>,
}

#[derive(Clone, Default)]
struct FakeRigd {
    seen: Arc<Mutex<Seen>>,
}

impl FakeRigd {
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let ok = auth.as_deref() == Some(&format!("Bearer {TOKEN}"));
        self.seen.lock().unwrap().auth.push(auth);
        if ok {
            Ok(())
        } else {
            Err(Status::unauthenticated("missing or wrong bearer token"))
        }
    }
}

type ProgressStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::UpProgress, Status>> + Send>>;

#[tonic::async_trait]
impl pb::environments_server::Environments for FakeRigd {
    type UpStream = ProgressStream;

    async fn up(&self, req: Request<pb::UpRequest>) -> Result<Response<Self::UpStream>, Status> {
        self.check(&req)?;
        let fails = req.get_ref().spec.contains("fail");
        let step = |service: &str, state: &str, message: &str| pb::UpProgress {
            env: "demo".into(),
            service: service.into(),
            state: state.into(),
            message: message.into(),
            ..Default::default()
        };
        let mut items = vec![
            Ok(step("store", "starting", "rig-demo store")),
            Ok(step(
                "store",
                "ready",
                "store ready (127.0.0.1:41234) 0.12s",
            )),
        ];
        if fails {
            let mut failed = step(
                "web",
                "failed",
                "service web exited with code 1 before it was ready",
            );
            failed.last_logs = vec!["panic: no config".into()];
            items.push(Ok(failed));
            items.push(Err(Status::failed_precondition(
                "service web exited with code 1 before it was ready\nlast log lines:\n  panic: no config\n",
            )));
        } else {
            let mut up = step("", "up", "demo is up");
            up.environment = Some(demo_status());
            items.push(Ok(up));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn down(
        &self,
        req: Request<pb::DownRequest>,
    ) -> Result<Response<pb::DownResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(pb::DownResponse {
            env: "demo".into(),
            stopped: vec!["web".into(), "store".into()],
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(pb::ListResponse {
            environments: vec![demo_status()],
        }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::EnvironmentStatus>, Status> {
        self.check(&req)?;
        if req.get_ref().env == "nope" {
            return Err(Status::not_found(
                "no environment named \"nope\" (running: demo)",
            ));
        }
        Ok(Response::new(demo_status()))
    }
}

#[tonic::async_trait]
impl pb::chaos_server::Chaos for FakeRigd {
    async fn set(
        &self,
        req: Request<pb::SetChaosRequest>,
    ) -> Result<Response<pb::ChaosResponse>, Status> {
        self.check(&req)?;
        let req = req.into_inner();
        self.seen.lock().unwrap().set.push(req.clone());
        let chaos = req.chaos.unwrap_or_default();
        if chaos.latency.as_deref() == Some("5xs") {
            return Err(Status::invalid_argument(
                "latency: invalid duration \"5xs\"",
            ));
        }
        Ok(Response::new(pb::ChaosResponse {
            edges: req
                .selector
                .unwrap_or_default()
                .edges
                .into_iter()
                .map(|edge| pb::EdgeChaos {
                    env: "demo".into(),
                    edge,
                    protocol: "http".into(),
                    version: 3,
                    chaos: Some(chaos.clone()),
                })
                .collect(),
        }))
    }

    async fn get(
        &self,
        req: Request<pb::GetChaosRequest>,
    ) -> Result<Response<pb::ChaosResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(pb::ChaosResponse::default()))
    }

    async fn clear(
        &self,
        req: Request<pb::ClearChaosRequest>,
    ) -> Result<Response<pb::ChaosResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(pb::ChaosResponse::default()))
    }

    async fn list_presets(
        &self,
        req: Request<pb::ListPresetsRequest>,
    ) -> Result<Response<pb::ListPresetsResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(pb::ListPresetsResponse::default()))
    }

    async fn apply_preset(
        &self,
        req: Request<pb::ApplyPresetRequest>,
    ) -> Result<Response<pb::ChaosResponse>, Status> {
        self.check(&req)?;
        Err(Status::not_found("no preset named \"nope\""))
    }
}

/// A stand-in rigd on 127.0.0.1:0; the server stops when the test's runtime ends.
async fn fake_rigd() -> (String, FakeRigd) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = FakeRigd::default();
    let server = tonic::transport::Server::builder()
        .add_service(pb::environments_server::EnvironmentsServer::new(
            fake.clone(),
        ))
        .add_service(pb::chaos_server::ChaosServer::new(fake.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    (addr.to_string(), fake)
}

/// Run the rigctl binary with a clean environment (no RIG_* from the caller's shell).
async fn rigctl(args: &[&str]) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_rigctl"))
        .args(args)
        .env_remove("RIG_ADDR")
        .env_remove("RIG_TOKEN")
        .env_remove("RIG_ENV")
        .env_remove("RIGCTL_ENV")
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("rigctl finishes")
        .expect("rigctl runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn no_daemon_is_explained_with_exit_code_1() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let out = rigctl(&["--addr", &addr, "status"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim_end(),
        format!(
            "error: cannot connect to rigd at {addr}: connection refused (is rigd running? start one with `rigctl up` or `rigd`)"
        )
    );
}

#[test]
fn global_options_go_before_or_after_the_subcommand() {
    for args in [
        &["ps", "--env", "shop", "--json"][..],
        &["--env", "shop", "--json", "ps"][..],
        &["down", "--env", "shop", "--json"][..],
        &["chaos", "get", "--env", "shop", "--json"][..],
    ] {
        let cli = parse(args);
        assert_eq!(cli.global.env(), Some("shop"), "{args:?}");
        assert!(cli.global.json, "{args:?}");
    }
    let cli = parse(&["ps", "shop", "--addr", "127.0.0.1:9", "--token", "t"]);
    assert!(matches!(cli.command, Command::Status { name: Some(ref n) } if n == "shop"));
    assert_eq!(cli.global.addr.to_string(), "127.0.0.1:9");
    assert_eq!(cli.global.token(), Some("t"));
}

#[tokio::test]
async fn env_after_the_subcommand_and_from_rigctl_env_reaches_rigd() {
    let (addr, _fake) = fake_rigd().await;
    // The fake refuses the environment "nope": its message shows the name reached rigd.
    let out = rigctl(&["ps", "--addr", &addr, "--token", TOKEN, "--env", "nope"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no environment named \"nope\""),
        "{}",
        text(&out.stderr)
    );

    let run = |var: &'static str| {
        let addr = addr.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_rigctl"))
                .args(["--addr", &addr, "--token", TOKEN, "ps"])
                .env_remove("RIG_ENV")
                .env_remove("RIGCTL_ENV")
                .env(var, "nope")
                .env("NO_COLOR", "1")
                .output()
                .await
                .expect("rigctl runs")
        }
    };
    let out = run("RIGCTL_ENV").await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("\"nope\""),
        "{}",
        text(&out.stderr)
    );
    // RIG_ENV is what rig sets in every service: rigctl must not take it for --env.
    let out = run("RIG_ENV").await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[tokio::test]
async fn usage_errors_exit_2_and_refusals_exit_1_without_a_daemon() {
    let out = rigctl(&["chaos", "set", "*", "--status", "teapot"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = rigctl(&["frobnicate"]).await;
    assert_eq!(out.status.code(), Some(2));
    // Refused before connecting: the default address need not answer.
    let out = rigctl(&["chaos", "set", "web/store"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim_end(),
        "error: nothing to set; use `rigctl chaos clear`"
    );
}

#[tokio::test]
async fn the_token_is_sent_and_a_wrong_one_is_explained() {
    let (addr, fake) = fake_rigd().await;
    let out = rigctl(&["--addr", &format!("http://{addr}"), "--token", TOKEN, "ls"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("NAME  STATE"), "{stdout}");
    assert!(stdout.contains("demo  up     1/2 ready"), "{stdout}");

    let out = rigctl(&["--addr", &addr, "--token", "wrong", "ls"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim_end(),
        "error: rigd refused the token (set RIG_TOKEN)"
    );
    let seen = fake.seen.lock().unwrap();
    assert_eq!(
        seen.auth,
        vec![
            Some(format!("Bearer {TOKEN}")),
            Some("Bearer wrong".to_string())
        ]
    );
}

#[tokio::test]
async fn chaos_set_prints_each_edge_and_rigd_errors_verbatim() {
    let (addr, fake) = fake_rigd().await;
    let out = rigctl(&[
        "--addr",
        &addr,
        "--token",
        TOKEN,
        "--env",
        "demo",
        "chaos",
        "set",
        "web/store",
        "--latency",
        "200ms",
        "--header",
        "Retry-After: 2",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "web/store  version 3  headers = { Retry-After = \"2\" }, latency = \"200ms\"\n"
    );
    {
        let seen = fake.seen.lock().unwrap();
        let req = seen.set.last().unwrap();
        assert_eq!(req.selector.as_ref().unwrap().env, "demo");
        assert_eq!(
            req.chaos
                .as_ref()
                .unwrap()
                .headers
                .get("Retry-After")
                .map(String::as_str),
            Some("2")
        );
    }

    let out = rigctl(&[
        "--addr",
        &addr,
        "--token",
        TOKEN,
        "chaos",
        "set",
        "web/store",
        "--latency",
        "5xs",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim_end(),
        "error: latency: invalid duration \"5xs\""
    );

    let out = rigctl(&["--addr", &addr, "--token", TOKEN, "status", "nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim_end(),
        "error: no environment named \"nope\" (running: demo)"
    );
}

#[tokio::test]
async fn json_listings() {
    let (addr, _fake) = fake_rigd().await;
    let out = rigctl(&["--addr", &addr, "--token", TOKEN, "status", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, status_json(&demo_status()));
}

#[tokio::test]
async fn up_detached_prints_progress_then_the_summary() {
    let (addr, _fake) = fake_rigd().await;
    let dir = temp_dir("up-bin");
    let ok = dir.join("demo.toml");
    std::fs::write(&ok, "name = \"demo\"\n").unwrap();
    let out = rigctl(&[
        "--addr",
        &addr,
        "--token",
        TOKEN,
        "up",
        "--detach",
        ok.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("✔ store ready (127.0.0.1:41234) 0.12s\n✔ environment demo is up\n"),
        "{stdout}"
    );
    assert!(stdout.contains(&render_status(&demo_status())), "{stdout}");

    // A service that fails: its logs once, the reason as the error, exit code 1.
    let bad = dir.join("fail.toml");
    std::fs::write(&bad, "name = \"fail\"\n").unwrap();
    let out = rigctl(&[
        "--addr",
        &addr,
        "--token",
        TOKEN,
        "up",
        "-d",
        bad.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).ends_with(
            "✖ web failed: exited with code 1 before it was ready\n    panic: no config\n"
        ),
        "{}",
        text(&out.stdout)
    );
    // The reason is said once, above; the error does not repeat it.
    assert_eq!(
        text(&out.stderr).trim_end(),
        "error: demo did not come up: web failed (see above)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
