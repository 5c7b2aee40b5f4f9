//! Out of file descriptors (hard limit lowered, in this process: one test per binary because
//! the limit is process-wide): every connection through a tcp edge is relayed or refused
//! cleanly, refusals are counted with reason fd_limit, no event blames the target, and the edge
//! relays again afterwards. The echo upstream runs here too and shares the limit, so it keeps
//! accepting after its own EMFILE (it used to end its accept loop there, which is why the edge
//! was seen not to relay again after the burst). The same against a rigd child, with the
//! upstream in its own process: tests/tests/conn_limits.rs.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use nix::sys::resource::{Resource, setrlimit};
use rig_proxy::{ChaosSpec, Edge, EdgeConfig, EdgeInfo, EventKind, EventSender, Protocol};
use rig_tests::prom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One echo round trip of `ping` through `addr`; true if it came back.
async fn ping(addr: std::net::SocketAddr) -> bool {
    let Ok(mut c) = TcpStream::connect(addr).await else {
        return false;
    };
    let ok = c.write_all(b"ping").await.is_ok();
    let mut b = [0u8; 4];
    ok && c.read_exact(&mut b).await.is_ok() && &b == b"ping"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_low_hard_limit_connections_are_relayed_or_refused_and_counted() {
    let rec = PrometheusBuilder::new()
        .install_recorder()
        .expect("recorder");
    let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = up.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            match up.accept().await {
                Ok((mut s, _)) => {
                    tokio::spawn(async move {
                        let mut b = [0u8; 4];
                        if s.read_exact(&mut b).await.is_ok() {
                            let _ = s.write_all(&b).await;
                        }
                    });
                }
                // Out of descriptors (this process shares the lowered limit): back off and
                // go on, as a real server does, instead of dropping the listener.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    });
    let events = EventSender::new(8192);
    let mut rx = events.subscribe();
    let edge = Edge::bind(
        EdgeConfig {
            info: EdgeInfo::standalone("client", "upstream", Protocol::Tcp),
            target,
            chaos: ChaosSpec::default(),
        },
        "127.0.0.1:0".parse().expect("addr"),
        events.clone(),
    )
    .await
    .expect("edge");
    let addr = edge.local_addr();
    let open = std::fs::read_dir("/proc/self/fd").expect("fds").count() as u64;
    setrlimit(Resource::RLIMIT_NOFILE, open + 120, open + 120).expect("setrlimit");
    let mut tasks = Vec::new();
    for _ in 0..60 {
        tasks.push(tokio::spawn(async move {
            // Bounded: a connection neither relayed nor refused within this is a hang.
            tokio::time::timeout(Duration::from_secs(20), ping(addr)).await
        }));
    }
    let mut relayed = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(true) => relayed += 1,
            Ok(false) => {}
            Err(_) => panic!("a connection was neither relayed nor refused within 20 s"),
        }
    }
    let refused = prom::value(
        &rec.render(),
        "rig_edge_connections_refused_total",
        &[("reason", "fd_limit")],
    );
    assert!(
        refused > 0.0,
        "some connections refused and counted: {refused}"
    );
    assert!(relayed > 0, "some connections relayed");
    // Every connection of the burst is closed now: the edge relays again.
    rig_tests::eventually::eventually("the edge relays again", Duration::from_secs(10), || async {
        ping(addr).await.then_some(())
    })
    .await;
    while let Ok(ev) = rx.try_recv() {
        if let EventKind::ConnectionClosed(i) = &ev.kind {
            let e = i.error.clone().unwrap_or_default();
            // The upstream shares this process's limit, so it may really reset connections;
            // rig's own fd exhaustion must never be reported as the target's.
            assert!(
                !(e.contains("target") && e.contains("open files")),
                "blames the target for rig's fd limit: {e}"
            );
        }
    }
}
