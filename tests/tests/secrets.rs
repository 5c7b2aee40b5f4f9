//! rigd's token stays rigd's: services do not inherit it (nor any of rig's own configuration
//! variables), it can be read from a private file instead of the command line, and a file that
//! others can read is refused before rigd serves anything.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rig_tests::rigd::{Rigd, TempDir, bin, http_get};

const TOKEN: &str = "tok-7f3a9c1e-never-inherited";

/// Polls until the service has written its environment, then parses it.
fn read_env_dump(path: &Path) -> HashMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} was never written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn private_file(dir: &TempDir, name: &str, contents: &str, mode: u32) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn services_do_not_inherit_the_token_or_rigs_configuration_unless_the_spec_sets_it() {
    // rigd gets the token as RIG_TOKEN (the way `Rigd::start_with` passes it).
    let rigd = Rigd::start_with(&[], Some(TOKEN));
    let dir = TempDir::new("secrets-env");
    let plain = dir.path().join("plain.env");
    let asks = dir.path().join("asks.env");
    let handed = dir.path().join("handed.env");
    let dump = |out: &Path| {
        format!(
            r#"["sh", "-c", "env > {o}.tmp && mv {o}.tmp {o} && exec sleep 600"]"#,
            o = out.display()
        )
    };
    let text = format!(
        r#"
name = "secrets"
[services.plain]
command = {plain}
[services.asks]
command = {asks}
env = {{ RIG_TOKEN = "the spec's own value", RIGCTL_ENV = "chosen" }}
[services.handed]
command = {handed}
env = {{ RIG_TOKEN = "${{RIG_TOKEN}}" }}
"#,
        handed = dump(&handed),
        plain = dump(&plain),
        asks = dump(&asks),
    );
    let spec = dir.path().join("secrets.toml");
    std::fs::write(&spec, text).unwrap();
    rigd.ok(&["up", spec.to_str().unwrap(), "--detach"]);

    let env = read_env_dump(&plain);
    assert!(!env.contains_key("RIG_TOKEN"), "RIG_TOKEN leaked: {env:?}");
    assert!(
        env.values().all(|v| !v.contains(TOKEN)),
        "the token's value is in the service's environment"
    );
    assert_eq!(env["RIG_ENV"], "secrets", "rig's own wiring still arrives");
    assert_eq!(env["RIG_SERVICE"], "plain");
    assert!(
        env.contains_key("PATH"),
        "the rest of the environment is inherited"
    );

    let env = read_env_dump(&asks);
    assert_eq!(
        env["RIG_TOKEN"], "the spec's own value",
        "a spec may set it"
    );
    assert_eq!(env["RIGCTL_ENV"], "chosen");

    let env = read_env_dump(&handed);
    assert_eq!(
        env["RIG_TOKEN"], TOKEN,
        "a spec may hand rigd's token on by name"
    );
    rigd.ok(&["down"]);
}

#[test]
fn a_private_token_file_guards_rigd_and_rigctl_reads_it_too() {
    let dir = TempDir::new("secrets-file");
    let file = private_file(&dir, "token", &format!("{TOKEN}\n"), 0o600);
    let rigd = Rigd::start_with(&["--token-file", &file], None);
    assert_eq!(http_get(&rigd.url("/metrics"), None).0, 401);
    assert_eq!(http_get(&rigd.url("/metrics"), Some(TOKEN)).0, 200);

    let cmdline = std::fs::read(format!("/proc/{}/cmdline", rigd.child.id())).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(TOKEN),
        "the token is not on rigd's command line"
    );

    let out = rigd.rigctl_cmd(&["ls"]).output().unwrap();
    assert!(!out.status.success(), "without the token rigctl is refused");
    let out = rigd
        .rigctl_cmd(&["ls", "--token-file", &file])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rigctl --token-file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = rigd
        .rigctl_cmd(&["ls"])
        .env("RIG_TOKEN_FILE", &file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "RIG_TOKEN_FILE works as the flag does"
    );
}

#[test]
fn a_token_file_others_can_read_is_refused_naming_the_file_and_the_fix() {
    let dir = TempDir::new("secrets-mode");
    let file = private_file(&dir, "token", TOKEN, 0o644);
    for program in ["rigd", "rigctl"] {
        let mut cmd = Command::new(bin(program));
        if program == "rigd" {
            cmd.args(["--listen", "127.0.0.1:0", "--state-dir"])
                .arg(dir.path().join("state"));
        } else {
            cmd.args(["ls", "--addr", "127.0.0.1:9"]);
        }
        let out = cmd
            .args(["--token-file", &file])
            .env_remove("RIG_TOKEN")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{program}: {err}");
        assert!(err.contains("--token-file"), "{program}: {err}");
        assert!(err.contains(&file), "{program} names the file: {err}");
        assert!(
            err.contains("chmod 600"),
            "{program} says how to fix it: {err}"
        );
        assert!(!err.contains(TOKEN), "{program} printed the token: {err}");
    }

    let ok = private_file(&dir, "ok", TOKEN, 0o600);
    let out = Command::new(bin("rigd"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--token",
            "x",
            "--token-file",
            &ok,
        ])
        .env_remove("RIG_TOKEN")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "--token and --token-file conflict"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
