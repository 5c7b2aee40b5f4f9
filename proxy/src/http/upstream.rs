//! HTTP/1.1 connections to the target, one per downstream connection.
//!
//! A downstream HTTP/1 connection carries one request at a time, so it keeps the upstream
//! connection it last used ([`Kept`]) and sends its next request on it: no pool lookup, lock
//! or background task per request (hyper-util's pooled client does all three, and spawns a
//! task per request to return the connection to its pool). The upstream connection is driven
//! by the downstream connection's own task, as pingora and linkerd pair them, so a request
//! and its response cross no task boundary. When the downstream connection closes, an idle
//! upstream connection gets a task of its own and goes to a small edge-wide stack that the
//! next new downstream connection takes from, so clients that open a connection per request
//! still reuse upstream connections. The stack is bounded (the oldest connection is closed
//! when it is full) and a sweeper task closes connections idle longer than the pool idle
//! timeout, as hyper-util's pool does. HTTP/2 requests keep using the shared pooled client: one
//! h2 connection multiplexes them all.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use super::body::UpBody;
use crate::metrics::{self, EdgeMetrics};

/// An upstream HTTP/1 connection's request half.
pub(crate) type Sender = SendRequest<UpBody>;
/// The I/O half, a future to poll until the connection closes.
type Conn = Pin<Box<http1::Connection<TokioIo<TcpStream>, UpBody>>>;

/// The upstream connection of one downstream connection: the sender its next request goes
/// out on, and the connection itself when this downstream connection's task drives it.
#[derive(Default)]
pub(crate) struct Kept {
    sender: Mutex<Option<Sender>>,
    conn: Mutex<Option<Conn>>,
}

impl Kept {
    /// Drive the upstream connection this downstream connection opened, if any. Ready when it
    /// has ended (the target closed it, or its sender is gone).
    pub(crate) fn poll_conn(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let Some(conn) = slot.as_mut() else {
            return Poll::Pending;
        };
        let r = std::task::ready!(conn.as_mut().poll(cx));
        if let Err(e) = r {
            debug!(error = %e, "upstream http/1 connection ended");
        }
        *slot = None;
        Poll::Ready(())
    }

    /// The downstream connection is done: an upstream connection ready for another request
    /// goes to `up`'s idle stack with a task of its own; anything else is closed.
    pub(crate) fn release(&self, up: &H1Upstream) {
        let sender = self.sender.lock().unwrap_or_else(|e| e.into_inner()).take();
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(sender) = sender else { return };
        if !sender.is_ready() {
            return;
        }
        if let Some(conn) = conn {
            spawn_conn(conn);
        }
        up.park(sender);
    }
}

fn spawn_conn(conn: Conn) {
    // The connection task ends when its sender is dropped or the target closes.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "upstream http/1 connection ended");
        }
    });
}

/// Why a request did not get a response head from the target.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("tcp connect error")]
    Connect(#[source] io::Error),
    #[error("tcp connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error(transparent)]
    Http1(#[from] hyper::Error),
    #[error(transparent)]
    Pooled(#[from] hyper_util::client::legacy::Error),
}

impl UpstreamError {
    /// The target could not be reached at all (as opposed to failing once reached).
    pub(crate) fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Connect(_) | UpstreamError::ConnectTimeout(_) => true,
            UpstreamError::Http1(_) => false,
            UpstreamError::Pooled(e) => e.is_connect(),
        }
    }

    /// rig itself is out of file descriptors (`EMFILE` / `ENFILE` dialling the target): not the
    /// target's failure.
    pub(crate) fn is_fd_exhausted(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            let Some(io) = e.downcast_ref::<io::Error>() else {
                cur = e.source();
                continue;
            };
            if crate::limits::is_fd_exhausted(io) {
                return true;
            }
            // An io error wrapping another error reports the wrapped one's source, not
            // the wrapped one, as its source.
            cur = match io.get_ref() {
                Some(inner) => Some(inner),
                None => e.source(),
            };
        }
        false
    }
}

/// The HTTP/1 side of an edge's upstream: how to dial, and the idle connections left by closed
/// downstream connections.
pub(crate) struct H1Upstream {
    target: SocketAddr,
    connect_timeout: Duration,
    builder: http1::Builder,
    idle: Arc<Mutex<IdleStack>>,
}

/// Idle connections, each with the time it was parked. Dropping a sender ends its
/// connection's task, which closes the connection.
struct IdleStack {
    /// Oldest first; the most recently parked (warmest) one is reused first.
    conns: VecDeque<(Instant, Sender)>,
    timeout: Duration,
    capacity: usize,
    /// A sweeper task is scheduled.
    sweeping: bool,
    metrics: EdgeMetrics,
}

impl IdleStack {
    /// Drop the connections idle for `timeout` or closed by the target; the time the next
    /// one expires, if any is left.
    fn expire(&mut self, now: Instant) -> Option<Instant> {
        let before = self.conns.len();
        let timeout = self.timeout;
        self.conns
            .retain(|(since, s)| now.duration_since(*since) < timeout && !s.is_closed());
        self.metrics
            .upstream_idle_closed(metrics::IDLE_TIMEOUT, (before - self.conns.len()) as u64);
        self.conns.front().map(|(since, _)| *since + timeout)
    }
}

/// Close idle connections as they expire, until the stack is empty or the edge is gone.
async fn sweep(idle: Weak<Mutex<IdleStack>>) {
    loop {
        let next = {
            let Some(idle) = idle.upgrade() else { return };
            let mut g = idle.lock().unwrap_or_else(|e| e.into_inner());
            match g.expire(Instant::now()) {
                Some(t) => t,
                None => {
                    g.sweeping = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(next).await;
    }
}

impl H1Upstream {
    /// At most `capacity` idle connections are kept, each for at most `idle_timeout`.
    pub(crate) fn new(
        target: SocketAddr,
        connect_timeout: Duration,
        idle_timeout: Duration,
        capacity: usize,
        metrics: EdgeMetrics,
    ) -> Self {
        H1Upstream {
            target,
            connect_timeout,
            builder: http1::Builder::new(),
            idle: Arc::new(Mutex::new(IdleStack {
                conns: VecDeque::new(),
                timeout: idle_timeout,
                capacity,
                sweeping: false,
                metrics,
            })),
        }
    }

    /// An idle connection parked by a closed downstream connection, if one is still open.
    fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = idle.timeout;
        while let Some((since, s)) = idle.conns.pop_back() {
            if since.elapsed() < timeout && !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    /// Keep a connection that is ready for another request for the next downstream connection.
    fn park(&self, sender: Sender) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.expire(now);
        if idle.capacity == 0 {
            idle.metrics.upstream_idle_closed(metrics::POOL_FULL, 1);
            return;
        }
        if idle.conns.len() >= idle.capacity {
            // Full: the coldest connection goes, it is the next to expire anyway.
            idle.conns.pop_front();
            idle.metrics.upstream_idle_closed(metrics::POOL_FULL, 1);
        }
        idle.conns.push_back((now, sender));
        if !idle.sweeping {
            idle.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(&self.idle)));
        }
    }

    /// A new connection whose I/O half is driven by `kept`'s downstream connection task.
    async fn connect(&self, kept: &Kept) -> Result<Sender, UpstreamError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.target)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
                Err(_) => return Err(UpstreamError::ConnectTimeout(self.connect_timeout)),
            };
        // Requests are small writes answered at once: Nagle would hold them back.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(target = %self.target, error = %e, "cannot set TCP_NODELAY upstream");
        }
        let (sender, conn) = self.builder.handshake(TokioIo::new(stream)).await?;
        // Any connection kept before is unusable (that is why this one is made): close it.
        *kept.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::pin(conn));
        Ok(sender)
    }

    /// Send `req` on `kept`'s connection, or on another one if it has none or it closed, and
    /// leave the connection used in `kept` for the next request.
    pub(crate) async fn send(
        &self,
        kept: &Kept,
        mut req: Request<UpBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let slot = &kept.sender;
        let taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (mut sender, mut reused) = match taken.or_else(|| self.take_idle()) {
            Some(s) => (s, true),
            None => (self.connect(kept).await?, false),
        };
        loop {
            if let Err(e) = sender.ready().await {
                // A kept connection the target closed while it was idle: nothing was sent.
                if !reused {
                    return Err(e.into());
                }
                (sender, reused) = match self.take_idle() {
                    Some(s) => (s, true),
                    None => (self.connect(kept).await?, false),
                };
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // The kept connection closed before the request went out: as hyper-util's
                    // client does, try once more on a fresh connection.
                    Some(r) if reused => {
                        req = r;
                        sender = self.connect(kept).await?;
                        reused = false;
                    }
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(code: nix::errno::Errno) -> io::Error {
        io::Error::from_raw_os_error(code as i32)
    }

    #[test]
    fn out_of_descriptors_is_rigs_not_the_targets() {
        use nix::errno::Errno;
        assert!(UpstreamError::Connect(os(Errno::EMFILE)).is_fd_exhausted());
        assert!(UpstreamError::Connect(os(Errno::ENFILE)).is_fd_exhausted());
        // Found under other errors too (hyper-util's pooled client wraps the io error).
        let wrapped = io::Error::other(os(Errno::EMFILE));
        assert!(UpstreamError::Connect(wrapped).is_fd_exhausted());
        assert!(!UpstreamError::Connect(os(Errno::ECONNREFUSED)).is_fd_exhausted());
        assert!(!UpstreamError::ConnectTimeout(Duration::from_secs(1)).is_fd_exhausted());
    }
}
