//! Chaos presets: named, ready-made chaos for `rigctl chaos set --preset NAME`.
//!
//! A preset file (`chaos-presets/NAME.toml`) holds a `description`, a `[chaos]` table (a
//! [`ChaosSpec`] for every protocol) and optional `[http]`, `[grpc]` and `[tcp]` tables merged
//! over it for that protocol (with [`ChaosSpec::merged_with`]): protocol-specific keys such as
//! `status`, `grpc_code` or `reset_after` belong in those. Every preset must validate for all
//! three protocols, so it can be applied to any edge.
//!
//! The presets in `chaos-presets/` are compiled in ([`builtin`]); [`load_dir`] reads more from a
//! directory.

use std::path::Path;

use rig_proxy::policy::{ChaosSpec, Protocol};
use serde::Deserialize;

use crate::spec::{FieldPath, Source, SpecError, toml_tree};

/// A named chaos preset.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub name: String,
    pub description: String,
    /// Applies to every protocol.
    pub chaos: ChaosSpec,
    /// Overlays for one protocol, merged over `chaos`.
    pub http: ChaosSpec,
    pub grpc: ChaosSpec,
    pub tcp: ChaosSpec,
}

impl Preset {
    /// The chaos this preset means for an edge speaking `p`: `chaos` with `p`'s overlay on top.
    pub fn for_protocol(&self, p: Protocol) -> ChaosSpec {
        let overlay = match p {
            Protocol::Http => &self.http,
            Protocol::Grpc => &self.grpc,
            Protocol::Tcp => &self.tcp,
        };
        self.chaos.merged_with(overlay)
    }
}

/// A preset that failed to load: where, and why. The same located error as a spec's:
/// `flaky.toml:7:1: chaos.status: does not apply to a tcp edge (only http) ...`.
pub type PresetError = SpecError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPreset {
    description: String,
    #[serde(default)]
    chaos: ChaosSpec,
    #[serde(default)]
    http: ChaosSpec,
    #[serde(default)]
    grpc: ChaosSpec,
    #[serde(default)]
    tcp: ChaosSpec,
}

/// The compiled-in presets' names and text. `control/tests/specs.rs` checks that this list and
/// the files in `chaos-presets/` are the same.
const BUILTIN: &[(&str, &str)] = &[
    (
        "bandwidth-constrained",
        include_str!("../../chaos-presets/bandwidth-constrained.toml"),
    ),
    (
        "blackhole",
        include_str!("../../chaos-presets/blackhole.toml"),
    ),
    ("chaos", include_str!("../../chaos-presets/chaos.toml")),
    (
        "degraded",
        include_str!("../../chaos-presets/degraded.toml"),
    ),
    ("error", include_str!("../../chaos-presets/error.toml")),
    ("flaky", include_str!("../../chaos-presets/flaky.toml")),
    ("healthy", include_str!("../../chaos-presets/healthy.toml")),
    (
        "partition",
        include_str!("../../chaos-presets/partition.toml"),
    ),
    (
        "slow-network",
        include_str!("../../chaos-presets/slow-network.toml"),
    ),
];

/// The compiled-in presets, sorted by name.
pub fn builtin() -> Vec<Preset> {
    let mut out: Vec<Preset> = BUILTIN
        .iter()
        .filter_map(|(name, text)| {
            let origin = format!("chaos-presets/{name}.toml");
            match parse_from(name, text, &origin) {
                Ok(p) => Some(p),
                Err(e) => {
                    // Tests keep this from happening; a broken preset must not take rigd down.
                    tracing::error!(preset = %name, error = %e, "invalid built-in preset");
                    None
                }
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The compiled-in preset `name`.
pub fn find_builtin(name: &str) -> Option<Preset> {
    builtin().into_iter().find(|p| p.name == name)
}

/// Every `*.toml` file in `dir` as a preset named after the file's stem, sorted by name. Other
/// files are ignored; the first invalid preset fails the whole directory.
pub fn load_dir(dir: &Path) -> Result<Vec<Preset>, PresetError> {
    let origin = dir.display().to_string();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| SpecError::plain(&origin, format!("cannot read the preset directory: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| {
            SpecError::plain(&origin, format!("cannot read the preset directory: {e}"))
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let mut out = Vec::with_capacity(files.len());
    for path in files {
        let origin = path.display().to_string();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| SpecError::plain(&origin, "the file name is not valid UTF-8"))?;
        let text = std::fs::read_to_string(&path)
            .map_err(|e| SpecError::plain(&origin, format!("cannot read the preset: {e}")))?;
        out.push(parse_from(name, &text, &origin)?);
    }
    Ok(out)
}

/// Parses and validates the preset `name` (errors name it as `NAME.toml`).
pub fn parse(name: &str, text: &str) -> Result<Preset, PresetError> {
    parse_from(name, text, &format!("{name}.toml"))
}

fn parse_from(name: &str, text: &str, origin: &str) -> Result<Preset, PresetError> {
    let mut chars = name.chars();
    let name_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !name_ok {
        return Err(SpecError::plain(
            origin,
            format!("invalid preset name {name:?}: use lowercase letters, digits, - and _"),
        ));
    }
    let src = Source::new(origin, text, Some(toml_tree(text)));
    let raw: RawPreset = toml::from_str(text).map_err(|e| SpecError::from_toml(&src, &e))?;
    if raw.description.trim().is_empty() {
        return Err(SpecError::at(
            &src,
            &FieldPath::new(&["description"]),
            "must not be empty",
        ));
    }
    let preset = Preset {
        name: name.to_owned(),
        description: raw.description,
        chaos: raw.chaos,
        http: raw.http,
        grpc: raw.grpc,
        tcp: raw.tcp,
    };
    for p in [Protocol::Http, Protocol::Grpc, Protocol::Tcp] {
        if let Err(e) = preset.for_protocol(p).validate(p) {
            // Blame the overlay when it sets the field, else the shared table.
            let overlay = FieldPath::new(&[p.as_str()]).dotted(&e.field);
            let path = if src.has(&overlay) {
                overlay
            } else {
                FieldPath::new(&["chaos"]).dotted(&e.field)
            };
            let hint = if e.message.contains("does not apply") {
                "; put protocol-specific keys in the [http], [grpc] or [tcp] table"
            } else {
                ""
            };
            let message = format!("{} (validating for {p} edges{hint})", e.message);
            return Err(SpecError::at(&src, &path, message));
        }
    }
    Ok(preset)
}
