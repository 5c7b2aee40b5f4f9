//! The one place where rig makes up answers: injected faults and failures of the target become
//! HTTP responses or gRPC trailers-only responses, all marked with [`crate::INJECTED_HEADER`].

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use tracing::debug;

use crate::INJECTED_HEADER;
use crate::edge::Active;
use crate::policy::GrpcCode;

use super::Proxy;
use super::body::{DownBody, Obs};
use super::grpc;

/// Why rig answers a request itself.
pub(crate) enum Rescue {
    /// The error fault, with the HTTP status it picked (ignored on grpc edges).
    Error { status: u16 },
    /// A `reject` partition.
    PartitionReject,
    /// A hang with `hang_then = "timeout"` ran its course.
    HangTimeout,
    /// The target could not be reached or failed before answering.
    Upstream(super::UpstreamError),
    /// A request rig cannot forward.
    BadRequest(&'static str),
}

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
                obs.set_failure(what);
                Answer {
                    status: StatusCode::BAD_REQUEST,
                    code: GrpcCode::Internal,
                    why: "request=invalid",
                    message: what.into(),
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
