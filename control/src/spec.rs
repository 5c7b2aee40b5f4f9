//! Spec files: one environment per file, in TOML or JSON (same structure, chosen by extension).
//!
//! ```toml
//! name = "shop"                  # [a-z0-9-]+; RIG_ENV and edge selectors use it
//! seed = 7                       # optional: per-edge seeds derive from it
//! observe = true                 # optional, default true; false: no proxies
//!
//! [services.store]
//! command = ["rig-demo", "kv"]   # argv, non-empty
//! cwd = "."                      # optional, relative to the spec file's directory
//! env = { LOG = "debug" }        # optional
//! stop_grace = "5s"              # optional SIGTERM → SIGKILL grace, default 5s
//! [services.store.ingresses.main]
//! protocol = "tcp"               # http | grpc | tcp
//! port = 7000                    # optional fixed port
//! ready = { timeout = "30s" }    # optional; `ready = false` disables the check
//!
//! [services.web]
//! command = ["rig-demo", "web", "--store", "${STORE_ADDR}"]
//! [services.web.ingresses.default]
//! protocol = "http"
//! ready = { path = "/healthz" }
//! [services.web.egresses.store]
//! service = "store"              # required
//! ingress = "main"               # required when the target has several ingresses
//! observe = true                 # optional, default: the environment's
//! chaos = { latency = "50ms" }   # optional ChaosSpec, validated against the target's protocol
//! ```
//!
//! Loading happens in two steps: strict serde structs (`raw`, `deny_unknown_fields` everywhere)
//! take the file apart, then [`parse`] checks the whole and builds the validated [`Spec`] the
//! orchestrator runs. Every error is a [`SpecError`] naming the file, line, column and dotted
//! field path. Positions come from a tree of spans built alongside the serde pass (`source`):
//! toml's `DeTable` for TOML, a small span-keeping scanner for JSON (serde_json keeps none). For
//! JSON syntax and type errors the line and column are serde_json's; for semantic errors they are
//! those of the offending key (or of the deepest part of its path that exists).
//!
//! ## The environment of a service
//!
//! The orchestrator injects these variables; a service's `command` and `env` values may refer to
//! them as `${VAR}` (syntax in [`expand_vars`]):
//!
//! * `HOST`, `PORT`: the service's default ingress (its only one, or the one named `default`);
//! * `<INGRESS>_HOST`, `<INGRESS>_PORT`: each other ingress;
//! * `<EGRESS>_HOST`, `<EGRESS>_PORT`, `<EGRESS>_ADDR` (`host:port`), and `<EGRESS>_URL`
//!   (`http://host:port`) for http and grpc egresses;
//! * `RIG_SERVICE`, `RIG_ENV`, `RIG_WIRING`.
//!
//! `<NAME>` is [`env_prefix`]`(name)`: upper-cased, `-` → `_`. Two names with the same prefix
//! in one service are rejected. A `${VAR}` that is none of these, not a key of the service's
//! `env` and not set in the validating process's environment is rejected only when it looks like
//! one of rig's own (`HOST`, `PORT`, `RIG_*`, `*_HOST`, `*_PORT`, `*_ADDR`, `*_URL`): anything
//! else may come from the environment rigd runs in. In an `env` value, a reference to that
//! same key (`TOKEN = "${TOKEN}"`) is rigd's variable, as in Compose.

mod raw;
mod source;
mod vars;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use rig_proxy::policy::{ChaosSpec, Protocol};

use raw::{RawEgress, RawIngress, RawReady, RawService, RawSpec};
pub(crate) use source::{FieldPath, Source, toml_tree};
use source::{JsonScan, json_tree};
pub use vars::{expand_vars, var_refs};

/// Default time a service's ingress gets to become ready.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default grace between SIGTERM and SIGKILL when stopping a service.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
/// The longest environment, service, ingress or egress name, in bytes: a DNS label's limit, as
/// for Docker Compose project names. rigd refuses longer names arriving through its API too.
pub const MAX_NAME_LEN: usize = 63;
/// The largest spec file rigctl reads (and spec text rigd accepts in `Up`), in bytes: 1 MiB,
/// well under gRPC's 4 MiB message limit.
pub const MAX_SPEC_BYTES: u64 = 1024 * 1024;

/// Refuses a name longer than [`MAX_NAME_LEN`]; the message quotes only its start, so an
/// over-long name does not make an over-long error. `kind` is "environment", "service", ...
pub fn check_name_len(kind: &str, name: &str) -> Result<(), String> {
    if name.len() <= MAX_NAME_LEN {
        return Ok(());
    }
    Err(format!(
        "{kind} name {} is {} bytes long: at most {MAX_NAME_LEN}",
        preview(name),
        name.len()
    ))
}

/// `name` quoted, cut to its first 16 characters (then `…`) when longer.
pub fn preview(name: &str) -> String {
    const SHOWN: usize = 16;
    match name.char_indices().nth(SHOWN) {
        Some((i, _)) => format!("{:?}…", &name[..i]),
        None => format!("{name:?}"),
    }
}

/// A spec that failed to load: where, and why.
///
/// Displays as `specs/shop.toml:12:5: services.web.egresses.store.service: unknown service
/// "stor" (known: store, web)`; the line, column and field are left out when unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// The file name (or whatever name the spec text came with).
    pub origin: String,
    /// 1-based line.
    pub line: Option<usize>,
    /// 1-based column.
    pub column: Option<usize>,
    /// Dotted path of the offending field (`services.web.command[2]`).
    pub field: Option<String>,
    /// What is wrong, lowercase, no trailing period.
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_located(
            f,
            &self.origin,
            self.line,
            self.column,
            self.field.as_deref(),
            &self.message,
        )
    }
}

pub(crate) fn write_located(
    f: &mut fmt::Formatter<'_>,
    origin: &str,
    line: Option<usize>,
    column: Option<usize>,
    field: Option<&str>,
    message: &str,
) -> fmt::Result {
    f.write_str(origin)?;
    if let Some(l) = line {
        write!(f, ":{l}")?;
        if let Some(c) = column {
            write!(f, ":{c}")?;
        }
    }
    f.write_str(": ")?;
    if let Some(field) = field {
        write!(f, "{field}: ")?;
    }
    f.write_str(message)
}

impl SpecError {
    pub(crate) fn plain(origin: &str, message: impl Into<String>) -> Self {
        SpecError {
            origin: origin.to_owned(),
            line: None,
            column: None,
            field: None,
            message: message.into(),
        }
    }

    pub(crate) fn at(src: &Source, path: &FieldPath, message: impl Into<String>) -> Self {
        let pos = src.locate(path);
        SpecError {
            origin: src.origin.clone(),
            line: pos.map(|p| p.line),
            column: pos.map(|p| p.column),
            field: (!path.is_empty()).then(|| path.to_string()),
            message: message.into(),
        }
    }

    /// A toml error: its span gives the position and, through the tree, the field.
    pub(crate) fn from_toml(src: &Source, e: &toml::de::Error) -> Self {
        let mut message = e.message().trim().to_owned();
        match e.span() {
            Some(span) => {
                let pos = src.position(span.start);
                let path = src.path_at(span.start);
                let mut field = (!path.is_empty()).then(|| path.to_string());
                if message == "duplicate key" {
                    // toml says only "duplicate key", and the repeated key is not in the tree
                    // (it failed to parse): name it from the text.
                    if let Some(key) = src.text_at(span.clone()) {
                        message = format!("duplicate key `{}`", key.trim().trim_matches('"'));
                    }
                    if field.is_none() {
                        field = src.dotted_key_at(span.end).map(|p| p.to_string());
                    }
                }
                SpecError {
                    origin: src.origin.clone(),
                    line: Some(pos.line),
                    column: Some(pos.column),
                    field,
                    message,
                }
            }
            None => SpecError::plain(&src.origin, message),
        }
    }

    fn from_json(src: &Source, e: &serde_json::Error) -> Self {
        let text = e.to_string();
        // serde_json appends " at line L column C"; the position is kept in its own fields.
        let message = match text.rsplit_once(" at line ") {
            Some((m, _)) if e.line() > 0 => m.to_owned(),
            _ => text,
        };
        if e.line() == 0 {
            return SpecError::plain(&src.origin, message);
        }
        let field = match e.classify() {
            serde_json::error::Category::Data => {
                let path = src.path_at(src.offset_of(e.line(), e.column()));
                (!path.is_empty()).then(|| path.to_string())
            }
            _ => None,
        };
        SpecError {
            origin: src.origin.clone(),
            line: Some(e.line()),
            column: Some(e.column().max(1)),
            field,
            message,
        }
    }
}

/// A spec file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

impl Format {
    /// By extension: `.toml` or `.json` (any case); `None` for anything else.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "toml" => Some(Format::Toml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// Where a spec came from, kept so that errors found later (a port in use, a command that
/// cannot start) can still point at a line. Compares equal to any other: positions are not
/// part of what a spec means, so the same environment in TOML and JSON gives equal specs.
#[derive(Clone)]
pub struct SourceMap(Source);

impl SourceMap {
    /// The file name the spec was loaded from.
    pub fn origin(&self) -> &str {
        &self.0.origin
    }

    /// An error about `field` (dotted path such as `services.web.command[0]`), located in the
    /// file when the field (or part of its path) is in it.
    pub fn error_at(&self, field: &str, message: impl Into<String>) -> SpecError {
        SpecError::at(&self.0, &FieldPath::parse(field), message)
    }
}

impl PartialEq for SourceMap {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for SourceMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SourceMap").field(&self.0.origin).finish()
    }
}

/// A validated environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub name: String,
    pub seed: Option<u64>,
    /// The environment's default for egresses' `observe`.
    pub observe: bool,
    /// The file it was loaded from (absolute), when loaded with [`load`].
    pub path: Option<PathBuf>,
    /// By name.
    pub services: BTreeMap<String, Service>,
    /// Start order: levels of services whose dependencies (egress targets) are all in earlier
    /// levels; the services of one level can start in parallel. Each level is sorted by name.
    pub order: Vec<Vec<String>>,
    /// Positions in the file, for later errors.
    pub source: SourceMap,
}

/// A service: a child process with its ingresses (where it listens) and egresses (what it
/// calls).
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    /// argv, non-empty; `${VAR}` references are not expanded yet.
    pub command: Vec<String>,
    /// Resolved against the spec file's directory by [`load`] and [`parse_in_dir`]; as written
    /// (minus `.` components) by [`parse`].
    pub cwd: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub stop_grace: Duration,
    pub ingresses: BTreeMap<String, Ingress>,
    pub egresses: BTreeMap<String, Egress>,
}

/// Where a service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingress {
    pub name: String,
    pub protocol: Protocol,
    /// A fixed port; `None`: rigd allocates one.
    pub port: Option<u16>,
    pub ready: Readiness,
}

/// How to tell that an ingress is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// `ready = false`: considered ready once started.
    Disabled,
    /// A TCP connect succeeds.
    Tcp { timeout: Duration },
    /// `GET path` answers with a status below 500.
    Http { path: String, timeout: Duration },
    /// `grpc.health.v1.Health/Check` for `service` ("" = the server) answers SERVING.
    Grpc { service: String, timeout: Duration },
}

impl Readiness {
    /// How long the check may take; `None` when disabled.
    pub fn timeout(&self) -> Option<Duration> {
        match self {
            Readiness::Disabled => None,
            Readiness::Tcp { timeout }
            | Readiness::Http { timeout, .. }
            | Readiness::Grpc { timeout, .. } => Some(*timeout),
        }
    }
}

/// A dependency of a service on another service's ingress: an edge rig proxies.
#[derive(Debug, Clone, PartialEq)]
pub struct Egress {
    pub name: String,
    /// The target service.
    pub service: String,
    /// The target ingress (resolved when the target has only one).
    pub ingress: String,
    /// The target ingress's protocol.
    pub protocol: Protocol,
    /// Proxy this edge (resolved from the environment's default).
    pub observe: bool,
    /// Chaos applied at `up`, validated against `protocol`; empty means none. When the
    /// environment has a seed and the chaos has none, `seed` is [`derive_seed`]'s.
    pub chaos: ChaosSpec,
}

impl Spec {
    /// Every edge: (source service, egress), by service then egress name.
    pub fn edges(&self) -> impl Iterator<Item = (&Service, &Egress)> {
        self.services
            .values()
            .flat_map(|s| s.egresses.values().map(move |e| (s, e)))
    }

    /// An error about a field of this spec, located in its file (see [`SourceMap::error_at`]).
    pub fn error_at(&self, field: &str, message: impl Into<String>) -> SpecError {
        self.source.error_at(field, message)
    }
}

impl Service {
    /// The ingress whose address goes in `HOST` and `PORT`: the only one, or the one named
    /// `default`.
    pub fn default_ingress(&self) -> Option<&Ingress> {
        if self.ingresses.len() == 1 {
            return self.ingresses.values().next();
        }
        self.ingresses.get("default")
    }

    /// The names of the variables rig injects into this service (see the module docs), sorted.
    pub fn injected_var_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.injected().into_iter().map(|v| v.var).collect();
        names.sort();
        names.dedup();
        names
    }

    fn injected(&self) -> Vec<Injected> {
        let mut out = Vec::new();
        let default = self.default_ingress().map(|i| i.name.clone());
        let svc = FieldPath::new(&["services", &self.name]);
        for ing in self.ingresses.values() {
            let path = svc.clone().key("ingresses").key(&ing.name);
            let what = format!("ingress {:?}", ing.name);
            let prefix = if default.as_deref() == Some(ing.name.as_str()) {
                String::new()
            } else {
                format!("{}_", env_prefix(&ing.name))
            };
            for suffix in ["HOST", "PORT"] {
                out.push(Injected {
                    var: format!("{prefix}{suffix}"),
                    what: what.clone(),
                    path: path.clone(),
                });
            }
        }
        for eg in self.egresses.values() {
            let path = svc.clone().key("egresses").key(&eg.name);
            let what = format!("egress {:?}", eg.name);
            let prefix = env_prefix(&eg.name);
            let mut suffixes = vec!["HOST", "PORT", "ADDR"];
            if eg.protocol != Protocol::Tcp {
                suffixes.push("URL");
            }
            for suffix in suffixes {
                out.push(Injected {
                    var: format!("{prefix}_{suffix}"),
                    what: what.clone(),
                    path: path.clone(),
                });
            }
        }
        for var in RIG_VARS {
            out.push(Injected {
                var: var.to_owned(),
                what: "rig".to_owned(),
                path: svc.clone(),
            });
        }
        out
    }
}

const RIG_VARS: [&str; 3] = ["RIG_SERVICE", "RIG_ENV", "RIG_WIRING"];

struct Injected {
    var: String,
    what: String,
    path: FieldPath,
}

/// The env var prefix of an ingress or egress name: upper-cased, `-` → `_`.
pub fn env_prefix(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

/// The seed of an edge without its own, from the environment's: stable across runs, platforms
/// and rig versions (FNV-1a over the seed and `source/egress`, then the SplitMix64 finaliser),
/// and different for every edge.
pub fn derive_seed(env_seed: u64, source: &str, egress: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    let bytes = env_seed
        .to_le_bytes()
        .into_iter()
        .chain(source.bytes())
        .chain(std::iter::once(b'/'))
        .chain(egress.bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    // FNV alone mixes the last bytes poorly; SplitMix64's finaliser spreads every bit.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Reads and validates a spec file; the format comes from the extension. `cwd`s resolve against
/// the file's directory and [`Spec::path`] is the file's absolute path.
pub fn load(path: &Path) -> Result<Spec, SpecError> {
    let origin = path.display().to_string();
    let format = Format::from_path(path).ok_or_else(|| {
        SpecError::plain(
            &origin,
            "unsupported spec format: expected a .toml or .json file",
        )
    })?;
    let text = read_spec_text(path)?;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut spec = parse_in(&text, format, &origin, abs.parent())?;
    spec.path = Some(abs);
    Ok(spec)
}

/// A spec file's text, refused without reading it all when over [`MAX_SPEC_BYTES`] (by its size
/// when it has one, else by reading one byte past the limit, for pipes and devices). The error
/// names the file and the limit.
pub fn read_spec_text(path: &Path) -> Result<String, SpecError> {
    use std::io::Read as _;
    let origin = path.display().to_string();
    let cannot =
        |e: std::io::Error| SpecError::plain(&origin, format!("cannot read the spec: {e}"));
    let too_big = |n: String| {
        SpecError::plain(
            &origin,
            format!("the spec is {n} bytes, over rig's limit of {MAX_SPEC_BYTES} bytes (1 MiB)"),
        )
    };
    let file = std::fs::File::open(path).map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    if meta.is_file() && meta.len() > MAX_SPEC_BYTES {
        return Err(too_big(meta.len().to_string()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_SPEC_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_SPEC_BYTES {
        return Err(too_big(format!("more than {MAX_SPEC_BYTES}")));
    }
    String::from_utf8(bytes).map_err(|e| {
        SpecError::plain(
            &origin,
            format!(
                "cannot read the spec: not UTF-8 (at byte {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Validates spec text. `origin` names it in errors (rigd gets the text over gRPC with the
/// file's name). `cwd`s are left as written (relative ones relative to wherever the spec's
/// directory is; see [`parse_in_dir`]), and [`Spec::path`] is `None`.
pub fn parse(text: &str, format: Format, origin: &str) -> Result<Spec, SpecError> {
    parse_in(text, format, origin, None)
}

/// [`parse`], with relative `cwd`s resolved against `dir` (the spec file's directory).
pub fn parse_in_dir(
    text: &str,
    format: Format,
    origin: &str,
    dir: &Path,
) -> Result<Spec, SpecError> {
    parse_in(text, format, origin, Some(dir))
}

fn parse_in(
    text: &str,
    format: Format,
    origin: &str,
    base: Option<&Path>,
) -> Result<Spec, SpecError> {
    let (raw, src) = match format {
        Format::Toml => {
            let src = Source::new(origin, text, Some(toml_tree(text)));
            match toml::from_str::<RawSpec>(text) {
                Ok(raw) => (raw, src),
                Err(e) => return Err(SpecError::from_toml(&src, &e)),
            }
        }
        Format::Json => {
            let (tree, duplicate) = match json_tree(text) {
                Ok(t) => (Some(t), None),
                Err(JsonScan::Duplicate { path, offset }) => (None, Some((path, offset))),
                Err(JsonScan::Invalid) => (None, None),
            };
            let src = Source::new(origin, text, tree);
            let raw = serde_json::from_str::<RawSpec>(text)
                .map_err(|e| SpecError::from_json(&src, &e))?;
            if let Some((path, offset)) = duplicate {
                let pos = src.position(offset);
                let key = match path.0.last() {
                    Some(source::Seg::Key(k)) => k.clone(),
                    _ => String::new(),
                };
                return Err(SpecError {
                    origin: origin.to_owned(),
                    line: Some(pos.line),
                    column: Some(pos.column),
                    field: Some(path.to_string()),
                    message: format!("duplicate key `{key}`"),
                });
            }
            (raw, src)
        }
    };
    build(raw, src, base)
}

/// Checks that every fixed `port` is free on 127.0.0.1 right now (binds and drops it), so `up`
/// fails before starting anything rather than halfway.
pub fn check_ports(spec: &Spec) -> Result<(), SpecError> {
    for svc in spec.services.values() {
        for ing in svc.ingresses.values() {
            let Some(port) = ing.port else { continue };
            if let Err(e) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                let field =
                    FieldPath::new(&["services", &svc.name, "ingresses", &ing.name, "port"]);
                return Err(SpecError::at(
                    &spec.source.0,
                    &field,
                    format!("port {port} is not free on 127.0.0.1: {e}"),
                ));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

fn build(raw: RawSpec, src: Source, base: Option<&Path>) -> Result<Spec, SpecError> {
    let err = |path: FieldPath, msg: String| SpecError::at(&src, &path, msg);

    check_name_len("environment", &raw.name).map_err(|m| err(FieldPath::new(&["name"]), m))?;
    if raw.name.is_empty()
        || !raw
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(err(
            FieldPath::new(&["name"]),
            format!(
                "invalid environment name {:?}: use lowercase letters, digits and -",
                raw.name
            ),
        ));
    }
    if raw.services.is_empty() {
        return Err(err(
            FieldPath::new(&["services"]),
            "an environment needs at least one service".to_owned(),
        ));
    }
    let env_observe = raw.observe.unwrap_or(true);

    // Services and their ingresses first: egresses are checked against them.
    let mut services = BTreeMap::new();
    for (name, rs) in &raw.services {
        let svc = build_service(name, rs, base).map_err(|(p, m)| err(p, m))?;
        services.insert(name.clone(), svc);
    }

    // Fixed ports must be distinct across the environment.
    let mut ports: BTreeMap<u16, FieldPath> = BTreeMap::new();
    for svc in services.values() {
        for ing in svc.ingresses.values() {
            let Some(port) = ing.port else { continue };
            let path = FieldPath::new(&["services", &svc.name, "ingresses", &ing.name, "port"]);
            if let Some(first) = ports.get(&port) {
                return Err(err(path, format!("port {port} is also used by {first}")));
            }
            ports.insert(
                port,
                FieldPath::new(&["services", &svc.name, "ingresses", &ing.name]),
            );
        }
    }

    // Egresses.
    let known: Vec<&str> = raw.services.keys().map(String::as_str).collect();
    for (name, rs) in &raw.services {
        let mut egresses = BTreeMap::new();
        for (eg_name, re) in &rs.egresses {
            let eg = build_egress(name, eg_name, re, &services, &known, env_observe, raw.seed)
                .map_err(|(p, m)| err(p, m))?;
            egresses.insert(eg_name.clone(), eg);
        }
        if let Some(svc) = services.get_mut(name) {
            svc.egresses = egresses;
        }
    }

    let order = start_order(&services).map_err(|(p, m)| err(p, m))?;

    for svc in services.values() {
        check_env(svc).map_err(|(p, m)| err(p, m))?;
    }

    Ok(Spec {
        name: raw.name,
        seed: raw.seed,
        observe: env_observe,
        path: None,
        services,
        order,
        source: SourceMap(src),
    })
}

type Problem = (FieldPath, String);

fn check_name(kind: &str, name: &str) -> Result<(), String> {
    check_name_len(kind, name)?;
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} name {name:?}: use lowercase letters, digits, _ and -, starting with a letter"
        ))
    }
}

fn build_service(name: &str, rs: &RawService, base: Option<&Path>) -> Result<Service, Problem> {
    let path = FieldPath::new(&["services", name]);
    check_name("service", name).map_err(|m| (path.clone(), m))?;

    match rs.command.first() {
        None => {
            return Err((
                path.key("command"),
                "must not be empty: give the program and its arguments".to_owned(),
            ));
        }
        Some(p) if p.trim().is_empty() => {
            return Err((
                path.key("command").index(0),
                "the program must not be empty".to_owned(),
            ));
        }
        Some(_) => {}
    }
    for (i, arg) in rs.command.iter().enumerate() {
        if arg.contains('\0') {
            return Err((
                path.clone().key("command").index(i),
                "must not contain a NUL byte".to_owned(),
            ));
        }
    }
    for (k, v) in &rs.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err((
                path.clone().key("env").key(k),
                format!("invalid environment variable name {k:?}"),
            ));
        }
        if v.contains('\0') {
            return Err((
                path.clone().key("env").key(k),
                "must not contain a NUL byte".to_owned(),
            ));
        }
    }

    let cwd = rs.cwd.as_ref().map(|c| {
        let c = Path::new(c);
        clean(&base.map(|b| b.join(c)).unwrap_or_else(|| c.to_path_buf()))
    });

    let mut ingresses = BTreeMap::new();
    for (ing_name, ri) in &rs.ingresses {
        let ing = build_ingress(name, ing_name, ri)?;
        ingresses.insert(ing_name.clone(), ing);
    }

    Ok(Service {
        name: name.to_owned(),
        command: rs.command.clone(),
        cwd,
        env: rs.env.clone(),
        stop_grace: rs.stop_grace.map(|d| d.0).unwrap_or(DEFAULT_STOP_GRACE),
        ingresses,
        egresses: BTreeMap::new(),
    })
}

/// Drops `.` components, so `dir/./x` reads as `dir/x` in logs.
fn clean(p: &Path) -> PathBuf {
    let cleaned: PathBuf = p.components().filter(|c| *c != Component::CurDir).collect();
    if cleaned.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        cleaned
    }
}

fn build_ingress(svc: &str, name: &str, ri: &RawIngress) -> Result<Ingress, Problem> {
    let path = FieldPath::new(&["services", svc, "ingresses", name]);
    check_name("ingress", name).map_err(|m| (path.clone(), m))?;
    if ri.port == Some(0) {
        return Err((
            path.key("port"),
            "must be between 1 and 65535 (leave it out to let rigd allocate one)".to_owned(),
        ));
    }
    let ready_path = path.clone().key("ready");
    let ready = match &ri.ready {
        None | Some(RawReady::Flag(true)) => default_readiness(ri.protocol, DEFAULT_READY_TIMEOUT),
        Some(RawReady::Flag(false)) => Readiness::Disabled,
        Some(RawReady::Options(o)) => {
            let timeout = o.timeout.map(|d| d.0).unwrap_or(DEFAULT_READY_TIMEOUT);
            if timeout.is_zero() {
                return Err((
                    ready_path.key("timeout"),
                    "must be greater than zero (use ready = false to skip the check)".to_owned(),
                ));
            }
            let misplaced = |key: &str, only: &str| {
                (
                    ready_path.clone().key(key),
                    format!("does not apply to a {} ingress (only {only})", ri.protocol),
                )
            };
            match ri.protocol {
                Protocol::Tcp if o.path.is_some() => return Err(misplaced("path", "http")),
                Protocol::Grpc if o.path.is_some() => return Err(misplaced("path", "http")),
                Protocol::Tcp | Protocol::Http if o.service.is_some() => {
                    return Err(misplaced("service", "grpc"));
                }
                _ => {}
            }
            match ri.protocol {
                Protocol::Tcp => Readiness::Tcp { timeout },
                Protocol::Grpc => Readiness::Grpc {
                    service: o.service.clone().unwrap_or_default(),
                    timeout,
                },
                Protocol::Http => {
                    let p = o.path.clone().unwrap_or_else(|| "/".to_owned());
                    if !p.starts_with('/') || p.parse::<http::uri::PathAndQuery>().is_err() {
                        return Err((
                            ready_path.key("path"),
                            format!("{p:?} must be a URL path starting with /"),
                        ));
                    }
                    Readiness::Http { path: p, timeout }
                }
            }
        }
    };
    Ok(Ingress {
        name: name.to_owned(),
        protocol: ri.protocol,
        port: ri.port,
        ready,
    })
}

fn default_readiness(protocol: Protocol, timeout: Duration) -> Readiness {
    match protocol {
        Protocol::Tcp => Readiness::Tcp { timeout },
        Protocol::Http => Readiness::Http {
            path: "/".to_owned(),
            timeout,
        },
        Protocol::Grpc => Readiness::Grpc {
            service: String::new(),
            timeout,
        },
    }
}

fn build_egress(
    svc: &str,
    name: &str,
    re: &RawEgress,
    services: &BTreeMap<String, Service>,
    known: &[&str],
    env_observe: bool,
    env_seed: Option<u64>,
) -> Result<Egress, Problem> {
    let path = FieldPath::new(&["services", svc, "egresses", name]);
    check_name("egress", name).map_err(|m| (path.clone(), m))?;
    let service_path = path.clone().key("service");
    let Some(target) = services.get(&re.service) else {
        return Err((
            service_path,
            format!(
                "unknown service {} (known: {})",
                preview(&re.service),
                known.join(", ")
            ),
        ));
    };
    if target.name == svc {
        return Err((
            service_path,
            format!("service {svc:?} cannot be its own egress"),
        ));
    }
    if target.ingresses.is_empty() {
        return Err((
            service_path,
            format!(
                "service {:?} has no ingress, so nothing can connect to it",
                target.name
            ),
        ));
    }
    let ingress_names = || {
        target
            .ingresses
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ingress = match &re.ingress {
        Some(i) => target.ingresses.get(i).ok_or_else(|| {
            (
                path.clone().key("ingress"),
                format!(
                    "unknown ingress {} of service {:?} (known: {})",
                    preview(i),
                    target.name,
                    ingress_names()
                ),
            )
        })?,
        None => {
            let mut all = target.ingresses.values();
            match (all.next(), all.next()) {
                (Some(only), None) => only,
                _ => {
                    return Err((
                        path.clone().key("ingress"),
                        format!(
                            "required: service {:?} has several ingresses ({}), name one with ingress = \"...\"",
                            target.name,
                            ingress_names()
                        ),
                    ));
                }
            }
        }
    };

    let observe = re.observe.unwrap_or(env_observe);
    let mut chaos = re.chaos.clone().unwrap_or_default();
    if !observe && !chaos.is_empty() {
        return Err((
            path.clone().key("chaos"),
            "cannot apply: the egress is not observed (observe = false), so no proxy carries its traffic".to_owned(),
        ));
    }
    chaos.validate(ingress.protocol).map_err(|e| {
        (
            path.clone().key("chaos").dotted(&e.field),
            format!(
                "{} (the target ingress speaks {})",
                e.message, ingress.protocol
            ),
        )
    })?;
    if chaos.seed.is_none() {
        chaos.seed = env_seed.map(|s| derive_seed(s, svc, name));
    }

    Ok(Egress {
        name: name.to_owned(),
        service: target.name.clone(),
        ingress: ingress.name.clone(),
        protocol: ingress.protocol,
        observe,
        chaos,
    })
}

fn start_order(services: &BTreeMap<String, Service>) -> Result<Vec<Vec<String>>, Problem> {
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut levels = Vec::new();
    while placed.len() < services.len() {
        let level: Vec<&str> = services
            .values()
            .filter(|s| !placed.contains(s.name.as_str()))
            .filter(|s| {
                s.egresses
                    .values()
                    .all(|e| placed.contains(e.service.as_str()))
            })
            .map(|s| s.name.as_str())
            .collect();
        if level.is_empty() {
            return Err(cycle(services, &placed));
        }
        placed.extend(level.iter().copied());
        levels.push(level.into_iter().map(str::to_owned).collect());
    }
    Ok(levels)
}

/// Names a cycle among the services left unplaced (each of which depends on another of them).
fn cycle(services: &BTreeMap<String, Service>, placed: &BTreeSet<&str>) -> Problem {
    let remaining = |name: &str| !placed.contains(name) && services.contains_key(name);
    // Walk from the first unplaced service along egresses to unplaced targets until a service
    // repeats: the walk then has closed a cycle.
    let mut walk: Vec<(&str, &str)> = Vec::new(); // (service, egress taken)
    let mut cur = services.keys().map(String::as_str).find(|n| remaining(n));
    while let Some(name) = cur {
        if let Some(pos) = walk.iter().position(|(s, _)| *s == name) {
            let mut cyc: Vec<(&str, &str)> = walk[pos..].to_vec();
            // Start at the smallest name so the message is the same whatever the walk's start.
            if let Some(min) = cyc
                .iter()
                .enumerate()
                .min_by_key(|(_, (s, _))| *s)
                .map(|(i, _)| i)
            {
                cyc.rotate_left(min);
            }
            let mut names: Vec<&str> = cyc.iter().map(|(s, _)| *s).collect();
            names.push(cyc[0].0);
            let (first, egress) = cyc[0];
            return (
                FieldPath::new(&["services", first, "egresses", egress, "service"]),
                format!("dependency cycle: {}", names.join(" → ")),
            );
        }
        let next = services.get(name).and_then(|s| {
            s.egresses
                .values()
                .find(|e| remaining(&e.service))
                .map(|e| (e.name.as_str(), e.service.as_str()))
        });
        match next {
            Some((egress, target)) => {
                walk.push((name, egress));
                cur = Some(target);
            }
            None => break,
        }
    }
    (
        FieldPath::new(&["services"]),
        "dependency cycle among the services' egresses".to_owned(),
    )
}

/// Env var collisions, and `${VAR}` references to variables that will not exist.
fn check_env(svc: &Service) -> Result<(), Problem> {
    let injected = svc.injected();
    let mut by_var: BTreeMap<&str, &Injected> = BTreeMap::new();
    for inj in &injected {
        if let Some(first) = by_var.get(inj.var.as_str()) {
            return Err((
                inj.path.clone(),
                format!(
                    "{} and {} both set {} (names become env var prefixes: upper-cased, - → _)",
                    first.what, inj.what, inj.var
                ),
            ));
        }
        by_var.insert(&inj.var, inj);
    }

    let path = FieldPath::new(&["services", &svc.name]);
    let mut strings: Vec<(FieldPath, &str)> = svc
        .command
        .iter()
        .enumerate()
        .map(|(i, a)| (path.clone().key("command").index(i), a.as_str()))
        .collect();
    strings.extend(
        svc.env
            .iter()
            .map(|(k, v)| (path.clone().key("env").key(k), v.as_str())),
    );
    for (field, s) in strings {
        let refs = var_refs(s).map_err(|m| (field.clone(), m))?;
        for var in refs {
            if by_var.contains_key(var.as_str())
                || svc.env.contains_key(&var)
                || std::env::var_os(&var).is_some()
            {
                continue;
            }
            if let Some(why) = missing_var(svc, &var) {
                return Err((field, format!("${{{var}}} will not be set: {why}")));
            }
        }
    }
    Ok(())
}

/// Why a variable that looks like one of rig's will not be set; `None` when it does not look
/// like one (it may come from rigd's environment).
fn missing_var(svc: &Service, var: &str) -> Option<String> {
    let egress_list = || {
        if svc.egresses.is_empty() {
            "it has no egresses".to_owned()
        } else {
            format!(
                "egresses: {}",
                svc.egresses
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    if var == "HOST" || var == "PORT" {
        return Some(if svc.ingresses.is_empty() {
            format!("service {:?} has no ingress", svc.name)
        } else {
            format!(
                "service {:?} has several ingresses and none named \"default\" (use <INGRESS>_{var})",
                svc.name
            )
        });
    }
    if var.starts_with("RIG_") {
        return Some(format!("rig sets {} only", RIG_VARS.join(", ")));
    }
    let (prefix, suffix) = ["_HOST", "_PORT", "_ADDR", "_URL"]
        .iter()
        .find_map(|s| var.strip_suffix(s).map(|p| (p, &s[1..])))?;
    if let Some(eg) = svc
        .egresses
        .values()
        .find(|e| env_prefix(&e.name) == prefix)
    {
        return Some(format!(
            "egress {:?} is {} ({prefix}_URL is set for http and grpc egresses only; use {prefix}_ADDR)",
            eg.name, eg.protocol
        ));
    }
    if let Some(ing) = svc
        .ingresses
        .values()
        .find(|i| env_prefix(&i.name) == prefix)
    {
        let is_default = svc.default_ingress().map(|d| &d.name) == Some(&ing.name);
        return Some(if is_default {
            format!(
                "ingress {:?} is the service's default ingress, so its address is in HOST and PORT",
                ing.name
            )
        } else {
            format!(
                "ingress {:?} gets {prefix}_HOST and {prefix}_PORT only, not {suffix}",
                ing.name
            )
        });
    }
    let lower = prefix.to_ascii_lowercase();
    let named = if lower.contains('_') {
        format!("{lower:?} or {:?}", lower.replace('_', "-"))
    } else {
        format!("{lower:?}")
    };
    Some(format!(
        "service {:?} has no egress {named} ({})",
        svc.name,
        egress_list()
    ))
}
