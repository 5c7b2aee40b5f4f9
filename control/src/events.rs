//! The one schema of every event rig emits; `docs/events.md` is its contract.
//!
//! The event log keeps these typed; they become JSON only at the edges (`Watch`'s `data_json`,
//! `/events`, `rigctl events --json`). Readers ignore fields they do not know, so new fields
//! are added as optional without a version bump; removing or renaming a field bumps
//! [`SCHEMA_VERSION`].

use std::fmt::Write;
use std::net::SocketAddr;

use rig_proxy::events::{ConnectionInfo, EdgeInfo, EventKind, FaultKind, ProxyEvent, RequestInfo};
use rig_proxy::policy::ChaosSpec;
use serde::{Deserialize, Serialize};

/// The schema version, `"v"` in every JSON envelope.
pub const SCHEMA_VERSION: u32 = 1;

/// Strings in an event (a log line, a reason, a path) longer than this many bytes are cut and
/// marked `…[truncated N bytes]`.
pub const MAX_FIELD_BYTES: usize = 64 * 1024;

/// A request as an edge saw it: the edge's labels plus the proxy's [`RequestInfo`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeRequest {
    /// When the proxy saw it, seconds since the Unix epoch.
    #[serde(default)]
    pub time: f64,
    pub edge: EdgeInfo,
    #[serde(flatten)]
    pub request: RequestInfo,
}

/// A connection as an edge saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeConnection {
    #[serde(default)]
    pub time: f64,
    pub edge: EdgeInfo,
    #[serde(flatten)]
    pub connection: ConnectionInfo,
}

/// What happened: the `data` of an event, tagged by its type name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum EventData {
    #[serde(rename = "service.starting")]
    ServiceStarting { command: Vec<String> },
    #[serde(rename = "service.ready")]
    ServiceReady {
        pid: u32,
        /// `HOST:PORT` of every ingress.
        addresses: Vec<String>,
        /// From start to ready.
        #[serde(default)]
        ready_seconds: f64,
    },
    #[serde(rename = "service.failed")]
    ServiceFailed {
        /// Why it never became ready (absent for an exit after it was up).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// How it exited after it was up (absent when it never became ready).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit: Option<String>,
        #[serde(default)]
        last_logs: Vec<String>,
    },
    #[serde(rename = "service.stopped")]
    ServiceStopped { exit: String, grace_seconds: f64 },
    #[serde(rename = "service.log")]
    ServiceLog { stream: String, line: String },
    #[serde(rename = "environment.up")]
    EnvironmentUp {
        origin: String,
        #[serde(default)]
        services: u64,
        #[serde(default)]
        edges: u64,
    },
    #[serde(rename = "environment.down")]
    EnvironmentDown {
        /// Why it failed to start (absent for a requested down).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// The services stopped (absent when it failed to start).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stopped: Option<Vec<String>>,
    },
    #[serde(rename = "chaos.changed")]
    ChaosChanged {
        old: Box<ChaosSpec>,
        old_version: u64,
        new: Box<ChaosSpec>,
        version: u64,
        cause: String,
    },
    /// An edge's policy `ttl` ran out; logged as a `chaos.changed` event.
    #[serde(rename = "chaos.expired")]
    ChaosExpired {
        #[serde(default)]
        time: f64,
        edge: EdgeInfo,
        version: u64,
    },
    #[serde(rename = "request.started")]
    RequestStarted(EdgeRequest),
    #[serde(rename = "request.completed")]
    RequestCompleted(EdgeRequest),
    #[serde(rename = "request.failed")]
    RequestFailed(EdgeRequest),
    #[serde(rename = "connection.opened")]
    ConnectionOpened(EdgeConnection),
    #[serde(rename = "connection.closed")]
    ConnectionClosed(EdgeConnection),
    /// Events were dropped: by the log's intake (data plane) or, with `resume_after`, by one
    /// slow follower.
    #[serde(rename = "events.lagged")]
    EventsLagged {
        missed: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_after: Option<u64>,
    },
}

impl EventData {
    /// The type name inside `data` (`chaos.expired` for an expiry).
    pub fn data_type(&self) -> &'static str {
        match self {
            EventData::ServiceStarting { .. } => "service.starting",
            EventData::ServiceReady { .. } => "service.ready",
            EventData::ServiceFailed { .. } => "service.failed",
            EventData::ServiceStopped { .. } => "service.stopped",
            EventData::ServiceLog { .. } => "service.log",
            EventData::EnvironmentUp { .. } => "environment.up",
            EventData::EnvironmentDown { .. } => "environment.down",
            EventData::ChaosChanged { .. } => "chaos.changed",
            EventData::ChaosExpired { .. } => "chaos.expired",
            EventData::RequestStarted(_) => "request.started",
            EventData::RequestCompleted(_) => "request.completed",
            EventData::RequestFailed(_) => "request.failed",
            EventData::ConnectionOpened(_) => "connection.opened",
            EventData::ConnectionClosed(_) => "connection.closed",
            EventData::EventsLagged { .. } => "events.lagged",
        }
    }

    /// The event's type in the envelope (what filters match): an expiry is a `chaos.changed`.
    pub fn kind(&self) -> &'static str {
        match self {
            EventData::ChaosExpired { .. } => "chaos.changed",
            d => d.data_type(),
        }
    }

    /// The one-line `message`; `service` and `edge` are the envelope's.
    pub fn summary(&self, env: &str, service: &str, edge: &str) -> String {
        match self {
            EventData::ServiceStarting { command } => command.join(" "),
            EventData::ServiceReady {
                addresses,
                ready_seconds,
                ..
            } => {
                let addrs = if addresses.is_empty() {
                    "no ingress".to_string()
                } else {
                    addresses.join(", ")
                };
                format!("{service} ready ({addrs}) {ready_seconds:.2}s")
            }
            EventData::ServiceFailed { reason, exit, .. } => match (reason, exit) {
                (Some(r), _) => r.clone(),
                (None, e) => format!("{service} {}", e.as_deref().unwrap_or("failed")),
            },
            EventData::ServiceStopped { exit, .. } => format!("{service} {exit}"),
            EventData::ServiceLog { line, .. } => line.clone(),
            EventData::EnvironmentUp {
                services, edges, ..
            } => format!("{env} is up: {services} services, {edges} edges"),
            EventData::EnvironmentDown {
                reason: Some(_), ..
            } => format!("{env} failed to start"),
            EventData::EnvironmentDown { .. } => format!("{env} is down"),
            EventData::ChaosChanged {
                old_version,
                new,
                version,
                cause,
                ..
            } => format!(
                "{edge} v{old_version} → v{version}: {} ({cause})",
                chaos_summary(new)
            ),
            EventData::ChaosExpired { version, .. } => {
                format!("chaos ttl expired; cleared (version {version})")
            }
            EventData::RequestStarted(r) => format!("{} {}", r.request.method, r.request.path),
            EventData::RequestCompleted(r) | EventData::RequestFailed(r) => {
                let r = &r.request;
                let m = format!(
                    "{} {} {} {:.1}ms",
                    r.method,
                    r.path,
                    r.status.as_deref().unwrap_or("-"),
                    r.latency.map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0)
                );
                with_outcome(m, &r.faults, r.error.as_deref())
            }
            EventData::ConnectionOpened(c) => format!("from {}", c.connection.peer),
            EventData::ConnectionClosed(c) => {
                let c = &c.connection;
                let m = format!(
                    "from {} up={}B down={}B",
                    c.peer, c.bytes_upstream, c.bytes_downstream
                );
                with_outcome(m, &c.faults, c.error.as_deref())
            }
            EventData::EventsLagged {
                missed,
                resume_after: None,
            } => format!("{missed} data-plane events were dropped: the log fell behind"),
            EventData::EventsLagged {
                missed,
                resume_after: Some(after),
            } => format!("this follower missed {missed} events (resume with --since {after})"),
        }
    }

    /// Cut every free-text field longer than `max` bytes, marking the cut; returns whether any
    /// was cut.
    pub fn truncate_fields(&mut self, max: usize) -> bool {
        let mut cut = false;
        let mut t = |s: &mut String| cut |= truncate(s, max);
        match self {
            EventData::ServiceStarting { command } => command.iter_mut().for_each(&mut t),
            EventData::ServiceFailed {
                reason,
                exit,
                last_logs,
            } => {
                reason.iter_mut().chain(exit.iter_mut()).for_each(&mut t);
                last_logs.iter_mut().for_each(&mut t);
            }
            EventData::ServiceStopped { exit, .. } => t(exit),
            EventData::ServiceLog { line, .. } => t(line),
            EventData::EnvironmentDown { reason, .. } => reason.iter_mut().for_each(&mut t),
            EventData::ChaosChanged {
                cause, old, new, ..
            } => {
                t(cause);
                for spec in [old, new] {
                    spec.body.iter_mut().for_each(&mut t);
                    spec.grpc_message.iter_mut().for_each(&mut t);
                    spec.headers.values_mut().for_each(&mut t);
                }
            }
            EventData::RequestStarted(r)
            | EventData::RequestCompleted(r)
            | EventData::RequestFailed(r) => {
                t(&mut r.request.path);
                r.request.error.iter_mut().for_each(&mut t);
            }
            EventData::ConnectionOpened(c) | EventData::ConnectionClosed(c) => {
                c.connection.error.iter_mut().for_each(&mut t)
            }
            EventData::ServiceReady { .. }
            | EventData::EnvironmentUp { .. }
            | EventData::ChaosExpired { .. }
            | EventData::EventsLagged { .. } => {}
        }
        cut
    }

    /// The size of the event's JSON in bytes, counted without building it.
    pub fn approx_size(&self) -> usize {
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0 += b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut c = Count(0);
        let _ = serde_json::to_writer(&mut c, self);
        c.0
    }
}

/// Cut `s` to at most `max` bytes (on a char boundary) including the appended
/// `…[truncated N bytes]`, so truncating again changes nothing.
fn truncate(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    // Room for the marker: "…" is 3 bytes, N at most 20 digits.
    let mut at = max.saturating_sub(40);
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    let cut = s.len() - at;
    s.truncate(at);
    let _ = write!(s, "…[truncated {cut} bytes]");
    true
}

/// Append ` [latency,error]` and ` (why it failed)` to an event summary.
fn with_outcome(mut m: String, faults: &[FaultKind], error: Option<&str>) -> String {
    for (i, f) in faults.iter().enumerate() {
        let _ = write!(m, "{}{}", if i == 0 { " [" } else { "," }, f.as_str());
    }
    if !faults.is_empty() {
        m.push(']');
    }
    if let Some(e) = error {
        let _ = write!(m, " ({e})");
    }
    m
}

impl From<&ProxyEvent> for EventData {
    fn from(ev: &ProxyEvent) -> Self {
        let time = crate::eventlog::unix_secs(ev.time);
        let edge = (*ev.edge).clone();
        let req = |r: &RequestInfo| EdgeRequest {
            time,
            edge: edge.clone(),
            request: r.clone(),
        };
        let conn = |c: &ConnectionInfo| EdgeConnection {
            time,
            edge: edge.clone(),
            connection: c.clone(),
        };
        match &ev.kind {
            EventKind::RequestStarted(r) => EventData::RequestStarted(req(r)),
            EventKind::RequestCompleted(r) => EventData::RequestCompleted(req(r)),
            EventKind::RequestFailed(r) => EventData::RequestFailed(req(r)),
            EventKind::ConnectionOpened(c) => EventData::ConnectionOpened(conn(c)),
            EventKind::ConnectionClosed(c) => EventData::ConnectionClosed(conn(c)),
            EventKind::ChaosExpired { version } => EventData::ChaosExpired {
                time,
                edge: edge.clone(),
                version: *version,
            },
        }
    }
}

/// One sample of every variant, for tests and docs; the match makes a new variant a compile
/// error here until it has a sample.
pub fn samples() -> Vec<EventData> {
    use rig_proxy::policy::Protocol;
    let edge = EdgeInfo::standalone("web", "store", Protocol::Http);
    let request = RequestInfo {
        request_id: 7,
        method: "GET".into(),
        path: "/items/1".into(),
        grpc_service: None,
        grpc_method: None,
        status: Some("503".into()),
        latency: Some(std::time::Duration::from_millis(3)),
        request_bytes: 10,
        response_bytes: 20,
        faults: vec![FaultKind::Latency, FaultKind::Error],
        error: Some("injected".into()),
    };
    let connection = ConnectionInfo {
        connection_id: 3,
        peer: SocketAddr::from(([127, 0, 0, 1], 4000)),
        bytes_upstream: 5,
        bytes_downstream: 6,
        duration: Some(std::time::Duration::from_millis(1500)),
        faults: vec![FaultKind::Reset],
        error: None,
    };
    let er = EdgeRequest {
        time: 1.5,
        edge: edge.clone(),
        request,
    };
    let ec = EdgeConnection {
        time: 1.5,
        edge: edge.clone(),
        connection,
    };
    let old = ChaosSpec::default();
    let new: ChaosSpec = serde_json::from_str(r#"{"latency":"5ms"}"#).expect("valid spec");
    let all = vec![
        EventData::ServiceStarting {
            command: vec!["python3".into(), "-m".into(), "http.server".into()],
        },
        EventData::ServiceReady {
            pid: 42,
            addresses: vec!["127.0.0.1:8080".into()],
            ready_seconds: 0.25,
        },
        EventData::ServiceFailed {
            reason: Some("service web exited before it was ready".into()),
            exit: None,
            last_logs: vec!["boom".into()],
        },
        EventData::ServiceStopped {
            exit: "exited with status 0".into(),
            grace_seconds: 5.0,
        },
        EventData::ServiceLog {
            stream: "stdout".into(),
            line: "listening".into(),
        },
        EventData::EnvironmentUp {
            origin: "shop.yaml".into(),
            services: 2,
            edges: 1,
        },
        EventData::EnvironmentDown {
            reason: None,
            stopped: Some(vec!["web".into()]),
        },
        EventData::ChaosChanged {
            old: Box::new(old),
            old_version: 0,
            new: Box::new(new),
            version: 1,
            cause: "rigctl chaos set".into(),
        },
        EventData::ChaosExpired {
            time: 1.5,
            edge,
            version: 2,
        },
        EventData::RequestStarted(er.clone()),
        EventData::RequestCompleted(er.clone()),
        EventData::RequestFailed(er),
        EventData::ConnectionOpened(ec.clone()),
        EventData::ConnectionClosed(ec),
        EventData::EventsLagged {
            missed: 9,
            resume_after: Some(100),
        },
    ];
    // Exhaustive: adding a variant fails to compile until it is listed above.
    for d in &all {
        match d {
            EventData::ServiceStarting { .. }
            | EventData::ServiceReady { .. }
            | EventData::ServiceFailed { .. }
            | EventData::ServiceStopped { .. }
            | EventData::ServiceLog { .. }
            | EventData::EnvironmentUp { .. }
            | EventData::EnvironmentDown { .. }
            | EventData::ChaosChanged { .. }
            | EventData::ChaosExpired { .. }
            | EventData::RequestStarted(_)
            | EventData::RequestCompleted(_)
            | EventData::RequestFailed(_)
            | EventData::ConnectionOpened(_)
            | EventData::ConnectionClosed(_)
            | EventData::EventsLagged { .. } => {}
        }
    }
    all
}

/// A one-line, TOML-like rendering of a spec for listings: `latency = "50ms", error_rate = 0.1`.
pub fn chaos_summary(c: &ChaosSpec) -> String {
    if c.is_empty() {
        return "-".to_string();
    }
    match toml::Value::try_from(c) {
        Ok(toml::Value::Table(t)) => t
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => format!("{c:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_round_trips_through_json() {
        let samples = samples();
        let types: std::collections::BTreeSet<_> = samples.iter().map(|d| d.data_type()).collect();
        assert_eq!(types.len(), samples.len(), "one sample per variant");
        for d in samples {
            let json = serde_json::to_string(&d).unwrap();
            let back: EventData = serde_json::from_str(&json).unwrap();
            assert_eq!(back, d, "{json}");
        }
    }

    #[test]
    fn readers_ignore_unknown_fields() {
        let d: EventData =
            serde_json::from_str(r#"{"type":"service.log","stream":"stdout","line":"hi","new":1}"#)
                .unwrap();
        assert_eq!(
            d,
            EventData::ServiceLog {
                stream: "stdout".into(),
                line: "hi".into()
            }
        );
    }

    #[test]
    fn large_chaos_bodies_are_cut_too() {
        let spec = ChaosSpec {
            body: Some("b".repeat(MAX_FIELD_BYTES * 2)),
            ..Default::default()
        };
        let mut d = EventData::ChaosChanged {
            old: Box::new(spec.clone()),
            old_version: 1,
            new: Box::new(ChaosSpec::default()),
            version: 2,
            cause: "test".into(),
        };
        assert!(d.truncate_fields(MAX_FIELD_BYTES));
        assert!(
            d.approx_size() < MAX_FIELD_BYTES + 1024,
            "{}",
            d.approx_size()
        );
        let EventData::ChaosChanged { old, .. } = &d else {
            unreachable!()
        };
        assert!(old.body.as_deref().unwrap().contains("…[truncated "));
    }

    #[test]
    fn summaries_name_faults_and_errors() {
        assert_eq!(with_outcome("GET / 200".into(), &[], None), "GET / 200");
        assert_eq!(
            with_outcome(
                "GET / 503".into(),
                &[FaultKind::Latency, FaultKind::Error],
                Some("injected")
            ),
            "GET / 503 [latency,error] (injected)"
        );
    }

    #[test]
    fn long_fields_are_cut_with_a_marker() {
        let mut d = EventData::ServiceLog {
            stream: "stdout".into(),
            line: "é".repeat(40_000),
        };
        assert!(d.truncate_fields(MAX_FIELD_BYTES));
        let EventData::ServiceLog { line, .. } = &d else {
            unreachable!()
        };
        assert!(line.len() <= MAX_FIELD_BYTES, "{}", line.len());
        assert!(
            line.ends_with("…[truncated 14504 bytes]"),
            "{}",
            &line[line.len() - 40..]
        );
        assert!(
            !d.truncate_fields(MAX_FIELD_BYTES),
            "a short field is left alone"
        );
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    /// The text of `docs/events.md` under `### TYPE`, up to the next heading.
    fn section<'a>(doc: &'a str, ty: &str) -> Option<&'a str> {
        let start = doc.find(&format!("\n### {ty}\n"))? + ty.len() + 6;
        let rest = &doc[start..];
        Some(&rest[..rest.find("\n#").unwrap_or(rest.len())])
    }

    #[test]
    fn docs_list_every_type_and_field() {
        let doc = include_str!("../../docs/events.md");
        let edge_section = &doc[doc.find("## Edge labels").expect("edge labels")..];
        for d in samples() {
            let ty = d.data_type();
            let text = section(doc, ty).unwrap_or_else(|| panic!("docs/events.md: no ### {ty}"));
            let json = serde_json::to_value(&d).unwrap();
            for (field, value) in json.as_object().unwrap() {
                if field == "type" {
                    continue;
                }
                assert!(
                    text.contains(&format!("`{field}`")),
                    "docs/events.md: {ty} does not name field {field}"
                );
                if field == "edge" {
                    for label in value.as_object().unwrap().keys() {
                        assert!(
                            edge_section.contains(&format!("`{label}`")),
                            "docs/events.md: edge label {label} missing"
                        );
                    }
                }
            }
        }
    }
}
