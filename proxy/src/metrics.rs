//! Per-edge metrics through the `metrics` facade; the daemon installs the Prometheus exporter.
//!
//! Names follow Prometheus conventions: `rig_edge_` prefix, base units, counters end in `_total`.
//! Labels come from small bounded sets: `env`, `edge`, `source`, `target`, `protocol`, plus
//! `status` (HTTP status or gRPC code name), `direction` and `fault`.
//!
//! | name | type | extra labels | meaning |
//! |---|---|---|---|
//! | `rig_edge_requests_total` | counter | `status` | http/grpc requests answered, by status |
//! | `rig_edge_request_duration_seconds` | histogram | | request latency seen by the client |
//! | `rig_edge_bytes_total` | counter | `direction` | bytes relayed, `upstream` (to the target) or `downstream` |
//! | `rig_edge_connections_total` | counter | | connections accepted |
//! | `rig_edge_connections_open` | gauge | | connections open now |
//! | `rig_edge_faults_injected_total` | counter | `fault` | faults injected, by kind |
//! | `rig_edge_upstream_errors_total` | counter | | failures to reach the target |
//! | `rig_edge_connections_refused_total` | counter | `reason` | connections the edge refused itself (`fd_limit`: out of file descriptors) |
//! | `rig_edge_policy_version` | gauge | | version of the chaos policy in force |
//! | `rig_edge_client_errors_total` | counter | `reason` | http/grpc requests rig failed because of the client (`body_timeout`: 408, `malformed_body`, `invalid_request`: 400) |
//! | `rig_edge_upstream_idle_closed_total` | counter | `reason` | idle upstream connections rig closed (`idle_timeout`, `pool_full`) |
//! | `rig_edge_splice_pipes_open` | gauge | none: process-wide, no edge labels | `splice(2)` pipes open in the process, held by a tcp direction moving bytes or idle in the pool (at most 64 idle) |
//!
//! Every metric name is a constant here and every `metrics` macro call is in this file
//! (`tests/layering.rs` checks it), so the table above is the whole list.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{Counter, Gauge, Histogram, Label};

use crate::events::{EdgeInfo, FaultKind};

pub const REQUESTS_TOTAL: &str = "rig_edge_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "rig_edge_request_duration_seconds";
pub const BYTES_TOTAL: &str = "rig_edge_bytes_total";
pub const CONNECTIONS_TOTAL: &str = "rig_edge_connections_total";
pub const CONNECTIONS_OPEN: &str = "rig_edge_connections_open";
pub const FAULTS_INJECTED_TOTAL: &str = "rig_edge_faults_injected_total";
pub const UPSTREAM_ERRORS_TOTAL: &str = "rig_edge_upstream_errors_total";
pub const CONNECTIONS_REFUSED_TOTAL: &str = "rig_edge_connections_refused_total";
pub const POLICY_VERSION: &str = "rig_edge_policy_version";
pub const CLIENT_ERRORS_TOTAL: &str = "rig_edge_client_errors_total";
pub const UPSTREAM_IDLE_CLOSED_TOTAL: &str = "rig_edge_upstream_idle_closed_total";
/// Process-wide, no labels: the tcp edges' splice(2) pipes share one pool.
pub const SPLICE_PIPES_OPEN: &str = "rig_edge_splice_pipes_open";

/// `reason` of [`CLIENT_ERRORS_TOTAL`]: the request body sent nothing for the body idle timeout.
pub const CLIENT_BODY_TIMEOUT: &str = "body_timeout";
/// `reason` of [`CLIENT_ERRORS_TOTAL`]: the request body could not be read (bad chunking).
pub const CLIENT_MALFORMED_BODY: &str = "malformed_body";
/// `reason` of [`CLIENT_ERRORS_TOTAL`]: a request rig cannot forward (CONNECT, bad target).
pub const CLIENT_INVALID_REQUEST: &str = "invalid_request";
/// `reason` of [`UPSTREAM_IDLE_CLOSED_TOTAL`]: idle longer than the pool idle timeout.
pub const IDLE_TIMEOUT: &str = "idle_timeout";
/// `reason` of [`UPSTREAM_IDLE_CLOSED_TOTAL`]: the edge's idle stack was full.
pub const POOL_FULL: &str = "pool_full";

/// Register names, units and help texts with the installed recorder. Call once at start-up.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        REQUESTS_TOTAL,
        "HTTP/gRPC requests answered through an edge, by status"
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Request latency through an edge, as the client sees it"
    );
    describe_counter!(
        BYTES_TOTAL,
        Unit::Bytes,
        "Bytes relayed through an edge, by direction"
    );
    describe_counter!(CONNECTIONS_TOTAL, "Connections accepted by an edge proxy");
    describe_gauge!(CONNECTIONS_OPEN, "Connections open through an edge proxy");
    describe_counter!(
        FAULTS_INJECTED_TOTAL,
        "Faults injected by an edge proxy, by kind"
    );
    describe_counter!(
        UPSTREAM_ERRORS_TOTAL,
        "Failures to reach or talk to an edge's target"
    );
    describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        "Connections an edge refused itself, by reason (fd_limit: out of file descriptors)"
    );
    describe_gauge!(
        POLICY_VERSION,
        "Version of the chaos policy in force on an edge"
    );
    describe_counter!(
        CLIENT_ERRORS_TOTAL,
        "HTTP/gRPC requests an edge failed because of the client, by reason"
    );
    describe_counter!(
        UPSTREAM_IDLE_CLOSED_TOTAL,
        "Idle upstream connections an edge closed, by reason"
    );
}

/// The gauge of [`SPLICE_PIPES_OPEN`], described the first time a pipe is counted (the pool
/// is process-wide, so this is a process-wide gauge, not an [`EdgeMetrics`] one).
pub(crate) fn splice_pipes_open() -> &'static Gauge {
    static G: OnceLock<Gauge> = OnceLock::new();
    G.get_or_init(|| {
        metrics::describe_gauge!(
            SPLICE_PIPES_OPEN,
            "splice(2) pipes open in the process (held while a tcp direction moves bytes, or idle in the pool)"
        );
        metrics::gauge!(SPLICE_PIPES_OPEN)
    })
}

const COMMON_STATUSES: usize = 32;

/// The slot of a status label seen on most requests: common HTTP statuses and every gRPC code
/// name. Others go through the map.
fn common_status(status: &str) -> Option<usize> {
    Some(match status {
        "200" => 0,
        "201" => 1,
        "204" => 2,
        "301" => 3,
        "302" => 4,
        "304" => 5,
        "400" => 6,
        "401" => 7,
        "403" => 8,
        "404" => 9,
        "429" => 10,
        "500" => 11,
        "502" => 12,
        "503" => 13,
        "504" => 14,
        "OK" => 15,
        "CANCELLED" => 16,
        "UNKNOWN" => 17,
        "INVALID_ARGUMENT" => 18,
        "DEADLINE_EXCEEDED" => 19,
        "NOT_FOUND" => 20,
        "ALREADY_EXISTS" => 21,
        "PERMISSION_DENIED" => 22,
        "RESOURCE_EXHAUSTED" => 23,
        "FAILED_PRECONDITION" => 24,
        "ABORTED" => 25,
        "OUT_OF_RANGE" => 26,
        "UNIMPLEMENTED" => 27,
        "INTERNAL" => 28,
        "UNAVAILABLE" => 29,
        "DATA_LOSS" => 30,
        "UNAUTHENTICATED" => 31,
        _ => return None,
    })
}

/// Handles for one edge, built once so the hot path does no label work.
#[derive(Debug, Clone)]
pub struct EdgeMetrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    labels: Vec<Label>,
    duration: Histogram,
    bytes_up: Counter,
    bytes_down: Counter,
    connections: Counter,
    open: Gauge,
    upstream_errors: Counter,
    refused_fd_limit: Counter,
    version: Gauge,
    /// Counters of the usual statuses, found without a lock or a hash; allocated at the
    /// first request so idle edges do not pay for them.
    common_status: OnceLock<Box<[OnceLock<Counter>; COMMON_STATUSES]>>,
    by_status: Mutex<HashMap<String, Counter>>,
    by_fault: Mutex<HashMap<FaultKind, Counter>>,
}

impl EdgeMetrics {
    pub fn new(info: &EdgeInfo) -> Self {
        let labels = vec![
            Label::new("env", info.env.clone()),
            Label::new("edge", info.edge.clone()),
            Label::new("source", info.source.clone()),
            Label::new("target", info.target.clone()),
            Label::new("protocol", info.protocol.as_str()),
        ];
        let with = |k: &'static str, v: &'static str| {
            let mut l = labels.clone();
            l.push(Label::new(k, v));
            l
        };
        EdgeMetrics {
            inner: Arc::new(Inner {
                duration: metrics::histogram!(REQUEST_DURATION_SECONDS, labels.clone()),
                bytes_up: metrics::counter!(BYTES_TOTAL, with("direction", "upstream")),
                bytes_down: metrics::counter!(BYTES_TOTAL, with("direction", "downstream")),
                connections: metrics::counter!(CONNECTIONS_TOTAL, labels.clone()),
                open: metrics::gauge!(CONNECTIONS_OPEN, labels.clone()),
                upstream_errors: metrics::counter!(UPSTREAM_ERRORS_TOTAL, labels.clone()),
                refused_fd_limit: metrics::counter!(
                    CONNECTIONS_REFUSED_TOTAL,
                    with("reason", "fd_limit")
                ),
                version: metrics::gauge!(POLICY_VERSION, labels.clone()),
                common_status: OnceLock::new(),
                by_status: Mutex::default(),
                by_fault: Mutex::default(),
                labels,
            }),
        }
    }

    /// A request was answered with `status` (HTTP status or gRPC code name) after `secs`.
    pub fn request(&self, status: &str, secs: f64) {
        self.inner.duration.record(secs);
        if let Some(i) = common_status(status) {
            let table = self
                .inner
                .common_status
                .get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
            table[i]
                .get_or_init(|| self.status_counter(status))
                .increment(1);
            return;
        }
        let mut map = self
            .inner
            .by_status
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(status) {
            c.increment(1);
            return;
        }
        let c = self.status_counter(status);
        c.increment(1);
        map.insert(status.to_owned(), c);
    }

    fn status_counter(&self, status: &str) -> Counter {
        let mut l = self.inner.labels.clone();
        l.push(Label::new("status", status.to_owned()));
        metrics::counter!(REQUESTS_TOTAL, l)
    }

    pub fn fault(&self, kind: FaultKind) {
        let mut map = self
            .inner
            .by_fault
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.entry(kind)
            .or_insert_with(|| {
                let mut l = self.inner.labels.clone();
                l.push(Label::new("fault", kind.as_str()));
                metrics::counter!(FAULTS_INJECTED_TOTAL, l)
            })
            .increment(1);
    }

    pub fn bytes_upstream(&self, n: u64) {
        self.inner.bytes_up.increment(n);
    }

    pub fn bytes_downstream(&self, n: u64) {
        self.inner.bytes_down.increment(n);
    }

    pub fn connection_opened(&self) {
        self.inner.connections.increment(1);
        self.inner.open.increment(1.0);
    }

    pub fn connection_closed(&self) {
        self.inner.open.decrement(1.0);
    }

    pub fn upstream_error(&self) {
        self.inner.upstream_errors.increment(1);
    }

    /// A connection was refused because the process is out of file descriptors.
    pub fn refused_fd_limit(&self) {
        self.inner.refused_fd_limit.increment(1);
    }

    pub fn policy_version(&self, v: u64) {
        self.inner.version.set(v as f64);
    }
}

/// Counters of rare outcomes, found by name when they happen instead of held per edge.
impl EdgeMetrics {
    fn rare(&self, name: &'static str, key: &'static str, value: &'static str) -> Counter {
        let mut l = self.inner.labels.clone();
        l.push(Label::new(key, value));
        metrics::counter!(name, l)
    }

    /// A request failed because of the client; `reason` is one of the `CLIENT_*` values.
    pub fn client_error(&self, reason: &'static str) {
        self.rare(CLIENT_ERRORS_TOTAL, "reason", reason)
            .increment(1);
    }

    /// Idle upstream connections were closed; `reason` is [`IDLE_TIMEOUT`] or [`POOL_FULL`].
    pub fn upstream_idle_closed(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.rare(UPSTREAM_IDLE_CLOSED_TOTAL, "reason", reason)
                .increment(n);
        }
    }
}
