//! `rigctl chaos set`: flags to a `SetChaosRequest`.
//!
//! Durations, sizes, rates and names go to rigd as typed, so rigd validates every spelling in one
//! place and its error names the field; clap only types what must be numbers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;
use rig_proto::v1 as pb;
use rig_proxy::policy::ChaosSpec;

/// Which edges a chaos command acts on.
#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct EdgeArgs {
    /// Edges: SOURCE/EGRESS, SOURCE/* or *; none means every edge (narrowed by --to)
    #[arg(value_name = "EDGE")]
    pub edges: Vec<String>,
    /// Only edges whose target is this service
    #[arg(long, value_name = "SERVICE")]
    pub to: Option<String>,
}

impl EdgeArgs {
    pub fn selector(&self, env: Option<&str>) -> pb::EdgeSelector {
        pb::EdgeSelector {
            env: env.unwrap_or_default().to_string(),
            edges: self.edges.clone(),
            to: self.to.clone().unwrap_or_default(),
        }
    }
}

/// `Name: value` for --header and --match-header.
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("expected 'Name: value', got {s:?}"))?;
    let name = name.trim();
    if name.is_empty() || name.chars().any(char::is_whitespace) {
        return Err(format!("invalid header name {name:?}"));
    }
    Ok((name.to_string(), value.trim().to_string()))
}

/// Faults for `rigctl chaos set`. Unset flags keep the value from --from-file, if any.
#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct ChaosSetArgs {
    #[command(flatten)]
    pub target: EdgeArgs,

    /// Start from a TOML chaos table (as in a spec's chaos block); flags override it
    #[arg(long, value_name = "CHAOS.toml")]
    pub from_file: Option<PathBuf>,

    /// Added latency per request (tcp: per chunk), e.g. 200ms
    #[arg(long, value_name = "D", help_heading = "Latency")]
    pub latency: Option<String>,
    /// Spread of the latency
    #[arg(long, value_name = "D", help_heading = "Latency")]
    pub jitter: Option<String>,
    /// uniform, normal or lognormal
    #[arg(long, value_name = "KIND", help_heading = "Latency")]
    pub distribution: Option<String>,
    /// 99th percentile of a lognormal latency
    #[arg(long, value_name = "D", help_heading = "Latency")]
    pub latency_p99: Option<String>,
    /// tcp: both, upstream or downstream
    #[arg(long, value_name = "DIR", help_heading = "Latency")]
    pub latency_direction: Option<String>,

    /// Fraction of requests (tcp: connections) that fail, 0..1
    #[arg(long, value_name = "R", help_heading = "Errors")]
    pub error_rate: Option<f64>,
    /// http: status of an injected error (default 503)
    #[arg(long, value_name = "N", help_heading = "Errors")]
    pub status: Option<u32>,
    /// grpc: code of an injected error, e.g. UNAVAILABLE
    #[arg(long, value_name = "NAME", help_heading = "Errors")]
    pub grpc_code: Option<String>,
    /// grpc: message of an injected error
    #[arg(long, value_name = "M", help_heading = "Errors")]
    pub grpc_message: Option<String>,
    /// http: body of an injected error
    #[arg(long, value_name = "B", help_heading = "Errors")]
    pub body: Option<String>,
    /// http: header on an injected error, 'Name: value' (repeatable)
    #[arg(long = "header", value_name = "'NAME: VALUE'", value_parser = parse_header, help_heading = "Errors")]
    pub headers: Vec<(String, String)>,
    /// tcp: reset an erroring connection after this many bytes
    #[arg(long, value_name = "SIZE", help_heading = "Errors")]
    pub reset_after: Option<String>,

    /// Fraction of requests (tcp: connections) held without an answer, 0..1
    #[arg(long, value_name = "R", help_heading = "Hangs")]
    pub hang_rate: Option<f64>,
    /// How long a hang lasts (default: until cleared)
    #[arg(long, value_name = "D", help_heading = "Hangs")]
    pub hang_for: Option<String>,
    /// After --hang-for: close or timeout
    #[arg(long, value_name = "close|timeout", help_heading = "Hangs")]
    pub hang_then: Option<String>,

    /// Cut the edge: blackhole (bare flag) or reject
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "blackhole", help_heading = "Partition")]
    pub partition: Option<String>,
    /// both, upstream or downstream
    #[arg(long, value_name = "DIR", help_heading = "Partition")]
    pub direction: Option<String>,
    /// Keep connections open when the partition starts
    #[arg(long, help_heading = "Partition")]
    pub keep_connections: bool,

    /// Bytes per second each way, e.g. 1MiB/s
    #[arg(long, value_name = "RATE", help_heading = "Bandwidth")]
    pub bandwidth: Option<String>,
    /// Client → target only
    #[arg(long, value_name = "RATE", help_heading = "Bandwidth")]
    pub bandwidth_upstream: Option<String>,
    /// Target → client only
    #[arg(long, value_name = "RATE", help_heading = "Bandwidth")]
    pub bandwidth_downstream: Option<String>,
    /// Limit each connection instead of the edge as a whole
    #[arg(long, help_heading = "Bandwidth")]
    pub bandwidth_per_connection: bool,

    /// tcp: delay closing connections
    #[arg(long, value_name = "D", help_heading = "Tcp")]
    pub slow_close: Option<String>,
    /// tcp: close a connection after this many bytes
    #[arg(long, value_name = "SIZE", help_heading = "Tcp")]
    pub limit_data: Option<String>,

    /// Only requests with this method (repeatable)
    #[arg(long = "match-method", value_name = "M", help_heading = "Scope")]
    pub match_methods: Vec<String>,
    /// Only requests whose path starts with this (repeatable)
    #[arg(long = "match-path", value_name = "PREFIX", help_heading = "Scope")]
    pub match_paths: Vec<String>,
    /// Only requests with this header, 'Name: value' (repeatable)
    #[arg(long = "match-header", value_name = "'NAME: VALUE'", value_parser = parse_header, help_heading = "Scope")]
    pub match_headers: Vec<(String, String)>,
    /// Only calls to this gRPC service
    #[arg(long, value_name = "S", help_heading = "Scope")]
    pub match_grpc_service: Option<String>,
    /// Only calls to this gRPC method
    #[arg(long, value_name = "M", help_heading = "Scope")]
    pub match_grpc_method: Option<String>,
    /// Seed fault decisions for repeatable runs
    #[arg(long, value_name = "N", help_heading = "Scope")]
    pub seed: Option<u64>,
    /// Revert to no chaos after this long
    #[arg(
        long = "for",
        visible_alias = "ttl",
        value_name = "D",
        help_heading = "Scope"
    )]
    pub ttl: Option<String>,
}

/// Read a chaos table from TOML: either the table itself or a file with a `[chaos]` table.
pub fn read_chaos_file(path: &Path) -> anyhow::Result<pb::ChaosSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
    if table.len() == 1
        && let Some(toml::Value::Table(_)) = table.get("chaos")
        && let Some(toml::Value::Table(inner)) = table.remove("chaos")
    {
        table = inner;
    }
    let spec: ChaosSpec = toml::Value::Table(table)
        .try_into()
        .with_context(|| format!("{}: invalid chaos table", path.display()))?;
    Ok(pb::ChaosSpec::from(&spec))
}

fn set<T: Clone>(slot: &mut Option<T>, flag: &Option<T>) {
    if flag.is_some() {
        slot.clone_from(flag);
    }
}

/// True when `c` sets a fault, not just its scope (match, seed, ttl).
pub fn has_fault(c: &pb::ChaosSpec) -> bool {
    let scope_only = pb::ChaosSpec {
        r#match: None,
        seed: None,
        ttl: None,
        ..c.clone()
    };
    scope_only != pb::ChaosSpec::default()
}

/// The request `rigctl chaos set` sends. Reads --from-file when given.
pub fn set_chaos_request(
    args: &ChaosSetArgs,
    env: Option<&str>,
) -> anyhow::Result<pb::SetChaosRequest> {
    let mut target = args.target.clone();
    let mut partition = args.partition.clone();
    // `--partition web/store` reads as a bare --partition followed by an edge: a mode never
    // contains '/' nor is '*', while every edge selector does or is.
    if let Some(p) = &partition
        && (p.contains('/') || p == "*")
    {
        target.edges.push(p.clone());
        partition = Some("blackhole".to_string());
    }

    let mut c = match &args.from_file {
        Some(path) => read_chaos_file(path)?,
        None => pb::ChaosSpec::default(),
    };
    set(&mut c.latency, &args.latency);
    set(&mut c.jitter, &args.jitter);
    set(&mut c.distribution, &args.distribution);
    set(&mut c.latency_p99, &args.latency_p99);
    set(&mut c.latency_direction, &args.latency_direction);
    set(&mut c.error_rate, &args.error_rate);
    set(&mut c.status, &args.status);
    set(&mut c.grpc_code, &args.grpc_code);
    set(&mut c.grpc_message, &args.grpc_message);
    set(&mut c.body, &args.body);
    c.headers.extend(args.headers.iter().cloned());
    set(&mut c.reset_after, &args.reset_after);
    set(&mut c.hang_rate, &args.hang_rate);
    set(&mut c.hang_for, &args.hang_for);
    set(&mut c.hang_then, &args.hang_then);
    set(&mut c.partition, &partition);
    set(&mut c.direction, &args.direction);
    if args.keep_connections {
        c.keep_connections = Some(true);
    }
    set(&mut c.bandwidth, &args.bandwidth);
    set(&mut c.bandwidth_upstream, &args.bandwidth_upstream);
    set(&mut c.bandwidth_downstream, &args.bandwidth_downstream);
    if args.bandwidth_per_connection {
        c.bandwidth_per_connection = Some(true);
    }
    set(&mut c.slow_close, &args.slow_close);
    set(&mut c.limit_data, &args.limit_data);
    set(&mut c.seed, &args.seed);
    set(&mut c.ttl, &args.ttl);

    let any_match = !args.match_methods.is_empty()
        || !args.match_paths.is_empty()
        || !args.match_headers.is_empty()
        || args.match_grpc_service.is_some()
        || args.match_grpc_method.is_some();
    if any_match {
        let m = c.r#match.get_or_insert_with(pb::Match::default);
        if !args.match_methods.is_empty() {
            m.methods.clone_from(&args.match_methods);
        }
        if !args.match_paths.is_empty() {
            m.path_prefixes.clone_from(&args.match_paths);
        }
        m.headers.extend(
            args.match_headers
                .iter()
                .cloned()
                .collect::<HashMap<_, _>>(),
        );
        set(&mut m.grpc_service, &args.match_grpc_service);
        set(&mut m.grpc_method, &args.match_grpc_method);
    }

    if !has_fault(&c) {
        bail!("nothing to set; use `rigctl chaos clear`");
    }
    Ok(pb::SetChaosRequest {
        selector: Some(target.selector(env)),
        chaos: Some(c),
    })
}
