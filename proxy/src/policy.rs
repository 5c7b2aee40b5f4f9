//! The chaos policy: plain, validated data shared by spec files, presets, the gRPC API and the
//! data plane.
//!
//! It comes in two layers, as configuration should:
//!
//! * [`ChaosSpec`] is what users write: a strict serde struct (`deny_unknown_fields`) whose flat keys
//!   are the `rigctl chaos set` flags in snake_case, with nested tables for the rarer parts (`match`,
//!   `slicer`, weighted `statuses`). Values that are wrong on their own (a rate of 1.5, a duration of
//!   "5xs", a status of 700, an unknown gRPC code) fail while parsing, so a TOML error points at the
//!   file, line and key.
//! * [`ChaosPolicy`] is what the data plane runs: typed durations, ratios and limits, checked
//!   against the edge's protocol by [`ChaosSpec::validate`]. It holds no I/O and no RNG state.
//!
//! Where each fault acts (the proxy's phases):
//!
//! | phase             | http / grpc                                    | tcp                                      |
//! |-------------------|------------------------------------------------|------------------------------------------|
//! | accept            | partition `reject`                             | partition `reject`, `reset` on accept     |
//! | request           | `match`, hang, error, latency (once, before forwarding) | -                               |
//! | body / each chunk | bandwidth (both directions)                    | latency (per chunk), bandwidth, slicer, blackhole, `reset_after`, `limit_data` |
//! | close             | -                                              | `slow_close`                             |

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The protocol an edge speaks; decides which faults apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (keep-alive) and HTTP/2 cleartext.
    Http,
    /// gRPC over HTTP/2 cleartext.
    Grpc,
    /// A raw byte stream.
    Tcp,
}

impl Protocol {
    /// The lowercase name used in specs, labels and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "http" => Ok(Protocol::Http),
            "grpc" => Ok(Protocol::Grpc),
            "tcp" => Ok(Protocol::Tcp),
            other => Err(format!(
                "unknown protocol {other:?}: expected http, grpc or tcp"
            )),
        }
    }
}

/// A policy that failed validation: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chaos.{field}: {message}")]
pub struct PolicyError {
    /// The snake_case key in a spec `chaos` block (the CLI flag is the same in kebab-case).
    pub field: String,
    /// What is wrong with it, lowercase, no trailing period.
    pub message: String,
}

impl PolicyError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        PolicyError {
            field: field.into(),
            message: message.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Value types: each parses from the string users write, and serialises back to it.
// ---------------------------------------------------------------------------------------------

/// A non-negative duration written as `"50ms"`, `"1.5s"`, `"2m"` (humantime syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.starts_with('-') {
            return Err(format!("invalid duration {s:?}: must not be negative"));
        }
        if t == "0" {
            return Ok(HumanDuration(Duration::ZERO));
        }
        // humantime does not take decimals ("1.5s"); accept them for seconds and milliseconds.
        if let Some(v) = parse_decimal_duration(t) {
            return Ok(HumanDuration(v));
        }
        humantime::parse_duration(t)
            .map(HumanDuration)
            .map_err(|e| {
                format!("invalid duration {s:?}: {e} (examples: \"50ms\", \"1.5s\", \"2m\")")
            })
    }
}

fn parse_decimal_duration(t: &str) -> Option<Duration> {
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    if !num.contains('.') {
        return None;
    }
    let v: f64 = num.trim().parse().ok()?;
    if !(v.is_finite() && v >= 0.0) {
        return None;
    }
    Duration::try_from_secs_f64(v * scale).ok()
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.is_zero() {
            return f.write_str("0s");
        }
        if d.subsec_nanos().is_multiple_of(1_000_000) {
            let ms = d.as_millis();
            if ms.is_multiple_of(1000) {
                return write!(f, "{}s", ms / 1000);
            }
            return write!(f, "{ms}ms");
        }
        write!(f, "{}us", d.as_micros())
    }
}

impl TryFrom<String> for HumanDuration {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<HumanDuration> for String {
    fn from(d: HumanDuration) -> String {
        d.to_string()
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A probability in `0..=1`.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default, Serialize)]
#[serde(transparent)]
pub struct Ratio(f64);

impl Ratio {
    pub fn new(v: f64) -> Result<Self, String> {
        if v.is_finite() && (0.0..=1.0).contains(&v) {
            Ok(Ratio(v))
        } else {
            Err(format!("must be between 0 and 1, got {v}"))
        }
    }
    pub fn get(self) -> f64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        Ratio::new(v).map_err(serde::de::Error::custom)
    }
}

/// An HTTP status code in `100..=599`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Status(u16);

impl Status {
    pub fn new(v: u32) -> Result<Self, String> {
        if (100..=599).contains(&v) {
            Ok(Status(v as u16))
        } else {
            Err(format!("http status must be between 100 and 599, got {v}"))
        }
    }
    pub fn get(self) -> u16 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        let v = u32::try_from(v).map_err(|_| {
            serde::de::Error::custom(format!("http status must be between 100 and 599, got {v}"))
        })?;
        Status::new(v).map_err(serde::de::Error::custom)
    }
}

/// A byte count, written as `65536`, `"64KiB"`, `"1MB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// A rate in bytes per second, written as `"1MiB/s"`, `"512KB/s"`, `"100000"`. Never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteRate(pub u64);

fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional unit such as KiB or MB")
    })?;
    let mult: f64 = match unit.trim() {
        "" | "B" | "b" => 1.0,
        "K" | "KB" | "kB" | "kb" => 1e3,
        "M" | "MB" | "mb" => 1e6,
        "G" | "GB" | "gb" => 1e9,
        "Ki" | "KiB" | "kib" => 1024.0,
        "Mi" | "MiB" | "mib" => 1024.0 * 1024.0,
        "Gi" | "GiB" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kbit" | "Kbit" => 1e3 / 8.0,
        "Mbit" | "mbit" => 1e6 / 8.0,
        "Gbit" | "gbit" => 1e9 / 8.0,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use B, KB, MB, GB, KiB, MiB, GiB, kbit, Mbit, Gbit)"
            ));
        }
    };
    let v = num * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("invalid size {s:?}"));
    }
    Ok(v.round() as u64)
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_bytes(s).map(ByteSize)
    }
}

impl FromStr for ByteRate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let t = t.strip_suffix("/s").unwrap_or(t);
        let v = parse_bytes(t).map_err(|e| e.replace("size", "rate"))?;
        if v == 0 {
            return Err(format!("invalid rate {s:?}: must be greater than zero"));
        }
        Ok(ByteRate(v))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for ByteRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v.is_multiple_of(1024 * 1024) {
            write!(f, "{}MiB/s", v / (1024 * 1024))
        } else if v.is_multiple_of(1024) {
            write!(f, "{}KiB/s", v / 1024)
        } else {
            write!(f, "{v}B/s")
        }
    }
}

macro_rules! serde_via_str_or_int {
    ($t:ident, $what:literal) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$t, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<$t, E> {
                        v.to_string().parse().map_err(E::custom)
                    }
                    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<$t, E> {
                        v.to_string().parse().map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}
serde_via_str_or_int!(ByteSize, "a byte size such as 65536 or \"64KiB\"");
serde_via_str_or_int!(ByteRate, "a rate such as \"1MiB/s\"");

/// A size is written back as its number of bytes (`reset_after = 65536`), the form a spec may use
/// and the unit the metrics count in.
impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// A rate keeps its unit (`"1MiB/s"`): a bare number would read as bytes, not bytes a second.
impl Serialize for ByteRate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A gRPC status code, by its canonical name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum GrpcCode {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

const GRPC_CODES: [GrpcCode; 17] = [
    GrpcCode::Ok,
    GrpcCode::Cancelled,
    GrpcCode::Unknown,
    GrpcCode::InvalidArgument,
    GrpcCode::DeadlineExceeded,
    GrpcCode::NotFound,
    GrpcCode::AlreadyExists,
    GrpcCode::PermissionDenied,
    GrpcCode::ResourceExhausted,
    GrpcCode::FailedPrecondition,
    GrpcCode::Aborted,
    GrpcCode::OutOfRange,
    GrpcCode::Unimplemented,
    GrpcCode::Internal,
    GrpcCode::Unavailable,
    GrpcCode::DataLoss,
    GrpcCode::Unauthenticated,
];

impl GrpcCode {
    /// The numeric code sent in `grpc-status`.
    pub fn code(self) -> u8 {
        self as u8
    }
    /// The canonical upper-case name (`UNAVAILABLE`).
    pub fn name(self) -> &'static str {
        match self {
            GrpcCode::Ok => "OK",
            GrpcCode::Cancelled => "CANCELLED",
            GrpcCode::Unknown => "UNKNOWN",
            GrpcCode::InvalidArgument => "INVALID_ARGUMENT",
            GrpcCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            GrpcCode::NotFound => "NOT_FOUND",
            GrpcCode::AlreadyExists => "ALREADY_EXISTS",
            GrpcCode::PermissionDenied => "PERMISSION_DENIED",
            GrpcCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            GrpcCode::FailedPrecondition => "FAILED_PRECONDITION",
            GrpcCode::Aborted => "ABORTED",
            GrpcCode::OutOfRange => "OUT_OF_RANGE",
            GrpcCode::Unimplemented => "UNIMPLEMENTED",
            GrpcCode::Internal => "INTERNAL",
            GrpcCode::Unavailable => "UNAVAILABLE",
            GrpcCode::DataLoss => "DATA_LOSS",
            GrpcCode::Unauthenticated => "UNAUTHENTICATED",
        }
    }
    /// The code for a numeric `grpc-status`; values above 16 map to UNKNOWN as gRPC specifies.
    pub fn from_code(code: u32) -> GrpcCode {
        GRPC_CODES
            .get(code as usize)
            .copied()
            .unwrap_or(GrpcCode::Unknown)
    }
}

impl FromStr for GrpcCode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_uppercase().replace('-', "_");
        GRPC_CODES
            .iter()
            .copied()
            .find(|c| c.name() == norm)
            .ok_or_else(|| {
                format!("unknown grpc code {s:?}: expected a name such as UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL")
            })
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which way bytes flow: `upstream` is client → target (requests), `downstream` is target → client
/// (replies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Both,
    Upstream,
    Downstream,
}

impl Direction {
    pub fn upstream(self) -> bool {
        matches!(self, Direction::Both | Direction::Upstream)
    }
    pub fn downstream(self) -> bool {
        matches!(self, Direction::Both | Direction::Downstream)
    }
}

impl FromStr for Direction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "both" => Ok(Direction::Both),
            "upstream" => Ok(Direction::Upstream),
            "downstream" => Ok(Direction::Downstream),
            other => Err(format!(
                "unknown direction {other:?}: expected both, upstream or downstream"
            )),
        }
    }
}

/// How a partition treats traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionMode {
    /// Refuse new connections at once (accept, then reset); requests fail fast.
    Reject,
    /// Accept, never forward: the peer sees silence until its own timeout.
    Blackhole,
}

impl FromStr for PartitionMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "reject" => Ok(PartitionMode::Reject),
            "blackhole" => Ok(PartitionMode::Blackhole),
            other => Err(format!(
                "unknown partition mode {other:?}: expected reject or blackhole"
            )),
        }
    }
}

/// `partition = true` (a blackhole) or `partition = "reject" | "blackhole"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PartitionSetting {
    Flag(bool),
    Mode(PartitionMode),
}

/// How latency is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistributionKind {
    /// `latency ± jitter`, uniformly (Toxiproxy's model). The default.
    #[default]
    Uniform,
    /// Normal with mean `latency` and standard deviation `jitter`, clamped at zero.
    Normal,
    /// Log-normal with median `latency` and 99th percentile `latency_p99`.
    Lognormal,
}

impl FromStr for DistributionKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "uniform" => Ok(DistributionKind::Uniform),
            "normal" => Ok(DistributionKind::Normal),
            "lognormal" | "log-normal" => Ok(DistributionKind::Lognormal),
            other => Err(format!(
                "unknown distribution {other:?}: expected uniform, normal or lognormal"
            )),
        }
    }
}

/// What a hang does when its duration is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HangThen {
    /// Close the connection without an answer. The default.
    #[default]
    Close,
    /// Answer 504 (http) or DEADLINE_EXCEEDED (grpc).
    Timeout,
}

impl FromStr for HangThen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "close" => Ok(HangThen::Close),
            "timeout" => Ok(HangThen::Timeout),
            other => Err(format!(
                "unknown hang outcome {other:?}: expected close or timeout"
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The user-facing form.
// ---------------------------------------------------------------------------------------------

/// One weighted entry of `statuses`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedStatus {
    /// HTTP status, 100..=599.
    pub status: Status,
    /// Relative weight, > 0. Default 1.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Which requests the faults of an http / grpc edge apply to. Every given condition must hold;
/// within a list any entry may match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// HTTP methods (`GET`, `POST`), case-insensitive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Path prefixes (`/api/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_prefixes: Vec<String>,
    /// Header name → exact value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// gRPC service, fully qualified (`demo.v1.Catalog`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_service: Option<String>,
    /// gRPC method name (`GetItem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_method: Option<String>,
}

/// Toxiproxy's slicer: cut the stream into small chunks with a delay between them (tcp).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlicerSpec {
    /// Mean chunk size in bytes, > 0.
    pub average_size: ByteSize,
    /// Chunk sizes vary uniformly by ± this many bytes (less than `average_size`).
    #[serde(default = "zero_bytes")]
    pub size_variation: ByteSize,
    /// Delay between chunks.
    #[serde(default)]
    pub delay: HumanDuration,
}

fn zero_bytes() -> ByteSize {
    ByteSize(0)
}

/// A chaos block as users write it in specs and presets, and as `rigctl chaos set` sends it.
/// Every field is optional; an empty spec means "no chaos".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosSpec {
    // -- latency ---------------------------------------------------------------------------
    /// Added latency: per request (http/grpc) or per chunk (tcp). The median for `lognormal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<HumanDuration>,
    /// Spread of the latency: ± for `uniform`, the standard deviation for `normal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<HumanDuration>,
    /// `uniform` (default), `normal` or `lognormal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<DistributionKind>,
    /// The 99th percentile of a `lognormal` latency; must exceed `latency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p99: Option<HumanDuration>,
    /// tcp only: which way latency applies. Default `downstream` (once per round trip); `both`
    /// delays each direction, so a round trip twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_direction: Option<Direction>,

    // -- errors ----------------------------------------------------------------------------
    /// Fraction of requests (http/grpc) or connections (tcp) that fail, 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<Ratio>,
    /// http: the status of an injected error. Default 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// http: a weighted choice of statuses instead of one `status`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<WeightedStatus>,
    /// http: the body of an injected error. Default: a short JSON description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// http: extra headers on an injected error (e.g. `Retry-After`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// grpc: the code of an injected error, by name. Default `UNAVAILABLE`; `OK` is rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_code: Option<GrpcCode>,
    /// grpc: the message of an injected error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_message: Option<String>,
    /// tcp: an erroring connection is reset after this many bytes (either way) instead of on
    /// accept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_after: Option<ByteSize>,

    // -- hang ------------------------------------------------------------------------------
    /// Fraction of requests (http/grpc) or connections (tcp) held without an answer, 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hang_rate: Option<Ratio>,
    /// How long a hang lasts. Default: until the client gives up or chaos is cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hang_for: Option<HumanDuration>,
    /// After `hang_for`: `close` (default) or `timeout` (504 / DEADLINE_EXCEEDED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hang_then: Option<HangThen>,

    // -- partition -------------------------------------------------------------------------
    /// `true` or `"blackhole"`: accept, never forward; `"reject"`: refuse at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionSetting>,
    /// Which way the partition cuts: `both` (default), `upstream` or `downstream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// Keep connections that are open when the partition starts. Default: cut them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_connections: Option<bool>,

    // -- bandwidth -------------------------------------------------------------------------
    /// Limit in bytes per second for each direction, shared by all connections of the edge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<ByteRate>,
    /// Limit for client → target only (overrides `bandwidth` that way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_upstream: Option<ByteRate>,
    /// Limit for target → client only (overrides `bandwidth` that way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_downstream: Option<ByteRate>,
    /// Apply the limit to each connection instead of the edge as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_per_connection: Option<bool>,

    // -- tcp-only, as in Toxiproxy ---------------------------------------------------------
    /// tcp: delay the close of a connection by this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_close: Option<HumanDuration>,
    /// tcp: cut data into small delayed chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slicer: Option<SlicerSpec>,
    /// tcp: close a connection once this many bytes have passed (either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_data: Option<ByteSize>,

    // -- scope -----------------------------------------------------------------------------
    /// http/grpc: apply faults only to matching requests.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<MatchSpec>,
    /// Seed for fault decisions: the same request sequence gets the same faults on every run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Revert to no chaos by itself after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<HumanDuration>,
}

// ---------------------------------------------------------------------------------------------
// The validated form the data plane runs.
// ---------------------------------------------------------------------------------------------

/// How a delay is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Delay {
    /// Uniform in `[base - jitter, base + jitter]`, clamped at zero.
    Uniform { base: Duration, jitter: Duration },
    /// Normal with mean `mean` and standard deviation `stddev`, clamped at zero.
    Normal { mean: Duration, stddev: Duration },
    /// Log-normal with median `p50` and 99th percentile `p99`.
    LogNormal { p50: Duration, p99: Duration },
}

/// Latency and the direction it acts in (direction matters for tcp only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub delay: Delay,
    pub direction: Direction,
}

/// An injected failure.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorFault {
    /// Fraction of requests / connections that fail.
    pub rate: f64,
    /// http: weighted statuses (at least one).
    pub statuses: Vec<(u16, u32)>,
    /// http: response body; `None` for rig's default JSON body.
    pub body: Option<String>,
    /// http: extra response headers.
    pub headers: Vec<(String, String)>,
    /// grpc: the code (never OK).
    pub grpc_code: GrpcCode,
    /// grpc: the message.
    pub grpc_message: Option<String>,
    /// tcp: reset after this many bytes; `None` resets on accept.
    pub reset_after: Option<u64>,
}

/// A hang: hold the request / connection without an answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HangFault {
    pub rate: f64,
    /// `None`: until the client gives up or chaos is cleared.
    pub duration: Option<Duration>,
    pub then: HangThen,
}

/// A network partition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartitionFault {
    pub mode: PartitionMode,
    pub direction: Direction,
    /// Cut connections open when the partition starts.
    pub cut_existing: bool,
}

/// Bandwidth limits, bytes per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BandwidthFault {
    pub upstream: Option<u64>,
    pub downstream: Option<u64>,
    pub per_connection: bool,
}

/// The slicer, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slicer {
    pub average_size: u64,
    pub size_variation: u64,
    pub delay: Duration,
}

/// Request matching, validated (methods upper-cased, header names lower-cased).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Match {
    pub methods: Vec<String>,
    pub path_prefixes: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub grpc_service: Option<String>,
    pub grpc_method: Option<String>,
}

impl Match {
    /// Does a request with this method, path and headers match? `path` is the HTTP path; for
    /// gRPC it is `/package.Service/Method`.
    pub fn matches(
        &self,
        method: &str,
        path: &str,
        header: impl Fn(&str) -> Option<String>,
    ) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
        {
            return false;
        }
        if !self.path_prefixes.is_empty()
            && !self
                .path_prefixes
                .iter()
                .any(|p| path.starts_with(p.as_str()))
        {
            return false;
        }
        if !self
            .headers
            .iter()
            .all(|(k, v)| header(k).as_deref() == Some(v.as_str()))
        {
            return false;
        }
        if self.grpc_service.is_some() || self.grpc_method.is_some() {
            let (svc, method) = grpc_path_parts(path).unwrap_or(("", ""));
            if self.grpc_service.as_deref().is_some_and(|s| s != svc) {
                return false;
            }
            if self.grpc_method.as_deref().is_some_and(|m| m != method) {
                return false;
            }
        }
        true
    }
}

/// Split a gRPC path `/package.Service/Method` into service and method.
pub fn grpc_path_parts(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (svc, method) = rest.split_once('/')?;
    (!svc.is_empty() && !method.is_empty() && !method.contains('/')).then_some((svc, method))
}

/// A spec that passed [`ChaosSpec::validated`] for one protocol, with the policy it yields: what
/// an edge installs without validating again ([`crate::Edge::install`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidChaos {
    spec: ChaosSpec,
    policy: ChaosPolicy,
    protocol: Protocol,
}

impl ValidChaos {
    /// The spec as the user wrote it (what events and `chaos get` show).
    pub fn spec(&self) -> &ChaosSpec {
        &self.spec
    }

    /// The protocol it was validated for.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The spec and its policy.
    pub fn into_parts(self) -> (ChaosSpec, ChaosPolicy) {
        (self.spec, self.policy)
    }
}

impl ChaosSpec {
    /// Validates for `protocol` ([`ChaosSpec::validate`]), keeping the spec with its policy.
    pub fn validated(self, protocol: Protocol) -> Result<ValidChaos, PolicyError> {
        let policy = self.validate(protocol)?;
        Ok(ValidChaos {
            spec: self,
            policy,
            protocol,
        })
    }
}

/// The validated chaos policy of one edge. `ChaosPolicy::default()` is "no chaos".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChaosPolicy {
    pub latency: Option<Latency>,
    pub error: Option<ErrorFault>,
    pub hang: Option<HangFault>,
    pub partition: Option<PartitionFault>,
    pub bandwidth: Option<BandwidthFault>,
    pub slow_close: Option<Duration>,
    pub slicer: Option<Slicer>,
    pub limit_data: Option<u64>,
    pub matcher: Option<Match>,
    pub seed: Option<u64>,
    pub ttl: Option<Duration>,
}

impl ChaosPolicy {
    /// True when the policy injects nothing (a tcp edge can then relay with splice).
    pub fn is_passthrough(&self) -> bool {
        self.latency.is_none()
            && self.error.is_none()
            && self.hang.is_none()
            && self.partition.is_none()
            && self.bandwidth.is_none()
            && self.slow_close.is_none()
            && self.slicer.is_none()
            && self.limit_data.is_none()
    }
}

impl ChaosSpec {
    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        *self == ChaosSpec::default()
    }

    /// Overlay `other` on `self`: every field `other` sets replaces this one's. Used to apply a
    /// preset and then flags on top of it.
    pub fn merged_with(&self, other: &ChaosSpec) -> ChaosSpec {
        let a = self.clone();
        let b = other.clone();
        macro_rules! pick {
            ($($f:ident),*) => { ChaosSpec { $($f: b.$f.or(a.$f),)* statuses: if b.statuses.is_empty() { a.statuses } else { b.statuses }, headers: if b.headers.is_empty() { a.headers } else { b.headers } } };
        }
        pick!(
            latency,
            jitter,
            distribution,
            latency_p99,
            latency_direction,
            error_rate,
            status,
            body,
            grpc_code,
            grpc_message,
            reset_after,
            hang_rate,
            hang_for,
            hang_then,
            partition,
            direction,
            keep_connections,
            bandwidth,
            bandwidth_upstream,
            bandwidth_downstream,
            bandwidth_per_connection,
            slow_close,
            slicer,
            limit_data,
            matcher,
            seed,
            ttl
        )
    }

    /// Fields that apply to some protocols only: refused on the others, naming the field.
    fn check_protocol(&self, protocol: Protocol) -> Result<(), PolicyError> {
        let ChaosSpec {
            status,
            statuses,
            body,
            headers,
            grpc_code,
            grpc_message,
            reset_after,
            latency_direction,
            slow_close,
            slicer,
            limit_data,
            matcher,
            ..
        } = self;
        let only = |field: &str, set: bool, allowed: &[Protocol]| -> Result<(), PolicyError> {
            if set && !allowed.contains(&protocol) {
                let names: Vec<&str> = allowed.iter().map(|p| p.as_str()).collect();
                return Err(PolicyError::new(
                    field,
                    format!(
                        "does not apply to a {protocol} edge (only {})",
                        names.join(", ")
                    ),
                ));
            }
            Ok(())
        };
        use Protocol::{Grpc, Http, Tcp};
        only("status", status.is_some(), &[Http])?;
        only("statuses", !statuses.is_empty(), &[Http])?;
        only("body", body.is_some(), &[Http])?;
        only("headers", !headers.is_empty(), &[Http])?;
        only("grpc_code", grpc_code.is_some(), &[Grpc])?;
        only("grpc_message", grpc_message.is_some(), &[Grpc])?;
        only("reset_after", reset_after.is_some(), &[Tcp])?;
        only("latency_direction", latency_direction.is_some(), &[Tcp])?;
        only("slow_close", slow_close.is_some(), &[Tcp])?;
        only("slicer", slicer.is_some(), &[Tcp])?;
        only("limit_data", limit_data.is_some(), &[Tcp])?;
        only("match", matcher.is_some(), &[Http, Grpc])?;

        Ok(())
    }

    /// Latency: a base delay, its jitter or distribution, and for tcp its direction.
    fn validate_latency(&self) -> Result<Option<Latency>, PolicyError> {
        let ChaosSpec {
            latency,
            jitter,
            distribution,
            latency_p99,
            latency_direction,
            ..
        } = self;
        let latency = match (latency, jitter, distribution, latency_p99) {
            (None, None, None, None) => None,
            (None, _, _, _) => {
                let field = if jitter.is_some() {
                    "jitter"
                } else if distribution.is_some() {
                    "distribution"
                } else {
                    "latency_p99"
                };
                return Err(PolicyError::new(field, "requires latency"));
            }
            (Some(base), jitter, dist, p99) => {
                let base = base.0;
                let delay = match dist.unwrap_or_default() {
                    DistributionKind::Uniform | DistributionKind::Normal if p99.is_some() => {
                        return Err(PolicyError::new(
                            "latency_p99",
                            "applies to distribution = \"lognormal\" only",
                        ));
                    }
                    DistributionKind::Uniform => Delay::Uniform {
                        base,
                        jitter: jitter.map(|j| j.0).unwrap_or_default(),
                    },
                    DistributionKind::Normal => Delay::Normal {
                        mean: base,
                        stddev: jitter.map(|j| j.0).ok_or_else(|| {
                            PolicyError::new("jitter", "distribution = \"normal\" requires jitter (the standard deviation)")
                        })?,
                    },
                    DistributionKind::Lognormal => {
                        if jitter.is_some() {
                            return Err(PolicyError::new(
                                "jitter",
                                "does not apply to distribution = \"lognormal\" (use latency_p99)",
                            ));
                        }
                        let p99 = p99.map(|p| p.0).ok_or_else(|| {
                            PolicyError::new("latency_p99", "distribution = \"lognormal\" requires latency_p99")
                        })?;
                        if base.is_zero() || p99 <= base {
                            return Err(PolicyError::new(
                                "latency_p99",
                                "must be greater than latency (the median), which must be above zero",
                            ));
                        }
                        Delay::LogNormal { p50: base, p99 }
                    }
                };
                Some(Latency {
                    delay,
                    // Downstream by default, so a tcp round trip is delayed once, as an http request
                    // is (and as Toxiproxy's latency toxic does by default).
                    direction: latency_direction.unwrap_or(Direction::Downstream),
                })
            }
        };

        Ok(latency)
    }

    /// Errors: a rate and what a failed request gets (status, body, headers, gRPC code, tcp reset).
    fn validate_error(&self) -> Result<Option<ErrorFault>, PolicyError> {
        let ChaosSpec {
            error_rate,
            status,
            statuses,
            body,
            headers,
            grpc_code,
            grpc_message,
            reset_after,
            ..
        } = self;
        let error_detail_set = status.is_some()
            || !statuses.is_empty()
            || body.is_some()
            || !headers.is_empty()
            || grpc_code.is_some()
            || grpc_message.is_some()
            || reset_after.is_some();
        let error = match error_rate {
            None if error_detail_set => {
                // Naming a status or code alone means "every request fails with it", as
                // Envoy's abort does with percentage 100.
                Some(1.0)
            }
            None => None,
            Some(r) => Some(r.get()),
        };
        let error = match error {
            None => None,
            Some(rate) => {
                if status.is_some() && !statuses.is_empty() {
                    return Err(PolicyError::new(
                        "statuses",
                        "give status or statuses, not both",
                    ));
                }
                if let Some(w) = statuses.iter().find(|w| w.weight == 0) {
                    return Err(PolicyError::new(
                        "statuses",
                        format!(
                            "weight of status {} must be greater than zero",
                            w.status.get()
                        ),
                    ));
                }
                let statuses: Vec<(u16, u32)> = if statuses.is_empty() {
                    vec![(status.map(|s| s.get()).unwrap_or(503), 1)]
                } else {
                    statuses
                        .iter()
                        .map(|w| (w.status.get(), w.weight))
                        .collect()
                };
                let grpc_code = grpc_code.unwrap_or(GrpcCode::Unavailable);
                if grpc_code == GrpcCode::Ok {
                    return Err(PolicyError::new(
                        "grpc_code",
                        "OK is not an error: choose a failing code such as UNAVAILABLE",
                    ));
                }
                let mut hdrs = Vec::with_capacity(headers.len());
                for (k, v) in headers {
                    if FRAMING_HEADERS
                        .iter()
                        .any(|h| h.eq_ignore_ascii_case(k.trim()))
                    {
                        return Err(PolicyError::new(
                            "headers",
                            format!(
                                "{k:?} cannot be set on an injected response: rig frames the response itself"
                            ),
                        ));
                    }
                    if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                        return Err(PolicyError::new(
                            "headers",
                            format!("invalid header name {k:?}"),
                        ));
                    }
                    if http::HeaderValue::from_str(v).is_err() {
                        return Err(PolicyError::new(
                            "headers",
                            format!("invalid value for header {k:?}"),
                        ));
                    }
                    hdrs.push((k.to_ascii_lowercase(), v.clone()));
                }
                Some(ErrorFault {
                    rate,
                    statuses,
                    body: body.clone(),
                    headers: hdrs,
                    grpc_code,
                    grpc_message: grpc_message.clone(),
                    reset_after: reset_after.map(|b| b.0),
                })
            }
        };

        Ok(error)
    }

    /// Hangs: a rate, how long, and what follows (close, or a timeout answer on http).
    fn validate_hang(&self, protocol: Protocol) -> Result<Option<HangFault>, PolicyError> {
        let ChaosSpec {
            hang_rate,
            hang_for,
            hang_then,
            ..
        } = self;
        let is_tcp = protocol == Protocol::Tcp;
        let hang = match hang_rate {
            None if hang_for.is_some() || hang_then.is_some() => {
                let field = if hang_for.is_some() {
                    "hang_for"
                } else {
                    "hang_then"
                };
                return Err(PolicyError::new(field, "requires hang_rate"));
            }
            None => None,
            Some(r) => {
                if hang_then == &Some(HangThen::Timeout) && hang_for.is_none() {
                    return Err(PolicyError::new(
                        "hang_then",
                        "\"timeout\" requires hang_for (how long to hold before answering)",
                    ));
                }
                if is_tcp && hang_then == &Some(HangThen::Timeout) {
                    return Err(PolicyError::new(
                        "hang_then",
                        "\"timeout\" does not apply to a tcp edge (only close)",
                    ));
                }
                Some(HangFault {
                    rate: r.get(),
                    duration: hang_for.map(|d| d.0),
                    then: hang_then.unwrap_or_default(),
                })
            }
        };

        Ok(hang)
    }

    /// Partitions: the mode, the direction, and whether open connections are cut.
    fn validate_partition(&self) -> Result<Option<PartitionFault>, PolicyError> {
        let ChaosSpec {
            partition,
            direction,
            keep_connections,
            ..
        } = self;
        let mode = match partition {
            None | Some(PartitionSetting::Flag(false)) => None,
            Some(PartitionSetting::Flag(true)) => Some(PartitionMode::Blackhole),
            Some(PartitionSetting::Mode(m)) => Some(*m),
        };
        let partition = match mode {
            None => {
                if direction.is_some() {
                    return Err(PolicyError::new("direction", "requires partition"));
                }
                if keep_connections.is_some() {
                    return Err(PolicyError::new("keep_connections", "requires partition"));
                }
                None
            }
            Some(mode) => {
                let direction = direction.unwrap_or_default();
                if mode == PartitionMode::Reject && direction != Direction::Both {
                    return Err(PolicyError::new(
                        "direction",
                        "a one-way partition must be a blackhole: reject refuses connections both ways",
                    ));
                }
                Some(PartitionFault {
                    mode,
                    direction,
                    cut_existing: !keep_connections.unwrap_or(false),
                })
            }
        };

        Ok(partition)
    }

    /// Bandwidth: a rate per direction (bytes/s), shared by the edge or per connection.
    fn validate_bandwidth(&self) -> Result<Option<BandwidthFault>, PolicyError> {
        let ChaosSpec {
            bandwidth,
            bandwidth_upstream,
            bandwidth_downstream,
            bandwidth_per_connection,
            ..
        } = self;
        let up = bandwidth_upstream.or(*bandwidth).map(|r| r.0);
        let down = bandwidth_downstream.or(*bandwidth).map(|r| r.0);
        let bandwidth = if up.is_none() && down.is_none() {
            if bandwidth_per_connection.is_some() {
                return Err(PolicyError::new(
                    "bandwidth_per_connection",
                    "requires bandwidth",
                ));
            }
            None
        } else {
            for (field, v) in [("bandwidth_upstream", up), ("bandwidth_downstream", down)] {
                if v.is_some_and(|v| v > u32::MAX as u64) {
                    return Err(PolicyError::new(field, "must be at most 4GiB/s"));
                }
            }
            Some(BandwidthFault {
                upstream: up,
                downstream: down,
                per_connection: bandwidth_per_connection.unwrap_or(false),
            })
        };

        Ok(bandwidth)
    }

    /// The tcp-only stream faults: the slicer and the data limit.
    fn validate_tcp_extras(&self) -> Result<Option<Slicer>, PolicyError> {
        let ChaosSpec {
            slicer, limit_data, ..
        } = self;
        let slicer = match slicer {
            None => None,
            Some(s) => {
                if s.average_size.0 == 0 {
                    return Err(PolicyError::new(
                        "slicer.average_size",
                        "must be greater than zero",
                    ));
                }
                if s.size_variation.0 >= s.average_size.0 {
                    return Err(PolicyError::new(
                        "slicer.size_variation",
                        "must be less than average_size",
                    ));
                }
                Some(Slicer {
                    average_size: s.average_size.0,
                    size_variation: s.size_variation.0,
                    delay: s.delay.0,
                })
            }
        };
        if limit_data == &Some(ByteSize(0)) {
            return Err(PolicyError::new("limit_data", "must be greater than zero"));
        }

        Ok(slicer)
    }

    /// Which requests the faults apply to (http and grpc).
    fn validate_match(&self, protocol: Protocol) -> Result<Option<Match>, PolicyError> {
        let ChaosSpec { matcher, .. } = self;
        let matcher = match matcher {
            None => None,
            Some(m) => {
                if protocol == Protocol::Http
                    && (m.grpc_service.is_some() || m.grpc_method.is_some())
                {
                    return Err(PolicyError::new(
                        "match.grpc_service",
                        "does not apply to an http edge (only grpc)",
                    ));
                }
                for p in &m.path_prefixes {
                    if !p.starts_with('/') {
                        return Err(PolicyError::new(
                            "match.path_prefixes",
                            format!("{p:?} must start with /"),
                        ));
                    }
                }
                let mut hdrs = Vec::new();
                for (k, v) in &m.headers {
                    if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                        return Err(PolicyError::new(
                            "match.headers",
                            format!("invalid header name {k:?}"),
                        ));
                    }
                    hdrs.push((k.to_ascii_lowercase(), v.clone()));
                }
                for meth in &m.methods {
                    if http::Method::from_bytes(meth.as_bytes()).is_err() {
                        return Err(PolicyError::new(
                            "match.methods",
                            format!("invalid method {meth:?}"),
                        ));
                    }
                }
                Some(Match {
                    methods: m.methods.iter().map(|s| s.to_ascii_uppercase()).collect(),
                    path_prefixes: m.path_prefixes.clone(),
                    headers: hdrs,
                    grpc_service: m.grpc_service.clone(),
                    grpc_method: m.grpc_method.clone(),
                })
            }
        };

        Ok(matcher)
    }

    /// Check the spec as a whole and against the edge's protocol, and build the policy the data
    /// plane runs: one validator per fault kind, each naming the first offending field.
    pub fn validate(&self, protocol: Protocol) -> Result<ChaosPolicy, PolicyError> {
        // Destructure so that a new field cannot be forgotten here: each is either checked by a
        // validator below or carried over as is.
        let ChaosSpec {
            latency: _,
            jitter: _,
            distribution: _,
            latency_p99: _,
            latency_direction: _,
            error_rate: _,
            status: _,
            statuses: _,
            body: _,
            headers: _,
            grpc_code: _,
            grpc_message: _,
            reset_after: _,
            hang_rate: _,
            hang_for: _,
            hang_then: _,
            partition: _,
            direction: _,
            keep_connections: _,
            bandwidth: _,
            bandwidth_upstream: _,
            bandwidth_downstream: _,
            bandwidth_per_connection: _,
            slow_close,
            slicer: _,
            limit_data,
            matcher: _,
            seed,
            ttl,
        } = self;
        check_bounds(self)?;
        self.check_protocol(protocol)?;
        let latency = self.validate_latency()?;
        let error = self.validate_error()?;
        let hang = self.validate_hang(protocol)?;
        let partition = self.validate_partition()?;
        let bandwidth = self.validate_bandwidth()?;
        let slicer = self.validate_tcp_extras()?;
        let matcher = self.validate_match(protocol)?;
        if ttl.is_some_and(|t| t.0.is_zero()) {
            return Err(PolicyError::new("ttl", "must be greater than zero"));
        }

        Ok(ChaosPolicy {
            latency,
            error,
            hang,
            partition,
            bandwidth,
            slow_close: slow_close.map(|d| d.0),
            slicer,
            limit_data: limit_data.map(|b| b.0),
            matcher,
            seed: *seed,
            ttl: ttl.map(|d| d.0),
        })
    }
}

/// The longest `latency`, `jitter`, `latency_p99`, `hang_for`, `slow_close` and `slicer.delay`.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// The longest `ttl`.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// The largest `reset_after`, `limit_data`, `slicer.average_size` and `slicer.size_variation`.
pub const MAX_SIZE: u64 = 1 << 40;
/// Response headers an injected error may not set: rig frames the response itself, and these
/// would misframe it (or are hop-by-hop).
pub const FRAMING_HEADERS: [&str; 7] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
];

/// Reject durations and sizes beyond sane maxima, so no arithmetic on them in the data plane can
/// overflow (`--latency 18446744073709551615s` would otherwise panic every connection).
fn check_bounds(spec: &ChaosSpec) -> Result<(), PolicyError> {
    let durations = [
        ("latency", spec.latency, MAX_DURATION),
        ("jitter", spec.jitter, MAX_DURATION),
        ("latency_p99", spec.latency_p99, MAX_DURATION),
        ("hang_for", spec.hang_for, MAX_DURATION),
        ("slow_close", spec.slow_close, MAX_DURATION),
        (
            "slicer.delay",
            spec.slicer.as_ref().map(|s| s.delay),
            MAX_DURATION,
        ),
        ("ttl", spec.ttl, MAX_TTL),
    ];
    for (field, value, max) in durations {
        if value.is_some_and(|d| d.0 > max) {
            return Err(PolicyError::new(
                field,
                format!("must be at most {}", HumanDuration(max)),
            ));
        }
    }
    let sizes = [
        ("reset_after", spec.reset_after),
        ("limit_data", spec.limit_data),
        (
            "slicer.average_size",
            spec.slicer.as_ref().map(|s| s.average_size),
        ),
        (
            "slicer.size_variation",
            spec.slicer.as_ref().map(|s| s.size_variation),
        ),
    ];
    for (field, value) in sizes {
        if value.is_some_and(|b| b.0 > MAX_SIZE) {
            return Err(PolicyError::new(field, "must be at most 1TiB"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ChaosSpec, String> {
        toml::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn flat_keys_parse_and_validate() {
        let spec = parse(
            r#"
            latency = "50ms"
            jitter = "10ms"
            error_rate = 0.1
            status = 503
            headers = { "Retry-After" = "1" }
            bandwidth = "1MiB/s"
            seed = 42
            ttl = "30s"
            "#,
        )
        .unwrap();
        let p = spec.validate(Protocol::Http).unwrap();
        assert_eq!(
            p.latency.unwrap().delay,
            Delay::Uniform {
                base: Duration::from_millis(50),
                jitter: Duration::from_millis(10)
            }
        );
        let e = p.error.unwrap();
        assert_eq!(e.rate, 0.1);
        assert_eq!(e.statuses, vec![(503, 1)]);
        assert_eq!(e.headers, vec![("retry-after".into(), "1".into())]);
        assert_eq!(p.bandwidth.unwrap().upstream, Some(1024 * 1024));
        assert_eq!(p.seed, Some(42));
        assert_eq!(p.ttl, Some(Duration::from_secs(30)));
    }

    #[test]
    fn bad_values_fail_at_parse_with_the_key() {
        for (src, needle) in [
            ("error_rate = 1.5", "between 0 and 1"),
            ("latency = \"5xs\"", "invalid duration"),
            ("latency = \"-5ms\"", "negative"),
            ("status = 700", "between 100 and 599"),
            ("grpc_code = \"NOPE\"", "unknown variant"),
            ("bandwidth = \"0\"", "greater than zero"),
            ("latncy = \"5ms\"", "unknown field"),
        ] {
            let err = parse(src).unwrap_err();
            assert!(err.contains(needle), "{src}: {err}");
            assert!(err.contains("line 1"), "{src}: {err}");
        }
    }

    #[test]
    fn protocol_mismatch_names_the_field() {
        let spec = parse("status = 503").unwrap();
        let err = spec.validate(Protocol::Tcp).unwrap_err();
        assert_eq!(err.field, "status");
        let spec = parse("slicer = { average_size = 10 }").unwrap();
        assert_eq!(spec.validate(Protocol::Http).unwrap_err().field, "slicer");
        let spec = parse("grpc_code = \"OK\"").unwrap();
        assert_eq!(
            spec.validate(Protocol::Grpc).unwrap_err().field,
            "grpc_code"
        );
    }

    #[test]
    fn partition_forms() {
        let p = parse("partition = true")
            .unwrap()
            .validate(Protocol::Tcp)
            .unwrap();
        assert_eq!(
            p.partition.unwrap(),
            PartitionFault {
                mode: PartitionMode::Blackhole,
                direction: Direction::Both,
                cut_existing: true
            }
        );
        let p =
            parse("partition = \"blackhole\"\ndirection = \"upstream\"\nkeep_connections = true")
                .unwrap()
                .validate(Protocol::Http)
                .unwrap();
        assert_eq!(p.partition.unwrap().direction, Direction::Upstream);
        assert!(!p.partition.unwrap().cut_existing);
        let err = parse("partition = \"reject\"\ndirection = \"upstream\"")
            .unwrap()
            .validate(Protocol::Tcp)
            .unwrap_err();
        assert_eq!(err.field, "direction");
    }

    #[test]
    fn values_round_trip_through_strings() {
        for s in ["50ms", "1s", "250us", "2m"] {
            let d: HumanDuration = s.parse().unwrap();
            let again: HumanDuration = d.to_string().parse().unwrap();
            assert_eq!(d, again);
        }
        assert_eq!(
            "1.5s".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(1500)
        );
        assert_eq!("1MiB/s".parse::<ByteRate>().unwrap().0, 1 << 20);
        assert_eq!("8Mbit/s".parse::<ByteRate>().unwrap().0, 1_000_000);
        assert_eq!("64KiB".parse::<ByteSize>().unwrap().0, 65536);
        assert_eq!(
            "unavailable".parse::<GrpcCode>().unwrap(),
            GrpcCode::Unavailable
        );
        assert_eq!(GrpcCode::from_code(4), GrpcCode::DeadlineExceeded);
        assert_eq!(GrpcCode::from_code(99), GrpcCode::Unknown);
    }

    #[test]
    fn merge_overlays_fields() {
        let base = parse("latency = \"50ms\"\nerror_rate = 0.5").unwrap();
        let over = parse("error_rate = 0.1\nstatus = 500").unwrap();
        let m = base.merged_with(&over);
        assert_eq!(m.latency, base.latency);
        assert_eq!(m.error_rate, over.error_rate);
        assert_eq!(m.status, over.status);
    }

    #[test]
    fn grpc_match() {
        let m = Match {
            grpc_service: Some("demo.v1.Catalog".into()),
            grpc_method: Some("GetItem".into()),
            ..Default::default()
        };
        assert!(m.matches("POST", "/demo.v1.Catalog/GetItem", |_| None));
        assert!(!m.matches("POST", "/demo.v1.Catalog/List", |_| None));
        assert!(!m.matches("POST", "/grpc.health.v1.Health/Check", |_| None));
    }

    #[test]
    fn empty_spec_is_passthrough() {
        let p = ChaosSpec::default().validate(Protocol::Tcp).unwrap();
        assert!(p.is_passthrough());
    }

    #[test]
    fn durations_and_sizes_are_bounded_and_name_the_field() {
        let cases = [
            (
                "latency = \"18446744073709551615s\"",
                Protocol::Http,
                "latency",
            ),
            (
                "latency = \"1s\"\njitter = \"2h\"",
                Protocol::Http,
                "jitter",
            ),
            (
                "latency = \"1s\"\ndistribution = \"lognormal\"\nlatency_p99 = \"2h\"",
                Protocol::Http,
                "latency_p99",
            ),
            (
                "hang_rate = 1.0\nhang_for = \"61m\"",
                Protocol::Http,
                "hang_for",
            ),
            ("slow_close = \"2h\"", Protocol::Tcp, "slow_close"),
            (
                "slicer = { average_size = 10, delay = \"2h\" }",
                Protocol::Tcp,
                "slicer.delay",
            ),
            ("ttl = \"25h\"", Protocol::Http, "ttl"),
            ("limit_data = \"2000GiB\"", Protocol::Tcp, "limit_data"),
            ("reset_after = \"2000GiB\"", Protocol::Tcp, "reset_after"),
        ];
        for (toml, proto, field) in cases {
            let err = parse(toml).unwrap().validate(proto).unwrap_err();
            assert_eq!(err.field, field, "{toml}");
            assert!(err.message.contains("at most"), "{err}");
        }
        assert!(
            parse("latency = \"1h\"\nttl = \"24h\"")
                .unwrap()
                .validate(Protocol::Http)
                .is_ok()
        );
    }

    #[test]
    fn framing_headers_are_refused() {
        for h in [
            "Content-Length",
            "transfer-encoding",
            "Connection",
            "Keep-Alive",
            "Upgrade",
            "TE",
            "Trailer",
        ] {
            let spec = parse(&format!("status = 503\nheaders = {{ {h:?} = \"1\" }}")).unwrap();
            let err = spec.validate(Protocol::Http).unwrap_err();
            assert_eq!(err.field, "headers", "{h}");
        }
        let ok = parse("status = 503\nheaders = { \"Retry-After\" = \"1\" }").unwrap();
        assert!(ok.validate(Protocol::Http).is_ok());
    }

    #[test]
    fn huge_decimal_durations_fail_without_panicking() {
        assert!(
            "99999999999999999999999.5s"
                .parse::<HumanDuration>()
                .is_err()
        );
        assert_eq!(
            "1.5s".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(1500)
        );
    }
}
