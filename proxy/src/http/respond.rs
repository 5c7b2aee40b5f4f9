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
use crate::policy::GrpcCode;
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
        // Answer with `connection: close` (HTTP/1; hyper drops it on HTTP/2).
        let mut close = false;
        let a = match r {
            Rescue::Error { status } => Answer {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                code: err.map_or(GrpcCode::Unavailable, |e| e.grpc_code),
                why: "fault=error",
                message: match err.and_then(|e| e.grpc_message.clone()) {
                    Some(m) => m.into(),
                    None => INJECTED.into(),
                },
            },
            Rescue::PartitionReject => Answer {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: GrpcCode::Unavailable,
                why: "fault=partition",
                message: "injected by rig: partition".into(),
            },
            Rescue::HangTimeout => Answer {
                status: StatusCode::GATEWAY_TIMEOUT,
                code: GrpcCode::DeadlineExceeded,
                why: "fault=hang",
                message: "injected by rig: hang timed out".into(),
            },
            Rescue::Upstream(e) => {
                self.ctx.metrics.upstream_error();
                let (why, what) = if e.is_connect() {
                    ("upstream=unreachable", "upstream unreachable")
                } else {
                    ("upstream=error", "upstream failed")
                };
                let message = format!("{what}: {}", error_chain(&e));
                debug!(edge = %self.ctx.info.edge, target = %self.ctx.target, error = %message, "upstream request failed");
                obs.set_failure(message.clone());
                Answer {
                    status: StatusCode::BAD_GATEWAY,
                    code: GrpcCode::Unavailable,
                    why,
                    message: message.into(),
                }
            }
            Rescue::BadRequest(what) => {
                self.ctx
                    .metrics
                    .client_error(metrics::CLIENT_INVALID_REQUEST);
                obs.set_failure(what);
                Answer {
                    status: StatusCode::BAD_REQUEST,
                    code: GrpcCode::Internal,
                    why: "request=invalid",
                    message: what.into(),
                }
            }
            Rescue::MalformedBody => {
                self.ctx
                    .metrics
                    .client_error(metrics::CLIENT_MALFORMED_BODY);
                close = true;
                let what = "malformed request body";
                obs.set_failure(what);
                Answer {
                    status: StatusCode::BAD_REQUEST,
                    code: GrpcCode::Internal,
                    why: "request=invalid",
                    message: what.into(),
                }
            }
            Rescue::BodyTimeout(d) => {
                self.ctx.metrics.client_error(metrics::CLIENT_BODY_TIMEOUT);
                // The rest of the body may still come: the connection cannot carry another
                // request.
                close = true;
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
            Rescue::FdLimit => {
                self.ctx.metrics.refused_fd_limit();
                crate::limits::warn_fd_limit(&self.ctx.info.edge, "connection to the target");
                obs.set_failure(FD_LIMIT_MESSAGE);
                Answer {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: GrpcCode::Unavailable,
                    why: "rig=fd_limit",
                    message: FD_LIMIT_MESSAGE.into(),
                }
            }
        };
        let injected = (
            HeaderName::from_static(INJECTED_HEADER),
            HeaderValue::from_static(a.why),
        );
        if self.grpc {
            // Trailers-only: the status travels in the headers of an empty, finished response,
            // which gRPC clients decode as exactly this code and message.
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
            h.insert(injected.0, injected.1);
            obs.response_head(StatusCode::OK, &h);
            let mut resp = Response::new(DownBody::full(Bytes::new(), obs));
            *resp.headers_mut() = h;
            return resp;
        }
        let mut headers = http::HeaderMap::new();
        let body = match (&a, err) {
            (
                Answer {
                    why: "fault=error", ..
                },
                Some(e),
            ) => {
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
        headers.insert(injected.0, injected.1);
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
