//! The http edge's own bounds, with the limits lowered: a stalled request body is cut (408,
//! the client's), idle upstream connections are closed at the pool idle timeout, and the idle
//! stack is bounded. Real sockets and a real hyper target that reports what it saw.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rig_proxy::http::HttpLimits;
use rig_proxy::{Edge, EdgeConfig, EdgeInfo, EventKind, EventSender, INJECTED_HEADER, Protocol};
use rig_tests::eventually::eventually;
use rig_tests::http_upstream::{prometheus, wait_event};
use rig_tests::prom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type R = anyhow::Result<()>;

const WAIT: Duration = Duration::from_secs(10);

/// What the target saw.
#[derive(Default)]
struct Seen {
    /// TCP connections open now.
    open: AtomicU64,
    /// Connections accepted so far.
    accepted: AtomicU64,
    /// Requests whose body broke before its end (the edge aborted them).
    aborted: AtomicU64,
}

/// A hyper HTTP/1.1 and h2c target on `127.0.0.1:0` that reads each request body to its end before
/// answering `200` with the number of bytes it read, and counts its open connections.
struct Target {
    addr: SocketAddr,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Target {
    async fn start() -> anyhow::Result<Target> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Seen::default());
        let st = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                st.open.fetch_add(1, Ordering::SeqCst);
                st.accepted.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = {
                        let st = st.clone();
                        hyper::service::service_fn(move |req: Request<Incoming>| {
                            let st = st.clone();
                            async move {
                                match req.into_body().collect().await {
                                    Ok(b) => {
                                        let n = b.to_bytes().len();
                                        Ok(Response::new(Full::new(Bytes::from(n.to_string()))))
                                    }
                                    Err(e) => {
                                        st.aborted.fetch_add(1, Ordering::SeqCst);
                                        Err(e)
                                    }
                                }
                            }
                        })
                    };
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    st.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Target { addr, seen, task })
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An http edge `name/api` in front of `target` with `limits`.
async fn edge(
    name: &str,
    target: SocketAddr,
    limits: HttpLimits,
    events: EventSender,
) -> anyhow::Result<Edge> {
    let config = EdgeConfig {
        info: EdgeInfo::standalone(name, "api", Protocol::Http),
        target,
        chaos: Default::default(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    Ok(Edge::start_with(config, listener, events, limits)?)
}

fn metric(name: &str, edge: &str, extra: &[(&str, &str)]) -> f64 {
    let edge = format!("{edge}/api");
    let mut want = vec![("edge", edge.as_str())];
    want.extend_from_slice(extra);
    prom::value(&prometheus().render(), name, &want)
}

const BODY_IDLE: Duration = Duration::from_millis(300);

#[tokio::test]
async fn a_stalled_request_body_gets_408_and_is_counted_as_the_clients() -> R {
    prometheus();
    let target = Target::start().await?;
    let events = EventSender::new(64);
    let mut rx = events.subscribe();
    let limits = HttpLimits {
        body_idle_timeout: BODY_IDLE,
        ..HttpLimits::default()
    };
    let edge = edge("body-stall", target.addr, limits, events).await?;

    let mut s = TcpStream::connect(edge.local_addr()).await?;
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nA")
        .await?;
    let sent = Instant::now();
    // The edge answers and closes the connection: read to its end.
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await??;
    let took = sent.elapsed();
    let text = String::from_utf8_lossy(&out).to_lowercase();
    assert!(text.starts_with("http/1.1 408"), "answer: {text:?}");
    assert!(text.contains("connection: close"), "answer: {text:?}");
    assert!(
        text.contains(&format!("{INJECTED_HEADER}: request=body_timeout")),
        "answer: {text:?}"
    );
    assert!(
        took >= BODY_IDLE && took < BODY_IDLE + Duration::from_secs(2),
        "answered after {took:?}, the limit is {BODY_IDLE:?}"
    );

    // The target's request was aborted, not left waiting for the rest of the body.
    eventually("the target to see its request aborted", WAIT, || async {
        (target.seen.aborted.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;

    let failed = wait_event(&mut rx, WAIT, |k| match k {
        EventKind::RequestFailed(i) => Some(i.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(failed.status.as_deref(), Some("408"));
    let error = failed.error.unwrap_or_default();
    assert!(
        error.contains("request body timed out") && error.contains("300 ms"),
        "{error}"
    );

    let client = [("reason", "body_timeout")];
    assert_eq!(
        metric("rig_edge_client_errors_total", "body-stall", &client),
        1.0
    );
    assert_eq!(
        metric(
            "rig_edge_requests_total",
            "body-stall",
            &[("status", "408")]
        ),
        1.0
    );
    assert_eq!(
        metric("rig_edge_upstream_errors_total", "body-stall", &[]),
        0.0,
        "a stalled client is not the target's failure"
    );
    Ok(())
}

#[tokio::test]
async fn a_slow_but_steady_request_body_passes() -> R {
    let target = Target::start().await?;
    let limits = HttpLimits {
        body_idle_timeout: BODY_IDLE,
        ..HttpLimits::default()
    };
    let edge = edge("body-steady", target.addr, limits, EventSender::new(16)).await?;

    // 20 bytes, one every 50 ms: the whole body takes about 1 s, three times the limit, but
    // the client is never idle for long.
    let n = 20;
    let mut s = TcpStream::connect(edge.local_addr()).await?;
    s.write_all(
        format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {n}\r\n\r\n").as_bytes(),
    )
    .await?;
    let started = Instant::now();
    for _ in 0..n {
        // Pacing the client, not waiting for the edge.
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(b"x").await?;
    }
    assert!(started.elapsed() > BODY_IDLE * 2);
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let text = tokio::time::timeout(WAIT, async {
        loop {
            let k = s.read(&mut buf).await?;
            out.extend_from_slice(&buf[..k]);
            let text = String::from_utf8_lossy(&out).into_owned();
            if k == 0 || text.ends_with(&format!("\r\n\r\n{n}")) {
                return Ok::<_, std::io::Error>(text);
            }
        }
    })
    .await??;
    assert!(text.starts_with("HTTP/1.1 200"), "answer: {text:?}");
    assert!(text.ends_with(&format!("\r\n\r\n{n}")), "answer: {text:?}");
    assert_eq!(target.seen.aborted.load(Ordering::SeqCst), 0);
    Ok(())
}

/// One GET on a fresh client connection, which is then closed.
async fn one_request_then_close(edge: &Edge) -> R {
    let stream = TcpStream::connect(edge.local_addr()).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(Request::get("/").header("host", "x").body(Empty::new())?)
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await?;
    drop(sender);
    tokio::time::timeout(WAIT, conn).await???;
    Ok(())
}

#[tokio::test]
async fn idle_upstream_connections_are_closed_at_the_pool_idle_timeout() -> R {
    prometheus();
    let target = Target::start().await?;
    let idle = Duration::from_millis(300);
    let limits = HttpLimits {
        pool_idle_timeout: idle,
        ..HttpLimits::default()
    };
    let edge = edge("pool-idle", target.addr, limits, EventSender::new(16)).await?;
    one_request_then_close(&edge).await?;
    let left = Instant::now();
    eventually(
        "the target to see the idle upstream connection closed",
        WAIT,
        || async { (target.seen.open.load(Ordering::SeqCst) == 0).then_some(()) },
    )
    .await;
    let took = left.elapsed();
    assert!(
        took < idle + Duration::from_secs(2),
        "closed {took:?} after the client left, the limit is {idle:?}"
    );
    assert_eq!(target.seen.accepted.load(Ordering::SeqCst), 1);
    // Closed by the idle timeout, as counted.
    eventually("the expiry to be counted", WAIT, || async {
        let v = metric(
            "rig_edge_upstream_idle_closed_total",
            "pool-idle",
            &[("reason", "idle_timeout")],
        );
        (v == 1.0).then_some(())
    })
    .await;

    // A new client still gets through, on a new upstream connection.
    one_request_then_close(&edge).await?;
    assert_eq!(target.seen.accepted.load(Ordering::SeqCst), 2);
    Ok(())
}

#[tokio::test]
async fn a_full_idle_stack_closes_the_oldest_connection() -> R {
    prometheus();
    let target = Target::start().await?;
    let limits = HttpLimits {
        idle_pool_capacity: 1,
        ..HttpLimits::default()
    };
    let edge = edge("pool-full", target.addr, limits, EventSender::new(16)).await?;

    // Two client connections open at once use two upstream connections.
    let mut clients = Vec::new();
    for _ in 0..2 {
        let stream = TcpStream::connect(edge.local_addr()).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let resp = sender
            .send_request(Request::get("/").header("host", "x").body(Empty::new())?)
            .await?;
        resp.into_body().collect().await?;
        clients.push((sender, conn));
    }
    assert_eq!(target.seen.open.load(Ordering::SeqCst), 2);
    for (sender, conn) in clients {
        drop(sender);
        tokio::time::timeout(WAIT, conn).await???;
    }
    // Both are parked in turn; the stack keeps one and closes the other at once.
    eventually("one upstream connection to be closed", WAIT, || async {
        (target.seen.open.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert_eq!(
        metric(
            "rig_edge_upstream_idle_closed_total",
            "pool-full",
            &[("reason", "pool_full")]
        ),
        1.0
    );
    // The one kept is reused by the next client.
    one_request_then_close(&edge).await?;
    assert_eq!(target.seen.accepted.load(Ordering::SeqCst), 2);
    Ok(())
}

#[tokio::test]
async fn a_stalled_http2_request_body_gets_408_too() -> R {
    prometheus();
    let target = Target::start().await?;
    let limits = HttpLimits {
        body_idle_timeout: BODY_IDLE,
        ..HttpLimits::default()
    };
    let edge = edge("body-stall-h2", target.addr, limits, EventSender::new(16)).await?;
    let stream = TcpStream::connect(edge.local_addr()).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    // One byte, then nothing: the sending half is kept open but never used again.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    tx.send(Ok(Frame::data(Bytes::from_static(b"A")))).await?;
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = Request::post(format!("http://{}/upload", edge.local_addr())).body(body)?;
    let sent = Instant::now();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req)).await??;
    let took = sent.elapsed();
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(resp.headers()[INJECTED_HEADER], "request=body_timeout");
    assert!(
        took < BODY_IDLE + Duration::from_secs(2),
        "answered after {took:?}"
    );
    drop(tx);
    eventually("the target to see its request aborted", WAIT, || async {
        (target.seen.aborted.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert_eq!(
        metric(
            "rig_edge_client_errors_total",
            "body-stall-h2",
            &[("reason", "body_timeout")]
        ),
        1.0
    );
    assert_eq!(
        metric("rig_edge_upstream_errors_total", "body-stall-h2", &[]),
        0.0
    );
    Ok(())
}

#[tokio::test]
async fn an_idle_keep_alive_client_is_closed_at_the_header_read_timeout_and_its_upstream_after() -> R
{
    let target = Target::start().await?;
    let limit = Duration::from_millis(300);
    let limits = HttpLimits {
        header_read_timeout: limit,
        pool_idle_timeout: limit,
        ..HttpLimits::default()
    };
    let edge = edge("keepalive-idle", target.addr, limits, EventSender::new(16)).await?;
    let stream = TcpStream::connect(edge.local_addr()).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(Request::get("/").header("host", "x").body(Empty::new())?)
        .await?;
    resp.into_body().collect().await?;
    let idle_since = Instant::now();
    // The client keeps its connection and sends nothing: hyper's header read timeout also
    // runs while a keep-alive connection waits for its next request, so the edge closes it.
    tokio::time::timeout(WAIT, conn).await???;
    let took = idle_since.elapsed();
    assert!(
        took >= limit && took < limit + Duration::from_secs(2),
        "closed after {took:?}"
    );
    drop(sender);
    eventually("the upstream connection to close", WAIT, || async {
        (target.seen.open.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn a_quiet_request_stream_after_the_target_answered_is_left_alone() -> R {
    // A streaming conversation (a gRPC bidi call, here an echo over h2c): the target answers
    // at once and the client speaks when it likes. That is no stuck upload.
    let up = rig_tests::http_upstream::HttpUpstream::start().await?;
    let limits = HttpLimits {
        body_idle_timeout: BODY_IDLE,
        ..HttpLimits::default()
    };
    let edge = edge("body-duplex", up.addr(), limits, EventSender::new(16)).await?;
    let stream = TcpStream::connect(edge.local_addr()).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    tx.send(Ok(Frame::data(Bytes::from_static(b"a")))).await?;
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = Request::post(format!("http://{}/echo", edge.local_addr())).body(body)?;
    let resp = tokio::time::timeout(WAIT, sender.send_request(req)).await??;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no echo"))??;
    assert_eq!(first.data_ref().map(|d| &d[..]), Some(&b"a"[..]));
    // The client is quiet for twice the limit (the scenario, not a wait for the edge).
    tokio::time::sleep(BODY_IDLE * 2).await;
    tx.send(Ok(Frame::data(Bytes::from_static(b"b")))).await?;
    drop(tx);
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await??
        .to_bytes();
    assert_eq!(&rest[..], b"b");
    Ok(())
}
