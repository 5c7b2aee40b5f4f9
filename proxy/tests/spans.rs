//! A real http edge opens a span per connection (a root: each connection is its own trace) and
//! a span per request inside it, with the fields a tracing backend shows.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rig_proxy::{ChaosSpec, Edge, EdgeConfig, EdgeInfo, EventSender, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata};

/// One span as it was opened: name, parent and field names.
#[derive(Debug, Clone)]
struct Opened {
    id: u64,
    name: &'static str,
    parent: Option<u64>,
    fields: Vec<&'static str>,
}

thread_local! {
    static ENTERED: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Records every span opened at debug and above (everything runs on one thread, so the
/// entered stack is the current span).
#[derive(Clone, Default)]
struct Recorder {
    spans: Arc<Mutex<Vec<Opened>>>,
    next: Arc<AtomicU64>,
}

impl tracing::Subscriber for Recorder {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        *m.level() <= Level::DEBUG
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let parent = if attrs.is_root() {
            None
        } else if let Some(p) = attrs.parent() {
            Some(p.into_u64())
        } else {
            ENTERED.with(|s| s.borrow().last().copied())
        };
        let fields = attrs.metadata().fields().iter().map(|f| f.name()).collect();
        self.spans.lock().unwrap().push(Opened {
            id,
            name: attrs.metadata().name(),
            parent,
            fields,
        });
        Id::from_u64(id)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, id: &Id) {
        ENTERED.with(|s| s.borrow_mut().push(id.into_u64()));
    }
    fn exit(&self, _: &Id) {
        ENTERED.with(|s| {
            s.borrow_mut().pop();
        });
    }
}

/// A target that answers every HTTP/1 request on a connection with `200 ok`.
async fn target() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn requests_have_spans_inside_their_connection_span() {
    let rec = Recorder::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(rec.clone(), || {
        rt.block_on(async {
            let config = EdgeConfig {
                info: EdgeInfo {
                    env: "env1".into(),
                    edge: "web/api".into(),
                    source: "web".into(),
                    egress: "api".into(),
                    target: "api".into(),
                    ingress: "http".into(),
                    protocol: Protocol::Http,
                },
                target: target().await,
                chaos: ChaosSpec::default(),
            };
            let edge = Edge::bind(config, "127.0.0.1:0".parse().unwrap(), EventSender::new(16))
                .await
                .unwrap();
            let mut c = TcpStream::connect(edge.local_addr()).await.unwrap();
            for path in ["/one", "/two"] {
                let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
                c.write_all(req.as_bytes()).await.unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.ends_with(b"ok") {
                    let n = c.read(&mut buf).await.unwrap();
                    assert!(n > 0, "edge closed the connection");
                    got.extend_from_slice(&buf[..n]);
                }
            }
            drop(c);
            edge.shutdown().await;
        });
    });
    let spans = rec.spans.lock().unwrap().clone();
    let conns: Vec<&Opened> = spans.iter().filter(|s| s.name == "connection").collect();
    assert_eq!(conns.len(), 1, "one connection span: {spans:?}");
    let conn = conns[0];
    assert_eq!(conn.parent, None, "a connection span is a root");
    for f in ["env", "edge", "protocol", "conn", "peer"] {
        assert!(conn.fields.contains(&f), "connection span has {f}");
    }
    let reqs: Vec<&Opened> = spans.iter().filter(|s| s.name == "request").collect();
    assert_eq!(reqs.len(), 2, "a span per request: {spans:?}");
    for r in reqs {
        assert_eq!(r.parent, Some(conn.id), "request inside its connection");
        for f in ["id", "method", "path"] {
            assert!(r.fields.contains(&f), "request span has {f}");
        }
    }
}

#[test]
fn tcp_connections_have_a_root_span() {
    let rec = Recorder::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(rec.clone(), || {
        rt.block_on(async {
            let config = EdgeConfig {
                info: EdgeInfo {
                    env: "env1".into(),
                    edge: "web/db".into(),
                    source: "web".into(),
                    egress: "db".into(),
                    target: "db".into(),
                    ingress: "tcp".into(),
                    protocol: Protocol::Tcp,
                },
                // Answers "ok" to whatever it reads, which is all this needs.
                target: target().await,
                chaos: ChaosSpec::default(),
            };
            let edge = Edge::bind(config, "127.0.0.1:0".parse().unwrap(), EventSender::new(16))
                .await
                .unwrap();
            let mut c = TcpStream::connect(edge.local_addr()).await.unwrap();
            c.write_all(b"ping").await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"ok") {
                let n = c.read(&mut buf).await.unwrap();
                assert!(n > 0, "edge closed the connection");
                got.extend_from_slice(&buf[..n]);
            }
            drop(c);
            edge.shutdown().await;
        });
    });
    let spans = rec.spans.lock().unwrap().clone();
    let conns: Vec<&Opened> = spans.iter().filter(|s| s.name == "connection").collect();
    assert_eq!(conns.len(), 1, "one connection span: {spans:?}");
    assert_eq!(conns[0].parent, None, "a connection span is a root");
    for f in ["env", "edge", "protocol", "conn", "peer"] {
        assert!(conns[0].fields.contains(&f), "connection span has {f}");
    }
}
