//! Load clients in the bench binary: a sequential keep-alive HTTP/1.1 client, a tcp echo client,
//! and percentile statistics over their samples.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One HTTP/1.1 keep-alive connection, used one request at a time.
#[derive(Debug)]
pub struct HttpConn {
    addr: SocketAddr,
    sender: SendRequest<Empty<Bytes>>,
    task: JoinHandle<()>,
}

/// What a request returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The `x-rig-injected` header: set when rig made the response up.
    pub injected: Option<String>,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> Result<HttpConn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("http handshake with {addr}"))?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HttpConn { addr, sender, task })
    }

    /// `GET path`, reading the whole body.
    pub async fn get(&mut self, path: &str) -> Result<Answer> {
        let req = http::Request::get(path)
            .header(http::header::HOST, self.addr.to_string())
            .body(Empty::new())
            .map_err(|e| anyhow!("building a request: {e}"))?;
        self.sender
            .ready()
            .await
            .with_context(|| format!("connection to {} closed", self.addr))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .with_context(|| format!("request to {}", self.addr))?;
        let status = resp.status().as_u16();
        let injected = resp
            .headers()
            .get(rig_proxy::INJECTED_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        resp.into_body()
            .collect()
            .await
            .with_context(|| format!("reading a body from {}", self.addr))?;
        Ok(Answer { status, injected })
    }
}

impl Drop for HttpConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A tcp connection to an echo server.
#[derive(Debug)]
pub struct EchoConn {
    stream: TcpStream,
}

impl EchoConn {
    pub async fn connect(addr: SocketAddr) -> Result<EchoConn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(EchoConn { stream })
    }

    /// Send `msg` and read the same number of bytes back.
    pub async fn round_trip(&mut self, msg: &[u8]) -> Result<()> {
        self.stream.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        self.stream
            .read_exact(&mut buf)
            .await
            .context("reading the echo")?;
        if buf != msg {
            bail!("the echo differs from what was sent");
        }
        Ok(())
    }
}

/// Percentiles of a set of samples, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(samples: &mut [Duration]) -> Stats {
        if samples.is_empty() {
            return Stats::default();
        }
        samples.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        // Nearest rank: the smallest sample with at least p of all samples at or below it.
        let pct = |p: f64| {
            let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            us(samples[rank - 1])
        };
        let sum: f64 = samples.iter().map(|d| us(*d)).sum();
        Stats {
            n: samples.len(),
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            mean: sum / samples.len() as f64,
            min: us(samples[0]),
            max: us(samples[samples.len() - 1]),
        }
    }
}

/// What to measure in [`measure`].
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// `GET /` on one keep-alive connection, expecting 200.
    Http(SocketAddr),
    /// 64-byte round trips on one connection.
    Echo(SocketAddr),
}

/// `warmup` unmeasured operations, then `n` measured ones, strictly one after the other. Each
/// measurement is bounded by `limit` overall.
pub async fn measure(target: Target, warmup: usize, n: usize, limit: Duration) -> Result<Stats> {
    let deadline = Instant::now() + limit;
    let mut samples = Vec::with_capacity(n);
    match target {
        Target::Http(addr) => {
            let mut conn = HttpConn::connect(addr).await?;
            for i in 0..warmup + n {
                let t0 = Instant::now();
                let a = conn.get("/").await?;
                let dt = t0.elapsed();
                if a.status != 200 {
                    bail!(
                        "GET / via {addr} answered {} (injected: {:?})",
                        a.status,
                        a.injected
                    );
                }
                if i >= warmup {
                    samples.push(dt);
                }
                if Instant::now() > deadline {
                    bail!("{n} requests via {addr} took longer than {limit:?}");
                }
            }
        }
        Target::Echo(addr) => {
            let mut conn = EchoConn::connect(addr).await?;
            let msg = [b'x'; 64];
            for i in 0..warmup + n {
                let t0 = Instant::now();
                conn.round_trip(&msg).await?;
                let dt = t0.elapsed();
                if i >= warmup {
                    samples.push(dt);
                }
                if Instant::now() > deadline {
                    bail!("{n} round trips via {addr} took longer than {limit:?}");
                }
            }
        }
    }
    Ok(Stats::of(&mut samples))
}
