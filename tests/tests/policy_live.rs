//! The policy's life on an edge, in tokio's paused time: a `ttl` of an hour takes microseconds.

use std::time::Duration;

use rig_proxy::policy::{ChaosSpec, Protocol};
use rig_proxy::{Edge, EdgeConfig, EdgeInfo, EventKind, EventSender};

fn spec(toml_text: &str) -> ChaosSpec {
    toml::from_str(toml_text).expect("valid chaos spec")
}

async fn edge(chaos: ChaosSpec, events: &EventSender) -> Edge {
    // The target is never dialled: these tests only watch the policy.
    let target = "127.0.0.1:9".parse().unwrap();
    Edge::bind(
        EdgeConfig {
            info: EdgeInfo::standalone("client", "api", Protocol::Http),
            target,
            chaos,
        },
        "127.0.0.1:0".parse().unwrap(),
        events.clone(),
    )
    .await
    .expect("edge binds")
}

#[tokio::test(start_paused = true)]
async fn ttl_reverts_to_no_chaos_and_says_so() {
    let events = EventSender::new(16);
    let mut rx = events.subscribe();
    let e = edge(spec("error_rate = 1.0\nttl = \"1h\""), &events).await;
    assert_eq!(e.chaos().0, 1);

    tokio::time::sleep(Duration::from_secs(3599)).await;
    assert_eq!(e.chaos().0, 1, "still in force before the ttl");

    tokio::time::sleep(Duration::from_secs(2)).await;
    let (version, now) = e.chaos();
    assert_eq!(version, 2);
    assert!(now.is_empty(), "reverted to no chaos: {now:?}");
    let ev = rx.recv().await.expect("an event");
    assert!(
        matches!(ev.kind, EventKind::ChaosExpired { version: 2 }),
        "{:?}",
        ev.kind
    );
}

#[tokio::test(start_paused = true)]
async fn a_newer_policy_is_not_reverted_by_an_older_ttl() {
    let events = EventSender::new(16);
    let e = edge(spec("latency = \"10ms\"\nttl = \"10s\""), &events).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(e.set_chaos(spec("latency = \"20ms\"")).unwrap(), 2);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (version, now) = e.chaos();
    assert_eq!(version, 2, "the first ttl must not touch version 2");
    assert_eq!(now, spec("latency = \"20ms\""));

    // A ttl set live counts from the change.
    assert_eq!(
        e.set_chaos(spec("latency = \"30ms\"\nttl = \"30s\""))
            .unwrap(),
        3
    );
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(e.chaos().0, 3);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(e.chaos().0, 4);
}

#[tokio::test]
async fn an_invalid_policy_changes_nothing() {
    let events = EventSender::new(16);
    let e = edge(spec("latency = \"10ms\""), &events).await;
    let err = e.set_chaos(spec("reset_after = 10")).unwrap_err();
    assert_eq!(err.field, "reset_after", "tcp-only field on an http edge");
    assert_eq!(e.chaos(), (1, spec("latency = \"10ms\"")));
    assert_eq!(e.clear_chaos(), 2);
}

#[tokio::test]
async fn a_validated_policy_installs_once_and_only_on_its_protocol() {
    let events = EventSender::new(16);
    let e = edge(ChaosSpec::default(), &events).await;
    let for_tcp = spec("reset_after = 10").validated(Protocol::Tcp).unwrap();
    let err = e.install(for_tcp).unwrap_err();
    assert_eq!(err.field, "protocol", "{err}");
    assert_eq!(e.chaos(), (1, ChaosSpec::default()), "nothing changed");

    let for_http = spec("latency = \"5ms\"").validated(Protocol::Http).unwrap();
    assert_eq!(e.install(for_http).unwrap(), 2);
    assert_eq!(e.chaos(), (2, spec("latency = \"5ms\"")));
}
