//! The http edge end to end: a real hyper upstream, a real rig edge, real hyper clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rig_proxy::{EventKind, EventSender, FaultKind, INJECTED_HEADER, Protocol};
use rig_tests::eventually::eventually;
use rig_tests::http_upstream::{
    HttpUpstream, chaos, edge, edge_url, get, h2c_client, http_edge, http1_client, observed_edge,
    pattern, prometheus, send, unused_addr, wait_event,
};
use rig_tests::prom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type R = anyhow::Result<()>;

const WAIT: Duration = Duration::from_secs(10);

/// `k` successes in `n` Bernoulli(p) draws lie within 5 standard deviations of the mean
/// (a false failure about once in 1.7 million runs).
fn assert_binomial(k: usize, n: usize, p: f64, what: &str) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    assert!(
        (k as f64 - mean).abs() <= 5.0 * sd,
        "{what}: {k} of {n}, expected {mean:.1} ± {:.1}",
        5.0 * sd
    );
}

#[tokio::test]
async fn get_and_post_through_the_proxy_equal_direct() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), Default::default()).await?;
    let client = http1_client();

    let direct = get(&client, &up.url("/echo/a?x=1&y=two")).await?;
    let proxied = get(&client, &edge_url(&edge, "/echo/a?x=1&y=two")).await?;
    assert_eq!(proxied.status, StatusCode::OK);
    assert_eq!(proxied.header("x-echo-path"), direct.header("x-echo-path"));
    assert_eq!(proxied.header("x-echo-path"), "/echo/a?x=1&y=two");
    assert_eq!(proxied.header("x-echo-method"), "GET");
    assert_eq!(proxied.header("x-echo-version"), "HTTP/1.1");
    // The Host header stays as the client sent it.
    assert_eq!(proxied.header("x-echo-host"), edge.local_addr().to_string());
    assert!(proxied.headers.get(INJECTED_HEADER).is_none());

    // A large body goes up and comes back intact, streamed both ways.
    let big = pattern(1 << 20);
    let direct = send(&client, Method::POST, &up.url("/echo"), &[], big.clone()).await?;
    let proxied = send(
        &client,
        Method::POST,
        &edge_url(&edge, "/echo"),
        &[],
        big.clone(),
    )
    .await?;
    assert_eq!(proxied.status, StatusCode::OK);
    assert_eq!(proxied.header("x-echo-method"), "POST");
    assert_eq!(proxied.body, direct.body);
    assert_eq!(proxied.body, big);

    // HTTP/1.1 trailers cross too, for a client that accepts them.
    let r = send(
        &client,
        Method::GET,
        &edge_url(&edge, "/trailers"),
        &[("te", "trailers")],
        Bytes::new(),
    )
    .await?;
    assert_eq!(r.body, "hello");
    assert_eq!(
        r.trailers.expect("trailers over HTTP/1.1")["x-checksum"],
        "42"
    );

    // A streamed response without buffering surprises, and real statuses pass untouched.
    let proxied = get(&client, &edge_url(&edge, "/bytes/300001?chunk=7000")).await?;
    assert_eq!(proxied.body, pattern(300_001));
    let proxied = get(&client, &edge_url(&edge, "/status/418")).await?;
    assert_eq!(proxied.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(proxied.body, "status 418");
    assert!(proxied.headers.get(INJECTED_HEADER).is_none());
    Ok(())
}

#[tokio::test]
async fn keep_alive_connections_are_reused() -> R {
    let up = HttpUpstream::start().await?;
    let events = EventSender::new(4096);
    let mut rx = events.subscribe();
    let edge = edge(
        "client",
        Protocol::Http,
        up.addr(),
        Default::default(),
        events,
    )
    .await?;
    let client = http1_client();
    for i in 0..20 {
        let r = get(&client, &edge_url(&edge, &format!("/echo/{i}"))).await?;
        assert_eq!(r.status, StatusCode::OK);
    }
    let mut opened = 0;
    let mut completed = 0;
    while let Ok(ev) = rx.try_recv() {
        match &ev.kind {
            EventKind::ConnectionOpened(_) => opened += 1,
            EventKind::RequestCompleted(_) => completed += 1,
            _ => {}
        }
    }
    assert_eq!(opened, 1, "the client's keep-alive connection is reused");
    assert_eq!(completed, 20);
    assert_eq!(
        up.connections(),
        1,
        "the edge's upstream connection is pooled"
    );
    assert_eq!(up.requests(), 20);
    Ok(())
}

#[tokio::test]
async fn h2c_clients_work_and_go_upstream_over_h2() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), Default::default()).await?;
    let client = h2c_client();

    let r = get(&client, &edge_url(&edge, "/echo/h2?q=1")).await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-echo-version"), "HTTP/2.0");
    assert_eq!(r.header("x-echo-path"), "/echo/h2?q=1");

    let body = pattern(200_000);
    let r = send(
        &client,
        Method::POST,
        &edge_url(&edge, "/echo"),
        &[],
        body.clone(),
    )
    .await?;
    assert_eq!(r.body, body);

    // Trailers cross the proxy.
    let r = get(&client, &edge_url(&edge, "/trailers")).await?;
    assert_eq!(r.body, "hello");
    let trailers = r.trailers.expect("trailers arrive over h2");
    assert_eq!(trailers["x-checksum"], "42");

    // Many concurrent streams on one connection.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let client = client.clone();
        let url = edge_url(&edge, &format!("/echo/{i}"));
        tasks.push(tokio::spawn(async move { get(&client, &url).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await??;
        assert_eq!(r.header("x-echo-path"), format!("/echo/{i}"));
    }
    Ok(())
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), Default::default()).await?;
    let client = http1_client();
    let r = send(
        &client,
        Method::GET,
        &edge_url(&edge, "/headers"),
        &[
            ("connection", "x-private"),
            ("x-private", "secret"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-end-to-end", "kept"),
        ],
        Bytes::new(),
    )
    .await?;
    let seen: serde_json::Value = serde_json::from_slice(&r.body)?;
    assert_eq!(seen["x-end-to-end"], "kept");
    assert_eq!(seen["host"], edge.local_addr().to_string());
    for gone in ["x-private", "proxy-authorization"] {
        assert!(
            seen.get(gone).is_none(),
            "{gone} reached the upstream: {seen}"
        );
    }
    // The connection header is hyper's own business on the next hop.
    assert_ne!(
        seen.get("connection").and_then(|v| v.as_str()),
        Some("x-private")
    );
    Ok(())
}

#[tokio::test]
async fn error_rate_one_answers_503_with_headers_and_default_body() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(
        up.addr(),
        chaos(
            r#"
            error_rate = 1.0
            headers = { "Retry-After" = "7" }
            "#,
        ),
    )
    .await?;
    let client = http1_client();
    let r = get(&client, &edge_url(&edge, "/echo")).await?;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("retry-after"), "7");
    assert_eq!(r.header(INJECTED_HEADER), "fault=error");
    assert_eq!(r.header("content-type"), "application/json");
    let body: serde_json::Value = serde_json::from_slice(&r.body)?;
    assert_eq!(body["error"], "injected by rig");
    assert_eq!(body["edge"], "client/api");
    assert_eq!(
        up.requests(),
        0,
        "an injected error never reaches the target"
    );

    // A custom status and body.
    edge.set_chaos(chaos("status = 429\nbody = \"slow down\""))?;
    let r = get(&client, &edge_url(&edge, "/echo")).await?;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body, "slow down");
    assert_eq!(r.header(INJECTED_HEADER), "fault=error");

    // Clearing the policy lets requests through again, on the same edge.
    edge.clear_chaos();
    let r = get(&client, &edge_url(&edge, "/echo")).await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(up.requests(), 1);
    Ok(())
}

async fn statuses(
    client: &rig_tests::http_upstream::HttpClient,
    url: &str,
    n: usize,
) -> anyhow::Result<Vec<u16>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(get(client, url).await?.status.as_u16());
    }
    Ok(out)
}

#[tokio::test]
async fn weighted_statuses_follow_their_weights() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(
        up.addr(),
        chaos(
            r#"
            error_rate = 1.0
            statuses = [{ status = 500, weight = 1 }, { status = 503, weight = 3 }]
            "#,
        ),
    )
    .await?;
    let n = 400;
    let got = statuses(&http1_client(), &edge_url(&edge, "/echo"), n).await?;
    assert!(got.iter().all(|s| *s == 500 || *s == 503), "{got:?}");
    let k500 = got.iter().filter(|s| **s == 500).count();
    assert_binomial(k500, n, 0.25, "status 500 with weight 1 of 4");
    Ok(())
}

#[tokio::test]
async fn a_seed_makes_the_status_sequence_repeatable() -> R {
    let up = HttpUpstream::start().await?;
    let spec = r#"
        error_rate = 0.5
        statuses = [{ status = 500 }, { status = 502 }, { status = 503, weight = 2 }]
        seed = 42
    "#;
    let a = http_edge(up.addr(), chaos(spec)).await?;
    let b = http_edge(up.addr(), chaos(spec)).await?;
    let client = http1_client();
    let sa = statuses(&client, &edge_url(&a, "/echo"), 200).await?;
    let sb = statuses(&client, &edge_url(&b, "/echo"), 200).await?;
    assert_eq!(sa, sb, "same seed, same sequence");
    for s in [200, 500, 502, 503] {
        assert!(sa.contains(&s), "status {s} never drawn in {sa:?}");
    }
    // Another seed gives another sequence (identical by chance with probability ~2^-200).
    let c = http_edge(up.addr(), chaos(&spec.replace("42", "43"))).await?;
    let sc = statuses(&client, &edge_url(&c, "/echo"), 200).await?;
    assert_ne!(sa, sc);
    Ok(())
}

#[tokio::test]
async fn error_rate_without_a_seed_is_binomial() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), chaos("error_rate = 0.3")).await?;
    let n = 400;
    let got = statuses(&http1_client(), &edge_url(&edge, "/echo"), n).await?;
    let errors = got.iter().filter(|s| **s == 503).count();
    assert_eq!(errors + got.iter().filter(|s| **s == 200).count(), n);
    assert_binomial(errors, n, 0.3, "error_rate 0.3");
    assert_eq!(
        up.requests() as usize,
        n - errors,
        "only the passed requests reach the target"
    );
    Ok(())
}

#[tokio::test]
async fn latency_is_added_per_request() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), chaos("latency = \"50ms\"\njitter = \"10ms\"")).await?;
    let client = http1_client();
    let url = edge_url(&edge, "/echo");
    get(&client, &url).await?; // connect outside the measurement
    let mut took = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(get(&client, &url).await?.status, StatusCode::OK);
        took.push(t.elapsed());
    }
    took.sort();
    let (min, median, max) = (took[0], took[10], took[19]);
    assert!(
        min >= Duration::from_millis(40),
        "faster than latency - jitter: {took:?}"
    );
    assert!(
        max <= Duration::from_millis(60 + 400),
        "far slower than latency + jitter: {took:?}"
    );
    assert!(
        median <= Duration::from_millis(150),
        "median {median:?}: {took:?}"
    );
    // Jitter spreads the delays: 20 uniform draws over 20 ms all within 4 ms is ~1e-12 likely.
    assert!(max - min >= Duration::from_millis(4), "no jitter: {took:?}");

    // Without chaos the same requests are fast again.
    edge.clear_chaos();
    let t = Instant::now();
    get(&client, &url).await?;
    assert!(
        t.elapsed() < Duration::from_millis(40),
        "still delayed after clearing: {:?}",
        t.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn a_hang_is_released_by_clearing_chaos() -> R {
    let up = HttpUpstream::start().await?;
    let (edge, mut rx) = observed_edge(Protocol::Http, up.addr(), chaos("hang_rate = 1.0")).await?;
    let client = http1_client();
    let url = edge_url(&edge, "/echo/held");
    let held = tokio::spawn(async move { get(&client, &url).await });
    wait_event(&mut rx, WAIT, |k| {
        matches!(k, EventKind::RequestStarted(_)).then_some(())
    })
    .await?;
    // Held: no answer within a bounded wait, and nothing reached the target.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!held.is_finished(), "a hung request was answered");
    assert_eq!(up.requests(), 0);

    let cleared = Instant::now();
    edge.clear_chaos();
    let r = tokio::time::timeout(WAIT, held).await???;
    assert!(
        cleared.elapsed() < Duration::from_secs(2),
        "released late: {:?}",
        cleared.elapsed()
    );
    // Released by the policy change, the request goes through under the new (empty) policy.
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-echo-path"), "/echo/held");
    assert_eq!(up.requests(), 1);
    let faults = wait_event(&mut rx, WAIT, |k| match k {
        EventKind::RequestCompleted(i) => Some(i.faults.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(faults, vec![FaultKind::Hang]);
    Ok(())
}

// Paused time would need tokio's test-util feature, which the workspace does not enable;
// a short real hang shows the same logic.
#[tokio::test]
async fn hang_for_then_timeout_answers_504() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(
        up.addr(),
        chaos("hang_rate = 1.0\nhang_for = \"200ms\"\nhang_then = \"timeout\""),
    )
    .await?;
    let t = Instant::now();
    let r = get(&http1_client(), &edge_url(&edge, "/echo")).await?;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.header(INJECTED_HEADER), "fault=hang");
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "answered after {:?}",
        t.elapsed()
    );
    assert_eq!(up.requests(), 0);
    Ok(())
}

// Paused time would need tokio's test-util feature, which the workspace does not enable;
// a short real hang shows the same logic.
#[tokio::test]
async fn hang_for_then_close_closes_the_connection() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), chaos("hang_rate = 1.0\nhang_for = \"200ms\"")).await?;
    let t = Instant::now();
    let err = get(&http1_client(), &edge_url(&edge, "/echo"))
        .await
        .expect_err("a hang that closes gives no answer");
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "closed after {:?}",
        t.elapsed()
    );
    let err = format!("{err:#}");
    assert!(
        err.contains("closed") || err.contains("incomplete"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn partition_reject_answers_503_at_once() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), chaos("partition = \"reject\"")).await?;
    let t = Instant::now();
    let r = get(&http1_client(), &edge_url(&edge, "/echo")).await?;
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header(INJECTED_HEADER), "fault=partition");
    assert_eq!(up.requests(), 0);
    Ok(())
}

#[tokio::test]
async fn blackhole_holds_until_cleared_then_passes_live() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), Default::default()).await?;
    let client = http1_client();
    let url = edge_url(&edge, "/echo");
    assert_eq!(get(&client, &url).await?.status, StatusCode::OK);

    edge.set_chaos(chaos("partition = true"))?;
    let silent = tokio::time::timeout(Duration::from_millis(300), get(&http1_client(), &url)).await;
    assert!(
        silent.is_err(),
        "a blackholed request was answered: {silent:?}"
    );
    assert_eq!(up.requests(), 1, "nothing crossed the blackhole");

    edge.clear_chaos();
    let r = get(&http1_client(), &url).await?;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers.get(INJECTED_HEADER).is_none());
    Ok(())
}

/// A raw HTTP/1.1 keep-alive connection to `addr`, and the task driving it (it ends when the
/// connection closes).
async fn raw_connection(
    addr: std::net::SocketAddr,
) -> anyhow::Result<(
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    Ok((sender, tokio::spawn(conn)))
}

#[tokio::test]
async fn a_partition_cuts_open_connections_unless_asked_to_keep_them() -> R {
    let up = HttpUpstream::start().await?;
    let (edge, mut rx) = observed_edge(Protocol::Http, up.addr(), Default::default()).await?;
    let get_on = |sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>| {
        let req = Request::get("/echo")
            .header("host", "rig")
            .body(Full::new(Bytes::new()));
        let fut = req.map(|r| sender.send_request(r));
        async move { anyhow::Ok(fut?.await?.status()) }
    };

    let (mut kept, kept_conn) = raw_connection(edge.local_addr()).await?;
    assert_eq!(get_on(&mut kept).await?, StatusCode::OK);
    edge.set_chaos(chaos("partition = \"reject\"\nkeep_connections = true"))?;
    assert_eq!(
        get_on(&mut kept).await?,
        StatusCode::SERVICE_UNAVAILABLE,
        "kept, and partitioned"
    );
    assert!(!kept_conn.is_finished());

    edge.clear_chaos();
    let (mut cut, cut_conn) = raw_connection(edge.local_addr()).await?;
    assert_eq!(get_on(&mut cut).await?, StatusCode::OK);
    edge.set_chaos(chaos("partition = \"reject\""))?;
    // Both open connections are cut: their drivers end.
    tokio::time::timeout(WAIT, cut_conn).await??.ok();
    tokio::time::timeout(WAIT, kept_conn).await??.ok();
    let closed = wait_event(&mut rx, WAIT, |k| match k {
        EventKind::ConnectionClosed(c) if c.error.is_some() => Some(c.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(closed.faults, vec![FaultKind::Partition]);
    assert_eq!(closed.error.as_deref(), Some("cut by partition"));
    // New connections get the partition's answer.
    let r = get(&http1_client(), &edge_url(&edge, "/echo")).await?;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    Ok(())
}

#[tokio::test]
async fn downstream_partition_delivers_the_request_but_not_the_response() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(
        up.addr(),
        chaos("partition = \"blackhole\"\ndirection = \"downstream\""),
    )
    .await?;
    let client = http1_client();
    let url = edge_url(&edge, "/echo/one-way");
    let pending = tokio::spawn(async move { get(&client, &url).await });
    let up_ref = &up;
    eventually("the request reaches the target", WAIT, || async move {
        (up_ref.requests() == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "the response crossed a downstream partition"
    );

    // Healing the partition delivers the held answer.
    edge.clear_chaos();
    let r = tokio::time::timeout(WAIT, pending).await???;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-echo-path"), "/echo/one-way");
    assert_eq!(up.requests(), 1);
    Ok(())
}

#[tokio::test]
async fn match_rules_scope_faults() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(
        up.addr(),
        chaos("error_rate = 1.0\n[match]\npath_prefixes = [\"/echo/fail\"]"),
    )
    .await?;
    let client = http1_client();
    let status =
        |path: &'static str, method: Method, headers: &'static [(&'static str, &'static str)]| {
            let client = client.clone();
            let url = edge_url(&edge, path);
            async move {
                anyhow::Ok(
                    send(&client, method, &url, headers, Bytes::new())
                        .await?
                        .status
                        .as_u16(),
                )
            }
        };
    assert_eq!(status("/echo/fail/x", Method::GET, &[]).await?, 503);
    assert_eq!(status("/echo/ok", Method::GET, &[]).await?, 200);

    edge.set_chaos(chaos("error_rate = 1.0\n[match]\nmethods = [\"post\"]"))?;
    assert_eq!(status("/echo", Method::POST, &[]).await?, 503);
    assert_eq!(status("/echo", Method::GET, &[]).await?, 200);

    edge.set_chaos(chaos(
        "error_rate = 1.0\n[match]\nheaders = { \"X-Chaos\" = \"on\" }",
    ))?;
    assert_eq!(
        status("/echo", Method::GET, &[("x-chaos", "on")]).await?,
        503
    );
    assert_eq!(
        status("/echo", Method::GET, &[("x-chaos", "off")]).await?,
        200
    );
    assert_eq!(status("/echo", Method::GET, &[]).await?, 200);

    // Conditions combine: all must hold.
    edge.set_chaos(chaos(
        "error_rate = 1.0\n[match]\nmethods = [\"GET\"]\npath_prefixes = [\"/echo/a\", \"/echo/b\"]",
    ))?;
    assert_eq!(status("/echo/b/1", Method::GET, &[]).await?, 503);
    assert_eq!(status("/echo/b/1", Method::POST, &[]).await?, 200);
    assert_eq!(status("/echo/c", Method::GET, &[]).await?, 200);
    Ok(())
}

#[tokio::test]
async fn bandwidth_limits_the_response_body() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), chaos("bandwidth_downstream = \"128KiB/s\"")).await?;
    let client = http1_client();
    let t = Instant::now();
    let r = get(&client, &edge_url(&edge, "/bytes/524288")).await?;
    let took = t.elapsed();
    assert_eq!(r.body, pattern(524_288));
    // 512 KiB at 128 KiB/s, minus the initial burst of 1/20 s: ~3.95 s.
    assert!(
        took >= Duration::from_millis(3600) && took <= Duration::from_millis(6000),
        "took {took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn bandwidth_limits_the_request_body() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), chaos("bandwidth_upstream = \"128KiB/s\"")).await?;
    let client = http1_client();
    let body = pattern(256 * 1024);
    let t = Instant::now();
    let r = send(
        &client,
        Method::POST,
        &edge_url(&edge, "/echo"),
        &[],
        body.clone(),
    )
    .await?;
    let took = t.elapsed();
    assert_eq!(r.body, body);
    // 256 KiB at 128 KiB/s minus the burst: ~1.95 s; the answer is not limited.
    assert!(
        took >= Duration::from_millis(1750) && took <= Duration::from_millis(4000),
        "took {took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn clearing_bandwidth_speeds_up_a_body_in_flight() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), chaos("bandwidth_downstream = \"32KiB/s\"")).await?;
    let client = http1_client();
    let req = Request::get(edge_url(&edge, "/bytes/524288")).body(Full::new(Bytes::new()))?;
    let mut body = client.request(req).await?.into_body();
    let mut got = 0usize;
    while got < 16 * 1024 {
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await?
            .expect("more body")?;
        got += frame.data_ref().map_or(0, Bytes::len);
    }
    // At 32 KiB/s the rest would take about 15 s.
    let t = Instant::now();
    edge.clear_chaos();
    while let Some(frame) = tokio::time::timeout(WAIT, body.frame()).await? {
        got += frame?.data_ref().map_or(0, Bytes::len);
    }
    assert_eq!(got, 524_288);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "still throttled: {:?}",
        t.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn bandwidth_per_connection_limits_each_connection_alone() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(
        up.addr(),
        chaos("bandwidth_downstream = \"128KiB/s\"\nbandwidth_per_connection = true"),
    )
    .await?;
    let t = Instant::now();
    let mut downloads = Vec::new();
    for _ in 0..2 {
        // Separate clients, separate connections.
        let url = edge_url(&edge, "/bytes/262144");
        downloads.push(tokio::spawn(
            async move { get(&http1_client(), &url).await },
        ));
    }
    for d in downloads {
        assert_eq!(d.await??.body.len(), 262_144);
    }
    // Each connection gets its own 128 KiB/s: ~1.95 s for both, where a shared limit needs ~4 s.
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1750) && took < Duration::from_millis(3300),
        "took {took:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_under_load_drop_nothing() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), Default::default()).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..16 {
        // One raw keep-alive connection each: a dropped connection fails the worker.
        let stream = tokio::net::TcpStream::connect(edge.local_addr()).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
        let conn_task = tokio::spawn(conn);
        let (stop, done) = (stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                sender.ready().await?;
                let req = Request::get(format!("/echo/{w}/{n}"))
                    .header("host", "rig")
                    .body(Full::new(Bytes::from_static(b"ping")))?;
                let resp = sender.send_request(req).await?;
                anyhow::ensure!(resp.status() == StatusCode::OK, "status {}", resp.status());
                let body = resp.into_body().collect().await?.to_bytes();
                anyhow::ensure!(body == "ping", "body {body:?}");
                n += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            drop(sender);
            conn_task.await??;
            anyhow::Ok(n)
        }));
    }
    let start = Instant::now();
    let mut toggles = 0;
    while start.elapsed() < Duration::from_secs(1) {
        if toggles % 2 == 0 {
            edge.set_chaos(chaos("latency = \"2ms\"\njitter = \"1ms\""))?;
        } else {
            edge.clear_chaos();
        }
        toggles += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let n = tokio::time::timeout(WAIT, w).await???;
        assert!(n > 0, "a worker made no request");
    }
    assert!(toggles >= 10);
    assert_eq!(up.requests(), done.load(Ordering::Relaxed));
    Ok(())
}

#[tokio::test]
async fn an_unreachable_target_answers_502_and_reports_the_failure() -> R {
    let target = unused_addr().await?;
    let events = EventSender::new(1024);
    let mut rx = events.subscribe();
    let edge = edge("client", Protocol::Http, target, Default::default(), events).await?;
    let r = get(&http1_client(), &edge_url(&edge, "/anything")).await?;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.header(INJECTED_HEADER), "upstream=unreachable");
    let failed = wait_event(&mut rx, WAIT, |k| match k {
        EventKind::RequestFailed(i) => Some(i.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(failed.status.as_deref(), Some("502"));
    assert_eq!(failed.path, "/anything");
    let error = failed.error.unwrap_or_default();
    assert!(
        error.contains("unreachable") && error.to_lowercase().contains("refused"),
        "{error}"
    );
    Ok(())
}

#[tokio::test]
async fn an_upstream_crash_breaks_only_that_response() -> R {
    let up = HttpUpstream::start().await?;
    let (edge, mut rx) = observed_edge(Protocol::Http, up.addr(), Default::default()).await?;
    let client = http1_client();

    // Mid-response: the client sees its response break.
    let err = get(&client, &edge_url(&edge, "/crash?after=4096")).await;
    assert!(
        err.is_err(),
        "a broken upstream response arrived whole: {err:?}"
    );
    let failed = wait_event(&mut rx, WAIT, |k| match k {
        EventKind::RequestFailed(i) => Some(i.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(failed.path, "/crash");
    assert_eq!(failed.response_bytes, 4096);
    assert!(failed.error.unwrap_or_default().contains("upstream"));

    // Before the response head: rig answers 502 itself.
    let r = get(&client, &edge_url(&edge, "/drop")).await?;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.header(INJECTED_HEADER), "upstream=error");

    // The edge keeps serving.
    let r = get(&client, &edge_url(&edge, "/echo")).await?;
    assert_eq!(r.status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn malformed_requests_get_400_and_the_edge_keeps_serving() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), Default::default()).await?;
    let mut s = tokio::net::TcpStream::connect(edge.local_addr()).await?;
    s.write_all(b"NOT HTTP AT ALL\r\n\r\n").await?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(up.requests(), 0);
    let r = get(&http1_client(), &edge_url(&edge, "/echo")).await?;
    assert_eq!(r.status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn events_report_started_and_completed_requests() -> R {
    let up = HttpUpstream::start().await?;
    let (edge, mut rx) = observed_edge(Protocol::Http, up.addr(), Default::default()).await?;
    let client = http1_client();
    let body = pattern(1000);
    send(
        &client,
        Method::POST,
        &edge_url(&edge, "/echo/ev?x=1"),
        &[],
        body,
    )
    .await?;

    let started = wait_event(&mut rx, WAIT, |k| match k {
        EventKind::RequestStarted(i) => Some(i.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(started.method, "POST");
    assert_eq!(started.path, "/echo/ev");
    assert!(started.status.is_none());
    let done = wait_event(&mut rx, WAIT, |k| match k {
        EventKind::RequestCompleted(i) => Some(i.clone()),
        EventKind::RequestFailed(i) => panic!("request failed: {i:?}"),
        _ => None,
    })
    .await?;
    assert_eq!(done.request_id, started.request_id);
    assert_eq!(done.status.as_deref(), Some("200"));
    assert_eq!(done.request_bytes, 1000);
    assert_eq!(done.response_bytes, 1000);
    assert!(done.latency.is_some_and(|l| l > Duration::ZERO && l < WAIT));
    assert!(done.faults.is_empty());
    assert!(done.grpc_service.is_none());

    // An injected error is a completed request with its fault.
    edge.set_chaos(chaos("error_rate = 1.0\nstatus = 500"))?;
    get(&client, &edge_url(&edge, "/echo")).await?;
    let done = wait_event(&mut rx, WAIT, |k| match k {
        EventKind::RequestCompleted(i) => Some(i.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(done.status.as_deref(), Some("500"));
    assert_eq!(done.faults, vec![FaultKind::Error]);
    assert!(done.response_bytes > 0);
    Ok(())
}

#[tokio::test]
async fn metrics_count_requests_and_faults() -> R {
    let handle = prometheus();
    let up = HttpUpstream::start().await?;
    let edge = edge(
        "metrics-http",
        Protocol::Http,
        up.addr(),
        chaos("error_rate = 1.0"),
        EventSender::new(16),
    )
    .await?;
    let client = http1_client();
    for _ in 0..5 {
        get(&client, &edge_url(&edge, "/echo")).await?;
    }
    edge.clear_chaos();
    for _ in 0..3 {
        send(
            &client,
            Method::POST,
            &edge_url(&edge, "/echo"),
            &[],
            "12345",
        )
        .await?;
    }
    let text = handle.render();
    let me = ("edge", "metrics-http/api");
    let v = |name: &str, extra: &[(&str, &str)]| {
        let mut want = vec![me];
        want.extend_from_slice(extra);
        prom::value(&text, name, &want)
    };
    assert_eq!(
        v("rig_edge_requests_total", &[("status", "503")]),
        5.0,
        "{text}"
    );
    assert_eq!(
        v("rig_edge_requests_total", &[("status", "200")]),
        3.0,
        "{text}"
    );
    assert_eq!(
        v("rig_edge_faults_injected_total", &[("fault", "error")]),
        5.0,
        "{text}"
    );
    assert_eq!(
        v("rig_edge_bytes_total", &[("direction", "upstream")]),
        15.0,
        "{text}"
    );
    assert!(
        v("rig_edge_bytes_total", &[("direction", "downstream")]) >= 15.0,
        "{text}"
    );
    assert_eq!(v("rig_edge_connections_total", &[]), 1.0, "{text}");
    assert_eq!(v("rig_edge_connections_open", &[]), 1.0, "{text}");
    assert_eq!(v("rig_edge_upstream_errors_total", &[]), 0.0, "{text}");
    Ok(())
}

#[tokio::test]
async fn shutdown_ends_held_requests_and_closes_the_listener() -> R {
    let up = HttpUpstream::start().await?;
    let (edge, mut rx) = observed_edge(Protocol::Http, up.addr(), chaos("hang_rate = 1.0")).await?;
    let addr = edge.local_addr();
    // An idle keep-alive connection, and a request held by the hang.
    let idle = tokio::net::TcpStream::connect(addr).await?;
    let url = edge_url(&edge, "/echo");
    let held = tokio::spawn(async move { get(&http1_client(), &url).await });
    wait_event(&mut rx, WAIT, |k| {
        matches!(k, EventKind::RequestStarted(_)).then_some(())
    })
    .await?;

    let t = Instant::now();
    tokio::time::timeout(WAIT, edge.shutdown()).await?;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
    let r = tokio::time::timeout(WAIT, held).await??;
    assert!(
        r.is_err(),
        "a hung request got an answer at shutdown: {r:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening"
    );
    assert_eq!(up.requests(), 0);
    drop(idle);
    Ok(())
}

#[tokio::test]
async fn version_of_http1_requests_is_kept_upstream() -> R {
    let up = HttpUpstream::start().await?;
    let edge = http_edge(up.addr(), Default::default()).await?;
    let stream = tokio::net::TcpStream::connect(edge.local_addr()).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get("/echo/v10")
        .version(Version::HTTP_10)
        .header("host", "rig")
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-echo-version"], "HTTP/1.0");
    Ok(())
}

#[tokio::test]
async fn a_client_that_gives_up_on_a_held_request_is_reported() -> R {
    let up = HttpUpstream::start().await?;
    let (edge, mut rx) = observed_edge(Protocol::Http, up.addr(), chaos("hang_rate = 1.0")).await?;
    let mut s = tokio::net::TcpStream::connect(edge.local_addr()).await?;
    s.write_all(b"GET /echo/gone HTTP/1.1\r\nhost: rig\r\n\r\n")
        .await?;
    wait_event(&mut rx, WAIT, |k| {
        matches!(k, EventKind::RequestStarted(_)).then_some(())
    })
    .await?;
    drop(s);
    let failed = wait_event(&mut rx, WAIT, |k| match k {
        EventKind::RequestFailed(i) => Some(i.clone()),
        EventKind::RequestCompleted(i) => panic!("completed: {i:?}"),
        _ => None,
    })
    .await?;
    assert_eq!(failed.path, "/echo/gone");
    assert_eq!(failed.faults, vec![FaultKind::Hang]);
    assert!(failed.status.is_none(), "no answer was sent");
    assert!(failed.error.unwrap_or_default().contains("client"));
    assert_eq!(up.requests(), 0);
    Ok(())
}

#[tokio::test]
async fn a_subscriber_that_never_reads_does_not_slow_traffic_and_learns_what_it_missed() -> R {
    let up = HttpUpstream::start().await?;
    // Room for 8 events; this subscriber reads nothing while 200 requests (400 events) pass.
    let events = EventSender::new(8);
    let mut stalled = events.subscribe();
    let edge = edge(
        "client",
        Protocol::Http,
        up.addr(),
        Default::default(),
        events,
    )
    .await?;
    let client = http1_client();
    for _ in 0..200 {
        let r = tokio::time::timeout(WAIT, get(&client, &edge_url(&edge, "/echo"))).await??;
        assert_eq!(r.status, StatusCode::OK);
    }
    match stalled.recv().await {
        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
            assert!(missed >= 300, "told it missed {missed} events");
        }
        other => panic!("expected a lag notice, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_malformed_client_body_is_a_400_counted_as_the_clients() -> R {
    let handle = prometheus();
    let up = HttpUpstream::start().await?;
    let edge = edge(
        "client-body",
        Protocol::Http,
        up.addr(),
        chaos(""),
        EventSender::new(16),
    )
    .await?;
    let mut s = tokio::net::TcpStream::connect(edge.local_addr()).await?;
    s.write_all(
        b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n",
    )
    .await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "answer: {text:?}");
    let scrape = handle.render();
    let errors = prom::value(
        &scrape,
        "rig_edge_upstream_errors_total",
        &[("edge", "client-body/api")],
    );
    assert_eq!(
        errors, 0.0,
        "a client's error is not the target's:\n{scrape}"
    );
    let client = prom::value(
        &scrape,
        "rig_edge_client_errors_total",
        &[("edge", "client-body/api"), ("reason", "malformed_body")],
    );
    assert_eq!(client, 1.0, "counted as the client's:\n{scrape}");
    Ok(())
}
