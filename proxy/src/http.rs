//! The http and grpc edge: a reverse proxy on hyper.
//!
//! Downstream, hyper-util's `auto` server speaks HTTP/1.1 (keep-alive) and HTTP/2 cleartext
//! (prior knowledge) on the same port. Upstream, HTTP/1 requests go out over HTTP/1.1 on an
//! upstream connection kept by their downstream connection (`upstream`); HTTP/2 requests (and
//! everything on a grpc edge) go over h2c through a hyper-util pooled client built once per
//! edge. Bodies stream both ways frame by frame, trailers included.
//!
//! Per request, in this order and only for requests the policy's `match` selects:
//! partition (`reject` answers at once, `blackhole` holds), hang, error, latency, then bandwidth
//! on the body frames (`body::Throttle`). A request held by a blackhole or a hang is released
//! when the policy changes and is then handled under the new policy; a latency delay released
//! early simply forwards. Throttled bodies follow policy changes as they stream. A new
//! partition that cuts existing connections (the default, unless `keep_connections` or a
//! `match` scopes it) drops every open downstream connection with whatever is in flight, as a
//! network cut would. Every response rig makes up comes from `respond`, which marks it with
//! [`crate::INJECTED_HEADER`].
//!
//! Events: `request.started` on arrival; `request.completed` when the response body ends
//! (injected error answers included, with their faults); `request.failed` when no proper
//! answer could be given: the target was unreachable or failed (the client still gets a 502 /
//! UNAVAILABLE from rig), a hang closed the connection, the response body broke, or the client
//! went away first. `rig_edge_requests_total` counts every request whose response head reached
//! the client, by HTTP status or gRPC code name.
//!
//! Bounds ([`HttpLimits`], defaults in the constants below), each with its own outcome:
//! - a request head must arrive within [`HEADER_READ_TIMEOUT`] (hyper closes the connection;
//!   on HTTP/1 this also closes a keep-alive connection idle for that long);
//! - a request body that sends nothing for [`BODY_IDLE_TIMEOUT`] before the target answers is
//!   cut (after that, a quiet request stream is the conversation's, e.g. a gRPC bidi call): the
//!   upstream request is aborted and the client gets 408 with `connection: close`
//!   (`x-rig-injected: request=body_timeout`); a malformed body gets 400
//!   (`request=invalid`). Both are the client's: `rig_edge_client_errors_total{reason}`, never
//!   `rig_edge_upstream_errors_total`;
//! - rig out of file descriptors when dialling the target answers 503 (`rig=fd_limit`),
//!   counted in `rig_edge_connections_refused_total{reason="fd_limit"}` and logged (warn, at
//!   most every 5 s), not blamed on the target;
//! - idle upstream connections close after [`POOL_IDLE`]; at most [`IDLE_POOL_CAPACITY`] left
//!   by closed client connections are kept per edge, the oldest closed when full
//!   (`rig_edge_upstream_idle_closed_total{reason}`).

mod body;
mod grpc;
mod respond;
mod upstream;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, warn};

use crate::context::{EdgeCtx, hold};
use crate::events::{ConnectionInfo, EventKind, FaultKind};
use crate::policy::{ChaosPolicy, HangThen, PartitionMode};
use crate::snapshot::Active;

use body::{ClientBody, ConnLimiters, Dir, DownBody, Obs, Throttle, UpBody};
use respond::Rescue;
use upstream::{H1Upstream, Kept, UpstreamError};

/// How long open connections may finish their requests once the edge stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for a TCP connection to the target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request head: hyper's own default, stated here so it
/// is one field with the others.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request body may send nothing before rig gives up on it (408). Half of nginx's
/// `client_body_timeout` (60 s) and the same as the header read timeout: on a local
/// environment a client that sends nothing for 30 s mid-body is stuck, not slow, and each
/// such request holds a connection to the target.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle upstream connections are closed after this long (hyper-util's pool default).
pub const POOL_IDLE: Duration = Duration::from_secs(90);
/// At most this many idle upstream HTTP/1 connections are kept per edge for new downstream
/// connections; when it is full the oldest one is closed.
pub const IDLE_POOL_CAPACITY: usize = 256;

/// The time and size limits of an http / grpc edge. [`Default`] is the constants above; tests
/// lower them with [`crate::Edge::start_with`].
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// How long a client may take to send a request head before hyper closes the connection.
    pub header_read_timeout: Duration,
    /// How long a request body may send nothing before the target has answered: then the
    /// client gets 408 (and `connection: close`) and the upstream request is aborted.
    pub body_idle_timeout: Duration,
    /// How long an upstream connection may stay idle before it is closed.
    pub pool_idle_timeout: Duration,
    /// How many idle upstream HTTP/1 connections left by closed downstream connections are kept.
    pub idle_pool_capacity: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            body_idle_timeout: BODY_IDLE_TIMEOUT,
            pool_idle_timeout: POOL_IDLE,
            idle_pool_capacity: IDLE_POOL_CAPACITY,
        }
    }
}

type UpstreamClient = Client<HttpConnector, UpBody>;

/// The state shared by every connection of one http / grpc edge.
pub(crate) struct Proxy {
    ctx: Arc<EdgeCtx>,
    grpc: bool,
    h1: H1Upstream,
    h2: UpstreamClient,
    authority: Authority,
    /// `Host` for HTTP/1 requests that come without one, as hyper-util's client sets it.
    host: http::HeaderValue,
    /// `{"error":"injected by rig","edge":...}`, built once.
    default_error_body: bytes::Bytes,
    limits: HttpLimits,
}

/// Why rig closes a connection instead of answering (the service's error: hyper then closes the
/// HTTP/1 connection or resets the HTTP/2 stream).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Closed(&'static str);

/// What the fault phase decided for one request.
enum Decision {
    Forward(Plan),
    Respond(Rescue),
    Close(&'static str),
    /// A hold was released by a policy change: decide again under the new policy.
    Released,
}

/// How to forward a request that faults let through.
#[derive(Default)]
struct Plan {
    up: Option<Box<Throttle>>,
    down: Option<Box<Throttle>>,
    /// Downstream blackhole: hold the response of this policy version.
    hold_response: Option<u64>,
}

pub(crate) async fn serve(listener: TcpListener, ctx: Arc<EdgeCtx>, limits: HttpLimits) {
    let proxy = Arc::new(Proxy::new(ctx.clone(), limits));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let mut reserve = crate::limits::Reserve::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e)
                if crate::limits::is_fd_exhausted(&e)
                    && crate::limits::shed(
                        &listener,
                        &ctx.info.edge,
                        &ctx.metrics,
                        &mut reserve,
                    ) =>
            {
                continue;
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(edge = %ctx.info.edge, error = %e, "accept failed");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(edge = %ctx.info.edge, error = %e, "cannot set TCP_NODELAY");
        }
        let id = ctx.next_id();
        let span = ctx.connection_span(id, peer);
        ctx.tracker.spawn(
            serve_connection(proxy.clone(), builder.clone(), stream, id, peer).instrument(span),
        );
    }
    debug!(edge = %ctx.info.edge, "http edge stopped accepting");
}

/// Per downstream connection.
struct ConnState {
    id: u64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    limiters: Arc<ConnLimiters>,
    /// The upstream HTTP/1 connection this connection's requests go out on.
    upstream: Kept,
}

async fn serve_connection(
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    id: u64,
    peer: SocketAddr,
) {
    let ctx = proxy.ctx.clone();
    let conn = Arc::new(ConnState {
        id,
        bytes_up: AtomicU64::new(0),
        bytes_down: AtomicU64::new(0),
        limiters: Arc::default(),
        upstream: Kept::default(),
    });
    let opened = Instant::now();
    ctx.metrics.connection_opened();
    if ctx.events.has_subscribers() {
        ctx.events.send(
            &ctx.info,
            EventKind::ConnectionOpened(conn_info(&conn, peer, None, Vec::new(), None)),
        );
    }
    let io = TokioIo::new(CountingIo {
        inner: stream,
        conn: conn.clone(),
    });
    let svc = {
        let proxy = proxy.clone();
        let conn = conn.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let conn = conn.clone();
            let (id, span) = request_span(&proxy.ctx, &req);
            async move { proxy.handle(conn, req, id).await }.instrument(span)
        })
    };
    // Boxed rather than pinned on the stack so it can be dropped before the upstream
    // connection is released.
    let mut http = Box::pin(builder.serve_connection(io, svc));
    let mut policy = ctx.cell.subscribe();
    policy.borrow_and_update();
    let mut watching = true;
    let mut faults = Vec::new();
    // Set once the edge stops: the connection gets this long to finish what is in flight.
    let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let result: Result<(), String> = loop {
        tokio::select! {
            // Fixed order: the connection itself is what wakes this task nearly every time.
            // The upstream connection comes right after it, so a request the service has just
            // handed to it goes out in the same pass.
            biased;
            r = http.as_mut() => break r.map_err(|e| e.to_string()),
            () = std::future::poll_fn(|cx| conn.upstream.poll_conn(cx)) => {}
            _ = ctx.shutdown.cancelled(), if grace.is_none() => {
                http.as_mut().graceful_shutdown();
                grace = Some(Box::pin(tokio::time::sleep(SHUTDOWN_GRACE)));
            }
            () = async { if let Some(g) = grace.as_mut() { g.await } }, if grace.is_some() => {
                break Err("closed by edge shutdown".to_owned());
            }
            changed = policy.changed(), if watching && grace.is_none() => {
                if changed.is_err() {
                    watching = false;
                    continue;
                }
                // A partition that cuts existing connections acts like a network cut: drop the
                // connection with whatever is in flight. One scoped by `match` only concerns
                // some requests, so it leaves connections alone.
                let cut = {
                    let a = policy.borrow_and_update();
                    a.policy.matcher.is_none() && a.policy.partition.is_some_and(|p| p.cut_existing)
                };
                if cut {
                    ctx.metrics.fault(FaultKind::Partition);
                    faults.push(FaultKind::Partition);
                    debug!(edge = %ctx.info.edge, connection = conn.id, fault = ?FaultKind::Partition, "connection cut");
                    break Err("cut by partition".to_owned());
                }
            }
        }
    };
    if let Err(e) = &result {
        debug!(edge = %ctx.info.edge, connection = conn.id, error = %e, "connection ended");
    }
    // The service (and any request in flight) is gone with `http`: what is kept upstream is
    // idle, or broken and closed here.
    drop(http);
    conn.upstream.release(&proxy.h1);
    ctx.metrics.connection_closed();
    if ctx.events.has_subscribers() {
        ctx.events.send(
            &ctx.info,
            EventKind::ConnectionClosed(conn_info(
                &conn,
                peer,
                Some(opened.elapsed()),
                faults,
                result.err(),
            )),
        );
    }
}

fn conn_info(
    conn: &ConnState,
    peer: SocketAddr,
    duration: Option<Duration>,
    faults: Vec<FaultKind>,
    error: Option<String>,
) -> ConnectionInfo {
    ConnectionInfo {
        connection_id: conn.id,
        peer,
        bytes_upstream: conn.bytes_up.load(Ordering::Relaxed),
        bytes_downstream: conn.bytes_down.load(Ordering::Relaxed),
        duration,
        faults,
        error,
    }
}

/// The span of one request, a child of its connection's span (the current one when hyper calls
/// the service), with the request id its events carry. The id is drawn here only for an enabled
/// span; otherwise [`Obs::start`] draws one if an event listener will see it. Debug level, like
/// the connection span: disabled at rigd's default `info`, where it costs a cached-interest
/// check and formats nothing.
fn request_span<B>(ctx: &EdgeCtx, req: &Request<B>) -> (Option<u64>, tracing::Span) {
    let span = tracing::debug_span!(
        "request",
        id = tracing::field::Empty,
        method = req.method().as_str(),
        path = req.uri().path(),
    );
    let id = (!span.is_disabled()).then(|| ctx.next_id());
    if let Some(id) = id {
        span.record("id", id);
    }
    (id, span)
}

/// True when nothing in the policy acts on http requests.
fn passthrough(p: &ChaosPolicy) -> bool {
    p.latency.is_none()
        && p.error.is_none()
        && p.hang.is_none()
        && p.partition.is_none()
        && p.bandwidth.is_none()
}

impl Proxy {
    fn new(ctx: Arc<EdgeCtx>, limits: HttpLimits) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let h1 = H1Upstream::new(
            ctx.target,
            CONNECT_TIMEOUT,
            limits.pool_idle_timeout,
            limits.idle_pool_capacity,
            ctx.metrics.clone(),
        );
        let h2 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(limits.pool_idle_timeout)
            .http2_only(true)
            .build(connector);
        // A socket address always makes a valid authority.
        let authority = Authority::try_from(ctx.target.to_string().as_str())
            .unwrap_or_else(|_| Authority::from_static("127.0.0.1"));
        // An authority is always a valid header value.
        let host = http::HeaderValue::from_str(authority.as_str())
            .unwrap_or_else(|_| http::HeaderValue::from_static("127.0.0.1"));
        let default_error_body =
            serde_json::json!({"error": "injected by rig", "edge": ctx.info.edge})
                .to_string()
                .into();
        Proxy {
            grpc: ctx.info.protocol == crate::policy::Protocol::Grpc,
            ctx,
            h1,
            h2,
            authority,
            host,
            default_error_body,
            limits,
        }
    }

    async fn handle(
        self: Arc<Self>,
        conn: Arc<ConnState>,
        req: Request<Incoming>,
        id: Option<u64>,
    ) -> Result<Response<DownBody>, Closed> {
        let mut obs = Obs::start(&self.ctx, self.grpc, &req, id);
        let mut active = self.ctx.cell.current();
        let plan = loop {
            if passthrough(&active.policy) || !self.selected(&active, &req) {
                break Plan::default();
            }
            match self.decide(&active, &conn, &mut obs).await {
                Decision::Forward(plan) => break plan,
                Decision::Respond(r) => return Ok(self.respond(r, Some(&active), obs)),
                Decision::Close(reason) => {
                    obs.fail(reason);
                    return Err(Closed(reason));
                }
                Decision::Released => active = self.ctx.cell.current(),
            }
        };
        drop(active);
        self.forward(&conn, req, plan, obs).await
    }

    /// Does the policy's `match` select this request?
    fn selected(&self, active: &Active, req: &Request<Incoming>) -> bool {
        let Some(m) = &active.policy.matcher else {
            return true;
        };
        m.matches(req.method().as_str(), req.uri().path(), |k| {
            req.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
    }

    fn inject(&self, obs: &mut Obs, kind: FaultKind) {
        self.ctx.metrics.fault(kind);
        obs.fault(kind);
        debug!(edge = %self.ctx.info.edge, fault = ?kind, "injected");
    }

    /// After a hold ended early: the edge stopping closes, a policy change decides again.
    fn released(&self) -> Decision {
        if self.ctx.shutdown.is_cancelled() {
            Decision::Close("edge shutting down")
        } else {
            Decision::Released
        }
    }

    /// The fault phase of one request under one policy snapshot.
    async fn decide(&self, active: &Arc<Active>, conn: &ConnState, obs: &mut Obs) -> Decision {
        let p = &active.policy;
        let version = active.version;
        let mut plan = Plan::default();
        if let Some(part) = p.partition {
            self.inject(obs, FaultKind::Partition);
            match part.mode {
                PartitionMode::Reject => return Decision::Respond(Rescue::PartitionReject),
                PartitionMode::Blackhole if part.direction.upstream() => {
                    hold(&self.ctx, version, None).await;
                    return self.released();
                }
                PartitionMode::Blackhole => plan.hold_response = Some(version),
            }
        }
        if let Some(h) = p.hang
            && active.roll(h.rate)
        {
            self.inject(obs, FaultKind::Hang);
            if hold(&self.ctx, version, h.duration).await {
                return match h.then {
                    HangThen::Close => Decision::Close("hang: connection closed by rig"),
                    HangThen::Timeout => Decision::Respond(Rescue::HangTimeout),
                };
            }
            return self.released();
        }
        if let Some(e) = &p.error
            && active.roll(e.rate)
        {
            self.inject(obs, FaultKind::Error);
            let status = if self.grpc { 200 } else { active.pick_status() };
            return Decision::Respond(Rescue::Error { status });
        }
        if let Some(d) = active.sample_latency() {
            self.inject(obs, FaultKind::Latency);
            if !hold(&self.ctx, version, Some(d)).await && self.ctx.shutdown.is_cancelled() {
                return Decision::Close("edge shutting down");
            }
        }
        if p.bandwidth.is_some() {
            self.inject(obs, FaultKind::Bandwidth);
            plan.up = Throttle::new(&self.ctx, &conn.limiters, Dir::Up);
            plan.down = Throttle::new(&self.ctx, &conn.limiters, Dir::Down);
        }
        Decision::Forward(plan)
    }

    async fn forward(
        &self,
        conn: &ConnState,
        req: Request<Incoming>,
        plan: Plan,
        mut obs: Obs,
    ) -> Result<Response<DownBody>, Closed> {
        let (mut parts, body) = req.into_parts();
        if parts.method == Method::CONNECT {
            return Ok(self.respond(Rescue::BadRequest("CONNECT is not supported"), None, obs));
        }
        let h2 = self.grpc || parts.version == Version::HTTP_2;
        if h2 {
            let Some(uri) = self.target_uri(&parts.uri) else {
                return Ok(self.respond(Rescue::BadRequest("invalid request target"), None, obs));
            };
            parts.uri = uri;
        } else {
            origin_form(&mut parts.uri);
            if !parts.headers.contains_key(header::HOST) {
                parts.headers.insert(header::HOST, self.host.clone());
            }
        }
        strip_hop_by_hop(&mut parts.headers);
        parts.version = match parts.version {
            _ if h2 => Version::HTTP_2,
            Version::HTTP_10 => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let (body, watch) = ClientBody::new(body, self.limits.body_idle_timeout);
        let body = UpBody::new(
            body,
            plan.up,
            self.ctx.metrics.clone(),
            obs.request_counter(),
        );
        let req = Request::from_parts(parts, body);
        let sent = if h2 {
            self.h2.request(req).await.map_err(UpstreamError::from)
        } else {
            self.h1.send(&conn.upstream, req).await
        };
        let resp = match sent {
            Ok(r) => {
                if let Some(w) = &watch {
                    w.answered();
                }
                r
            }
            Err(e) => {
                let rescue = Rescue::from_upstream(e, watch.as_deref());
                return Ok(self.respond(rescue, None, obs));
            }
        };
        if let Some(version) = plan.hold_response {
            // One-way partition: the target got the request, its answer goes nowhere until the
            // partition is lifted (then it is delivered late, as a healed network would).
            hold(&self.ctx, version, None).await;
            if self.ctx.shutdown.is_cancelled() {
                obs.fail("edge shutting down");
                return Err(Closed("edge shutting down"));
            }
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        obs.response_head(parts.status, &parts.headers);
        Ok(Response::from_parts(
            parts,
            DownBody::upstream(body, plan.down, obs),
        ))
    }

    /// The request's path and query on the target.
    fn target_uri(&self, uri: &Uri) -> Option<Uri> {
        let mut p = http::uri::Parts::default();
        p.scheme = Some(Scheme::HTTP);
        p.authority = Some(self.authority.clone());
        p.path_and_query = Some(match uri.path_and_query() {
            Some(pq) => pq.clone(),
            None => http::uri::PathAndQuery::from_static("/"),
        });
        Uri::from_parts(p).ok()
    }
}

/// The request target as sent on an HTTP/1 connection to the target: path and query only
/// (a client may have sent the absolute form meant for proxies).
fn origin_form(uri: &mut Uri) {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return;
    }
    *uri = match uri.path_and_query() {
        Some(pq) if pq.as_str() != "/" => Uri::from(pq.clone()),
        _ => Uri::default(),
    };
}

/// Headers that belong to one connection, not to the message (RFC 9110 7.6.1), as other
/// proxies strip them. `te: trailers` stays: gRPC requires it and it is end-to-end in
/// meaning. `trailer` stays: hyper needs it to send HTTP/1.1 trailers.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names first: most messages carry none of these, and comparing
    // standard names is cheap while removing means hashing.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| n != header::TE)
        .collect();
    for n in named {
        headers.remove(n);
    }
    let keep_te = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(n);
    }
    if keep_te {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

/// The downstream socket, counting bytes for the connection's events.
struct CountingIo {
    inner: TcpStream,
    conn: Arc<ConnState>,
}

impl AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.conn.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.conn.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.conn.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tracing::level_filters::LevelFilter;
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata};

    /// A subscriber that listens up to `0`, as rigd's `fmt` subscriber at that filter does.
    struct UpTo(Level);

    impl tracing::Subscriber for UpTo {
        fn enabled(&self, m: &Metadata<'_>) -> bool {
            *m.level() <= self.0
        }
        fn max_level_hint(&self) -> Option<LevelFilter> {
            Some(LevelFilter::from_level(self.0))
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &Event<'_>) {}
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    fn ctx() -> EdgeCtx {
        let info = Arc::new(crate::EdgeInfo {
            env: "e".into(),
            edge: "a/b".into(),
            source: "a".into(),
            egress: "b".into(),
            target: "c".into(),
            ingress: "d".into(),
            protocol: crate::Protocol::Http,
        });
        let events = crate::EventSender::new(4);
        let metrics = crate::metrics::EdgeMetrics::new(&info);
        let cell = crate::snapshot::PolicyCell::new(
            crate::Protocol::Http,
            crate::ChaosSpec::default(),
            info.clone(),
            events.clone(),
            metrics.clone(),
        )
        .unwrap();
        EdgeCtx::new(info, "127.0.0.1:1".parse().unwrap(), cell, events, metrics)
    }

    /// Connection and request spans are there at debug, and off (no request id drawn either)
    /// at rigd's default `info`.
    #[test]
    fn connection_and_request_spans_are_debug_only() {
        let ctx = ctx();
        let peer: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let req = Request::get("/a?secret=1").body(()).unwrap();
        tracing::subscriber::with_default(UpTo(Level::INFO), || {
            assert!(ctx.connection_span(1, peer).is_disabled());
            let (id, span) = request_span(&ctx, &req);
            assert!(span.is_disabled());
            assert_eq!(id, None, "no id drawn for nobody");
        });
        tracing::subscriber::with_default(UpTo(Level::DEBUG), || {
            let conn = ctx.connection_span(1, peer);
            assert!(!conn.is_disabled());
            let _in_conn = conn.enter();
            let (id, span) = request_span(&ctx, &req);
            assert!(!span.is_disabled());
            assert!(id.is_some());
            let fields = span.metadata().unwrap().fields();
            for f in ["id", "method", "path"] {
                assert!(fields.field(f).is_some(), "request span has {f}");
            }
        });
    }

    /// What a request pays for its (disabled) span when nobody listens at debug. Timing, so not
    /// run by default: `cargo test -p rig-proxy --release --lib disabled_span_cost -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn disabled_span_cost() {
        let ctx = ctx();
        let peer: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let req = Request::get("/some/path").body(()).unwrap();
        let n = 1_000_000u32;
        let per = |took: Duration| took.as_nanos() as f64 / f64::from(n);
        let run = || {
            let t = Instant::now();
            for i in 0..n {
                std::hint::black_box(ctx.connection_span(u64::from(i), peer));
            }
            let conn = t.elapsed();
            let t = Instant::now();
            for _ in 0..n {
                std::hint::black_box(request_span(&ctx, &req));
            }
            (conn, t.elapsed())
        };
        for (name, sub) in [
            ("info subscriber", Some(Level::INFO)),
            ("no subscriber", None),
            ("info subscriber, again", Some(Level::INFO)),
        ] {
            let (conn, req) = match sub {
                None => run(),
                Some(l) => tracing::subscriber::with_default(UpTo(l), run),
            };
            println!(
                "{name}: connection span {:.1} ns, request span {:.1} ns",
                per(conn),
                per(req)
            );
        }
    }

    #[test]
    fn requests_go_upstream_in_origin_form() {
        for (sent, expected) in [
            ("/a/b?c=1", "/a/b?c=1"),
            ("http://example:8080/a?x", "/a?x"),
            ("http://example", "/"),
            ("*", "*"),
        ] {
            let mut uri: Uri = sent.parse().unwrap();
            origin_form(&mut uri);
            assert_eq!(uri.to_string(), expected, "{sent}");
            assert!(uri.authority().is_none() && uri.scheme().is_none());
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::HOST, "example".parse().unwrap());
        h.insert(header::TRAILER, "grpc-status".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["host", "te", "trailer"]);
        assert_eq!(h[header::TE], "trailers");

        let mut h = HeaderMap::new();
        h.insert(header::TE, "gzip".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }
}
