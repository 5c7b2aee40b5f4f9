//! The grpc edge end to end: a real tonic Health server, a real rig edge, a real tonic client.

use std::time::{Duration, Instant};

use rig_proxy::events::RequestInfo;
use rig_proxy::{EventKind, EventSender, FaultKind, INJECTED_HEADER, Protocol};
use rig_tests::http_upstream::{
    GrpcUpstream, chaos, edge, grpc_edge, health_client, observed_edge, prometheus, unused_addr,
    wait_event,
};
use rig_tests::prom;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

type R = anyhow::Result<()>;

const WAIT: Duration = Duration::from_secs(10);

fn req(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

#[tokio::test]
async fn health_check_and_watch_through_the_proxy() -> R {
    let up = GrpcUpstream::start().await?;
    let edge = grpc_edge(up.addr(), Default::default()).await?;
    let mut client = health_client(edge.local_addr()).await?;

    let r = client.check(req("")).await?;
    assert_eq!(r.into_inner().status(), ServingStatus::Serving);

    // A server stream crosses the proxy message by message, not buffered to its end.
    let mut watch = client.watch(req("")).await?.into_inner();
    let first = tokio::time::timeout(WAIT, watch.message()).await??;
    assert_eq!(first.map(|m| m.status()), Some(ServingStatus::Serving));
    up.set_serving("", false).await;
    let next = tokio::time::timeout(WAIT, watch.message()).await??;
    assert_eq!(next.map(|m| m.status()), Some(ServingStatus::NotServing));

    // A real error status from the target passes untouched.
    let err = client
        .check(req("no.such.Service"))
        .await
        .expect_err("not registered");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.metadata().get(INJECTED_HEADER).is_none());
    assert_eq!(up.calls(), 3);
    Ok(())
}

#[tokio::test]
async fn injected_unavailable_carries_code_and_message() -> R {
    let up = GrpcUpstream::start().await?;
    let edge = grpc_edge(
        up.addr(),
        chaos("error_rate = 1.0\ngrpc_code = \"UNAVAILABLE\"\ngrpc_message = \"rig says no: 100% ünïcode\""),
    )
    .await?;
    let mut client = health_client(edge.local_addr()).await?;
    let err = client.check(req("")).await.expect_err("injected error");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(err.message(), "rig says no: 100% ünïcode");
    assert_eq!(
        err.metadata()
            .get(INJECTED_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some("fault=error")
    );
    assert_eq!(up.calls(), 0, "an injected error never reaches the target");
    Ok(())
}

#[tokio::test]
async fn injected_resource_exhausted() -> R {
    let up = GrpcUpstream::start().await?;
    let edge = grpc_edge(up.addr(), chaos("grpc_code = \"RESOURCE_EXHAUSTED\"")).await?;
    let mut client = health_client(edge.local_addr()).await?;
    let err = client.check(req("")).await.expect_err("injected error");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(err.message(), "injected by rig");
    // Streams fail the same way, before the first message.
    let err = client.watch(req("")).await.expect_err("injected error");
    assert_eq!(err.code(), Code::ResourceExhausted);

    edge.clear_chaos();
    assert_eq!(
        client.check(req("")).await?.into_inner().status(),
        ServingStatus::Serving
    );
    Ok(())
}

#[tokio::test]
async fn match_on_grpc_service_and_method() -> R {
    let up = GrpcUpstream::start().await?;
    let edge = grpc_edge(
        up.addr(),
        chaos("error_rate = 1.0\n[match]\ngrpc_service = \"grpc.health.v1.Health\"\ngrpc_method = \"Check\""),
    )
    .await?;
    let mut client = health_client(edge.local_addr()).await?;
    assert_eq!(
        client.check(req("")).await.expect_err("matched").code(),
        Code::Unavailable
    );
    let mut watch = client.watch(req("")).await?.into_inner();
    let first = tokio::time::timeout(WAIT, watch.message()).await??;
    assert_eq!(first.map(|m| m.status()), Some(ServingStatus::Serving));

    edge.set_chaos(chaos(
        "error_rate = 1.0\n[match]\ngrpc_service = \"demo.v1.Other\"",
    ))?;
    assert_eq!(
        client.check(req("")).await?.into_inner().status(),
        ServingStatus::Serving
    );
    Ok(())
}

// Paused time would need tokio's test-util feature, which the workspace does not enable;
// a short real hang shows the same logic.
#[tokio::test]
async fn hang_then_timeout_is_deadline_exceeded() -> R {
    let up = GrpcUpstream::start().await?;
    let edge = grpc_edge(
        up.addr(),
        chaos("hang_rate = 1.0\nhang_for = \"200ms\"\nhang_then = \"timeout\""),
    )
    .await?;
    let mut client = health_client(edge.local_addr()).await?;
    let t = Instant::now();
    let err = client.check(req("")).await.expect_err("hang then timeout");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "answered after {:?}",
        t.elapsed()
    );
    assert_eq!(up.calls(), 0);
    Ok(())
}

#[tokio::test]
async fn hang_then_close_resets_only_that_call() -> R {
    let up = GrpcUpstream::start().await?;
    let edge = grpc_edge(up.addr(), Default::default()).await?;
    let mut client = health_client(edge.local_addr()).await?;
    // A long call on the same HTTP/2 connection, opened before the hang.
    let mut watch = client.watch(req("")).await?.into_inner();
    let first = tokio::time::timeout(WAIT, watch.message()).await??;
    assert_eq!(first.map(|m| m.status()), Some(ServingStatus::Serving));

    edge.set_chaos(chaos("hang_rate = 1.0\nhang_for = \"200ms\""))?;
    let t = Instant::now();
    let err = client.check(req("")).await.expect_err("hang then close");
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    // rig resets the stream (HTTP/2 INTERNAL_ERROR), which tonic reports as INTERNAL.
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    // Only that call: the stream opened earlier on the same connection still delivers.
    up.set_serving("", false).await;
    let next = tokio::time::timeout(WAIT, watch.message()).await??;
    assert_eq!(next.map(|m| m.status()), Some(ServingStatus::NotServing));
    Ok(())
}

#[tokio::test]
async fn a_client_deadline_during_a_hang_is_reported_as_failed() -> R {
    let up = GrpcUpstream::start().await?;
    let (edge, mut rx) = observed_edge(Protocol::Grpc, up.addr(), chaos("hang_rate = 1.0")).await?;
    let mut client = health_client(edge.local_addr()).await?;
    let mut call = tonic::Request::new(req(""));
    call.set_timeout(Duration::from_millis(200));
    let err = client
        .check(call)
        .await
        .expect_err("held past the deadline");
    // tonic reports its own timer running out as CANCELLED ("Timeout expired").
    assert!(
        matches!(err.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{err:?}"
    );
    // The client resets its stream; the edge stops holding and reports the request.
    let failed = wait_event(&mut rx, WAIT, |k| match k {
        EventKind::RequestFailed(i) => Some(i.clone()),
        EventKind::RequestCompleted(i) => panic!("completed: {i:?}"),
        _ => None,
    })
    .await?;
    assert_eq!(failed.grpc_method.as_deref(), Some("Check"));
    assert_eq!(failed.faults, vec![FaultKind::Hang]);
    assert!(failed.status.is_none());
    assert_eq!(up.calls(), 0);

    // The connection is fine: with the hang cleared the next call goes through.
    edge.clear_chaos();
    assert_eq!(
        client.check(req("")).await?.into_inner().status(),
        ServingStatus::Serving
    );
    Ok(())
}

#[tokio::test]
async fn partition_reject_is_unavailable() -> R {
    let up = GrpcUpstream::start().await?;
    let edge = grpc_edge(up.addr(), chaos("partition = \"reject\"")).await?;
    let mut client = health_client(edge.local_addr()).await?;
    let err = client.check(req("")).await.expect_err("partition");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(
        err.metadata()
            .get(INJECTED_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some("fault=partition")
    );
    Ok(())
}

#[tokio::test]
async fn latency_delays_each_call() -> R {
    let up = GrpcUpstream::start().await?;
    let edge = grpc_edge(up.addr(), chaos("latency = \"100ms\"")).await?;
    let mut client = health_client(edge.local_addr()).await?;
    for _ in 0..3 {
        let t = Instant::now();
        client.check(req("")).await?;
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_millis(600),
            "{took:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn an_unreachable_target_is_unavailable() -> R {
    let target = unused_addr().await?;
    let events = EventSender::new(1024);
    let mut rx = events.subscribe();
    let edge = edge("client", Protocol::Grpc, target, Default::default(), events).await?;
    let mut client = health_client(edge.local_addr()).await?;
    let err = client.check(req("")).await.expect_err("nothing listens");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("unreachable"), "{}", err.message());
    assert_eq!(
        err.metadata()
            .get(INJECTED_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some("upstream=unreachable")
    );
    let failed = wait_event(&mut rx, WAIT, |k| match k {
        EventKind::RequestFailed(i) => Some(i.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(failed.status.as_deref(), Some("UNAVAILABLE"));
    assert_eq!(failed.grpc_method.as_deref(), Some("Check"));
    Ok(())
}

async fn completed(
    rx: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<rig_proxy::ProxyEvent>>,
) -> anyhow::Result<RequestInfo> {
    wait_event(rx, WAIT, |k| match k {
        EventKind::RequestCompleted(i) => Some(i.clone()),
        EventKind::RequestFailed(i) => panic!("failed: {i:?}"),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn events_carry_grpc_names_and_codes_from_trailers() -> R {
    let up = GrpcUpstream::start().await?;
    let (edge, mut rx) = observed_edge(Protocol::Grpc, up.addr(), Default::default()).await?;
    let mut client = health_client(edge.local_addr()).await?;
    client.check(req("")).await?;
    let ok = completed(&mut rx).await?;
    assert_eq!(ok.grpc_service.as_deref(), Some("grpc.health.v1.Health"));
    assert_eq!(ok.grpc_method.as_deref(), Some("Check"));
    assert_eq!(ok.path, "/grpc.health.v1.Health/Check");
    assert_eq!(
        ok.status.as_deref(),
        Some("OK"),
        "from the response trailers"
    );
    assert!(ok.request_bytes > 0 && ok.response_bytes > 0);

    client.check(req("nope")).await.expect_err("not registered");
    let nf = completed(&mut rx).await?;
    assert_eq!(
        nf.status.as_deref(),
        Some("NOT_FOUND"),
        "from a trailers-only answer"
    );

    edge.set_chaos(chaos("error_rate = 1.0"))?;
    client.check(req("")).await.expect_err("injected");
    let inj = completed(&mut rx).await?;
    assert_eq!(inj.status.as_deref(), Some("UNAVAILABLE"));
    assert_eq!(inj.faults, vec![FaultKind::Error]);
    Ok(())
}

#[tokio::test]
async fn metrics_count_grpc_codes() -> R {
    let handle = prometheus();
    let up = GrpcUpstream::start().await?;
    let edge = edge(
        "metrics-grpc",
        Protocol::Grpc,
        up.addr(),
        chaos("error_rate = 1.0\ngrpc_code = \"ABORTED\""),
        EventSender::new(16),
    )
    .await?;
    let mut client = health_client(edge.local_addr()).await?;
    for _ in 0..4 {
        client.check(req("")).await.expect_err("injected");
    }
    edge.clear_chaos();
    for _ in 0..2 {
        client.check(req("")).await?;
    }
    let text = handle.render();
    let v = |name: &str, extra: (&str, &str)| {
        prom::value(&text, name, &[("edge", "metrics-grpc/api"), extra])
    };
    assert_eq!(
        v("rig_edge_requests_total", ("status", "ABORTED")),
        4.0,
        "{text}"
    );
    assert_eq!(
        v("rig_edge_requests_total", ("status", "OK")),
        2.0,
        "{text}"
    );
    assert_eq!(
        v("rig_edge_faults_injected_total", ("fault", "error")),
        4.0,
        "{text}"
    );
    assert_eq!(
        v("rig_edge_connections_total", ("protocol", "grpc")),
        1.0,
        "{text}"
    );
    Ok(())
}
