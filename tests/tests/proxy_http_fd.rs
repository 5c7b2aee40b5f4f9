//! An http edge out of file descriptors when it dials the target: the client gets rig's own
//! 503 (`rig=fd_limit`), counted as a refusal, not a 502 blamed on the target; the edge serves
//! again once descriptors are free. The soft fd limit is process-wide, so this binary holds
//! this one test only, and the target is reached only after the limit is restored.

use std::fs::File;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use rig_proxy::{INJECTED_HEADER, Protocol};
use rig_tests::eventually::eventually;
use rig_tests::http_upstream::{HttpUpstream, edge, prometheus};
use rig_tests::prom;
use tokio::net::TcpStream;

const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn metric(name: &str, extra: &[(&str, &str)]) -> f64 {
    let mut want = vec![("edge", "fd-http/api")];
    want.extend_from_slice(extra);
    prom::value(&prometheus().render(), name, &want)
}

/// Take every free descriptor under a soft limit lowered to a few above those open now; the
/// limit comes back (and the files close) when the guard drops.
struct Exhausted {
    files: Vec<File>,
    soft: u64,
    hard: u64,
}

impl Exhausted {
    fn now() -> anyhow::Result<Exhausted> {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        let open = std::fs::read_dir("/proc/self/fd")?.count() as u64;
        setrlimit(Resource::RLIMIT_NOFILE, open + 16, hard)?;
        let mut files = Vec::new();
        loop {
            match File::open("/dev/null") {
                Ok(f) => files.push(f),
                Err(e) if rig_proxy::limits::is_fd_exhausted(&e) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Exhausted { files, soft, hard })
    }
}

impl Drop for Exhausted {
    fn drop(&mut self) {
        self.files.clear();
        let _ = setrlimit(Resource::RLIMIT_NOFILE, self.soft, self.hard);
    }
}

#[tokio::test]
async fn out_of_descriptors_dialling_the_target_is_rigs_503_not_the_targets_502()
-> anyhow::Result<()> {
    prometheus();
    let up = HttpUpstream::start().await?;
    let edge = edge(
        "fd-http",
        Protocol::Http,
        up.addr(),
        Default::default(),
        rig_proxy::EventSender::new(16),
    )
    .await?;
    // The client connection is open and accepted before descriptors run out; its first
    // request makes the edge dial the target.
    let stream = TcpStream::connect(edge.local_addr()).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    eventually("the edge to accept the connection", WAIT, || async {
        (metric("rig_edge_connections_open", &[]) == 1.0).then_some(())
    })
    .await;

    let exhausted = Exhausted::now()?;
    assert!(!exhausted.files.is_empty());
    let resp = sender
        .send_request(
            Request::get("/echo")
                .header("host", "x")
                .body(Empty::new())?,
        )
        .await?;
    let status = resp.status();
    let why = resp.headers().get(INJECTED_HEADER).cloned();
    let body = resp.into_body().collect().await?.to_bytes();
    drop(exhausted);

    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        why.as_ref().map(|v| v.as_bytes()),
        Some(&b"rig=fd_limit"[..])
    );
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("out of file descriptors"), "{body}");
    assert_eq!(
        metric(
            "rig_edge_connections_refused_total",
            &[("reason", "fd_limit")]
        ),
        1.0
    );
    assert_eq!(metric("rig_edge_upstream_errors_total", &[]), 0.0);
    assert_eq!(up.requests(), 0);

    // Descriptors are back: the same client connection gets through.
    sender.ready().await?;
    let resp = sender
        .send_request(
            Request::get("/echo")
                .header("host", "x")
                .body(Empty::new())?,
        )
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(up.requests(), 1);
    Ok(())
}
