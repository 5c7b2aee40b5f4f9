//! `rig-demo web`: the HTTP front. `GET /items/{id}` asks the catalog over
//! gRPC and maps its answer onto HTTP statuses.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::common::{self, Shutdown, json_response, response};
use crate::pb::GetItemRequest;
use crate::pb::catalog_client::CatalogClient;

/// Deadline of one catalog call, sent to the catalog as `grpc-timeout` so it
/// stops working on calls nobody waits for any more.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on (re)connecting to the catalog, inside the call's deadline, so a
/// black-holed catalog still answers 502 rather than only ever 504.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn run(mut shutdown: Shutdown) -> Result<()> {
    let url = common::egress_url("catalog")?;
    let endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("CATALOG_URL={url:?} is not a valid URL"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    // Lazy: web must come up (and answer /healthz) even while the catalog is
    // still starting or down; the channel connects, and reconnects, on use.
    let catalog = CatalogClient::new(endpoint.connect_lazy());

    let listener = common::bind("web").await?;
    let app = move |req| route(req, catalog.clone());
    tokio::select! {
        () = common::serve_http(listener, app) => Ok(()),
        () = shutdown.recv() => Ok(()),
    }
}

async fn route(req: Request<Incoming>, catalog: CatalogClient<Channel>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if req.method() == Method::GET {
        if path == "/healthz" {
            return response(StatusCode::OK, "text/plain", "ok");
        }
        if let Some(id) = path.strip_prefix("/items/")
            && !id.is_empty()
            && !id.contains('/')
        {
            return get_item(catalog, id.to_owned()).await;
        }
    }
    json_response(StatusCode::NOT_FOUND, &json!({ "error": "not found" }))
}

async fn get_item(mut catalog: CatalogClient<Channel>, id: String) -> Response<Full<Bytes>> {
    let mut request = tonic::Request::new(GetItemRequest { id: id.clone() });
    request.set_timeout(CALL_TIMEOUT);
    // The grpc-timeout header already makes tonic's client give up after
    // CALL_TIMEOUT; this outer timeout is a backstop for any phase that
    // header does not cover (e.g. waiting for the lazy channel).
    let result = tokio::time::timeout(CALL_TIMEOUT, catalog.get_item(request)).await;
    let status = match result {
        Ok(Ok(item)) => {
            let item = item.into_inner();
            let body = json!({ "id": item.id, "name": item.name, "price_cents": item.price_cents });
            return json_response(StatusCode::OK, &body);
        }
        Ok(Err(status)) => status,
        Err(_elapsed) => return timeout_response(),
    };
    match status.code() {
        Code::NotFound => json_response(
            StatusCode::NOT_FOUND,
            &json!({ "error": "not found", "id": id }),
        ),
        Code::DeadlineExceeded => timeout_response(),
        // tonic reports its own client-side deadline expiry as CANCELLED
        // "Timeout expired" (we never cancel calls otherwise).
        Code::Cancelled if status.message().contains("Timeout expired") => timeout_response(),
        code => json_response(
            StatusCode::BAD_GATEWAY,
            &json!({ "error": status.message(), "grpc_code": code_name(code) }),
        ),
    }
}

fn timeout_response() -> Response<Full<Bytes>> {
    json_response(
        StatusCode::GATEWAY_TIMEOUT,
        &json!({
            "error": format!("catalog did not answer within {CALL_TIMEOUT:?}"),
            "grpc_code": code_name(Code::DeadlineExceeded),
        }),
    )
}

/// The canonical gRPC name (`UNAVAILABLE`), which is what people grep for;
/// tonic's `Display` gives a sentence and `Debug` gives CamelCase.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
