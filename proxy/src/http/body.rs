//! Bodies on their way through the edge: counted, throttled, and observed to their end.
//!
//! [`Obs`] follows one request from arrival to the end of its response and reports it once
//! (event and metrics), whichever way it ends: the response body finished, broke, or was
//! dropped because the client went away.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::context::EdgeCtx;
use crate::events::{EventKind, FaultKind, RequestInfo};
use crate::metrics::EdgeMetrics;
use crate::policy::BandwidthFault;
use crate::policy::{GrpcCode, grpc_path_parts};
use crate::snapshot::{Active, Limiter, Limiters};
use tokio::sync::watch;

use super::grpc;

/// Which way a body flows: `Up` is the request (client → target), `Down` the response.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dir {
    Up,
    Down,
}

/// The token buckets of a per-connection bandwidth limit, with the policy version they belong
/// to; shared by the requests of one downstream connection.
#[derive(Default)]
pub(crate) struct ConnLimiters(Mutex<Option<(u64, Arc<Limiters>)>>);

impl ConnLimiters {
    fn get(&self, version: u64, bw: &BandwidthFault) -> Arc<Limiters> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((v, l)) = &*g
            && *v == version
        {
            return l.clone();
        }
        let l = Arc::new(Limiters::new(bw));
        *g = Some((version, l.clone()));
        l
    }
}

/// Where a throttle's token buckets live: the policy snapshot (edge-wide limits) or the
/// downstream connection (per-connection limits).
#[derive(Clone)]
enum LimiterRef {
    Edge(Arc<Active>),
    Conn(Arc<Limiters>),
}

impl LimiterRef {
    /// The limiter `active` puts on `dir`, if any.
    fn resolve(active: &Arc<Active>, conn: &ConnLimiters, dir: Dir) -> Option<LimiterRef> {
        let bw = active.policy.bandwidth?;
        let lim = if bw.per_connection {
            LimiterRef::Conn(conn.get(active.version, &bw))
        } else {
            LimiterRef::Edge(active.clone())
        };
        lim.get(dir).is_some().then_some(lim)
    }

    fn get(&self, dir: Dir) -> Option<&Limiter> {
        let l = match self {
            LimiterRef::Edge(a) => a.limiters.as_ref()?,
            LimiterRef::Conn(l) => l,
        };
        match dir {
            Dir::Up => l.upstream.as_ref(),
            Dir::Down => l.downstream.as_ref(),
        }
    }
}

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Lets data frames through a byte-rate limiter, cutting frames larger than the burst so a
/// big frame cannot pass at once. It follows the policy: a change retunes the body in flight
/// at once (a wait for a permit is cut short), and a policy without a limit this way lets the
/// rest of the body through unthrottled.
pub(crate) struct Throttle {
    dir: Dir,
    /// `None` once the policy no longer limits this way.
    lim: Option<LimiterRef>,
    policy: watch::Receiver<Arc<Active>>,
    conn: Arc<ConnLimiters>,
    /// The permit being waited for, and the chunk it is for.
    wait: Option<(Wait, Bytes)>,
    /// The rest of a frame larger than the burst.
    rest: Option<Bytes>,
}

impl Throttle {
    /// `None` when the policy in force has no limit that way. Boxed: rare, and it keeps the
    /// bodies of unthrottled requests small.
    pub(crate) fn new(ctx: &EdgeCtx, conn: &Arc<ConnLimiters>, dir: Dir) -> Option<Box<Throttle>> {
        let mut policy = ctx.cell.subscribe();
        let active = policy.borrow_and_update().clone();
        let lim = LimiterRef::resolve(&active, conn, dir)?;
        Some(Box::new(Throttle {
            dir,
            lim: Some(lim),
            policy,
            conn: conn.clone(),
            wait: None,
            rest: None,
        }))
    }

    fn buffered(&self) -> usize {
        self.rest.as_ref().map_or(0, Bytes::len) + self.wait.as_ref().map_or(0, |(_, b)| b.len())
    }

    fn idle(&self) -> bool {
        self.rest.is_none() && self.wait.is_none()
    }

    /// Pick up a policy change.
    fn refresh(&mut self) {
        if self.policy.has_changed().unwrap_or(false) {
            let active = self.policy.borrow_and_update().clone();
            self.lim = LimiterRef::resolve(&active, &self.conn, self.dir);
        }
    }

    fn poll_frame<B>(
        &mut self,
        mut inner: Pin<&mut B>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
    where
        B: Body<Data = Bytes>,
    {
        loop {
            if let Some((w, _)) = &mut self.wait {
                ready!(w.as_mut().poll(cx));
                if let Some((_, chunk)) = self.wait.take() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
            }
            let mut chunk = match self.rest.take() {
                Some(b) => b,
                None => match ready!(inner.as_mut().poll_frame(cx)) {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(d) if !d.is_empty() => d,
                        Ok(d) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    },
                    other => return Poll::Ready(other),
                },
            };
            self.refresh();
            let Some(lim) = self.lim.clone() else {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            };
            let burst = lim.get(self.dir).map_or(usize::MAX, |l| l.burst().max(1));
            if chunk.len() > burst {
                self.rest = Some(chunk.split_off(burst));
            }
            let n = chunk.len();
            let dir = self.dir;
            let mut changed = self.policy.clone();
            let w: Wait = Box::pin(async move {
                if let Some(l) = lim.get(dir) {
                    tokio::select! {
                        _ = l.acquire(n) => {}
                        _ = changed.changed() => {}
                    }
                }
            });
            self.wait = Some((w, chunk));
        }
    }
}

/// The client's request body, cut with [`ClientBodyError::Idle`] when the client sends nothing
/// for `timeout` while the body is being read, until the target has answered. The wait counts
/// only while somebody reads: a body held back by a bandwidth throttle is not the client's
/// delay. Once the response has started, a quiet request stream is the conversation between
/// client and target (a gRPC bidi stream, an echo), not a stuck upload, and is left alone.
pub(crate) struct ClientBody {
    inner: Incoming,
    timeout: Duration,
    /// Since when the body has been read without the client sending anything.
    waiting_since: Option<tokio::time::Instant>,
    /// Armed at the first wait and only re-armed when it fires early, so a streaming body
    /// costs no timer update per frame.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Shared with the request's forwarder (absent for bodies that are over at once).
    watch: Option<Arc<BodyWatch>>,
}

/// What the forwarder of a request and its body tell each other.
#[derive(Default)]
pub(crate) struct BodyWatch {
    /// How the body failed, for a forwarder whose transport loses the error: an h2 client
    /// sends the body from a task of its own and reports a body error as a bare stream reset.
    failure: std::sync::OnceLock<BodyFailure>,
    /// The target's response head has arrived: the idle timeout no longer applies.
    answered: std::sync::atomic::AtomicBool,
}

impl BodyWatch {
    pub(crate) fn failure(&self) -> Option<BodyFailure> {
        self.failure.get().copied()
    }

    pub(crate) fn answered(&self) {
        self.answered.store(true, Ordering::Relaxed);
    }

    fn is_answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }
}

/// The kind of a [`ClientBodyError`], kept when the error itself is gone.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BodyFailure {
    Malformed,
    Idle(Duration),
}

impl ClientBody {
    /// The body of a request and, unless it is over already, what its forwarder watches.
    pub(crate) fn new(inner: Incoming, timeout: Duration) -> (Self, Option<Arc<BodyWatch>>) {
        let watch = (!inner.is_end_stream()).then(Arc::<BodyWatch>::default);
        let body = ClientBody {
            inner,
            timeout,
            waiting_since: None,
            timer: None,
            watch: watch.clone(),
        };
        (body, watch)
    }

    fn failed(&self, e: ClientBodyError) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        if let Some(w) = &self.watch {
            let _ = w.failure.set(e.kind());
        }
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => return this.failed(ClientBodyError::Read(e)),
            Poll::Ready(r) => {
                this.waiting_since = None;
                return Poll::Ready(r.map(|f| f.map_err(ClientBodyError::Read)));
            }
            Poll::Pending => {}
        }
        if this.watch.as_ref().is_some_and(|w| w.is_answered()) {
            this.timer = None;
            return Poll::Pending;
        }
        let deadline = *this
            .waiting_since
            .get_or_insert_with(tokio::time::Instant::now)
            + this.timeout;
        loop {
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            ready!(timer.as_mut().poll(cx));
            if tokio::time::Instant::now() >= deadline {
                return this.failed(ClientBodyError::Idle(this.timeout));
            }
            // Armed for an earlier wait that the client ended in time.
            timer.as_mut().reset(deadline);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body on its way to the target.
pub(crate) struct UpBody {
    inner: ClientBody,
    throttle: Option<Box<Throttle>>,
    metrics: EdgeMetrics,
    /// For the request's event, when somebody listens.
    count: Option<Arc<AtomicU64>>,
}

impl UpBody {
    pub(crate) fn new(
        inner: ClientBody,
        throttle: Option<Box<Throttle>>,
        metrics: EdgeMetrics,
        count: Option<Arc<AtomicU64>>,
    ) -> Self {
        UpBody {
            inner,
            throttle,
            metrics,
            count,
        }
    }
}

/// Reading the client's request body failed: the client's fault, not the target's, so it is
/// answered by rig (400, 408) and not counted as an upstream error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientBodyError {
    /// A malformed chunk, or the client went away mid-body.
    #[error("request body from the client: {0}")]
    Read(#[source] hyper::Error),
    /// The client sent nothing for this long.
    #[error("the client sent no request body data for {0:?}")]
    Idle(Duration),
}

impl ClientBodyError {
    /// The failure to read the client's body in `e` or its sources, if that is what `e` is.
    pub(crate) fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Self> {
        let mut cur = Some(e);
        while let Some(c) = cur {
            if let Some(b) = c.downcast_ref::<ClientBodyError>() {
                return Some(b);
            }
            cur = c.source();
        }
        None
    }

    pub(crate) fn kind(&self) -> BodyFailure {
        match self {
            ClientBodyError::Read(_) => BodyFailure::Malformed,
            ClientBodyError::Idle(d) => BodyFailure::Idle(*d),
        }
    }

    /// The `reason` label of `rig_edge_client_errors_total`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            ClientBodyError::Read(_) => crate::metrics::CLIENT_MALFORMED_BODY,
            ClientBodyError::Idle(_) => crate::metrics::CLIENT_BODY_TIMEOUT,
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        let r = match &mut this.throttle {
            Some(t) => t.poll_frame(Pin::new(&mut this.inner), cx),
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        if let Poll::Ready(Some(Ok(frame))) = &r
            && let Some(d) = frame.data_ref()
        {
            let n = d.len() as u64;
            this.metrics.bytes_upstream(n);
            if let Some(c) = &this.count {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.throttle.as_ref().is_none_or(|t| t.idle()) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        with_buffered(self.inner.size_hint(), self.throttle.as_deref())
    }
}

fn with_buffered(hint: SizeHint, throttle: Option<&Throttle>) -> SizeHint {
    let Some(t) = throttle else { return hint };
    let extra = t.buffered() as u64;
    let mut h = SizeHint::new();
    h.set_lower(hint.lower() + extra);
    if let Some(u) = hint.upper() {
        h.set_upper(u + extra);
    }
    h
}

enum Kind {
    Upstream {
        inner: Incoming,
        throttle: Option<Box<Throttle>>,
    },
    /// A response rig made up; `None` once sent.
    Full(Option<Bytes>),
}

/// The response body on its way to the client.
pub(crate) struct DownBody {
    kind: Kind,
    obs: Obs,
}

impl DownBody {
    pub(crate) fn upstream(inner: Incoming, throttle: Option<Box<Throttle>>, obs: Obs) -> Self {
        DownBody {
            kind: Kind::Upstream { inner, throttle },
            obs,
        }
    }

    pub(crate) fn full(body: Bytes, obs: Obs) -> Self {
        DownBody {
            kind: Kind::Full((!body.is_empty()).then_some(body)),
            obs,
        }
    }
}

impl Drop for DownBody {
    fn drop(&mut self) {
        // Servers drop a body that says it is done without polling it (an empty body, or the
        // last frame of a sized one): that is a complete response, not an abandoned one.
        if self.is_end_stream() {
            self.obs.finish();
        }
    }
}

impl Body for DownBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            Kind::Upstream { inner, throttle } => match throttle {
                Some(t) => t.poll_frame(Pin::new(inner), cx),
                None => Pin::new(inner).poll_frame(cx),
            },
        };
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.obs.response_bytes(d.len() as u64);
                } else if let Some(t) = frame.trailers_ref() {
                    this.obs.trailers(t);
                }
                // HTTP/1 stops polling once the body says it is done, so the end is noted here.
                if this.is_end_stream() {
                    this.obs.finish();
                }
            }
            Poll::Ready(Some(Err(e))) => {
                // The target may answer before it has read the whole request body; a client
                // that then stalls or sends garbage breaks the response, through no fault of
                // the target's.
                match ClientBodyError::find(e) {
                    Some(c) => {
                        this.obs.ctx.metrics.client_error(c.reason());
                        this.obs.set_failure(format!("response cut: {c}"));
                    }
                    None => {
                        this.obs.ctx.metrics.upstream_error();
                        this.obs.set_failure(format!("upstream response body: {e}"));
                    }
                }
                this.obs.finish();
            }
            Poll::Ready(None) => this.obs.finish(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream { inner, throttle } => {
                throttle.as_ref().is_none_or(|t| t.idle()) && inner.is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream { inner, throttle } => {
                with_buffered(inner.size_hint(), throttle.as_deref())
            }
        }
    }
}

/// The faults that acted on a request, in order, each once; no allocation.
#[derive(Default)]
struct Faults {
    kinds: [Option<FaultKind>; 9],
    len: usize,
}

impl Faults {
    fn push(&mut self, k: FaultKind) {
        if self.kinds[..self.len].contains(&Some(k)) || self.len == self.kinds.len() {
            return;
        }
        self.kinds[self.len] = Some(k);
        self.len += 1;
    }

    fn to_vec(&self) -> Vec<FaultKind> {
        self.kinds[..self.len].iter().flatten().copied().collect()
    }
}

/// One request from arrival to the end of its response; reports it exactly once.
pub(crate) struct Obs {
    ctx: Arc<EdgeCtx>,
    start: Instant,
    grpc: bool,
    faults: Faults,
    /// The status sent to the client; `None` until a response head is on its way.
    status: Option<StatusCode>,
    /// gRPC status from the response headers (trailers-only) or trailers.
    grpc_code: Option<GrpcCode>,
    response_bytes: u64,
    /// Event data, only when somebody listens (nothing is built otherwise).
    info: Option<Box<RequestInfo>>,
    request_bytes: Option<Arc<AtomicU64>>,
    /// Set when no proper answer was given (the request is reported as failed).
    failure: Option<Cow<'static, str>>,
    done: bool,
}

impl Obs {
    /// A request arrived: note the time and tell listeners. `id` is the request's, when it
    /// was drawn for its span or its events.
    pub(crate) fn start(
        ctx: &Arc<EdgeCtx>,
        grpc: bool,
        req: &Request<Incoming>,
        id: Option<u64>,
    ) -> Obs {
        let start = Instant::now();
        let (info, request_bytes) = if ctx.events.has_subscribers() {
            let path = req.uri().path();
            let (grpc_service, grpc_method) = match grpc.then(|| grpc_path_parts(path)).flatten() {
                Some((s, m)) => (Some(s.to_owned()), Some(m.to_owned())),
                None => (None, None),
            };
            let info = RequestInfo {
                request_id: id.unwrap_or_else(|| ctx.next_id()),
                method: req.method().as_str().to_owned(),
                path: path.to_owned(),
                grpc_service,
                grpc_method,
                ..RequestInfo::default()
            };
            ctx.events
                .send(&ctx.info, EventKind::RequestStarted(info.clone()));
            (Some(Box::new(info)), Some(Arc::new(AtomicU64::new(0))))
        } else {
            (None, None)
        };
        Obs {
            ctx: ctx.clone(),
            start,
            grpc,
            faults: Faults::default(),
            status: None,
            grpc_code: None,
            response_bytes: 0,
            info,
            request_bytes,
            failure: None,
            done: false,
        }
    }

    pub(crate) fn fault(&mut self, k: FaultKind) {
        self.faults.push(k);
    }

    pub(crate) fn request_counter(&self) -> Option<Arc<AtomicU64>> {
        self.request_bytes.clone()
    }

    /// The response head is on its way to the client.
    pub(crate) fn response_head(&mut self, status: StatusCode, headers: &HeaderMap) {
        self.status = Some(status);
        if self.grpc {
            self.grpc_code = grpc::status_of(headers);
        }
    }

    fn trailers(&mut self, t: &HeaderMap) {
        if self.grpc
            && let Some(c) = grpc::status_of(t)
        {
            self.grpc_code = Some(c);
        }
    }

    fn response_bytes(&mut self, n: u64) {
        self.response_bytes += n;
        self.ctx.metrics.bytes_downstream(n);
    }

    /// The request gets no proper answer (the reason goes into `request.failed`).
    pub(crate) fn set_failure(&mut self, reason: impl Into<Cow<'static, str>>) {
        if self.failure.is_none() {
            self.failure = Some(reason.into());
        }
    }

    /// The request ends here without an answer.
    pub(crate) fn fail(mut self, reason: &'static str) {
        self.set_failure(reason);
        self.finish();
    }

    /// The gRPC code name for metrics and events, from the response's `grpc-status`.
    fn grpc_label(&self, status: StatusCode) -> &'static str {
        let code = match self.grpc_code {
            Some(c) => c,
            None if status != StatusCode::OK => grpc::from_http_status(status),
            // Trailers never came.
            None if self.failure.as_deref() == Some(CLIENT_GONE) => GrpcCode::Cancelled,
            None => GrpcCode::Unknown,
        };
        code.name()
    }

    /// Report the request, once: at the end of the response body or when it is dropped.
    pub(crate) fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let elapsed = self.start.elapsed();
        let status = self.status;
        // The HTTP status ("200") or the gRPC code name ("UNAVAILABLE"); none without an answer.
        let label = match &status {
            None => None,
            Some(s) if !self.grpc => Some(s.as_str()),
            Some(s) => Some(self.grpc_label(*s)),
        };
        if let Some(l) = label {
            self.ctx.metrics.request(l, elapsed.as_secs_f64());
        }
        if let Some(mut info) = self.info.take() {
            info.status = label.map(str::to_owned);
            info.latency = Some(elapsed);
            info.request_bytes = self
                .request_bytes
                .as_ref()
                .map_or(0, |c| c.load(Ordering::Relaxed));
            info.response_bytes = self.response_bytes;
            info.faults = self.faults.to_vec();
            let kind = match self.failure.take() {
                Some(reason) => {
                    info.error = Some(reason.into_owned());
                    EventKind::RequestFailed(*info)
                }
                None => EventKind::RequestCompleted(*info),
            };
            self.ctx.events.send(&self.ctx.info, kind);
        }
    }
}

const CLIENT_GONE: &str = "client went away before the response ended";

impl Drop for Obs {
    fn drop(&mut self) {
        if !self.done {
            self.set_failure(CLIENT_GONE);
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_keep_order_once() {
        let mut f = Faults::default();
        for k in [
            FaultKind::Partition,
            FaultKind::Latency,
            FaultKind::Partition,
            FaultKind::Bandwidth,
        ] {
            f.push(k);
        }
        assert_eq!(
            f.to_vec(),
            vec![
                FaultKind::Partition,
                FaultKind::Latency,
                FaultKind::Bandwidth
            ]
        );
    }
}
