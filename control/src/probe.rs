//! Readiness probes: is a service's ingress ready? A tcp connect, an HTTP GET, or the gRPC
//! health check, retried with back-off until the readiness timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rig_proxy::policy::Protocol;

use crate::client::root_cause;
use crate::spec::Readiness;

/// Poll an ingress until it is ready: fast at first, then backing off, until the timeout.
pub async fn wait_ready(
    protocol: Protocol,
    addr: SocketAddr,
    ready: &Readiness,
) -> Result<(), String> {
    let Some(timeout) = ready.timeout() else {
        return Ok(());
    };
    let deadline = Instant::now() + timeout;
    let mut wait = Duration::from_millis(5);
    let mut last;
    loop {
        let r = tokio::time::timeout(
            Duration::from_secs(2).min(timeout),
            probe(protocol, addr, ready),
        )
        .await;
        match r {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(_) => last = "probe timed out".into(),
        }
        if Instant::now() + wait > deadline {
            return Err(format!(
                "not ready after {}: {last}",
                humantime::format_duration(timeout)
            ));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(500));
    }
}

async fn probe(_protocol: Protocol, addr: SocketAddr, ready: &Readiness) -> Result<(), String> {
    match ready {
        Readiness::Disabled => Ok(()),
        Readiness::Tcp { .. } => tokio::net::TcpStream::connect(addr)
            .await
            .map(|_| ())
            .map_err(|e| format!("tcp connect: {}", root_cause(&e))),
        Readiness::Http { path, .. } => {
            use http_body_util::Empty;
            use hyper_util::client::legacy::Client;
            use hyper_util::rt::TokioExecutor;
            let client: Client<_, Empty<bytes::Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            let uri: http::Uri = format!("http://{addr}{path}")
                .parse()
                .map_err(|e| format!("bad readiness path: {e}"))?;
            let resp = client
                .get(uri)
                .await
                .map_err(|e| format!("GET {path}: {}", root_cause(&e)))?;
            if resp.status().as_u16() < 500 {
                Ok(())
            } else {
                Err(format!("GET {path} answered {}", resp.status()))
            }
        }
        Readiness::Grpc { service, .. } => {
            use tonic_health::pb::health_check_response::ServingStatus;
            use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| format!("grpc connect: {}", root_cause(&e)))?;
            let resp = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.clone(),
                })
                .await
                .map_err(|e| format!("grpc health check: {} {}", e.code(), e.message()))?;
            if resp.get_ref().status == ServingStatus::Serving as i32 {
                Ok(())
            } else {
                Err(format!("grpc health: {:?}", resp.get_ref().status))
            }
        }
    }
}
