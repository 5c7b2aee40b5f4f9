//! The one place where rig makes up answers: injected faults and failures of the target become
//! HTTP responses or gRPC trailers-only responses, all marked with [`crate::INJECTED_HEADER`].

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use tracing::debug;

use crate::INJECTED_HEADER;
use crate::metrics;
use crate::policy::{ErrorFault, GrpcCode};
use crate::snapshot::Active;

use super::Proxy;
use super::body::{BodyFailure, BodyWatch, ClientBodyError, DownBody, Obs};
use super::grpc;
use super::upstream::UpstreamError;

/// Why rig answers a request itself.
pub(crate) enum Rescue {
    /// The error fault, with the HTTP status it picked (ignored on grpc edges).
    Error { status: u16 },
    /// A `reject` partition.
    PartitionReject,
    /// A hang with `hang_then = "timeout"` ran its course.
    HangTimeout,
    /// The target could not be reached or failed before answering.
    Upstream(UpstreamError),
    /// A request rig cannot forward.
    BadRequest(&'static str),
    /// The client's request body could not be read (bad chunking, the client went away).
    MalformedBody,
    /// The client's request body sent nothing for this long.
    BodyTimeout(Duration),
    /// rig could not open a connection to the target: it is out of file descriptors itself.
    FdLimit,
}

impl Rescue {
    /// Whose failure a request that got no response head from the target is: the client's
    /// (its body), rig's own (out of descriptors), or the target's.
    /// `watch` is where the request's body noted its failure, if the error may not carry it.
    pub(super) fn from_upstream(e: UpstreamError, watch: Option<&BodyWatch>) -> Rescue {
        let body = ClientBodyError::find(&e)
            .map(ClientBodyError::kind)
            .or_else(|| watch.and_then(BodyWatch::failure));
        match body {
            Some(BodyFailure::Idle(d)) => Rescue::BodyTimeout(d),
            Some(BodyFailure::Malformed) => Rescue::MalformedBody,
            None if e.is_fd_exhausted() => Rescue::FdLimit,
            None => Rescue::Upstream(e),
        }
    }
}

/// What the client reads when rig itself is out of file descriptors.
const FD_LIMIT_MESSAGE: &str =
    "refused by rig: out of file descriptors (fd_limit), raise rigd's RLIMIT_NOFILE";

/// What a made-up answer says, independent of the protocol.
struct Answer {
    status: StatusCode,
    code: GrpcCode,
    /// The value of the injected header.
    why: &'static str,
    message: Cow<'static, str>,
}

const INJECTED: &str = "injected by rig";

impl Proxy {
    /// Turn `r` into the response the client gets; `active` is the policy that injected it.
    pub(super) fn respond(
        &self,
        r: Rescue,
        active: Option<&Active>,
        mut obs: Obs,
    ) -> Response<DownBody> {
        let err = active.and_then(|a| a.policy.error.as_ref());
        // `close`: answer with `connection: close` (HTTP/1; hyper drops it on HTTP/2).
        let (a, close) = match r {
            Rescue::Error { status } => (injected_error(status, err), false),
            Rescue::PartitionReject => (
                Answer {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: GrpcCode::Unavailable,
                    why: "fault=partition",
                    message: "injected by rig: partition".into(),
                },
                false,
            ),
            Rescue::HangTimeout => (
                Answer {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    code: GrpcCode::DeadlineExceeded,
                    why: "fault=hang",
                    message: "injected by rig: hang timed out".into(),
                },
                false,
            ),
            Rescue::Upstream(e) => (self.upstream_failed(&e, &mut obs), false),
            Rescue::BadRequest(what) => {
                self.ctx
                    .metrics
                    .client_error(metrics::CLIENT_INVALID_REQUEST);
                obs.set_failure(what);
                (invalid_request(what), false)
            }
            Rescue::MalformedBody => {
                self.ctx
                    .metrics
                    .client_error(metrics::CLIENT_MALFORMED_BODY);
                let what = "malformed request body";
                obs.set_failure(what);
                (invalid_request(what), true)
            }
            // The rest of the body may still come: the connection cannot carry another request.
            Rescue::BodyTimeout(d) => (self.body_timed_out(d, &mut obs), true),
            Rescue::FdLimit => {
                self.ctx.metrics.refused_fd_limit();
                crate::limits::warn_fd_limit(&self.ctx.info.edge, "connection to the target");
                obs.set_failure(FD_LIMIT_MESSAGE);
                let a = Answer {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: GrpcCode::Unavailable,
                    why: "rig=fd_limit",
                    message: FD_LIMIT_MESSAGE.into(),
                };
                (a, false)
            }
        };
        if self.grpc {
            grpc_answer(&a, obs)
        } else {
            self.http_answer(&a, err, close, obs)
        }
    }

    /// The target could not be reached or failed before answering: 502, counted and noted.
    fn upstream_failed(&self, e: &UpstreamError, obs: &mut Obs) -> Answer {
        self.ctx.metrics.upstream_error();
        let (why, what) = if e.is_connect() {
            ("upstream=unreachable", "upstream unreachable")
        } else {
            ("upstream=error", "upstream failed")
        };
        let message = format!("{what}: {}", error_chain(e));
        debug!(edge = %self.ctx.info.edge, target = %self.ctx.target, error = %message, "upstream request failed");
        obs.set_failure(message.clone());
        Answer {
            status: StatusCode::BAD_GATEWAY,
            code: GrpcCode::Unavailable,
            why,
            message: message.into(),
        }
    }

    /// The client's request body sent nothing for `d`: 408, the client's failure.
    fn body_timed_out(&self, d: Duration, obs: &mut Obs) -> Answer {
        self.ctx.metrics.client_error(metrics::CLIENT_BODY_TIMEOUT);
        let message = format!(
            "request body timed out: the client sent nothing for {} ms",
            d.as_millis()
        );
        debug!(edge = %self.ctx.info.edge, error = %message, "client body timed out");
        obs.set_failure(message.clone());
        Answer {
            status: StatusCode::REQUEST_TIMEOUT,
            code: GrpcCode::DeadlineExceeded,
            why: "request=body_timeout",
            message: message.into(),
        }
    }

    /// An HTTP answer: the error fault's own headers and body, or a JSON body saying why.
    fn http_answer(
        &self,
        a: &Answer,
        err: Option<&ErrorFault>,
        close: bool,
        mut obs: Obs,
    ) -> Response<DownBody> {
        let mut headers = http::HeaderMap::new();
        let body = match err {
            Some(e) if a.why == "fault=error" => {
                for (k, v) in &e.headers {
                    if let (Ok(k), Ok(v)) = (
                        HeaderName::from_bytes(k.as_bytes()),
                        HeaderValue::from_str(v),
                    ) {
                        headers.append(k, v);
                    }
                }
                match &e.body {
                    Some(b) => {
                        if !headers.contains_key(header::CONTENT_TYPE) {
                            headers.insert(
                                header::CONTENT_TYPE,
                                HeaderValue::from_static("text/plain; charset=utf-8"),
                            );
                        }
                        Bytes::from(b.clone())
                    }
                    None => {
                        headers
                            .entry(header::CONTENT_TYPE)
                            .or_insert(HeaderValue::from_static("application/json"));
                        self.default_error_body.clone()
                    }
                }
            }
            _ => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                let msg = if a.message.starts_with(INJECTED) {
                    INJECTED
                } else {
                    &a.message
                };
                serde_json::json!({"error": msg, "edge": self.ctx.info.edge, "reason": a.why})
                    .to_string()
                    .into()
            }
        };
        headers.insert(injected_header(), HeaderValue::from_static(a.why));
        if close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        obs.response_head(a.status, &headers);
        let mut resp = Response::new(DownBody::full(body, obs));
        *resp.status_mut() = a.status;
        *resp.headers_mut() = headers;
        resp
    }
}

/// The error fault's answer, with the HTTP status it picked.
fn injected_error(status: u16, err: Option<&ErrorFault>) -> Answer {
    Answer {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        code: err.map_or(GrpcCode::Unavailable, |e| e.grpc_code),
        why: "fault=error",
        message: match err.and_then(|e| e.grpc_message.clone()) {
            Some(m) => m.into(),
            None => INJECTED.into(),
        },
    }
}

/// A request rig cannot forward: 400, gRPC `INTERNAL`.
fn invalid_request(what: &'static str) -> Answer {
    Answer {
        status: StatusCode::BAD_REQUEST,
        code: GrpcCode::Internal,
        why: "request=invalid",
        message: what.into(),
    }
}

fn injected_header() -> HeaderName {
    HeaderName::from_static(INJECTED_HEADER)
}

/// Trailers-only: the status travels in the headers of an empty, finished response, which gRPC
/// clients decode as exactly this code and message.
fn grpc_answer(a: &Answer, mut obs: Obs) -> Response<DownBody> {
    let mut h = http::HeaderMap::with_capacity(4);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        grpc::GRPC_STATUS,
        HeaderValue::from(u16::from(a.code.code())),
    );
    h.insert(grpc::GRPC_MESSAGE, grpc::encode_message(&a.message));
    h.insert(injected_header(), HeaderValue::from_static(a.why));
    obs.response_head(StatusCode::OK, &h);
    let mut resp = Response::new(DownBody::full(Bytes::new(), obs));
    *resp.headers_mut() = h;
    resp
}

/// An error and its sources, `outer: inner: root`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
