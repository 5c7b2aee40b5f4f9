//! http and gRPC upstreams (owned by the http data-plane work), the clients that talk to them,
//! and edge proxies in front of them.
//!
//! [`HttpUpstream`] is a hyper server on `127.0.0.1:0` speaking HTTP/1.1 and h2c, with routes
//! for tests:
//!
//! | route | answer |
//! |---|---|
//! | `/echo…` | 200, the request body streamed back; `x-echo-method`, `x-echo-path` (with query), `x-echo-version`, `x-echo-host` |
//! | `/headers` | 200, the request headers as a JSON object (values of repeated names joined by `, `) |
//! | `/status/{code}` | that status, body `status {code}` |
//! | `/bytes/{n}?chunk=K&delay_ms=D` | `n` bytes (byte `i` is `i % 251`) in chunks of `K` (default 16 KiB), `D` ms apart |
//! | `/sleep/{ms}` | 200 `slept` after `ms` milliseconds |
//! | `/trailers` | 200 `hello` with trailer `x-checksum: 42` |
//! | `/crash?after=N` | announces `2N` bytes, sends `N`, then breaks the connection |
//! | `/drop` | closes the connection without an answer |
//! | anything else | 404 |
//!
//! [`GrpcUpstream`] serves the standard `grpc.health.v1.Health` service (tonic-health), so no
//! proto needs compiling; [`health_client`] is the real gRPC client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rig_proxy::events::EdgeInfo;
use rig_proxy::{ChaosSpec, Edge, EdgeConfig, EventKind, EventSender, Protocol, ProxyEvent};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type UpBody = BoxBody<Bytes, BoxError>;

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// Path and query.
    pub path: String,
    pub version: Version,
    pub headers: HeaderMap,
}

#[derive(Default)]
struct State {
    requests: AtomicU64,
    connections: AtomicU64,
    seen: Mutex<Vec<Seen>>,
}

/// A real HTTP/1.1 + h2c server on `127.0.0.1:0`. Stops when dropped.
pub struct HttpUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl HttpUpstream {
    pub async fn start() -> anyhow::Result<HttpUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let builder = builder.clone();
                // Owned by the JoinSet so that dropping the upstream ends its connections too.
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| route(st.clone(), req));
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(HttpUpstream { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests received so far (counted when their head arrives).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Every request received so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn query_param(query: Option<&str>, key: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// Byte `i` of a `/bytes` body.
pub fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// The error of the routes that break on purpose.
#[derive(Debug)]
struct Crash;

impl std::fmt::Display for Crash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream crashed on purpose")
    }
}

impl std::error::Error for Crash {}

async fn route(st: Arc<State>, req: Request<Incoming>) -> Result<Response<UpBody>, Crash> {
    st.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    st.seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Seen {
            method: req.method().clone(),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            version: req.version(),
            headers: req.headers().clone(),
        });
    let reply = |status: StatusCode, body: UpBody| {
        let mut r = Response::new(body);
        *r.status_mut() = status;
        Ok(r)
    };
    if path.starts_with("/echo") {
        let (parts, body) = req.into_parts();
        let host = parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let path_q = parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default();
        let mut resp = Response::new(body.map_err(BoxError::from).boxed());
        let h = resp.headers_mut();
        for (k, v) in [
            ("x-echo-method", parts.method.to_string()),
            ("x-echo-path", path_q),
            ("x-echo-version", format!("{:?}", parts.version)),
            ("x-echo-host", host),
        ] {
            if let Ok(v) = v.parse() {
                h.insert(k, v);
            }
        }
        if let Some(len) = parts.headers.get(http::header::CONTENT_LENGTH) {
            h.insert(http::header::CONTENT_LENGTH, len.clone());
        }
        return Ok(resp);
    }
    if path == "/headers" {
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in req.headers() {
            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
            map.entry(k.as_str().to_owned())
                .and_modify(|e| {
                    e.push_str(", ");
                    e.push_str(&v);
                })
                .or_insert(v);
        }
        let json = serde_json::to_vec(&map).unwrap_or_default();
        return reply(StatusCode::OK, full(json));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        return reply(status, full(format!("status {code}")));
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0);
        let chunk = query_param(query.as_deref(), "chunk")
            .unwrap_or(16 * 1024)
            .max(1) as usize;
        let delay = Duration::from_millis(query_param(query.as_deref(), "delay_ms").unwrap_or(0));
        let data = pattern(n);
        let stream = futures_util::stream::iter(
            (0..n)
                .step_by(chunk)
                .map(move |at| data.slice(at..(at + chunk).min(n))),
        )
        .then(move |b| async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<_, BoxError>(Frame::data(b))
        });
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, n.into());
        return Ok(resp);
    }
    if let Some(ms) = path.strip_prefix("/sleep/") {
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return reply(StatusCode::OK, full("slept"));
    }
    if path == "/trailers" {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("42"));
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
            frames,
        ))));
        resp.headers_mut().insert(
            http::header::TRAILER,
            http::HeaderValue::from_static("x-checksum"),
        );
        return Ok(resp);
    }
    if path == "/crash" {
        let after = query_param(query.as_deref(), "after").unwrap_or(1024) as usize;
        let body = CrashBody {
            data: Some(pattern(after)),
            flushed: false,
        };
        let mut resp = Response::new(body.boxed());
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, (2 * after).into());
        return Ok(resp);
    }
    if path == "/drop" {
        return Err(Crash);
    }
    reply(StatusCode::NOT_FOUND, full("not found"))
}

/// Sends its data, then fails: hyper then breaks the connection mid-response.
struct CrashBody {
    data: Option<Bytes>,
    /// Pending once between the data and the failure, so hyper flushes the data first.
    flushed: bool,
}

impl Body for CrashBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if !self.flushed {
            self.flushed = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Some(Err(Box::new(Crash))))
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------------------------

/// A tonic server on `127.0.0.1:0` serving `grpc.health.v1.Health`. Stops when dropped.
pub struct GrpcUpstream {
    addr: SocketAddr,
    reporter: HealthReporter,
    calls: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl GrpcUpstream {
    pub async fn start() -> anyhow::Result<GrpcUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let reporter = HealthReporter::new();
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        let svc = HealthServer::with_interceptor(
            HealthService::from_health_reporter(reporter.clone()),
            move |req: tonic::Request<()>| {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(req)
            },
        );
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(GrpcUpstream {
            addr,
            reporter,
            calls,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Calls that reached the service.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Report `service` ("" is the whole server) as serving or not; watchers are told.
    pub async fn set_serving(&self, service: &str, serving: bool) {
        use tonic_health::ServingStatus;
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(service, status).await;
    }
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A tonic Health client connected to `addr` (an edge or the upstream itself).
pub async fn health_client(addr: SocketAddr) -> anyhow::Result<HealthClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(HealthClient::new(channel))
}

// ---------------------------------------------------------------------------------------------
// http clients
// ---------------------------------------------------------------------------------------------

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A hyper-util legacy client speaking HTTP/1.1 with keep-alive.
pub fn http1_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A hyper-util legacy client speaking HTTP/2 cleartext (prior knowledge).
pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    /// A header as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// Send a request and read the whole answer.
pub async fn send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> anyhow::Result<Reply> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into()))?;
    let resp = client.request(req).await?;
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// `GET url`.
pub async fn get(client: &HttpClient, url: &str) -> anyhow::Result<Reply> {
    send(client, Method::GET, url, &[], Bytes::new()).await
}

// ---------------------------------------------------------------------------------------------
// edges, chaos, events, metrics
// ---------------------------------------------------------------------------------------------

/// A chaos spec from a TOML snippet (`error_rate = 1.0`), as users write it.
pub fn chaos(toml_src: &str) -> ChaosSpec {
    match toml::from_str(toml_src) {
        Ok(spec) => spec,
        Err(e) => panic!("bad chaos spec in test: {e}"),
    }
}

/// An edge `source/api` of `protocol` on `127.0.0.1:0` in front of `target`.
pub async fn edge(
    source: &str,
    protocol: Protocol,
    target: SocketAddr,
    spec: ChaosSpec,
    events: EventSender,
) -> anyhow::Result<Edge> {
    let config = EdgeConfig {
        info: EdgeInfo::standalone(source, "api", protocol),
        target,
        chaos: spec,
    };
    Ok(Edge::bind(config, "127.0.0.1:0".parse()?, events).await?)
}

/// An edge `client/api` in front of `target`, with a subscriber to its events.
pub async fn observed_edge(
    protocol: Protocol,
    target: SocketAddr,
    spec: ChaosSpec,
) -> anyhow::Result<(
    Edge,
    tokio::sync::broadcast::Receiver<std::sync::Arc<rig_proxy::ProxyEvent>>,
)> {
    let events = EventSender::new(1024);
    let rx = events.subscribe();
    Ok((edge("client", protocol, target, spec, events).await?, rx))
}

/// An http edge `client/api` in front of `target`.
pub async fn http_edge(target: SocketAddr, spec: ChaosSpec) -> anyhow::Result<Edge> {
    edge(
        "client",
        Protocol::Http,
        target,
        spec,
        EventSender::new(1024),
    )
    .await
}

/// A grpc edge `client/api` in front of `target`.
pub async fn grpc_edge(target: SocketAddr, spec: ChaosSpec) -> anyhow::Result<Edge> {
    edge(
        "client",
        Protocol::Grpc,
        target,
        spec,
        EventSender::new(1024),
    )
    .await
}

/// `http://EDGE{path}`.
pub fn edge_url(edge: &Edge, path: &str) -> String {
    format!("http://{}{path}", edge.local_addr())
}

/// An address nothing listens on (bound, then released).
pub async fn unused_addr() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?)
}

/// Wait up to `timeout` for an event `f` picks, skipping others.
pub async fn wait_event<T>(
    rx: &mut broadcast::Receiver<Arc<ProxyEvent>>,
    timeout: Duration,
    mut f: impl FnMut(&EventKind) -> Option<T>,
) -> anyhow::Result<T> {
    let found = tokio::time::timeout(timeout, async {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    if let Some(v) = f(&ev.kind) {
                        return Ok(v);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => anyhow::bail!("event channel closed"),
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| anyhow::bail!("no matching event within {timeout:?}"))
}

/// The process-wide Prometheus recorder, installed on first use. Install it before creating
/// the edges whose metrics a test reads, and give those edges a unique name: tests of one file
/// share the recorder under `cargo test`.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| match PrometheusBuilder::new().install_recorder() {
        Ok(h) => h,
        Err(e) => panic!("cannot install the prometheus recorder: {e}"),
    })
}

/// Drain a body to its end, counting bytes; fails like the body does.
pub async fn drain(mut body: Incoming) -> anyhow::Result<u64> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}
