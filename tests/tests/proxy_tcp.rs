//! The tcp edge, end to end: real tokio clients → an edge on 127.0.0.1:0 → real upstreams.
//!
//! Timing bounds are one-sided where the proxy guarantees a side (a delay is never shorter than
//! configured) and generous on the other, for a loaded 2-core machine. Random faults are checked
//! against binomial bounds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rig_proxy::events::ConnectionInfo;
use rig_proxy::{
    ChaosSpec, Edge, EdgeConfig, EdgeInfo, EventKind, EventSender, FaultKind, Protocol,
};
use rig_tests::eventually::eventually;
use rig_tests::prom;
use rig_tests::tcp_upstream::{TcpUpstream, fill_pattern, pattern, pattern_mismatch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio::time::{Instant, timeout};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const WAIT: Duration = Duration::from_secs(10);

fn spec(toml_src: &str) -> ChaosSpec {
    toml::from_str(toml_src).expect("test spec parses")
}

async fn edge_named(
    source: &str,
    target_name: &str,
    target: SocketAddr,
    chaos: ChaosSpec,
) -> (Edge, EventSender) {
    let events = EventSender::new(4096);
    let edge = Edge::bind(
        EdgeConfig {
            info: EdgeInfo::standalone(source, target_name, Protocol::Tcp),
            target,
            chaos,
        },
        "127.0.0.1:0".parse().expect("addr"),
        events.clone(),
    )
    .await
    .expect("edge binds");
    (edge, events)
}

async fn edge(target: SocketAddr, chaos: ChaosSpec) -> Edge {
    edge_named("client", "upstream", target, chaos).await.0
}

async fn connect(edge: &Edge) -> TcpStream {
    let s = TcpStream::connect(edge.local_addr())
        .await
        .expect("connect to edge");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Connect, unless the proxy resets the connection so fast that the handshake reports it.
async fn connect_unless_reset(edge: &Edge) -> Option<TcpStream> {
    match TcpStream::connect(edge.local_addr()).await {
        Ok(s) => Some(s),
        Err(e) => {
            assert!(is_reset(&e), "unexpected connect error {e}");
            None
        }
    }
}

/// Write `msg` and read back exactly as many bytes; the round-trip time.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let t0 = Instant::now();
    s.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    timeout(WAIT, s.read_exact(&mut back))
        .await
        .expect("echo within the deadline")
        .expect("echo read");
    assert_eq!(back, msg, "echo returns the same bytes");
    t0.elapsed()
}

/// Nothing arrives for `d` (the bounded wait is the assertion).
async fn assert_silent(s: &mut TcpStream, d: Duration, what: &str) {
    let mut buf = [0u8; 64];
    match timeout(d, s.read(&mut buf)).await {
        Err(_) => {}
        Ok(Ok(n)) => panic!("{what}: expected silence, read {n} bytes {:?}", &buf[..n]),
        Ok(Err(e)) => panic!("{what}: expected silence, got error {e}"),
    }
}

/// The connection is closed or reset by the proxy: a read ends with EOF or an error. Returns
/// the bytes read before that.
async fn read_until_closed(s: &mut TcpStream) -> (Vec<u8>, Option<io::Error>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match timeout(WAIT, s.read(&mut buf))
            .await
            .expect("connection ends within the deadline")
        {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e)),
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// Does the proxy reset (or close) this fresh connection instead of relaying one byte?
async fn refused(edge: &Edge) -> bool {
    // A reset that comes back during the handshake fails the connect itself.
    let Some(mut s) = connect_unless_reset(edge).await else {
        return true;
    };
    // The write may already fail if the reset came first.
    if s.write_all(b"?").await.is_err() {
        return true;
    }
    let mut one = [0u8; 1];
    match timeout(WAIT, s.read(&mut one))
        .await
        .expect("answer or reset within the deadline")
    {
        Ok(1) => false,
        Ok(_) => true,
        Err(e) => {
            assert!(is_reset(&e), "unexpected error {e}");
            true
        }
    }
}

async fn next_closed(rx: &mut broadcast::Receiver<Arc<rig_proxy::ProxyEvent>>) -> ConnectionInfo {
    loop {
        let ev = timeout(WAIT, rx.recv())
            .await
            .expect("connection.closed within the deadline")
            .expect("event channel open");
        if let EventKind::ConnectionClosed(info) = &ev.kind {
            return info.clone();
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The Prometheus recorder, installed once per process (tests of this file may share one).
/// Edges record to it only if it was installed before they started, so metric tests call this
/// first and use edge names of their own.
fn recorder() -> &'static PrometheusHandle {
    static H: OnceLock<PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("install the prometheus recorder")
    })
}

// ---------------------------------------------------------------------------------------------
// Relay
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_of_many_sizes_with_half_close() {
    let echo = TcpUpstream::echo().await.unwrap();
    let edge = edge(echo.addr(), ChaosSpec::default()).await;
    for size in [
        1usize,
        7,
        1000,
        4096,
        65_535,
        65_536,
        65_537,
        300_001,
        1 << 20,
    ] {
        let s = connect(&edge).await;
        let (mut rd, mut wr) = s.into_split();
        let data = pattern(size);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&sent).await.expect("write");
            // Half-close: the echo sees EOF, finishes and closes its side; our read side stays.
            wr.shutdown().await.expect("shutdown write");
            wr
        });
        let mut back = Vec::new();
        timeout(WAIT, rd.read_to_end(&mut back))
            .await
            .expect("echo ends within the deadline")
            .expect("read to end");
        let _wr = writer.await.unwrap();
        assert_eq!(back.len(), size, "size {size}");
        assert_eq!(
            pattern_mismatch(0, &back),
            None,
            "size {size}: bytes differ"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_half_close_leaves_the_client_direction_open() {
    // The source sends 1000 bytes and half-closes; the client then still sends 500 bytes.
    let src = TcpUpstream::source(Some(1000)).await.unwrap();
    let edge = edge(src.addr(), ChaosSpec::default()).await;
    let mut s = connect(&edge).await;
    let (got, err) = read_until_closed(&mut s).await;
    assert!(err.is_none(), "clean EOF, got {err:?}");
    assert_eq!(got, pattern(1000));
    s.write_all(&[7u8; 500])
        .await
        .expect("write after the target's EOF");
    eventually("the target receives the client's bytes", WAIT, || async {
        (src.received() == 500).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_relays_64_mib_intact() {
    const TOTAL: usize = 64 << 20;
    let echo = TcpUpstream::echo().await.unwrap();
    let edge = edge(echo.addr(), ChaosSpec::default()).await;
    let s = connect(&edge).await;
    let (mut rd, mut wr) = s.into_split();
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut off = 0usize;
        while off < TOTAL {
            let n = buf.len().min(TOTAL - off);
            fill_pattern(off as u64, &mut buf[..n]);
            wr.write_all(&buf[..n]).await.expect("write");
            off += n;
        }
        wr.shutdown().await.expect("shutdown");
        wr
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    loop {
        let n = timeout(WAIT, rd.read(&mut buf))
            .await
            .expect("progress")
            .expect("read");
        if n == 0 {
            break;
        }
        assert_eq!(
            pattern_mismatch(off, &buf[..n]),
            None,
            "corrupt at offset {off}"
        );
        off += n as u64;
    }
    let _wr = writer.await.unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(off, TOTAL as u64, "every byte comes back");
    println!(
        "64 MiB echoed through the edge in {secs:.2}s ({:.0} MiB/s each way)",
        64.0 / secs
    );
}

// ---------------------------------------------------------------------------------------------
// Latency
// ---------------------------------------------------------------------------------------------

/// Round trips of a small message; the delay is never below `floor`, and the median is within
/// `slack` above it.
async fn check_rtt(chaos: &str, floor: Duration, slack: Duration) {
    let echo = TcpUpstream::echo().await.unwrap();
    let edge = edge(echo.addr(), spec(chaos)).await;
    let mut s = connect(&edge).await;
    let mut rtts = Vec::new();
    for i in 0..9u8 {
        let rtt = round_trip(&mut s, &[i; 100]).await;
        assert!(
            rtt >= floor,
            "{chaos}: round trip {rtt:?} is below {floor:?}"
        );
        rtts.push(rtt);
    }
    let med = median(rtts);
    println!("{chaos}: median round trip {med:?} (floor {floor:?})");
    assert!(
        med <= floor + slack,
        "{chaos}: median round trip {med:?} exceeds {floor:?} + {slack:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_applies_per_chunk_in_each_direction() {
    // Both ways: a round trip crosses the delay twice.
    check_rtt(
        "latency = \"50ms\"\nlatency_direction = \"both\"",
        Duration::from_millis(100),
        Duration::from_millis(40),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_latency_applies_once_per_round_trip() {
    // Downstream by default: a round trip is delayed once, as an http request is.
    check_rtt(
        "latency = \"50ms\"",
        Duration::from_millis(50),
        Duration::from_millis(25),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_latency_applies_once_per_round_trip() {
    check_rtt(
        "latency = \"50ms\"\nlatency_direction = \"upstream\"",
        Duration::from_millis(50),
        Duration::from_millis(25),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_latency_applies_once_per_round_trip() {
    check_rtt(
        "latency = \"50ms\"\nlatency_direction = \"downstream\"",
        Duration::from_millis(50),
        Duration::from_millis(25),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_delays_the_stream_without_throttling_it() {
    // 20 messages 10 ms apart through 50 ms of upstream latency: each arrives ~50 ms after it was
    // sent, so the last one ~240 ms after the first was sent, not 20 × 50 ms.
    let echo = TcpUpstream::echo().await.unwrap();
    let edge = edge(
        echo.addr(),
        spec("latency = \"50ms\"\nlatency_direction = \"upstream\""),
    )
    .await;
    let s = connect(&edge).await;
    let (mut rd, mut wr) = s.into_split();
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        let mut sent_at = Vec::new();
        for i in 0..20u8 {
            sent_at.push(Instant::now());
            wr.write_all(&[i]).await.expect("write");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (wr, sent_at)
    });
    let mut arrived = Vec::new();
    let mut buf = [0u8; 64];
    while arrived.len() < 20 {
        let n = timeout(WAIT, rd.read(&mut buf))
            .await
            .expect("echo")
            .expect("read");
        assert!(n > 0, "unexpected EOF");
        for &b in &buf[..n] {
            assert_eq!(b as usize, arrived.len(), "bytes stay in order");
            arrived.push(Instant::now());
        }
    }
    let (_wr, sent_at) = writer.await.unwrap();
    for (i, (s, a)) in sent_at.iter().zip(&arrived).enumerate() {
        let d = *a - *s;
        assert!(
            d >= Duration::from_millis(50),
            "message {i} delayed only {d:?}"
        );
    }
    let total = t0.elapsed();
    assert!(
        total < Duration::from_millis(600),
        "the stream was throttled: {total:?} for 20 messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_act_on_an_open_connection() {
    let echo = TcpUpstream::echo().await.unwrap();
    let edge = edge(echo.addr(), ChaosSpec::default()).await;
    let mut s = connect(&edge).await;
    let fast = round_trip(&mut s, b"hello").await;
    assert!(fast < Duration::from_millis(50), "no latency yet: {fast:?}");
    edge.set_chaos(spec("latency = \"80ms\"\nlatency_direction = \"upstream\""))
        .unwrap();
    let slow = round_trip(&mut s, b"hello").await;
    assert!(
        slow >= Duration::from_millis(80),
        "latency applies from the next chunk: {slow:?}"
    );
    edge.clear_chaos();
    let mut back_to_fast = Vec::new();
    for _ in 0..5 {
        back_to_fast.push(round_trip(&mut s, b"hello").await);
    }
    let med = median(back_to_fast);
    assert!(
        med < Duration::from_millis(40),
        "latency off again: {med:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Errors (resets)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_one_resets_on_accept() {
    let echo = TcpUpstream::echo().await.unwrap();
    let (edge, events) = edge_named("client", "echo", echo.addr(), spec("error_rate = 1.0")).await;
    let mut rx = events.subscribe();
    if let Some(mut s) = connect_unless_reset(&edge).await {
        let mut buf = [0u8; 16];
        match timeout(WAIT, s.read(&mut buf))
            .await
            .expect("reset within the deadline")
        {
            Ok(0) => {}
            Ok(n) => panic!("read {n} bytes from a reset connection"),
            Err(e) => assert!(is_reset(&e), "expected a reset, got {e}"),
        }
    }
    let closed = next_closed(&mut rx).await;
    assert_eq!(closed.error.as_deref(), Some("reset by chaos"));
    assert_eq!(closed.faults, vec![FaultKind::Reset]);
    assert_eq!(echo.accepted(), 0, "the target was never dialled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_passes_exactly_that_many_bytes() {
    // A source streams forever: the client gets at most 10 000 bytes, then the reset.
    let src = TcpUpstream::source(None).await.unwrap();
    let (edge, events) = edge_named(
        "client",
        "source",
        src.addr(),
        spec("error_rate = 1.0\nreset_after = 10000"),
    )
    .await;
    let mut rx = events.subscribe();
    // The source fills the budget at once, so the reset may beat the client's handshake.
    if let Some(mut s) = connect_unless_reset(&edge).await {
        let (got, err) = read_until_closed(&mut s).await;
        assert!(got.len() <= 10_000, "{} bytes came through", got.len());
        assert_eq!(pattern_mismatch(0, &got), None);
        if let Some(e) = err {
            assert!(is_reset(&e), "expected a reset, got {e}");
        }
    }
    let closed = next_closed(&mut rx).await;
    assert_eq!(
        closed.bytes_downstream, 10_000,
        "the proxy passed exactly reset_after bytes"
    );
    assert_eq!(closed.error.as_deref(), Some("reset by chaos"));

    // Both directions count: an echo of 5000 bytes stops after 1000 in all.
    let echo = TcpUpstream::echo().await.unwrap();
    let (edge, events) = edge_named(
        "client",
        "echo",
        echo.addr(),
        spec("error_rate = 1.0\nreset_after = 1000"),
    )
    .await;
    let mut rx = events.subscribe();
    let mut s = connect(&edge).await;
    let _ = s.write_all(&pattern(5000)).await;
    let (got, _) = read_until_closed(&mut s).await;
    assert!(got.len() <= 1000, "{} bytes came back", got.len());
    let closed = next_closed(&mut rx).await;
    assert_eq!(closed.bytes_upstream + closed.bytes_downstream, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_resets_repeat_across_edges() {
    let echo = TcpUpstream::echo().await.unwrap();
    let chaos = spec("error_rate = 0.5\nseed = 42");
    let a = edge(echo.addr(), chaos.clone()).await;
    let b = edge(echo.addr(), chaos).await;
    let mut seq_a = Vec::new();
    let mut seq_b = Vec::new();
    for _ in 0..200 {
        seq_a.push(refused(&a).await);
        seq_b.push(refused(&b).await);
    }
    assert_eq!(seq_a, seq_b, "the same seed gives the same resets");
    let resets = seq_a.iter().filter(|r| **r).count();
    // Binomial(200, 0.5): sigma ~7.1; ±5 sigma.
    assert!((65..=135).contains(&resets), "{resets} resets of 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unseeded_error_rate_is_within_binomial_bounds() {
    let echo = TcpUpstream::echo().await.unwrap();
    let edge = Arc::new(edge(echo.addr(), spec("error_rate = 0.3")).await);
    let resets = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (edge, resets) = (edge.clone(), resets.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                if refused(&edge).await {
                    resets.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = resets.load(Ordering::Relaxed);
    // Binomial(400, 0.3): mean 120, sigma ~9.17; ±5 sigma.
    assert!((74..=166).contains(&n), "{n} resets of 400");
}

// ---------------------------------------------------------------------------------------------
// Hang
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_holds_until_chaos_is_cleared() {
    let echo = TcpUpstream::echo().await.unwrap();
    let edge = edge(echo.addr(), spec("hang_rate = 1.0")).await;
    let mut s = connect(&edge).await;
    s.write_all(b"ping").await.unwrap();
    assert_silent(&mut s, Duration::from_millis(300), "held connection").await;
    assert_eq!(echo.accepted(), 0, "nothing forwarded while held");
    edge.clear_chaos();
    let mut back = [0u8; 4];
    timeout(WAIT, s.read_exact(&mut back))
        .await
        .expect("released")
        .expect("read");
    assert_eq!(&back, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_for_closes_after_its_duration() {
    let echo = TcpUpstream::echo().await.unwrap();
    let (edge, events) = edge_named(
        "client",
        "echo",
        echo.addr(),
        spec("hang_rate = 1.0\nhang_for = \"200ms\""),
    )
    .await;
    let mut rx = events.subscribe();
    let t0 = Instant::now();
    let mut s = connect(&edge).await;
    s.write_all(b"ping").await.unwrap();
    let (got, _) = read_until_closed(&mut s).await;
    assert!(got.is_empty(), "nothing echoed from a hung connection");
    assert!(
        t0.elapsed() >= Duration::from_millis(200),
        "closed after {:?}",
        t0.elapsed()
    );
    let closed = next_closed(&mut rx).await;
    assert_eq!(closed.faults, vec![FaultKind::Hang]);
    assert_eq!(closed.error.as_deref(), Some("closed after hang"));
}

// ---------------------------------------------------------------------------------------------
// Partitions
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_blocks_then_resumes_live_on_the_same_connection() {
    let echo = TcpUpstream::echo().await.unwrap();
    let edge = edge(echo.addr(), ChaosSpec::default()).await;
    let mut s = connect(&edge).await;
    round_trip(&mut s, b"before").await;
    edge.set_chaos(spec("partition = \"blackhole\"\nkeep_connections = true"))
        .unwrap();
    s.write_all(b"lost").await.unwrap();
    assert_silent(&mut s, Duration::from_millis(300), "blackholed connection").await;
    edge.clear_chaos();
    // What was sent into the blackhole is gone; what follows flows.
    round_trip(&mut s, b"after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_holds_new_connections_without_dialling_the_target() {
    let echo = TcpUpstream::echo().await.unwrap();
    let edge = edge(echo.addr(), spec("partition = true")).await;
    let mut s = connect(&edge).await;
    s.write_all(b"lost").await.unwrap();
    assert_silent(&mut s, Duration::from_millis(300), "blackholed connection").await;
    assert_eq!(
        echo.accepted(),
        0,
        "a full partition does not reach the target"
    );
    edge.clear_chaos();
    round_trip(&mut s, b"after").await;
    assert_eq!(echo.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_cuts_existing_connections_by_default() {
    let echo = TcpUpstream::echo().await.unwrap();
    let (edge, events) = edge_named("client", "echo", echo.addr(), ChaosSpec::default()).await;
    let mut rx = events.subscribe();
    let mut s = connect(&edge).await;
    round_trip(&mut s, b"before").await;
    // The connection is idle: the policy change alone must end it.
    edge.set_chaos(spec("partition = \"blackhole\"")).unwrap();
    let (got, err) = read_until_closed(&mut s).await;
    assert!(got.is_empty());
    if let Some(e) = err {
        assert!(is_reset(&e), "expected a reset, got {e}");
    }
    let closed = next_closed(&mut rx).await;
    assert_eq!(closed.error.as_deref(), Some("cut by partition"));
    assert_eq!(closed.faults, vec![FaultKind::Partition]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_resets_new_connections() {
    let echo = TcpUpstream::echo().await.unwrap();
    let (edge, events) = edge_named(
        "client",
        "echo",
        echo.addr(),
        spec("partition = \"reject\""),
    )
    .await;
    let mut rx = events.subscribe();
    assert!(refused(&edge).await, "a rejected connection relays nothing");
    let closed = next_closed(&mut rx).await;
    assert_eq!(closed.error.as_deref(), Some("rejected by partition"));
    assert_eq!(closed.faults, vec![FaultKind::Partition]);
    assert_eq!(echo.accepted(), 0);
    edge.clear_chaos();
    assert!(!refused(&edge).await, "connections pass again once cleared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_partition_drops_client_bytes_while_target_bytes_flow() {
    let greeter = TcpUpstream::greeter(b"tick\n", Duration::from_millis(30))
        .await
        .unwrap();
    let edge = edge(
        greeter.addr(),
        spec("partition = \"blackhole\"\ndirection = \"upstream\""),
    )
    .await;
    let mut s = connect(&edge).await;
    s.write_all(&[1u8; 1000]).await.unwrap();
    // Ticks keep coming back while the client's bytes go nowhere.
    let mut ticks = 0;
    let mut buf = [0u8; 5];
    while ticks < 5 {
        timeout(WAIT, s.read_exact(&mut buf))
            .await
            .expect("ticks flow downstream")
            .expect("read");
        assert_eq!(&buf, b"tick\n");
        ticks += 1;
    }
    assert_eq!(
        greeter.received(),
        0,
        "client bytes crossed an upstream partition"
    );
    edge.clear_chaos();
    s.write_all(&[2u8; 10]).await.unwrap();
    eventually(
        "client bytes reach the target once cleared",
        WAIT,
        || async { (greeter.received() == 10).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_partition_drops_target_bytes_while_client_bytes_flow() {
    let greeter = TcpUpstream::greeter(b"tick\n", Duration::from_millis(30))
        .await
        .unwrap();
    let edge = edge(
        greeter.addr(),
        spec("partition = \"blackhole\"\ndirection = \"downstream\""),
    )
    .await;
    let mut s = connect(&edge).await;
    s.write_all(&[1u8; 100]).await.unwrap();
    eventually("client bytes reach the target", WAIT, || async {
        (greeter.received() == 100).then_some(())
    })
    .await;
    assert_silent(&mut s, Duration::from_millis(300), "downstream partition").await;
    assert!(greeter.sent() >= 10, "the target kept sending");
    edge.clear_chaos();
    let mut buf = [0u8; 5];
    timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("ticks flow once cleared")
        .expect("read");
    assert_eq!(&buf, b"tick\n");
}

// ---------------------------------------------------------------------------------------------
// Policy changes under load
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_under_load_lose_nothing() {
    let echo = TcpUpstream::echo().await.unwrap();
    let edge = edge(echo.addr(), ChaosSpec::default()).await;
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut conns = Vec::new();
    for c in 0..8u64 {
        let s = connect(&edge).await;
        let (mut rd, mut wr) = s.into_split();
        let stopped = stopped.clone();
        let writer = tokio::spawn(async move {
            let mut off = 0u64;
            let mut buf = vec![0u8; 24 * 1024];
            while !stopped.load(Ordering::Relaxed) {
                // Vary the write sizes so chunks straddle every boundary.
                let n = 1000 + ((off / 7 + c * 131) % 20_000) as usize;
                fill_pattern(off, &mut buf[..n]);
                wr.write_all(&buf[..n]).await.expect("write under load");
                off += n as u64;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            wr.shutdown().await.expect("shutdown");
            off
        });
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0u64;
            loop {
                let n = timeout(WAIT, rd.read(&mut buf))
                    .await
                    .expect("progress")
                    .expect("read under load");
                if n == 0 {
                    return off;
                }
                assert_eq!(
                    pattern_mismatch(off, &buf[..n]),
                    None,
                    "connection {c}: corrupt at {off}"
                );
                off += n as u64;
            }
        });
        conns.push((writer, reader));
    }
    for chaos in [
        "latency = \"5ms\"",
        "",
        "bandwidth = \"2MiB/s\"",
        "latency = \"3ms\"\njitter = \"2ms\"\nbandwidth = \"4MiB/s\"\nbandwidth_per_connection = true",
        "slicer = { average_size = 500, size_variation = 100 }",
        "",
    ] {
        edge.set_chaos(spec(chaos)).unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stopped.store(true, Ordering::Relaxed);
    for (c, (writer, reader)) in conns.into_iter().enumerate() {
        let sent = writer.await.unwrap();
        let got = reader.await.unwrap();
        assert!(sent > 0);
        assert_eq!(
            got, sent,
            "connection {c}: every byte comes back exactly once"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Bandwidth
// ---------------------------------------------------------------------------------------------

const RATE: f64 = 256.0 * 1024.0;
const WINDOW: Duration = Duration::from_millis(2500);

/// Read from `n` connections for a warm-up and then `WINDOW`; bytes per second per connection
/// over the window.
async fn downstream_rates(edge: &Edge, n: usize) -> Vec<f64> {
    let mut counters = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut s = connect(edge).await;
        let count = Arc::new(AtomicU64::new(0));
        counters.push(count.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(k) = s.read(&mut buf).await {
                if k == 0 {
                    break;
                }
                count.fetch_add(k as u64, Ordering::Relaxed);
            }
        }));
    }
    // Skip the initial burst of the token bucket.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t1 = Instant::now();
    let start: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    tokio::time::sleep(WINDOW).await;
    let secs = t1.elapsed().as_secs_f64();
    let rates = counters
        .iter()
        .zip(start)
        .map(|(c, s0)| (c.load(Ordering::Relaxed) - s0) as f64 / secs)
        .collect();
    for t in tasks {
        t.abort();
    }
    rates
}

fn assert_rate(what: &str, got: f64, want: f64) {
    println!(
        "{what}: {:.1} KiB/s (want {:.1} KiB/s)",
        got / 1024.0,
        want / 1024.0
    );
    assert!(
        (got - want).abs() <= want * 0.10,
        "{what}: {got:.0} B/s is not within 10% of {want:.0} B/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_is_shared_by_the_edge() {
    let src = TcpUpstream::source(None).await.unwrap();
    let edge = edge(src.addr(), spec("bandwidth_downstream = \"256KiB/s\"")).await;
    let rates = downstream_rates(&edge, 2).await;
    assert_rate("two connections together", rates.iter().sum(), RATE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_per_connection() {
    let src = TcpUpstream::source(None).await.unwrap();
    let edge = edge(
        src.addr(),
        spec("bandwidth_downstream = \"256KiB/s\"\nbandwidth_per_connection = true"),
    )
    .await;
    let rates = downstream_rates(&edge, 2).await;
    for (i, r) in rates.iter().enumerate() {
        assert_rate(&format!("connection {i}"), *r, RATE);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_upstream() {
    let sink = TcpUpstream::sink().await.unwrap();
    let edge = edge(sink.addr(), spec("bandwidth_upstream = \"256KiB/s\"")).await;
    let s = connect(&edge).await;
    let (_rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let buf = vec![0u8; 64 * 1024];
        while wr.write_all(&buf).await.is_ok() {}
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (t1, b1) = (Instant::now(), sink.received());
    tokio::time::sleep(WINDOW).await;
    let rate = (sink.received() - b1) as f64 / t1.elapsed().as_secs_f64();
    writer.abort();
    assert_rate("upstream", rate, RATE);
}

// ---------------------------------------------------------------------------------------------
// Toxiproxy's extras: slicer, limit_data, slow_close
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slicer_cuts_the_stream_into_delayed_pieces() {
    let src = TcpUpstream::source(Some(2000)).await.unwrap();
    let (edge, events) = edge_named(
        "client",
        "source",
        src.addr(),
        spec("slicer = { average_size = 100, size_variation = 20, delay = \"10ms\" }"),
    )
    .await;
    let mut rx = events.subscribe();
    let t0 = Instant::now();
    let mut s = connect(&edge).await;
    let mut got = Vec::new();
    let mut reads = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = timeout(WAIT, s.read(&mut buf))
            .await
            .expect("progress")
            .expect("read");
        if n == 0 {
            break;
        }
        reads.push(n);
        got.extend_from_slice(&buf[..n]);
    }
    let elapsed = t0.elapsed();
    drop(s);
    assert_eq!(got, pattern(2000));
    // 2000 bytes in pieces of at most 120 are at least 17 pieces, so 16 delays.
    assert!(
        elapsed >= Duration::from_millis(160),
        "2000 bytes sliced in {elapsed:?}"
    );
    assert!(
        reads.len() >= 8,
        "the client saw the stream in pieces: {reads:?}"
    );
    let small = reads.iter().filter(|n| **n <= 120).count();
    assert!(
        small * 2 >= reads.len(),
        "most reads are one piece: {reads:?}"
    );
    let closed = next_closed(&mut rx).await;
    assert!(closed.faults.contains(&FaultKind::Slicer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_data_closes_after_that_many_bytes() {
    let src = TcpUpstream::source(None).await.unwrap();
    let (edge, events) =
        edge_named("client", "source", src.addr(), spec("limit_data = 5000")).await;
    let mut rx = events.subscribe();
    let mut s = connect(&edge).await;
    let (got, err) = read_until_closed(&mut s).await;
    assert!(err.is_none(), "a normal close, got {err:?}");
    assert_eq!(got, pattern(5000));
    let closed = next_closed(&mut rx).await;
    assert_eq!(closed.error.as_deref(), Some("data limit reached"));
    assert_eq!(closed.faults, vec![FaultKind::LimitData]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_close_delays_the_end_of_stream() {
    let src = TcpUpstream::source(Some(100)).await.unwrap();
    let edge = edge(src.addr(), spec("slow_close = \"300ms\"")).await;
    let mut s = connect(&edge).await;
    let mut first = [0u8; 100];
    timeout(WAIT, s.read_exact(&mut first))
        .await
        .expect("data")
        .expect("read");
    let t_data = Instant::now();
    let mut rest = [0u8; 1];
    let n = timeout(WAIT, s.read(&mut rest))
        .await
        .expect("EOF")
        .expect("read");
    assert_eq!(n, 0);
    let held = t_data.elapsed();
    assert!(
        held >= Duration::from_millis(250),
        "EOF came {held:?} after the data"
    );

    // Without it the close follows at once.
    edge.clear_chaos();
    let mut s = connect(&edge).await;
    timeout(WAIT, s.read_exact(&mut first))
        .await
        .expect("data")
        .expect("read");
    let t_data = Instant::now();
    let n = timeout(WAIT, s.read(&mut rest))
        .await
        .expect("EOF")
        .expect("read");
    assert_eq!(n, 0);
    assert!(
        t_data.elapsed() < Duration::from_millis(250),
        "EOF came {:?} after the data",
        t_data.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Failures, observation, shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_closes_the_client_and_reports_it() {
    let rec = recorder();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (edge, events) = edge_named(
        "unreach-client",
        "unreach-target",
        dead,
        ChaosSpec::default(),
    )
    .await;
    let mut rx = events.subscribe();
    let mut s = connect(&edge).await;
    let (got, _) = read_until_closed(&mut s).await;
    assert!(got.is_empty());
    let closed = next_closed(&mut rx).await;
    assert_eq!(
        closed.error.as_deref(),
        Some("target unreachable: connection refused")
    );
    let errors = prom::value(
        &rec.render(),
        "rig_edge_upstream_errors_total",
        &[("edge", "unreach-client/unreach-target")],
    );
    assert_eq!(errors, 1.0);
    // The edge keeps serving.
    let mut s = connect(&edge).await;
    let (got, _) = read_until_closed(&mut s).await;
    assert!(got.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_metrics_count_connections_and_bytes() {
    let rec = recorder();
    let echo = TcpUpstream::echo().await.unwrap();
    let (edge, events) =
        edge_named("obs-client", "obs-echo", echo.addr(), ChaosSpec::default()).await;
    let mut rx = events.subscribe();
    let mut s = connect(&edge).await;
    round_trip(&mut s, &pattern(1000)).await;
    // Bytes are counted as they pass, not only at close.
    let labels = [("edge", "obs-client/obs-echo"), ("direction", "upstream")];
    eventually("bytes counted while open", WAIT, || async {
        (prom::value(&rec.render(), "rig_edge_bytes_total", &labels) == 1000.0).then_some(())
    })
    .await;
    assert_eq!(
        prom::value(
            &rec.render(),
            "rig_edge_connections_open",
            &[("edge", "obs-client/obs-echo")]
        ),
        1.0
    );
    s.shutdown().await.unwrap();
    let (rest, err) = read_until_closed(&mut s).await;
    assert!(rest.is_empty() && err.is_none());

    let ev = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    let EventKind::ConnectionOpened(opened) = &ev.kind else {
        panic!("first event is connection.opened, got {}", ev.kind.name());
    };
    assert_eq!(ev.edge.edge, "obs-client/obs-echo");
    let closed = next_closed(&mut rx).await;
    assert_eq!(closed.connection_id, opened.connection_id);
    assert_eq!(closed.bytes_upstream, 1000);
    assert_eq!(closed.bytes_downstream, 1000);
    assert_eq!(closed.error, None);
    assert!(closed.faults.is_empty());
    assert!(closed.duration.is_some());

    let text = rec.render();
    let edge_l = ("edge", "obs-client/obs-echo");
    assert_eq!(
        prom::value(&text, "rig_edge_connections_total", &[edge_l]),
        1.0
    );
    assert_eq!(
        prom::value(&text, "rig_edge_connections_open", &[edge_l]),
        0.0
    );
    assert_eq!(
        prom::value(
            &text,
            "rig_edge_bytes_total",
            &[edge_l, ("direction", "downstream")]
        ),
        1000.0
    );

    // A fault is counted once per connection it acts on.
    edge.set_chaos(spec("error_rate = 1.0")).unwrap();
    for _ in 0..3 {
        assert!(refused(&edge).await);
    }
    for _ in 0..3 {
        next_closed(&mut rx).await;
    }
    let resets = prom::value(
        &rec.render(),
        "rig_edge_faults_injected_total",
        &[edge_l, ("fault", "reset")],
    );
    assert_eq!(resets, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_open_connections_promptly() {
    let echo = TcpUpstream::echo().await.unwrap();
    let edge = edge(echo.addr(), ChaosSpec::default()).await;
    let addr = edge.local_addr();
    let mut idle = connect(&edge).await;
    round_trip(&mut idle, b"hi").await;
    // One held by a slow delay too.
    edge.set_chaos(spec("latency = \"10s\"")).unwrap();
    let mut delayed = connect(&edge).await;
    delayed.write_all(b"slow").await.unwrap();
    timeout(Duration::from_secs(5), edge.shutdown())
        .await
        .expect("shutdown completes promptly");
    for s in [&mut idle, &mut delayed] {
        let (got, _) = read_until_closed(s).await;
        assert!(got.is_empty());
    }
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

// ---------------------------------------------------------------------------------------------
// Memory: an idle proxied connection holds no large buffers
// ---------------------------------------------------------------------------------------------

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}
/// Bytes allocated and not yet freed by threads marked COUNTED (the proxy's runtime).
static LIVE: AtomicI64 = AtomicI64::new(0);

/// The system allocator, counting the live bytes of the proxy runtime's threads.
struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping only reads
// a const-initialised thread-local (which never allocates) and bumps an atomic.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTED.with(Cell::get) {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTED.with(Cell::get) {
            LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn idle_connections_cost_little_memory() {
    const N: usize = 200;
    // The proxy gets a runtime of its own whose threads are counted; the clients and the echo run
    // elsewhere.
    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(|| COUNTED.with(|c| c.set(true)))
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let echo = client_rt.block_on(TcpUpstream::echo()).unwrap();
    let target = echo.addr();
    let edge = proxy_rt.block_on(async move {
        tokio::spawn(async move { edge(target, ChaosSpec::default()).await })
            .await
            .unwrap()
    });
    let per_conn = client_rt.block_on(async {
        // Warm up lazily built state (timer wheels, slabs) with a first connection under chaos
        // and without.
        let mut warm = connect(&edge).await;
        round_trip(&mut warm, b"warm").await;
        let before = LIVE.load(Ordering::Relaxed);
        let mut conns = Vec::new();
        for _ in 0..N {
            let mut s = connect(&edge).await;
            round_trip(&mut s, &pattern(3000)).await;
            conns.push(s);
        }
        // Through the copy loop too (latency on), and back to splice.
        edge.set_chaos(spec("latency = \"1ms\"")).unwrap();
        for s in conns.iter_mut() {
            round_trip(s, &pattern(3000)).await;
        }
        edge.clear_chaos();
        for s in conns.iter_mut() {
            round_trip(s, b"idle").await;
        }
        // The echoes are back, but the proxy may still be a step from parking: poll until
        // the cost per connection drops under the budget (it never does if buffers are kept).
        let deadline = Instant::now() + Duration::from_secs(5);
        let (within, last) = loop {
            let per = (LIVE.load(Ordering::Relaxed) - before) / N as i64;
            if per <= 16 * 1024 || Instant::now() > deadline {
                break (per <= 16 * 1024, per);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        drop(conns);
        (within, last)
    });
    println!(
        "an idle proxied connection holds {} bytes of heap",
        per_conn.1
    );
    assert!(per_conn.0, "an idle connection holds {} bytes", per_conn.1);
    drop(edge);
    drop(echo);
}
