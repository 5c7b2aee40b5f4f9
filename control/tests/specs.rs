//! Spec files and chaos presets: every shipped file loads, every invalid spec fails with the
//! error it documents, and the validated model (start order, seeds, readiness, wiring checks)
//! is what the orchestrator is promised.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rig_control::presets::{self, Preset};
use rig_control::spec::{self, Format, Readiness, Spec, SpecError};
use rig_proxy::policy::{ChaosSpec, GrpcCode, PartitionMode, Protocol};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("control/ has a parent")
        .to_path_buf()
}

/// Every file under `dir` (recursively), sorted, skipping the directories `skip`.
fn files_under(dir: &Path, skip: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                if !skip.contains(&path) {
                    stack.push(path);
                }
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn toml(text: &str) -> Result<Spec, SpecError> {
    spec::parse(text, Format::Toml, "test.toml")
}

fn toml_ok(text: &str) -> Spec {
    toml(text).unwrap_or_else(|e| panic!("expected a valid spec, got: {e}"))
}

fn toml_err(text: &str) -> SpecError {
    match toml(text) {
        Ok(_) => panic!("expected an invalid spec:\n{text}"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------
// The files in the repository
// ---------------------------------------------------------------------------------------------

#[test]
fn every_spec_file_loads() {
    let specs = repo().join("specs");
    let files: Vec<PathBuf> = files_under(&specs, &[specs.join("invalid")])
        .into_iter()
        .filter(|p| Format::from_path(p).is_some())
        .collect();
    // The examples shipped with this test, at least; files added later are picked up too.
    assert!(files.len() >= 5, "found only {files:?}");
    let mut failures = Vec::new();
    for path in &files {
        match spec::load(path) {
            Ok(s) => {
                assert!(!s.services.is_empty());
                assert_eq!(
                    s.path.as_deref(),
                    Some(std::path::absolute(path).unwrap().as_path())
                );
                let ordered: usize = s.order.iter().map(Vec::len).sum();
                assert_eq!(
                    ordered,
                    s.services.len(),
                    "{}: order misses services",
                    path.display()
                );
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "specs that do not load:\n{}",
        failures.join("\n")
    );
}

/// The expectations of an invalid spec: `expect: [line N:] fragment` lines, at the top of the
/// file as `# expect: ...` comments, or in a sidecar `NAME.expect` file (JSON has no comments).
fn expectations(path: &Path) -> Vec<(Option<usize>, String)> {
    let (text, sidecar) = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => {
            let mut p = path.as_os_str().to_owned();
            p.push(".expect");
            (
                std::fs::read_to_string(PathBuf::from(p)).unwrap_or_default(),
                true,
            )
        }
        _ => (std::fs::read_to_string(path).unwrap_or_default(), false),
    };
    text.lines()
        .map(str::trim)
        .map(|l| {
            if sidecar {
                l
            } else {
                l.strip_prefix('#').unwrap_or("").trim()
            }
        })
        .filter_map(|l| l.strip_prefix("expect:"))
        .map(|e| {
            let e = e.trim();
            let line = e.strip_prefix("line ").and_then(|rest| {
                let (n, frag) = rest.split_once(':')?;
                Some((n.trim().parse::<usize>().ok()?, frag.trim()))
            });
            match line {
                Some((n, frag)) => (Some(n), frag.to_owned()),
                None => (None, e.to_owned()),
            }
        })
        .collect()
}

#[test]
fn every_invalid_spec_fails_with_its_expected_error() {
    let dir = repo().join("specs").join("invalid");
    let files: Vec<PathBuf> = files_under(&dir, &[])
        .into_iter()
        .filter(|p| Format::from_path(p).is_some())
        .collect();
    // The cases the control-plane issue asks for must stay covered.
    for name in [
        "unknown-top-level-key.toml",
        "unknown-ingress-key.toml",
        "unknown-chaos-key.toml",
        "unknown-service.toml",
        "unknown-ingress.toml",
        "ambiguous-ingress.toml",
        "cycle.toml",
        "self-egress.toml",
        "duplicate-key.toml",
        "chaos-error-rate.toml",
        "chaos-status-on-tcp.toml",
        "bad-duration.toml",
        "duplicate-port.toml",
        "empty-command.toml",
        "bad-name.toml",
        "unknown-key.json",
        "syntax-error.json",
    ] {
        assert!(
            files.contains(&dir.join(name)),
            "missing specs/invalid/{name}"
        );
    }
    let mut failures = Vec::new();
    for path in &files {
        let expect = expectations(path);
        if expect.is_empty() {
            failures.push(format!("{}: no `expect:` line", path.display()));
            continue;
        }
        let err = match spec::load(path) {
            Ok(_) => {
                failures.push(format!("{}: loaded, but should fail", path.display()));
                continue;
            }
            Err(e) => e,
        };
        let shown = err.to_string();
        if !shown.starts_with(&path.display().to_string()) {
            failures.push(format!("{shown}\n    does not start with the file name"));
        }
        for (line, fragment) in expect {
            if let Some(n) = line
                && err.line != Some(n)
            {
                failures.push(format!("{shown}\n    expected line {n}"));
            }
            if !shown.contains(&fragment) {
                failures.push(format!("{shown}\n    expected to contain: {fragment}"));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

const REQUIRED_PRESETS: [&str; 9] = [
    "bandwidth-constrained",
    "blackhole",
    "chaos",
    "degraded",
    "error",
    "flaky",
    "healthy",
    "partition",
    "slow-network",
];

#[test]
fn every_preset_file_loads_validates_and_is_built_in() {
    let dir = repo().join("chaos-presets");
    let from_dir = presets::load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    let builtin = presets::builtin();
    let files: BTreeSet<String> = files_under(&dir, &[])
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .collect();
    let loaded: BTreeSet<String> = from_dir.iter().map(|p| p.name.clone()).collect();
    let compiled: Vec<String> = builtin.iter().map(|p| p.name.clone()).collect();
    assert_eq!(loaded, files);
    // A file added to chaos-presets/ must also be compiled in (presets.rs BUILTIN), and sorted.
    assert_eq!(compiled, files.iter().cloned().collect::<Vec<_>>());
    assert_eq!(from_dir, builtin);
    for name in REQUIRED_PRESETS {
        assert!(files.contains(name), "missing preset {name}");
    }
    for p in &builtin {
        assert!(!p.description.is_empty(), "{}", p.name);
        for proto in [Protocol::Http, Protocol::Grpc, Protocol::Tcp] {
            if let Err(e) = p.for_protocol(proto).validate(proto) {
                panic!("{} for {proto}: {e}", p.name);
            }
        }
        let text = std::fs::read_to_string(dir.join(format!("{}.toml", p.name))).unwrap();
        assert!(text.starts_with('#'), "{}: needs a comment header", p.name);
    }
}

fn preset(name: &str) -> Preset {
    presets::find_builtin(name).unwrap_or_else(|| panic!("no preset {name}"))
}

#[test]
fn presets_mean_what_their_names_say() {
    use Protocol::{Grpc, Http, Tcp};
    let policy = |name: &str, p: Protocol| {
        preset(name)
            .for_protocol(p)
            .validate(p)
            .unwrap_or_else(|e| panic!("{name}/{p}: {e}"))
    };

    for p in [Http, Grpc, Tcp] {
        assert!(policy("healthy", p).is_passthrough(), "healthy/{p}");
    }

    let flaky = policy("flaky", Http).error.expect("flaky errors");
    assert_eq!(flaky.rate, 0.1);
    assert_eq!(flaky.statuses, vec![(503, 1)]);
    assert!(flaky.headers.iter().any(|(k, _)| k == "retry-after"));
    assert!(policy("flaky", Http).latency.is_some());
    assert_eq!(
        policy("flaky", Grpc).error.unwrap().grpc_code,
        GrpcCode::Unavailable
    );
    assert_eq!(policy("flaky", Tcp).error.unwrap().reset_after, None);

    let error = policy("error", Http).error.unwrap();
    assert_eq!((error.rate, error.statuses.clone()), (1.0, vec![(500, 1)]));
    assert_eq!(
        policy("error", Grpc).error.unwrap().grpc_code,
        GrpcCode::Internal
    );
    let tcp_error = policy("error", Tcp).error.unwrap();
    assert_eq!((tcp_error.rate, tcp_error.reset_after), (1.0, None));

    for p in [Http, Grpc, Tcp] {
        let part = policy("partition", p).partition.expect("partition");
        assert_eq!(part.mode, PartitionMode::Reject);
        assert!(part.direction.upstream() && part.direction.downstream());
        let hole = policy("blackhole", p).partition.expect("blackhole");
        assert_eq!(hole.mode, PartitionMode::Blackhole);
        assert!(hole.direction.upstream() && hole.direction.downstream());
    }

    let bw = policy("bandwidth-constrained", Tcp).bandwidth.unwrap();
    assert_eq!((bw.upstream, bw.downstream), (Some(65536), Some(65536)));

    let chaos = policy("chaos", Http);
    assert!(chaos.latency.is_some());
    assert_eq!(chaos.error.unwrap().rate, 0.2);
    assert_eq!(chaos.hang.unwrap().duration, Some(Duration::from_secs(5)));

    let degraded = preset("degraded").for_protocol(Grpc);
    assert_eq!(
        degraded.latency.map(|d| d.0),
        Some(Duration::from_millis(500))
    );
    let slow = preset("slow-network").for_protocol(Tcp);
    assert_eq!(slow.latency.map(|d| d.0), Some(Duration::from_millis(200)));
}

#[test]
fn invalid_presets_name_file_line_and_field() {
    let e = presets::parse(
        "mine",
        "description = \"x\"\n[chaos]\nerror_rate = 0.5\nstatus = 503\n",
    )
    .unwrap_err();
    assert_eq!(e.line, Some(4));
    assert_eq!(e.field.as_deref(), Some("chaos.status"));
    let shown = e.to_string();
    assert!(
        shown.starts_with("mine.toml:4:1: chaos.status: does not apply to a grpc edge"),
        "{shown}"
    );
    assert!(shown.contains("[http]"), "{shown}");

    // The overlay that sets a bad field is blamed, not [chaos].
    let e = presets::parse(
        "mine",
        "description = \"x\"\n[chaos]\nerror_rate = 0.5\n[tcp]\nlimit_data = 0\n",
    )
    .unwrap_err();
    assert_eq!(
        (e.line, e.field.as_deref()),
        (Some(5), Some("tcp.limit_data"))
    );

    let e = presets::parse("mine", "description = \"x\"\n[http]\nstatuss = 503\n").unwrap_err();
    assert_eq!(e.line, Some(3));
    assert!(e.to_string().contains("unknown field `statuss`"), "{e}");

    let e = presets::parse("mine", "[chaos]\nlatency = \"5ms\"\n").unwrap_err();
    assert!(e.to_string().contains("missing field `description`"), "{e}");

    let e = presets::parse("Bad Name", "description = \"x\"\n").unwrap_err();
    assert!(e.to_string().contains("invalid preset name"), "{e}");

    // A directory with a broken preset fails, naming the file.
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("presets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("good.toml"),
        "description = \"fine\"\n[chaos]\nlatency = \"1ms\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), "not a preset").unwrap();
    assert_eq!(presets::load_dir(&dir).unwrap().len(), 1);
    std::fs::write(
        dir.join("bad.toml"),
        "description = \"x\"\n[chaos]\nlatency = \"5xs\"\n",
    )
    .unwrap();
    let e = presets::load_dir(&dir).unwrap_err();
    assert!(
        e.to_string()
            .contains("bad.toml:3:11: chaos.latency: invalid duration"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The validated model
// ---------------------------------------------------------------------------------------------

const CHAIN: &str = r#"
name = "shop"

[services.store]
command = ["rig-demo", "kv"]
ingresses.main.protocol = "tcp"

[services.catalog]
command = ["rig-demo", "catalog"]
ingresses.default.protocol = "grpc"
egresses.store.service = "store"

[services.web]
command = ["rig-demo", "web"]
ingresses.default.protocol = "http"
egresses.catalog.service = "catalog"

[services.traffic]
command = ["rig-demo", "traffic"]
egresses.web.service = "web"

[services.cache]
command = ["cache"]
ingresses.default.protocol = "tcp"
"#;

#[test]
fn start_order_is_levels_of_dependencies() {
    let s = toml_ok(CHAIN);
    assert_eq!(
        s.order,
        vec![
            vec!["cache".to_owned(), "store".to_owned()],
            vec!["catalog".to_owned()],
            vec!["web".to_owned()],
            vec!["traffic".to_owned()],
        ]
    );

    // A diamond: both middle services start together, after their shared dependency.
    let s = toml_ok(
        r#"
        name = "diamond"
        [services.top]
        command = ["t"]
        egresses.left.service = "left"
        egresses.right.service = "right"
        [services.left]
        command = ["l"]
        ingresses.default.protocol = "http"
        egresses.base.service = "base"
        [services.right]
        command = ["r"]
        ingresses.default.protocol = "http"
        egresses.base.service = "base"
        [services.base]
        command = ["b"]
        ingresses.default.protocol = "tcp"
        "#,
    );
    assert_eq!(
        s.order,
        vec![
            vec!["base".to_owned()],
            vec!["left".to_owned(), "right".to_owned()],
            vec!["top".to_owned()],
        ]
    );
}

#[test]
fn a_cycle_is_named_the_same_whichever_way_it_is_written() {
    let e = toml_err(
        r#"
name = "loop"
[services.x]
command = ["x"]
ingresses.default.protocol = "http"
[services.c]
command = ["c"]
ingresses.default.protocol = "http"
egresses.to-a.service = "a"
[services.b]
command = ["b"]
ingresses.default.protocol = "http"
egresses.to-c.service = "c"
egresses.to-x.service = "x"
[services.a]
command = ["a"]
ingresses.default.protocol = "http"
egresses.to-b.service = "b"
"#,
    );
    assert_eq!(e.message, "dependency cycle: a → b → c → a");
    assert_eq!(e.field.as_deref(), Some("services.a.egresses.to-b.service"));
    assert_eq!(e.line, Some(18));
}

#[test]
fn seeds_derive_per_edge_stably() {
    let with_seed = format!("seed = 7\n{CHAIN}");
    let a = toml_ok(&with_seed);
    let b = toml_ok(&with_seed);
    let seeds: Vec<(String, Option<u64>)> = a
        .edges()
        .map(|(s, e)| (format!("{}/{}", s.name, e.name), e.chaos.seed))
        .collect();
    assert_eq!(seeds.len(), 3);
    // Stable: the same file gives the same seeds, and they follow the documented derivation...
    assert_eq!(
        seeds,
        b.edges()
            .map(|(s, e)| (format!("{}/{}", s.name, e.name), e.chaos.seed))
            .collect::<Vec<_>>()
    );
    for (s, e) in a.edges() {
        assert_eq!(e.chaos.seed, Some(spec::derive_seed(7, &s.name, &e.name)));
    }
    // ...which is pinned, so a rig upgrade does not change a recorded run's faults.
    assert_eq!(
        spec::derive_seed(7, "web", "catalog"),
        2_304_108_413_781_862_895
    );
    // Different for every edge and every environment seed.
    let distinct: BTreeSet<u64> = seeds.iter().filter_map(|(_, s)| *s).collect();
    assert_eq!(distinct.len(), 3);
    assert_ne!(
        spec::derive_seed(7, "web", "catalog"),
        spec::derive_seed(8, "web", "catalog")
    );
    assert_ne!(
        spec::derive_seed(7, "web", "catalog"),
        spec::derive_seed(7, "webc", "atalog")
    );

    // An edge's own seed wins; without an environment seed there is none.
    let own = toml_ok(&with_seed.replace(
        "egresses.store.service = \"store\"",
        "egresses.store = { service = \"store\", chaos = { seed = 99 } }",
    ));
    assert_eq!(
        own.services["catalog"].egresses["store"].chaos.seed,
        Some(99)
    );
    assert!(toml_ok(CHAIN).edges().all(|(_, e)| e.chaos.seed.is_none()));
    assert!(toml_ok(CHAIN).edges().all(|(_, e)| e.chaos.is_empty()));
}

#[test]
fn json_and_toml_give_equal_specs() {
    let dir = repo().join("specs").join("examples");
    let t = spec::load(&dir.join("http-grpc-tcp.toml")).unwrap_or_else(|e| panic!("{e}"));
    let mut j = spec::load(&dir.join("http-grpc-tcp.json")).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(t.path, j.path);
    j.path.clone_from(&t.path);
    assert_eq!(t, j);
    // Not vacuous: the specs do carry the chaos, and a change shows.
    let web = &t.services["traffic"].egresses["web"];
    assert_eq!(web.chaos.status.map(|s| s.get()), Some(503));
    assert!(web.chaos.seed.is_some());
    let other = spec::parse(
        &std::fs::read_to_string(dir.join("http-grpc-tcp.json"))
            .unwrap()
            .replace("\"status\": 503", "\"status\": 502"),
        Format::Json,
        "x.json",
    )
    .unwrap();
    assert_ne!(t, other);
}

#[test]
fn resolved_fields_and_defaults() {
    let s = toml_ok(
        r#"
name = "shop"
observe = false

[services.store]
command = ["rig-demo", "kv"]
cwd = "./data"
stop_grace = "1.5s"
[services.store.ingresses.main]
protocol = "tcp"
port = 7000
[services.store.ingresses.admin]
protocol = "http"
ready = { path = "/status?full=1", timeout = "5s" }
[services.store.ingresses.rpc]
protocol = "grpc"
ready = { service = "kv.v1.Store" }
[services.store.ingresses.debug]
protocol = "http"
ready = false

[services.web]
command = ["rig-demo", "web"]
[services.web.ingresses.default]
protocol = "http"
[services.web.egresses.store]
service = "store"
ingress = "admin"
observe = true
[services.web.egresses.rpc]
service = "store"
ingress = "rpc"
"#,
    );
    assert!(!s.observe);
    let store = &s.services["store"];
    assert_eq!(store.cwd.as_deref(), Some(Path::new("data")));
    assert_eq!(store.stop_grace, Duration::from_millis(1500));
    assert_eq!(store.ingresses["main"].port, Some(7000));
    assert_eq!(
        store.ingresses["main"].ready,
        Readiness::Tcp {
            timeout: Duration::from_secs(30)
        }
    );
    assert_eq!(
        store.ingresses["admin"].ready,
        Readiness::Http {
            path: "/status?full=1".into(),
            timeout: Duration::from_secs(5)
        }
    );
    assert_eq!(
        store.ingresses["rpc"].ready,
        Readiness::Grpc {
            service: "kv.v1.Store".into(),
            timeout: Duration::from_secs(30)
        }
    );
    assert_eq!(store.ingresses["debug"].ready, Readiness::Disabled);
    assert_eq!(store.default_ingress(), None);

    let web = &s.services["web"];
    assert_eq!(web.stop_grace, Duration::from_secs(5));
    assert_eq!(web.cwd, None);
    assert_eq!(
        web.ingresses["default"].ready,
        Readiness::Http {
            path: "/".into(),
            timeout: Duration::from_secs(30)
        }
    );
    let e = &web.egresses["store"];
    assert_eq!(
        (e.ingress.as_str(), e.protocol, e.observe),
        ("admin", Protocol::Http, true)
    );
    let e = &web.egresses["rpc"];
    assert_eq!(
        (e.ingress.as_str(), e.protocol, e.observe),
        ("rpc", Protocol::Grpc, false)
    );
    assert_eq!(e.chaos, ChaosSpec::default());
    assert_eq!(
        web.injected_var_names(),
        [
            "HOST",
            "PORT",
            "RIG_ENV",
            "RIG_SERVICE",
            "RIG_WIRING",
            "RPC_ADDR",
            "RPC_HOST",
            "RPC_PORT",
            "RPC_URL",
            "STORE_ADDR",
            "STORE_HOST",
            "STORE_PORT",
            "STORE_URL",
        ]
    );
    assert_eq!(
        store.injected_var_names(),
        [
            "ADMIN_HOST",
            "ADMIN_PORT",
            "DEBUG_HOST",
            "DEBUG_PORT",
            "MAIN_HOST",
            "MAIN_PORT",
            "RIG_ENV",
            "RIG_SERVICE",
            "RIG_WIRING",
            "RPC_HOST",
            "RPC_PORT",
        ]
    );
    let edges: Vec<(&str, &str)> = s
        .edges()
        .map(|(s, e)| (s.name.as_str(), e.name.as_str()))
        .collect();
    assert_eq!(edges, [("web", "rpc"), ("web", "store")]);
}

#[test]
fn load_resolves_cwd_against_the_spec_directory() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("spec-cwd-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let file = dir.join("sub").join("env.toml");
    std::fs::write(&file, "name = \"e\"\n[services.a]\ncommand = [\"a\"]\ncwd = \"../work\"\n[services.b]\ncommand = [\"b\"]\ncwd = \"/abs\"\n").unwrap();
    let s = spec::load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        s.services["a"].cwd.as_deref(),
        Some(dir.join("sub").join("../work").as_path())
    );
    assert_eq!(s.services["b"].cwd.as_deref(), Some(Path::new("/abs")));
    assert_eq!(s.path.as_deref(), Some(file.as_path()));

    // Spec text without a file (rigd gets it over gRPC): cwd as written, or against a given dir.
    let text = "name = \"e\"\n[services.a]\ncommand = [\"a\"]\ncwd = \"./work\"\n";
    let s = spec::parse(text, Format::Toml, "sub/env.toml").unwrap();
    assert_eq!(s.services["a"].cwd.as_deref(), Some(Path::new("work")));
    assert_eq!(s.path, None);
    let s = spec::parse_in_dir(text, Format::Toml, "env.toml", Path::new("/srv/specs")).unwrap();
    assert_eq!(
        s.services["a"].cwd.as_deref(),
        Some(Path::new("/srv/specs/work"))
    );

    let e = spec::load(&dir.join("sub").join("missing.toml")).unwrap_err();
    assert!(
        e.to_string().contains("missing.toml: cannot read the spec"),
        "{e}"
    );
    std::fs::write(dir.join("env.yaml"), "name: e").unwrap();
    let e = spec::load(&dir.join("env.yaml")).unwrap_err();
    assert!(
        e.to_string().contains("expected a .toml or .json file"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_display_file_line_column_and_field() {
    let e = spec::parse(
        "name = \"shop\"\n[services.store]\ncommand = [\"kv\"]\ningresses.main.protocol = \"tcp\"\n[services.web]\ncommand = [\"web\"]\n[services.web.egresses.store]\n    service = \"stor\"\n",
        Format::Toml,
        "specs/shop.toml",
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "specs/shop.toml:8:5: services.web.egresses.store.service: unknown service \"stor\" (known: store, web)"
    );
    assert_eq!(e.line, Some(8));
    assert_eq!(e.column, Some(5));

    // A spec's source map locates later errors (the orchestrator's) in the same file.
    let s = toml_ok(CHAIN);
    let e = s.error_at("services.web.command[0]", "cannot start: not found");
    assert_eq!(
        e.to_string(),
        "test.toml:14:12: services.web.command[0]: cannot start: not found"
    );
}

#[test]
fn variables_must_exist_when_they_look_like_rigs() {
    let base = |cmd: &str, env: &str| {
        format!(
            r#"
name = "shop"
[services.store]
command = ["kv"]
ingresses.main.protocol = "tcp"
[services.catalog]
command = ["catalog"]
ingresses.default.protocol = "grpc"
[services.web]
command = {cmd}
env = {env}
ingresses.default.protocol = "http"
ingresses.admin.protocol = "http"
egresses.store.service = "store"
egresses.catalog.service = "catalog"
"#
        )
    };
    // Every variable rig injects, the service's own env, other variables, and escapes pass.
    toml_ok(&base(
        r#"["web", "${HOST}:${PORT}", "${ADMIN_HOST}:${ADMIN_PORT}", "${STORE_ADDR}", "${STORE_HOST}", "${STORE_PORT}", "${CATALOG_URL}", "${CATALOG_ADDR}", "${RIG_SERVICE}", "${RIG_ENV}", "${RIG_WIRING}", "${MY_TOKEN}", "$${NOT_A_VAR_ADDR}", "$HOME"]"#,
        r#"{ OWN_URL = "http://x", USE = "${OWN_URL}" }"#,
    ));
    for (cmd, env, field, fragment) in [
        (
            r#"["web", "${CACHE_ADDR}"]"#,
            "{}",
            "services.web.command[1]",
            "${CACHE_ADDR} will not be set: service \"web\" has no egress \"cache\" (egresses: catalog, store)",
        ),
        (
            r#"["web"]"#,
            r#"{ S = "x${STORE_URL}" }"#,
            "services.web.env.S",
            "egress \"store\" is tcp (STORE_URL is set for http and grpc egresses only; use STORE_ADDR)",
        ),
        (
            r#"["web", "${ADMIN_ADDR}"]"#,
            "{}",
            "services.web.command[1]",
            "ingress \"admin\" gets ADMIN_HOST and ADMIN_PORT only, not ADDR",
        ),
        (
            r#"["web", "${DEFAULT_PORT}"]"#,
            "{}",
            "services.web.command[1]",
            "is the service's default ingress, so its address is in HOST and PORT",
        ),
        (
            r#"["web", "${RIG_SPEC}"]"#,
            "{}",
            "services.web.command[1]",
            "rig sets RIG_SERVICE, RIG_ENV, RIG_WIRING only",
        ),
        (
            r#"["web", "${PORT"]"#,
            "{}",
            "services.web.command[1]",
            "unterminated ${",
        ),
    ] {
        let e = toml_err(&base(cmd, env));
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
        assert!(
            e.to_string().contains(fragment),
            "{e}\n  expected: {fragment}"
        );
        assert!(e.line.is_some(), "{e}");
    }
    // HOST / PORT of a service without ingress.
    let e = toml_err("name = \"x\"\n[services.gen]\ncommand = [\"gen\", \"--port=${PORT}\"]\n");
    assert!(
        e.to_string().contains("service \"gen\" has no ingress"),
        "{e}"
    );
}

#[test]
fn check_ports_reports_a_port_in_use_with_its_field() {
    let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = held.local_addr().unwrap().port();
    let text = format!(
        "name = \"shop\"\n[services.store]\ncommand = [\"kv\"]\n[services.store.ingresses.main]\nprotocol = \"tcp\"\nport = {port}\n"
    );
    let s = toml_ok(&text);
    let e = spec::check_ports(&s).unwrap_err();
    assert_eq!(
        e.field.as_deref(),
        Some("services.store.ingresses.main.port")
    );
    assert_eq!(e.line, Some(6));
    assert!(
        e.to_string()
            .contains(&format!("port {port} is not free on 127.0.0.1")),
        "{e}"
    );

    drop(held);
    // Free again (nothing else on this machine is expected to grab this very port meanwhile).
    spec::check_ports(&s).unwrap_or_else(|e| panic!("{e}"));
    // Specs without fixed ports have nothing to check.
    spec::check_ports(&toml_ok(CHAIN)).unwrap();
}

#[test]
fn readiness_options_must_fit_the_protocol() {
    let ingress = |proto: &str, ready: &str| {
        format!(
            "name = \"x\"\n[services.s]\ncommand = [\"s\"]\n[services.s.ingresses.main]\nprotocol = \"{proto}\"\nready = {ready}\n"
        )
    };
    for (proto, ready, field, fragment) in [
        (
            "tcp",
            "{ path = \"/\" }",
            "services.s.ingresses.main.ready.path",
            "does not apply to a tcp ingress (only http)",
        ),
        (
            "grpc",
            "{ path = \"/\" }",
            "services.s.ingresses.main.ready.path",
            "does not apply to a grpc ingress (only http)",
        ),
        (
            "http",
            "{ service = \"x\" }",
            "services.s.ingresses.main.ready.service",
            "does not apply to a http ingress (only grpc)",
        ),
        (
            "http",
            "{ path = \"healthz\" }",
            "services.s.ingresses.main.ready.path",
            "must be a URL path starting with /",
        ),
        (
            "http",
            "{ timeout = \"0s\" }",
            "services.s.ingresses.main.ready.timeout",
            "must be greater than zero",
        ),
    ] {
        let e = toml_err(&ingress(proto, ready));
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
        assert!(e.message.contains(fragment), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
    }
    for (ready, fragment) in [
        ("{ timeout = \"-1s\" }", "must not be negative"),
        (
            "{ timeout = 5 }",
            "invalid type: integer `5`, expected a string",
        ),
        ("\"yes\"", "false to disable the readiness check"),
    ] {
        let e = toml_err(&ingress("http", ready));
        assert!(e.to_string().contains(fragment), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
    }
    assert_eq!(
        toml_ok(&ingress("grpc", "true")).services["s"].ingresses["main"].ready,
        Readiness::Grpc {
            service: String::new(),
            timeout: spec::DEFAULT_READY_TIMEOUT
        }
    );
}

#[test]
fn json_errors_are_located_too() {
    let json = |text: &str| spec::parse(text, Format::Json, "env.json").unwrap_err();
    let e = json(
        "{\"name\": \"x\",\n \"services\": {\"s\": {\"command\": [\"s\"],\n  \"ingresses\": {\"m\": {\"protocol\": \"tcp\", \"port\": 70000}}}}}",
    );
    assert_eq!(
        (e.line, e.field.as_deref()),
        (Some(3), Some("services.s.ingresses.m.port"))
    );
    assert!(e.message.contains("70000"), "{e}");
    let e = json(
        "{\"name\": \"x\",\n \"services\": {\"s\": {\"command\": [\"s\"]}},\n \"services\": {}}",
    );
    assert_eq!(e.line, Some(3), "{e}");
    assert!(e.message.contains("duplicate field `services`"), "{e}");
    let e = json("{\"name\": \"x\"");
    assert!(e.message.contains("EOF"), "{e}");
    assert_eq!(e.field, None);
}

/// A spec with an environment, service, ingress and egress named as given.
fn named(env: &str, svc: &str, ing: &str, eg: &str) -> String {
    format!(
        "name = \"{env}\"\n[services.store]\ncommand = [\"kv\"]\n[services.store.ingresses.{ing}]\nprotocol = \"tcp\"\n[services.{svc}]\ncommand = [\"web\"]\n[services.{svc}.egresses.{eg}]\nservice = \"store\"\n"
    )
}

#[test]
fn names_are_at_most_63_bytes_and_the_error_names_the_field() {
    assert_eq!(spec::MAX_NAME_LEN, 63);
    let max = "a".repeat(63);
    let long = "a".repeat(64);
    let s = toml_ok(&named(&max, &max, &max, &max));
    assert_eq!(s.name, max);
    assert!(s.services[&max].egresses.contains_key(&max));

    let cases = [
        (named(&long, "web", "main", "store"), "name", "environment"),
        (
            named("shop", &long, "main", "store"),
            &*format!("services.{long}"),
            "service",
        ),
        (
            named("shop", "web", &long, "store"),
            &*format!("services.store.ingresses.{long}"),
            "ingress",
        ),
        (
            named("shop", "web", "main", &long),
            &*format!("services.web.egresses.{long}"),
            "egress",
        ),
    ];
    for (text, field, kind) in &cases {
        let e = toml_err(text);
        assert_eq!(e.field.as_deref(), Some(*field), "{e}");
        assert!(e.line.is_some(), "{e}");
        assert_eq!(
            e.message,
            format!("{kind} name \"aaaaaaaaaaaaaaaa\"… is 64 bytes long: at most 63")
        );
    }
    // Huge: refused as quickly, and the message stays short.
    let e = toml_err(&named(&"a".repeat(100_000), "web", "main", "store"));
    assert!(e.message.len() < 100, "{}", e.message);
    // The same in JSON.
    let json = format!(r#"{{"name": "{long}", "services": {{"a": {{"command": ["x"]}}}}}}"#);
    let e = spec::parse(&json, Format::Json, "long.json").unwrap_err();
    assert_eq!(e.field.as_deref(), Some("name"), "{e}");
    assert!(e.message.contains("at most 63"), "{e}");
}

#[test]
fn a_spec_file_over_the_size_limit_is_refused_naming_file_and_limit() {
    let dir = std::env::temp_dir().join(format!("rig-spec-size-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let limit = spec::MAX_SPEC_BYTES;
    assert_eq!(limit, 1024 * 1024);
    let big = dir.join("big.toml");
    let mut text = String::from("name = \"big\"\n#");
    text.push_str(&"x".repeat(limit as usize));
    std::fs::write(&big, &text).unwrap();
    for e in [
        spec::load(&big).unwrap_err(),
        spec::read_spec_text(&big).unwrap_err(),
    ] {
        assert_eq!(e.origin, big.display().to_string());
        assert_eq!(
            e.message,
            format!(
                "the spec is {} bytes, over rig's limit of {limit} bytes (1 MiB)",
                text.len()
            )
        );
    }
    // Without a size to look at (a pipe), reading stops one byte past the limit.
    let e = spec::read_spec_text(Path::new("/dev/zero")).unwrap_err();
    assert!(
        e.message.contains(&format!("more than {limit} bytes")),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_prefix_of_a_spec_fails_cleanly_or_loads() {
    // Truncated files hit every error path of both parsers and the locators: none may panic,
    // and every error must still name the file.
    let dir = repo().join("specs").join("examples");
    for name in ["http-grpc-tcp.toml", "http-grpc-tcp.json", "tcp.toml"] {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let format = Format::from_path(&path).unwrap();
        let mut errors = 0;
        for end in (0..=text.len()).filter(|i| text.is_char_boundary(*i)) {
            if let Err(e) = spec::parse(&text[..end], format, name) {
                errors += 1;
                assert!(!e.message.is_empty());
                assert!(e.to_string().starts_with(name), "{e}");
            }
        }
        assert!(
            errors > text.len() / 2,
            "{name}: only {errors} prefixes failed"
        );
    }
}
