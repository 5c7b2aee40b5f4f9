//! What every service shares: reading the environment rigd injects, binding
//! the ingress, accepting connections, serving tiny HTTP apps, logging and
//! waiting for SIGTERM/SIGINT.

use std::convert::Infallible;
use std::fmt;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Writes one line to stderr. Errors are ignored on purpose: `eprintln!`
/// panics when stderr is gone (e.g. rigd closed the pipe), and losing a log
/// line must never take a service down.
pub fn log(args: fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{args}");
}

/// Reads a variable, treating "set but empty" like unset: a templated env
/// file often leaves `FOO=` behind and that should not count as a value.
pub fn env_opt(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_required(name: &str, what: &str) -> Result<String> {
    env_opt(name).with_context(|| format!("environment variable {name} is not set ({what})"))
}

/// Binds this service's ingress at `$HOST:$PORT` and logs
/// `<service> listening on <addr>`.
pub async fn bind(service: &str) -> Result<TcpListener> {
    let host = env_opt("HOST").unwrap_or_else(|| "127.0.0.1".to_owned());
    let port = env_required("PORT", "the port this service must listen on")?;
    let port: u16 = port
        .trim()
        .parse()
        .with_context(|| format!("PORT={port:?} is not a valid TCP port"))?;
    // A (host, port) tuple rather than "host:port" so an IPv6 HOST needs no brackets.
    let listener = TcpListener::bind((host.as_str(), port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    let addr = listener
        .local_addr()
        .context("cannot read the listening address")?;
    let mut line = format!("{service} listening on {addr}");
    if let Some(name) = env_opt("RIG_SERVICE") {
        line.push_str(&format!(" (service={name}"));
        if let Some(env) = env_opt("RIG_ENV") {
            line.push_str(&format!(" env={env}"));
        }
        line.push(')');
    }
    log(format_args!("{line}"));
    Ok(listener)
}

/// `host:port` of the egress `name`: `$NAME_ADDR`, else `$NAME_HOST:$NAME_PORT`.
pub fn egress_addr(name: &str) -> Result<String> {
    let upper = name.to_ascii_uppercase();
    if let Some(addr) = env_opt(&format!("{upper}_ADDR")) {
        return Ok(addr);
    }
    match (
        env_opt(&format!("{upper}_HOST")),
        env_opt(&format!("{upper}_PORT")),
    ) {
        (Some(host), Some(port)) if host.contains(':') => Ok(format!("[{host}]:{port}")),
        (Some(host), Some(port)) => Ok(format!("{host}:{port}")),
        _ => bail!("environment variable {upper}_ADDR is not set (the `{name}` egress, host:port)"),
    }
}

/// Base URL of the http/grpc egress `name`: `$NAME_URL`, else `http://` + its address.
pub fn egress_url(name: &str) -> Result<String> {
    let upper = name.to_ascii_uppercase();
    if let Some(url) = env_opt(&format!("{upper}_URL")) {
        return Ok(url.trim_end_matches('/').to_owned());
    }
    let addr = egress_addr(name)
        .with_context(|| format!("environment variable {upper}_URL is not set either"))?;
    Ok(format!("http://{addr}"))
}

/// Resolves when the process gets SIGTERM or SIGINT.
///
/// The handlers are installed by `install`, before any port is bound, so a
/// signal sent right after rigd sees the port open is never lost (the
/// default action would kill the process with a non-zero status).
pub struct Shutdown {
    term: Signal,
    int: Signal,
}

impl Shutdown {
    pub fn install() -> Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Accepts the next connection with TCP_NODELAY set (the demo's messages
/// are small request/response pairs that Nagle would only delay).
///
/// Accept errors (EMFILE, a connection reset before accept...) are logged
/// and retried after a short pause instead of killing the service: they are
/// transient and the pause avoids a hot loop when out of descriptors.
pub async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Best effort: a socket that refuses the option still works.
                let _ = stream.set_nodelay(true);
                return stream;
            }
            Err(err) => {
                log(format_args!("accept failed: {err}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// An HTTP/1.1 response with a fixed body.
pub fn response(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        resp.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    resp
}

pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    response(status, "application/json", body.to_string())
}

/// Serves `handler` over HTTP/1.1 with keep-alive until the future is dropped.
pub async fn serve_http<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let stream = accept(&listener).await;
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            // A client that disconnects mid-request is routine: nothing to report.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
