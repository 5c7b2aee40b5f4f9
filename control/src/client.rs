//! Connecting to rigd: the address users write, the bearer token, and one channel shared by the
//! three `rig.v1` service clients.
//!
//! The connection is made eagerly so "nothing listens there" is known before any request is
//! built: `rigctl up` uses that to decide whether to start a daemon itself.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use rig_proto::v1 as pb;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// rigd's default gRPC address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7447";

/// How long a TCP connect to rigd may take; rigd is local, so this only guards against a
/// firewall silently dropping packets.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What can go wrong reaching rigd. The messages are shown to users as they are, so they say
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid rigd address {input:?}: {reason}")]
    BadAddress { input: String, reason: String },
    #[error(
        "cannot connect to rigd at {addr}: connection refused (is rigd running? start one with `rigctl up` or `rigd`)"
    )]
    NoDaemon { addr: DaemonAddr },
    #[error("cannot reach rigd at {addr}: {cause}")]
    Connect { addr: DaemonAddr, cause: String },
    #[error("cannot resolve rigd address {addr}: {cause}")]
    Resolve { addr: DaemonAddr, cause: String },
    #[error("the token cannot be sent as a header (only visible ASCII is allowed)")]
    BadToken,
}

/// Where rigd listens, as users write it: `host:port` or `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonAddr {
    host: String,
    port: u16,
}

impl DaemonAddr {
    /// The host part, without brackets for IPv6 literals.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://host:port`, the base of the gRPC and `/metrics` URLs.
    pub fn http_base(&self) -> String {
        format!("http://{self}")
    }

    /// The socket address without a name lookup: an IP address, or `localhost` as 127.0.0.1.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip = match self.host.as_str() {
            "localhost" => std::net::IpAddr::from([127, 0, 0, 1]),
            h => h.parse().ok()?,
        };
        Some(SocketAddr::new(ip, self.port))
    }

    /// The socket address to listen on or connect to, resolving a host name if needed.
    pub async fn resolve(&self) -> Result<SocketAddr, ClientError> {
        let mut addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| ClientError::Resolve {
                addr: self.clone(),
                cause: e.to_string(),
            })?;
        addrs.next().ok_or_else(|| ClientError::Resolve {
            addr: self.clone(),
            cause: "no addresses".to_string(),
        })
    }
}

impl From<SocketAddr> for DaemonAddr {
    fn from(a: SocketAddr) -> Self {
        DaemonAddr {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl fmt::Display for DaemonAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for DaemonAddr {
    type Err = ClientError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ClientError::BadAddress {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = input.trim();
        let rest = match trimmed.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "unsupported scheme {scheme:?} (rigd speaks plain http)"
                )));
            }
            None => trimmed,
        };
        // A trailing slash is what people paste from a browser; any other path is a mistake.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(bad("expected host:port without a path"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed '[' in IPv6 address"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| bad("expected host:port"))?;
            (host, port)
        } else {
            rest.rsplit_once(':')
                .ok_or_else(|| bad("expected host:port"))?
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| bad(&format!("invalid port {port:?}")))?;
        Ok(DaemonAddr {
            host: host.to_string(),
            port,
        })
    }
}

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Clone, Default)]
pub struct BearerAuth {
    header: Option<MetadataValue<Ascii>>,
}

impl BearerAuth {
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        let header = token
            .map(|t| {
                MetadataValue::try_from(format!("Bearer {t}")).map_err(|_| ClientError::BadToken)
            })
            .transpose()?;
        Ok(BearerAuth { header })
    }
}

// The token must never reach a log line.
impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerAuth")
            .field("token", &self.header.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// The transport every client shares.
pub type Transport = InterceptedService<Channel, BearerAuth>;
pub type EnvironmentsClient = pb::environments_client::EnvironmentsClient<Transport>;
pub type ChaosClient = pb::chaos_client::ChaosClient<Transport>;
pub type EventsClient = pb::events_client::EventsClient<Transport>;

/// A connection to rigd. Cloning is cheap and shares the connection.
#[derive(Debug, Clone)]
pub struct Client {
    addr: DaemonAddr,
    channel: Channel,
    auth: BearerAuth,
}

impl Client {
    /// Connect now; [`ClientError::NoDaemon`] when nothing listens at `addr`.
    pub async fn connect(addr: &DaemonAddr, token: Option<&str>) -> Result<Client, ClientError> {
        let auth = BearerAuth::new(token)?;
        let endpoint =
            Endpoint::from_shared(addr.http_base()).map_err(|e| ClientError::BadAddress {
                input: addr.to_string(),
                reason: error_chain(&e),
            })?;
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| {
                if is_connection_refused(&e) {
                    ClientError::NoDaemon { addr: addr.clone() }
                } else {
                    ClientError::Connect {
                        addr: addr.clone(),
                        cause: root_cause(&e),
                    }
                }
            })?;
        Ok(Client {
            addr: addr.clone(),
            channel,
            auth,
        })
    }

    /// The address this client talks to.
    pub fn addr(&self) -> &DaemonAddr {
        &self.addr
    }

    fn transport(&self) -> Transport {
        InterceptedService::new(self.channel.clone(), self.auth.clone())
    }

    pub fn environments(&self) -> EnvironmentsClient {
        pb::environments_client::EnvironmentsClient::new(self.transport())
    }

    pub fn chaos(&self) -> ChaosClient {
        pb::chaos_client::ChaosClient::new(self.transport())
    }

    pub fn events(&self) -> EventsClient {
        pb::events_client::EventsClient::new(self.transport())
    }

    /// A failed call as a sentence for users. rigd's own messages are already written for
    /// humans; only transport failures and auth get rewritten.
    pub fn describe(&self, status: &tonic::Status) -> String {
        describe_status(status, &self.addr)
    }
}

/// A failed call as a sentence for users; see [`Client::describe`].
pub fn describe_status(status: &tonic::Status, addr: &DaemonAddr) -> String {
    use std::error::Error as _;
    match status.code() {
        tonic::Code::Unauthenticated => "rigd refused the token (set RIG_TOKEN)".to_string(),
        // Statuses rigd sends itself carry no source; one made from a transport error does.
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            if status.source().is_some() =>
        {
            let cause = status.source().map(root_cause).unwrap_or_default();
            if cause_is_refused(status) {
                ClientError::NoDaemon { addr: addr.clone() }.to_string()
            } else {
                format!("lost the connection to rigd at {addr}: {cause}")
            }
        }
        // An answer that was HTTP but not gRPC: something else listens there.
        _ if let Some(http) = non_grpc_answer(status.message()) => {
            let http = http.map(|h| format!(" HTTP {h}")).unwrap_or_default();
            format!(
                "the server at {addr} answered{http}, not as rigd does: is --addr (or RIG_ADDR) rigd's address?"
            )
        }
        _ if status.message().is_empty() => format!("rigd answered {}", status.code()),
        _ => status.message().to_string(),
    }
}

/// tonic's words for a response that was not gRPC ("grpc-status header missing, mapped from
/// HTTP status code 404", "protocol error: … while receiving response with status: 404 Not
/// Found"): `Some` with the HTTP status when it says one.
fn non_grpc_answer(message: &str) -> Option<Option<String>> {
    if let Some(rest) = message.strip_prefix("grpc-status header missing") {
        let code = rest.rsplit(' ').next().filter(|c| c.parse::<u16>().is_ok());
        return Some(code.map(str::to_string));
    }
    let (_, status) = message.split_once("while receiving response with status: ")?;
    let status = status.trim();
    Some((!status.is_empty()).then(|| status.to_string()))
}

fn cause_is_refused(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        cur = e.source();
    }
    false
}

fn is_connection_refused(err: &tonic::transport::Error) -> bool {
    cause_is_refused(err)
}

/// What failed, in words: the transport's wrappers ("transport error", "client error
/// (Connect)", "tcp connect error") are library jargon that tells users nothing, so an I/O
/// error in the chain is named by its kind ("connection refused"), else the innermost message
/// is shown without its "(os error N)".
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    use std::io::ErrorKind;
    let mut cur = err;
    loop {
        if let Some(io) = cur.downcast_ref::<std::io::Error>() {
            let words = match io.kind() {
                ErrorKind::ConnectionRefused => Some("connection refused"),
                ErrorKind::ConnectionReset => Some("connection reset"),
                ErrorKind::ConnectionAborted => Some("connection aborted"),
                ErrorKind::TimedOut => Some("timed out"),
                ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof => Some("connection closed"),
                ErrorKind::AddrNotAvailable => Some("address not available"),
                ErrorKind::HostUnreachable => Some("host unreachable"),
                ErrorKind::NetworkUnreachable => Some("network unreachable"),
                _ => None,
            };
            if let Some(w) = words {
                return w.to_string();
            }
        }
        match cur.source() {
            Some(next) => cur = next,
            None => break,
        }
    }
    let msg = cur.to_string();
    match msg.find(" (os error ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    }
}

/// `outer: inner: innermost`, skipping links that repeat the previous message.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let msg = e.to_string();
        if parts.last().is_none_or(|last| !last.contains(&msg)) {
            parts.push(msg);
        }
        cur = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_in_both_spellings() {
        let a: DaemonAddr = "127.0.0.1:7447".parse().unwrap();
        assert_eq!(a.to_string(), "127.0.0.1:7447");
        let b: DaemonAddr = "http://localhost:9000/".parse().unwrap();
        assert_eq!((b.host(), b.port()), ("localhost", 9000));
        assert_eq!(b.http_base(), "http://localhost:9000");
        let c: DaemonAddr = "[::1]:7447".parse().unwrap();
        assert_eq!(c.host(), "::1");
        assert_eq!(c.to_string(), "[::1]:7447");
        for bad in [
            "7447",
            "https://x:1",
            "x:port",
            ":1",
            "http://x:1/api",
            "x:70000",
        ] {
            assert!(
                bad.parse::<DaemonAddr>().is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn the_token_goes_in_the_authorization_header() {
        let mut auth = BearerAuth::new(Some("s3cret")).unwrap();
        let req = auth.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        assert!(!format!("{auth:?}").contains("s3cret"));
        let mut none = BearerAuth::new(None).unwrap();
        let req = none.call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
        assert!(matches!(
            BearerAuth::new(Some("bad\ntoken")),
            Err(ClientError::BadToken)
        ));
    }

    #[tokio::test]
    async fn nothing_listening_is_no_daemon() {
        // Bind then drop: the port is free and nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr: DaemonAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let err = Client::connect(&addr, None).await.unwrap_err();
        assert!(matches!(err, ClientError::NoDaemon { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot connect to rigd at 127.0.0.1:{port}: connection refused (is rigd running? start one with `rigctl up` or `rigd`)"
            )
        );
    }

    #[test]
    fn rigd_messages_pass_through_and_auth_is_explained() {
        let addr: DaemonAddr = "127.0.0.1:1".parse().unwrap();
        let s = tonic::Status::invalid_argument("latency: invalid duration \"5xs\"");
        assert_eq!(
            describe_status(&s, &addr),
            "latency: invalid duration \"5xs\""
        );
        for (tonic_says, http) in [
            (
                "grpc-status header missing, mapped from HTTP status code 404",
                "404",
            ),
            (
                "protocol error: received message with invalid compression flag: 110 (valid flags are 0 and 1) while receiving response with status: 404 Not Found",
                "404 Not Found",
            ),
        ] {
            assert_eq!(
                describe_status(&tonic::Status::internal(tonic_says), &addr),
                format!(
                    "the server at 127.0.0.1:1 answered HTTP {http}, not as rigd does: is --addr (or RIG_ADDR) rigd's address?"
                )
            );
        }
        let s = tonic::Status::unauthenticated("bad token");
        assert_eq!(
            describe_status(&s, &addr),
            "rigd refused the token (set RIG_TOKEN)"
        );
    }
}
