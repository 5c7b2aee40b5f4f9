//! The registry's domain layer stays free of the transport: no protobuf, no tonic.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("registry dir readable") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_registry_module_depends_on_protobuf_or_tonic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/registry");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    assert!(!files.is_empty(), "no files under {}", dir.display());
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable");
        for needle in ["rig_proto", "tonic::", "pb::", "tonic ::"] {
            assert!(!text.contains(needle), "{} mentions {needle}", f.display());
        }
    }
}
