//! What rigctl prints: pure functions from API messages to text or JSON, so tests can check the
//! output without a daemon.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use rig_proto::v1 as pb;
use rig_proxy::policy::ChaosSpec;
use serde_json::{Value, json};

use crate::events::EventData;

use crate::events::chaos_summary;

// ---------------------------------------------------------------------------------------------
// Tables and small formats
// ---------------------------------------------------------------------------------------------

/// Left-aligned columns separated by two spaces; widths count characters, not bytes, so `→`
/// and `µ` line up.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cols = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(cols) {
            if i + 1 < cols {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad + 2));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A latency for humans: `850µs`, `3.2ms`, `1.25s`.
pub fn format_seconds(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".to_string();
    }
    if secs < 0.001 {
        format!("{:.0}µs", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.1}ms", secs * 1e3)
    } else if secs < 60.0 {
        format!("{secs:.2}s")
    } else {
        format!("{secs:.0}s")
    }
}

/// Wall-clock time of day in UTC, `HH:MM:SS.mmm`, from seconds since the Unix epoch.
///
/// UTC because the local zone needs a time-zone database the workspace does not depend on.
pub fn format_clock(unix_secs: f64) -> String {
    if !unix_secs.is_finite() {
        return "--:--:--.---".to_string();
    }
    let ms = (unix_secs * 1000.0).round() as i64;
    let of_day = ms.rem_euclid(86_400_000);
    let (h, rest) = (of_day / 3_600_000, of_day % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, ms) = (rest / 1000, rest % 1000);
    format!("{h:02}:{m:02}:{s:02}.{ms:03}")
}

/// How long something has been up: `42s`, `5m12s`, `3h07m`.
pub fn format_age(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".to_string();
    }
    let s = secs as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

// ---------------------------------------------------------------------------------------------
// Chaos
// ---------------------------------------------------------------------------------------------

/// The domain form of a wire spec; rigd only sends specs it validated, so failure here means a
/// version mismatch, which the callers show rather than hide.
fn domain(c: &pb::ChaosSpec) -> Result<ChaosSpec, String> {
    ChaosSpec::try_from(c.clone()).map_err(|e| e.to_string())
}

/// `latency = "200ms", error_rate = 0.1, reset_after = 65536`, or `-` for no chaos.
pub fn chaos_spec_summary(c: &pb::ChaosSpec) -> String {
    let spec = match domain(c) {
        Ok(spec) => spec,
        Err(e) => return format!("(unreadable: {e})"),
    };
    if spec.is_empty() {
        return "-".to_string();
    }
    match toml::Value::try_from(chaos_spec_json(c)) {
        Ok(toml::Value::Table(t)) => t
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => chaos_summary(&spec),
    }
}

/// The spec as the JSON object a spec file's chaos block would hold.
pub fn chaos_spec_json(c: &pb::ChaosSpec) -> Value {
    match domain(c).map(|spec| serde_json::to_value(&spec)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => json!({ "unreadable": e.to_string() }),
        Err(e) => json!({ "unreadable": e }),
    }
}

fn is_no_chaos(c: Option<&pb::ChaosSpec>) -> bool {
    c.is_none_or(|c| *c == pb::ChaosSpec::default())
}

/// One line per edge: `web/store  version 3  latency = "200ms", error_rate = 0.1`.
pub fn render_chaos(resp: &pb::ChaosResponse) -> String {
    if resp.edges.is_empty() {
        return "no edges matched\n".to_string();
    }
    let width = resp
        .edges
        .iter()
        .map(|e| e.edge.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for e in &resp.edges {
        let chaos = match &e.chaos {
            c if is_no_chaos(c.as_ref()) => "no chaos".to_string(),
            Some(c) => chaos_spec_summary(c),
            None => "no chaos".to_string(),
        };
        let _ = writeln!(out, "{:<width$}  version {}  {}", e.edge, e.version, chaos);
    }
    out
}

pub fn chaos_json(resp: &pb::ChaosResponse) -> Value {
    Value::Array(
        resp.edges
            .iter()
            .map(|e| {
                json!({
                    "env": e.env,
                    "edge": e.edge,
                    "protocol": e.protocol,
                    "version": e.version,
                    "chaos": e.chaos.as_ref().map(chaos_spec_json).unwrap_or_else(|| json!({})),
                })
            })
            .collect(),
    )
}

/// Preset names and descriptions, with what each sets underneath.
pub fn render_presets(resp: &pb::ListPresetsResponse) -> String {
    if resp.presets.is_empty() {
        return "no presets\n".to_string();
    }
    let width = resp
        .presets
        .iter()
        .map(|p| p.name.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for p in &resp.presets {
        let _ = writeln!(out, "{:<width$}  {}", p.name, p.description);
        for (label, spec) in [
            ("all", &p.chaos),
            ("http", &p.http),
            ("grpc", &p.grpc),
            ("tcp", &p.tcp),
        ] {
            if let Some(spec) = spec
                && !is_no_chaos(Some(spec))
            {
                let _ = writeln!(
                    out,
                    "{:<width$}    {label}: {}",
                    "",
                    chaos_spec_summary(spec)
                );
            }
        }
    }
    out
}

pub fn presets_json(resp: &pb::ListPresetsResponse) -> Value {
    let opt = |c: &Option<pb::ChaosSpec>| c.as_ref().map(chaos_spec_json);
    Value::Array(
        resp.presets
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "description": p.description,
                    "chaos": opt(&p.chaos),
                    "http": opt(&p.http),
                    "grpc": opt(&p.grpc),
                    "tcp": opt(&p.tcp),
                })
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Environments
// ---------------------------------------------------------------------------------------------

fn ingress_cell(s: &pb::ServiceStatus) -> String {
    if s.ingresses.is_empty() {
        return "-".to_string();
    }
    s.ingresses
        .iter()
        .map(|i| {
            let addr = if i.address.is_empty() {
                "-"
            } else {
                &i.address
            };
            if i.name.is_empty() || i.name == "default" {
                format!("{} {addr}", i.protocol)
            } else {
                format!("{} {} {addr}", i.name, i.protocol)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn edge_chaos_cell(e: &pb::EdgeStatus) -> String {
    if is_no_chaos(e.chaos.as_ref()) {
        return "-".to_string();
    }
    let summary = e.chaos.as_ref().map(chaos_spec_summary).unwrap_or_default();
    format!("v{} {summary}", e.chaos_version)
}

/// The services and edges of one environment, as `rigctl status` and `rigctl up` print them.
pub fn render_status(env: &pb::EnvironmentStatus) -> String {
    let mut out = String::new();
    let _ = write!(out, "environment {}  {}", env.name, env.state().label());
    if !env.origin.is_empty() {
        let _ = write!(out, "  {}", env.origin);
    }
    out.push_str("\n\n");
    let services: Vec<Vec<String>> = env
        .services
        .iter()
        .map(|s| {
            let state = if s.exit.is_empty() {
                s.state().label().to_string()
            } else {
                format!("{} ({})", s.state().label(), s.exit)
            };
            let pid = if s.pid == 0 {
                "-".to_string()
            } else {
                s.pid.to_string()
            };
            vec![s.name.clone(), state, pid, ingress_cell(s)]
        })
        .collect();
    if services.is_empty() {
        out.push_str("no services\n");
    } else {
        out.push_str(&table(&["SERVICE", "STATE", "PID", "INGRESS"], &services));
    }
    if !env.edges.is_empty() {
        out.push('\n');
        let edges: Vec<Vec<String>> = env
            .edges
            .iter()
            .map(|e| {
                let route = if e.observed {
                    format!("{} → {}", e.proxy_address, e.target_address)
                } else {
                    format!("direct → {}", e.target_address)
                };
                vec![
                    e.edge.clone(),
                    e.protocol.clone(),
                    route,
                    if e.observed { "yes" } else { "no" }.to_string(),
                    edge_chaos_cell(e),
                ]
            })
            .collect();
        out.push_str(&table(
            &["EDGE", "PROTOCOL", "ROUTE", "OBSERVED", "CHAOS"],
            &edges,
        ));
    }
    out
}

/// `rigctl ls`: one row per environment. `now` is seconds since the Unix epoch.
pub fn render_env_list(envs: &[pb::EnvironmentStatus], now: f64) -> String {
    if envs.is_empty() {
        return "no environments running\n".to_string();
    }
    let rows: Vec<Vec<String>> = envs
        .iter()
        .map(|e| {
            let ready = e
                .services
                .iter()
                .filter(|s| s.state() == pb::ServiceState::Ready)
                .count();
            let up = if e.started_at > 0.0 {
                format_age(now - e.started_at)
            } else {
                "-".to_string()
            };
            vec![
                e.name.clone(),
                e.state().label().to_string(),
                format!("{ready}/{} ready", e.services.len()),
                e.edges.len().to_string(),
                up,
                e.origin.clone(),
            ]
        })
        .collect();
    table(
        &["NAME", "STATE", "SERVICES", "EDGES", "UP", "ORIGIN"],
        &rows,
    )
}

pub fn status_json(env: &pb::EnvironmentStatus) -> Value {
    json!({
        "name": env.name,
        "state": env.state().label(),
        "origin": env.origin,
        "started_at": env.started_at,
        "services": env.services.iter().map(|s| json!({
            "name": s.name,
            "state": s.state().label(),
            "pid": s.pid,
            "exit": s.exit,
            "command": s.command,
            "ingresses": s.ingresses.iter().map(|i| json!({
                "name": i.name,
                "protocol": i.protocol,
                "address": i.address,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "edges": env.edges.iter().map(|e| json!({
            "edge": e.edge,
            "source": e.source,
            "egress": e.egress,
            "target": e.target,
            "ingress": e.ingress,
            "protocol": e.protocol,
            "proxy_address": e.proxy_address,
            "target_address": e.target_address,
            "observed": e.observed,
            "chaos_version": e.chaos_version,
            "chaos": e.chaos.as_ref().map(chaos_spec_json).unwrap_or_else(|| json!({})),
        })).collect::<Vec<_>>(),
    })
}

/// A line of `rigctl up` progress, or `None` for steps not worth a line (`starting`).
///
/// rigd writes whole sentences for `ready` (`store ready (127.0.0.1:41234) 0.12s`) and
/// `proxies-ready`; `elapsed`, measured by the caller from the service's `starting` step, only
/// fills in when the message is empty.
pub fn render_progress(p: &pb::UpProgress, elapsed: Option<Duration>) -> Option<String> {
    match p.state.as_str() {
        "starting" => None,
        "ready" if !p.message.is_empty() => Some(format!("✔ {}", p.message)),
        "ready" => {
            let mut line = format!("✔ {} ready", p.service);
            if let Some(d) = elapsed {
                let _ = write!(line, " {:.2}s", d.as_secs_f64());
            }
            Some(line)
        }
        "failed" => {
            let mut line = if p.service.is_empty() {
                format!("✖ failed: {}", p.message)
            } else {
                // rigd says "service web exited with code 1 …" or "failed to start: service
                // web: cannot start …"; the name is already in front, once is enough.
                let name = &p.service;
                let why = p
                    .message
                    .strip_prefix(&format!("service {name} "))
                    .or_else(|| p.message.strip_prefix(&format!("{name} ")))
                    .unwrap_or(&p.message)
                    .replace(&format!("service {name}: "), "");
                match why.strip_prefix("failed to start: ") {
                    Some(rest) => format!("✖ {name} failed to start: {rest}"),
                    None => format!("✖ {name} failed: {why}"),
                }
            };
            for l in &p.last_logs {
                let _ = write!(line, "\n    {l}");
            }
            Some(line)
        }
        "proxies-ready" if !p.message.is_empty() => Some(format!("✔ {}", p.message)),
        "proxies-ready" => Some("✔ proxies ready".to_string()),
        "up" => Some(format!("✔ environment {} is up", p.env)),
        other => {
            let who = if p.service.is_empty() {
                &p.env
            } else {
                &p.service
            };
            Some(if p.message.is_empty() {
                format!("• {who} {other}")
            } else {
                format!("• {who} {other}: {}", p.message)
            })
        }
    }
}

/// `rigctl down`: what stopped, in the order it stopped.
pub fn render_down(resp: &pb::DownResponse) -> String {
    let mut out = String::new();
    for s in &resp.stopped {
        let _ = writeln!(out, "✔ stopped {s}");
    }
    let _ = writeln!(out, "environment {} is down", resp.env);
    out
}

pub fn down_json(resp: &pb::DownResponse) -> Value {
    json!({ "env": resp.env, "stopped": resp.stopped })
}

// ---------------------------------------------------------------------------------------------
// Events and logs
// ---------------------------------------------------------------------------------------------

fn event_data(ev: &pb::Event) -> Value {
    if ev.data_json.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(&ev.data_json).unwrap_or_else(|_| Value::String(ev.data_json.clone()))
}

/// `12:00:01.123 #42 request.completed web/store GET /items/1 200 3.2ms`: time, sequence, type
/// and who (the edge, else the service) in front of the summary rigd wrote.
pub fn render_event(ev: &pb::Event) -> String {
    let mut line = format!("{} #{} {}", format_clock(ev.time), ev.seq, ev.r#type);
    let who = if ev.edge.is_empty() {
        ev.service.as_str()
    } else {
        ev.edge.as_str()
    };
    // rigd's summaries of service events often start with the name already.
    let named = ev
        .message
        .strip_prefix(who)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '));
    if !who.is_empty() && !named {
        line.push(' ');
        line.push_str(who);
    }
    if !ev.message.is_empty() {
        line.push(' ');
        line.push_str(&ev.message);
    }
    line
}

/// One JSON object per event: the envelope plus `data` parsed from `data_json`.
pub fn event_json(ev: &pb::Event) -> Value {
    json!({
        "seq": ev.seq,
        "type": ev.r#type,
        "time": ev.time,
        "env": ev.env,
        "service": ev.service,
        "edge": ev.edge,
        "message": ev.message,
        "data": event_data(ev),
    })
}

/// An event's `data` in the typed schema; `None` for a type (or shape) this rigctl does not
/// know, which readers skip.
pub fn typed_data(ev: &pb::Event) -> Option<EventData> {
    serde_json::from_str(&ev.data_json).ok()
}

/// The text of a `service.log` event: its `line` field, else the summary.
pub fn log_text(ev: &pb::Event) -> String {
    match typed_data(ev) {
        Some(EventData::ServiceLog { line, .. }) => line,
        _ => ev.message.clone(),
    }
}

const COLOURS: [&str; 10] = ["36", "33", "32", "35", "34", "96", "93", "92", "95", "94"];

/// `web    | listening on …`: service names padded to one width and, on a terminal, coloured
/// per service like `docker compose up`.
#[derive(Debug, Clone)]
pub struct LogPrefixer {
    width: usize,
    colour: bool,
    assigned: HashMap<String, &'static str>,
}

impl LogPrefixer {
    pub fn new<'a>(services: impl IntoIterator<Item = &'a str>, colour: bool) -> Self {
        let mut p = LogPrefixer {
            width: 0,
            colour,
            assigned: HashMap::new(),
        };
        for s in services {
            p.width = p.width.max(s.chars().count());
            p.colour_of(s);
        }
        p
    }

    fn colour_of(&mut self, service: &str) -> &'static str {
        let next = COLOURS[self.assigned.len() % COLOURS.len()];
        self.assigned.entry(service.to_string()).or_insert(next)
    }

    pub fn line(&mut self, service: &str, text: &str) -> String {
        let pad = self.width.saturating_sub(service.chars().count());
        let name = format!("{service}{}", " ".repeat(pad));
        if self.colour {
            let c = self.colour_of(service);
            format!("\x1b[{c}m{name} |\x1b[0m {text}")
        } else {
            format!("{name} | {text}")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The demo's per-edge tally
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Clone)]
struct EdgeTally {
    requests: u64,
    failed: u64,
    statuses: BTreeMap<String, u64>,
    faults: BTreeMap<String, u64>,
    latencies: Vec<f64>,
}

/// Requests per edge from `request.completed` / `request.failed` events: counts, statuses,
/// injected faults and the median latency.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    edges: BTreeMap<String, EdgeTally>,
    tcp: BTreeMap<String, EdgeCounters>,
}

/// Whether a request's answer is a failure of the server side: an HTTP 5xx, or a gRPC code
/// that the gRPC-to-HTTP mapping (google.rpc.Code) puts at 5xx: `UNKNOWN`, `INTERNAL`,
/// `UNIMPLEMENTED`, `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `DATA_LOSS`. A 4xx or `NOT_FOUND` is an
/// answer the client asked for (the demo's traffic asks for missing items on purpose).
pub fn status_is_failure(status: &str) -> bool {
    match status.parse::<u16>() {
        Ok(code) => code >= 500,
        Err(_) => matches!(
            status,
            "UNKNOWN"
                | "INTERNAL"
                | "UNIMPLEMENTED"
                | "UNAVAILABLE"
                | "DEADLINE_EXCEEDED"
                | "DATA_LOSS"
        ),
    }
}

/// `512 B`, `3.4 KiB`, `12.0 MiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// One tcp edge's counters from a `/metrics` scrape.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EdgeCounters {
    /// `rig_edge_connections_total`: connections accepted.
    pub connections: u64,
    /// `rig_edge_connections_open`: open at the scrape.
    pub open: u64,
    /// `rig_edge_bytes_total{direction="upstream"}`: client → target.
    pub bytes_upstream: u64,
    /// `rig_edge_bytes_total{direction="downstream"}`: target → client.
    pub bytes_downstream: u64,
}

impl EdgeCounters {
    /// What happened between `before` and `self`: counters as differences, `open` as it is now.
    pub fn since(&self, before: &EdgeCounters) -> EdgeCounters {
        EdgeCounters {
            connections: self.connections.saturating_sub(before.connections),
            open: self.open,
            bytes_upstream: self.bytes_upstream.saturating_sub(before.bytes_upstream),
            bytes_downstream: self
                .bytes_downstream
                .saturating_sub(before.bytes_downstream),
        }
    }
}

/// The counters of every tcp edge of `env` in a Prometheus text scrape, by edge.
pub fn tcp_edge_counters(scrape: &str, env: &str) -> BTreeMap<String, EdgeCounters> {
    let mut out: BTreeMap<String, EdgeCounters> = BTreeMap::new();
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let label = |key: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"'))
            })
        };
        if label("env") != Some(env) || label("protocol") != Some("tcp") {
            continue;
        }
        let Some(edge) = label("edge") else { continue };
        // Counters and gauges print as floats ("12" or "1.2e3"); they hold whole numbers here.
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let v = v.max(0.0) as u64;
        let c = out.entry(edge.to_string()).or_default();
        match (name, label("direction")) {
            ("rig_edge_connections_total", _) => c.connections = v,
            ("rig_edge_connections_open", _) => c.open = v,
            ("rig_edge_bytes_total", Some("upstream")) => c.bytes_upstream = v,
            ("rig_edge_bytes_total", Some("downstream")) => c.bytes_downstream = v,
            _ => {}
        }
    }
    out
}

impl Tally {
    pub fn new() -> Self {
        Tally::default()
    }

    /// Count one event; other types are ignored.
    pub fn record(&mut self, ev: &pb::Event) {
        let failed = match ev.r#type.as_str() {
            "request.completed" => false,
            "request.failed" => true,
            _ => return,
        };
        let Some(EventData::RequestCompleted(r) | EventData::RequestFailed(r)) = typed_data(ev)
        else {
            return;
        };
        let r = r.request;
        let t = self.edges.entry(ev.edge.clone()).or_default();
        t.requests += 1;
        if failed || r.status.as_deref().is_some_and(status_is_failure) {
            t.failed += 1;
        }
        if let Some(s) = r.status {
            *t.statuses.entry(s).or_default() += 1;
        }
        if let Some(d) = r.latency {
            t.latencies.push(d.as_secs_f64());
        }
        for f in r.faults {
            *t.faults.entry(f.as_str().to_string()).or_default() += 1;
        }
    }

    /// Requests seen on `edge`.
    pub fn requests(&self, edge: &str) -> u64 {
        self.edges.get(edge).map_or(0, |t| t.requests)
    }

    /// Requests on `edge` that had a fault of kind `fault` injected.
    pub fn faults(&self, edge: &str, fault: &str) -> u64 {
        self.edges
            .get(edge)
            .and_then(|t| t.faults.get(fault).copied())
            .unwrap_or(0)
    }

    /// Requests on `edge` that failed: see [`status_is_failure`].
    pub fn failed(&self, edge: &str) -> u64 {
        self.edges.get(edge).map_or(0, |t| t.failed)
    }

    /// The traffic of tcp edges, which carry no requests: what their counters say happened
    /// during the same window (see [`EdgeCounters::since`]).
    pub fn set_tcp(&mut self, tcp: BTreeMap<String, EdgeCounters>) {
        self.tcp = tcp;
    }

    pub fn is_empty(&self) -> bool {
        self.edges.is_empty() && self.tcp.is_empty()
    }

    /// A table of requests per http/grpc edge, then one of connections and bytes per tcp edge.
    pub fn render(&self) -> String {
        if self.is_empty() {
            return "no requests seen\n".to_string();
        }
        let mut out = self.render_requests();
        if !self.tcp.is_empty() {
            if !out.is_empty() {
                out.push('\n');
            }
            let rows: Vec<Vec<String>> = self
                .tcp
                .iter()
                .map(|(edge, c)| {
                    vec![
                        edge.clone(),
                        c.connections.to_string(),
                        c.open.to_string(),
                        format_bytes(c.bytes_upstream),
                        format_bytes(c.bytes_downstream),
                    ]
                })
                .collect();
            out.push_str(&table(
                &["TCP EDGE", "CONNECTIONS", "OPEN", "BYTES UP", "BYTES DOWN"],
                &rows,
            ));
        }
        out
    }

    fn render_requests(&self) -> String {
        if self.edges.is_empty() {
            return String::new();
        }
        let counts = |m: &BTreeMap<String, u64>| {
            if m.is_empty() {
                "-".to_string()
            } else {
                m.iter()
                    .map(|(k, n)| format!("{k}×{n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        };
        let rows: Vec<Vec<String>> = self
            .edges
            .iter()
            .map(|(edge, t)| {
                let mut l = t.latencies.clone();
                l.sort_by(f64::total_cmp);
                let p50 = if l.is_empty() {
                    "-".to_string()
                } else {
                    format_seconds(l[(l.len() - 1) / 2])
                };
                vec![
                    edge.clone(),
                    t.requests.to_string(),
                    t.failed.to_string(),
                    counts(&t.statuses),
                    p50,
                    counts(&t.faults),
                ]
            })
            .collect();
        table(
            &["EDGE", "REQUESTS", "FAILED", "STATUSES", "P50", "FAULTS"],
            &rows,
        )
    }
}

/// The `rig_edge_requests_total` and `rig_edge_faults_injected_total` samples of one
/// environment from a Prometheus text scrape.
pub fn metrics_lines(scrape: &str, env: &str) -> Vec<String> {
    let env_label = format!("env=\"{env}\"");
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            ["rig_edge_requests_total", "rig_edge_faults_injected_total"]
                .iter()
                .any(|name| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                })
        })
        .filter(|l| l.contains(&env_label))
        .map(str::to_string)
        .collect()
}
