//! The proxy crate is built in layers, and these tests read the sources to keep it so: a module
//! never names a module above it, and metric names live in `metrics.rs` only.
//!
//! ```text
//! edge → tcp/, http/ → context → snapshot, limits → policy, events, metrics, timer
//! ```

use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src dir readable") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A module's own files: `name.rs` and everything under `name/`.
fn module_files(name: &str) -> Vec<PathBuf> {
    let mut files = vec![src().join(format!("{name}.rs"))];
    let dir = src().join(name);
    if dir.is_dir() {
        rust_files(&dir, &mut files);
    }
    files
}

/// The file's code with comments left out (doc links to higher layers are fine; imports are
/// not).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Does `code` name the module (or root item) `crate::name`? `crate::Edge` must not match
/// `crate::EdgeInfo`.
fn names(code: &str, name: &str) -> bool {
    let needle = format!("crate::{name}");
    code.match_indices(&needle).any(|(i, _)| {
        code[i + needle.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

/// Each layer, with what it must never name (everything above it, and its siblings).
const LAYERS: &[(&[&str], &[&str])] = &[
    (&["tcp"], &["edge", "Edge", "http"]),
    (&["http"], &["edge", "Edge", "tcp"]),
    (&["context"], &["edge", "Edge", "tcp", "http"]),
    (
        &["snapshot", "limits"],
        &["edge", "Edge", "tcp", "http", "context"],
    ),
    (
        &["policy", "events", "metrics", "timer"],
        &[
            "edge", "Edge", "tcp", "http", "context", "snapshot", "limits",
        ],
    ),
];

#[test]
fn no_module_names_a_module_above_it() {
    for (modules, above) in LAYERS {
        for module in *modules {
            for file in module_files(module) {
                let code = code(&file);
                for name in *above {
                    assert!(
                        !names(&code, name),
                        "{} names crate::{name}, a layer above {module}",
                        file.display()
                    );
                }
            }
        }
    }
}

#[test]
fn every_module_is_in_a_layer() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    for f in files {
        let rel = f.strip_prefix(src()).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("utf-8 path");
        let module = top.trim_end_matches(".rs");
        let placed = module == "lib"
            || module == "edge"
            || LAYERS.iter().any(|(ms, _)| ms.contains(&module));
        assert!(
            placed,
            "{} is in no layer of tests/layering.rs",
            f.display()
        );
    }
}

#[test]
fn metric_names_and_macros_live_in_metrics_rs() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let metrics_rs = src().join("metrics.rs");
    for f in files.iter().filter(|f| **f != metrics_rs) {
        let code = code(f);
        for needle in [
            "counter!(",
            "gauge!(",
            "histogram!(",
            "describe_counter!(",
            "\"rig_edge_",
        ] {
            assert!(
                !code.contains(needle),
                "{} has `{needle}`: metric names and their macros belong in metrics.rs",
                f.display()
            );
        }
    }
}
