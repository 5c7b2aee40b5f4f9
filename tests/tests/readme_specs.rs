//! Every spec README.md shows is one a user can run as written: each ```toml block with a
//! `name =` and a `[services.` table is brought up by a real rigd with `rigctl up --detach`,
//! checked up (every service ready, every edge proxied) and brought down again.

use std::time::Duration;

use rig_tests::rigd::{Rigd, TempDir, alive, assert_all_gone, workspace_root};

/// The ```toml blocks of `markdown` that are whole specs (not chaos snippets or presets).
fn spec_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match current.as_mut() {
            None if line.trim_start().starts_with("```toml") => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_start().starts_with("```") => {
                let block = current.take().unwrap_or_default();
                let is_spec = block.lines().any(|l| l.trim_start().starts_with("name ="))
                    && block.contains("[services.");
                if is_spec {
                    blocks.push(block);
                }
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    blocks
}

#[test]
fn the_extractor_finds_spec_blocks_only() {
    let md = "text\n```toml\nname = \"a\"\n[services.x]\n```\n```toml\nlatency = \"1s\"\n```\n\
              ```sh\nname = 1 [services.\n```\n";
    assert_eq!(spec_blocks(md), vec!["name = \"a\"\n[services.x]\n"]);
}

#[test]
fn every_readme_spec_comes_up_as_written() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let blocks = spec_blocks(&readme);
    // Not vacuous: the spec reference shows at least one spec.
    assert!(!blocks.is_empty(), "README.md shows no spec");
    for (i, block) in blocks.iter().enumerate() {
        let rigd = Rigd::start();
        let dir = TempDir::new("readme");
        let file = dir.path().join(format!("readme-{i}.toml"));
        std::fs::write(&file, block).expect("write spec");
        let out = rigd.rigctl(&["up", "--detach", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "README spec #{i} does not come up:\n{block}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let envs = rigd.json(&["ls"]);
        let env = &envs.as_array().expect("ls --json is a list")[0];
        let name = env["name"].as_str().expect("env name").to_string();
        assert_eq!(env["state"], "up", "README spec #{i}: {env}");
        let services = env["services"].as_array().expect("services");
        assert!(!services.is_empty(), "{env}");
        let mut pids = Vec::new();
        for s in services {
            assert_eq!(s["state"], "ready", "README spec #{i}: {s}");
            let pid = s["pid"].as_u64().expect("pid") as u32;
            assert!(alive(pid), "README spec #{i}: {s} is not running");
            pids.push(pid);
        }
        rigd.ok(&["down", &name]);
        assert_all_gone(&pids, Duration::from_secs(15));
        assert_eq!(rigd.json(&["ls"]), serde_json::json!([]));
    }
}
