//! rigd's single listener: the gRPC services and plain HTTP (`/metrics`, `/healthz`,
//! `/events`) on one axum router, behind the token check.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{Stream, StreamExt};
use rig_proto::v1::chaos_server::ChaosServer;
use rig_proto::v1::environments_server::EnvironmentsServer;
use rig_proto::v1::events_server::EventsServer;
use serde::Deserialize;
use tokio_stream::wrappers::ReceiverStream;

use super::Shared;
use super::grpc::Api;
use crate::eventlog::{Filter, Followed};

/// The whole service: gRPC (rig.v1, health, reflection) and HTTP routes.
pub fn router(shared: Arc<Shared>) -> axum::Router {
    let api = Api {
        shared: shared.clone(),
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        health_reporter
            .set_serving::<EnvironmentsServer<Api>>()
            .await;
        health_reporter.set_serving::<ChaosServer<Api>>().await;
        health_reporter.set_serving::<EventsServer<Api>>().await;
    });
    let mut grpc = tonic::service::Routes::new(EnvironmentsServer::new(api.clone()))
        .add_service(ChaosServer::new(api.clone()))
        .add_service(EventsServer::new(api))
        .add_service(health);
    match tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rig_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
    {
        Ok(reflection) => grpc = grpc.add_service(reflection),
        Err(e) => tracing::warn!(error = %e, "gRPC reflection unavailable"),
    }
    let plain = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/events", get(events))
        .with_state(shared.clone());
    grpc.into_axum_router()
        .merge(plain)
        .layer(middleware::from_fn_with_state(shared, auth))
}

/// With a token configured, every call must carry `authorization: Bearer <token>`.
async fn auth(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let Some(token) = &shared.token else {
        return next.run(req).await;
    };
    if bearer_matches(req.headers(), token.expose()) {
        return next.run(req).await;
    }
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if is_grpc {
        // A trailers-only gRPC answer, so gRPC clients see UNAUTHENTICATED.
        let mut resp = Response::new(axum::body::Body::empty());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static("16"));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("missing%20or%20wrong%20token"),
        );
        return resp;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "missing or wrong token\n",
    )
        .into_response()
}

/// Does the request carry `authorization: Bearer <token>`? Compared in constant time.
pub(super) fn bearer_matches(headers: &http::HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.prometheus.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Comma-separated type prefixes.
    types: Option<String>,
    env: Option<String>,
    service: Option<String>,
    edge: Option<String>,
    /// Resume after this sequence number (like `Last-Event-ID`).
    after: Option<u64>,
}

/// Server-Sent Events of the event log; each event's `id` is its sequence number, so a client
/// reconnecting with `Last-Event-ID` resumes where it left off.
async fn events(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let after = last_id.or(q.after).unwrap_or(0);
    let filter = Filter {
        types: q
            .types
            .map(|t| {
                t.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        env: q.env.unwrap_or_default(),
        service: q.service.unwrap_or_default(),
        edge: q.edge.unwrap_or_default(),
    };
    let rx = shared
        .log
        .follow(after, filter, true, shared.shutdown.clone());
    let stream = ReceiverStream::new(rx).map(|item| {
        Ok(match item {
            Followed::Event(e) => SseEvent::default()
                .id(e.seq.to_string())
                .event(e.kind())
                .data(e.to_json().to_string()),
            Followed::Lagged {
                missed,
                resume_after,
            } => SseEvent::default().event("events.lagged").data(
                serde_json::to_string(&crate::events::EventData::EventsLagged {
                    missed,
                    resume_after: Some(resume_after),
                })
                .unwrap_or_default(),
            ),
        })
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
