//! The guard in front of everything rigd serves: it refuses what a web page can make a browser
//! send to a loopback address.
//!
//! - `Host` (or the HTTP/2 `:authority`) must be a loopback name or address (`localhost`,
//!   `127.0.0.0/8`, `[::1]`, any port) or rigd's own listen address: otherwise 403. This defeats
//!   DNS rebinding, where a page on `evil.example` resolves its own name to 127.0.0.1. A request
//!   with the valid token passes (a remote caller of a rigd listening on another address).
//! - A request carrying an `Origin` other than rigd's own (`http://<listen addr>`,
//!   `http://localhost:<port>`, `http://127.0.0.1:<port>`, `http://[::1]:<port>`) is refused
//!   with 403 unless it carries the valid token.
//! - gRPC paths take only `POST` (else 405) with `content-type: application/grpc*` (else 415),
//!   so a cross-origin "simple" request (`text/plain` form post) never reaches a service.
//! - Any other path than the gRPC services and `/metrics`, `/healthz`, `/events` is 404.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Shared;

/// Path prefixes routed to the tonic services.
const GRPC_PREFIXES: &[&str] = &["/rig.v1.", "/grpc.health.v1.", "/grpc.reflection."];
/// The plain HTTP routes.
const PLAIN_PATHS: &[&str] = &["/metrics", "/healthz", "/events"];

/// What the guard needs: the address rigd listens on and the shared state (for the token).
#[derive(Debug, Clone)]
pub struct Guard {
    pub listen: SocketAddr,
    pub shared: Arc<Shared>,
}

/// The middleware: see the module docs for what it refuses.
pub async fn guard(State(g): State<Guard>, req: Request, next: Next) -> Response {
    match check(&g, &req) {
        Ok(()) => next.run(req).await,
        Err((status, why)) => {
            tracing::debug!(%status, why, path = req.uri().path(), "refused by the guard");
            (status, format!("{why}\n")).into_response()
        }
    }
}

fn check(g: &Guard, req: &Request) -> Result<(), (StatusCode, &'static str)> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    // A valid token is a credential no page can attach, so it also admits a remote caller of a
    // rigd listening on a non-loopback address (which always has a token).
    if !host.is_some_and(|h| host_allowed(h, g.listen)) && !token_ok(g, req) {
        return Err((StatusCode::FORBIDDEN, "host is not a loopback address"));
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let own = origin.to_str().is_ok_and(|o| origin_allowed(o, g.listen));
        if !own && !token_ok(g, req) {
            return Err((
                StatusCode::FORBIDDEN,
                "foreign origin without a valid token",
            ));
        }
    }
    let path = req.uri().path();
    if GRPC_PREFIXES.iter().any(|p| path.starts_with(p)) {
        if req.method() != Method::POST {
            return Err((StatusCode::METHOD_NOT_ALLOWED, "grpc takes POST only"));
        }
        let grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !grpc {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "grpc takes content-type application/grpc only",
            ));
        }
        return Ok(());
    }
    if PLAIN_PATHS.contains(&path) {
        return Ok(());
    }
    Err((StatusCode::NOT_FOUND, "not found"))
}

fn token_ok(g: &Guard, req: &Request) -> bool {
    g.shared
        .token
        .as_ref()
        .is_some_and(|token| super::http::bearer_matches(req.headers(), token.expose()))
}

/// Split `host[:port]` / `[v6][:port]` into the host part.
fn host_part(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(h, _)| h);
    }
    match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// Is `authority` (a `Host` value) loopback or rigd's own listen address?
pub fn host_allowed(authority: &str, listen: SocketAddr) -> bool {
    let host = host_part(authority.trim());
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback() || ip == listen.ip(),
        Err(_) => false,
    }
}

/// Is `origin` one of rigd's own origins?
pub fn origin_allowed(origin: &str, listen: SocketAddr) -> bool {
    let port = listen.port();
    let own = [
        format!("http://{listen}"),
        format!("http://localhost:{port}"),
        format!("http://127.0.0.1:{port}"),
        format!("http://[::1]:{port}"),
    ];
    let origin = origin.trim().trim_end_matches('/');
    own.iter().any(|o| o.eq_ignore_ascii_case(origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let listen: SocketAddr = "127.0.0.1:7447".parse().unwrap();
        for ok in [
            "localhost",
            "LOCALHOST:7447",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:7447",
            "[::1]",
        ] {
            assert!(host_allowed(ok, listen), "{ok}");
        }
        for bad in [
            "evil.example:7447",
            "evil.example",
            "10.0.0.1:7447",
            "",
            "localhost.evil",
        ] {
            assert!(!host_allowed(bad, listen), "{bad}");
        }
        let lan: SocketAddr = "192.0.2.5:7447".parse().unwrap();
        assert!(host_allowed("192.0.2.5:7447", lan));
    }

    #[test]
    fn origins() {
        let listen: SocketAddr = "127.0.0.1:7447".parse().unwrap();
        assert!(origin_allowed("http://127.0.0.1:7447", listen));
        assert!(origin_allowed("http://localhost:7447", listen));
        assert!(!origin_allowed("http://localhost:8080", listen));
        assert!(!origin_allowed("null", listen));
        assert!(!origin_allowed("https://evil.example", listen));
    }
}
