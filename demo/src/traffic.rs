//! `rig-demo traffic`: a load generator for web. It sends
//! `GET $WEB_URL/items/item-N` at `$RATE` requests per second and prints one
//! summary line per second on stdout:
//!
//! `traffic: 20 req/s ok=18 4xx=2 5xx=0 errors=0 p50=2.1ms p99=9.8ms`

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};

use crate::common::{self, Shutdown, json_response, response};

const DEFAULT_RATE: f64 = 20.0;
/// Upper bound for `RATE`, far above what the demo needs, so a typo cannot
/// turn the generator into a flood.
const MAX_RATE: f64 = 100_000.0;
/// Ids are drawn from item-0..item-119: the store holds 100 items, so about
/// one request in six is an expected 404.
const ID_SPACE: u64 = 120;
/// A request that takes longer counts as an error. Well above web's own 2 s
/// catalog deadline, so this only fires when web itself is stuck.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Cap on outstanding requests. When web stalls, the generator sends less
/// (visible as a lower req/s) instead of piling up unbounded tasks.
const MAX_IN_FLIGHT: usize = 512;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub async fn run(mut shutdown: Shutdown) -> Result<()> {
    let base = common::egress_url("web")?;
    // Check the URL once up front rather than failing every request.
    format!("{base}/items/item-0")
        .parse::<Uri>()
        .with_context(|| format!("WEB_URL={base:?} is not a valid URL"))?;
    let rate = match common::env_opt("RATE") {
        Some(rate) => parse_rate(&rate)?,
        None => DEFAULT_RATE,
    };
    let duration = common::env_opt("DURATION")
        .map(|d| parse_duration(&d))
        .transpose()?;

    // The ingress only exists so rigd can probe readiness.
    let listener = common::bind("traffic").await?;
    let health = tokio::spawn(common::serve_http(listener, healthz));

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    // The legacy client pools connections: keep-alive across requests.
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);

    let stats = Arc::new(Mutex::new(Window::default()));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut ids = Lcg(u64::from(std::process::id()));

    let start = Instant::now();
    let mut send = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    // After a stall, carry on at the configured rate rather than bursting to catch up.
    send.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut report =
        tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    report.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_report = start;
    let stop = async move {
        match duration {
            Some(duration) => tokio::time::sleep_until(start + duration).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);

    loop {
        tokio::select! {
            // Stopping wins over sending, and the final report over a send.
            biased;
            () = shutdown.recv() => break,
            () = &mut stop => break,
            now = report.tick() => {
                let window = std::mem::take(&mut *lock(&stats));
                print_line(&window.summary(now - last_report));
                last_report = now;
            }
            _ = send.tick() => {
                // Skipping when saturated is deliberate: see MAX_IN_FLIGHT.
                if let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() {
                    let uri = format!("{base}/items/item-{}", ids.next_below(ID_SPACE));
                    tokio::spawn(one_request(client.clone(), uri, Arc::clone(&stats), permit));
                }
            }
        }
    }

    // Report the last partial second too, unless it is too short for its
    // req/s to mean anything.
    let elapsed = last_report.elapsed();
    let window = std::mem::take(&mut *lock(&stats));
    if elapsed >= Duration::from_millis(500) && window.total() > 0 {
        print_line(&window.summary(elapsed));
    }
    health.abort();
    Ok(())
}

async fn healthz(req: Request<Incoming>) -> hyper::Response<http_body_util::Full<Bytes>> {
    if req.method() == Method::GET && req.uri().path() == "/healthz" {
        response(StatusCode::OK, "text/plain", "ok")
    } else {
        json_response(StatusCode::NOT_FOUND, &json!({ "error": "not found" }))
    }
}

async fn one_request(
    client: HttpClient,
    uri: String,
    stats: Arc<Mutex<Window>>,
    _permit: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let uri: Uri = uri.parse().ok()?;
        let resp = client.get(uri).await.ok()?;
        let status = resp.status();
        // Read the body to the end: the connection only returns to the pool then.
        resp.into_body().collect().await.ok()?;
        Some(status)
    })
    .await;
    let mut window = lock(&stats);
    match outcome {
        Ok(Some(status)) => window.record(status, started.elapsed()),
        // Connection errors, broken bodies and timeouts alike.
        _ => window.errors += 1,
    }
}

fn lock(stats: &Mutex<Window>) -> std::sync::MutexGuard<'_, Window> {
    // Nothing panics while holding the lock; if it ever did, counts are still usable.
    stats.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes and flushes one line: the output is read line by line by rigd or a
/// person, often through a pipe where it would otherwise sit in a buffer.
/// Write errors (stdout closed) are ignored: the load must go on.
fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// What happened since the previous summary line.
#[derive(Default, Debug)]
struct Window {
    ok: u64,
    client_errors: u64,
    server_errors: u64,
    /// No HTTP response at all: connect failure, reset, timeout.
    errors: u64,
    /// Latencies of the requests that got a response, any status.
    latencies_ms: Vec<f64>,
}

impl Window {
    fn record(&mut self, status: StatusCode, latency: Duration) {
        if status.is_server_error() {
            self.server_errors += 1;
        } else if status.is_client_error() {
            self.client_errors += 1;
        } else {
            self.ok += 1;
        }
        self.latencies_ms.push(latency.as_secs_f64() * 1000.0);
    }

    fn total(&self) -> u64 {
        self.ok + self.client_errors + self.server_errors + self.errors
    }

    /// `traffic: N req/s ok=.. 4xx=.. 5xx=.. errors=.. p50=X.Xms p99=X.Xms`,
    /// where N counts completed requests over `elapsed` and the percentiles
    /// are `-` when no response arrived in the window.
    fn summary(mut self, elapsed: Duration) -> String {
        let per_sec = self.total() as f64 / elapsed.as_secs_f64().max(1e-3);
        self.latencies_ms.sort_by(f64::total_cmp);
        let p50 = percentile(&self.latencies_ms, 0.50);
        let p99 = percentile(&self.latencies_ms, 0.99);
        format!(
            "traffic: {per_sec:.0} req/s ok={} 4xx={} 5xx={} errors={} p50={p50} p99={p99}",
            self.ok, self.client_errors, self.server_errors, self.errors
        )
    }
}

/// Nearest-rank percentile of sorted samples, formatted in milliseconds.
fn percentile(sorted_ms: &[f64], p: f64) -> String {
    if sorted_ms.is_empty() {
        return "-".to_owned();
    }
    let rank = (p * sorted_ms.len() as f64).ceil() as usize;
    let value = sorted_ms[rank.clamp(1, sorted_ms.len()) - 1];
    format!("{value:.1}ms")
}

/// A 64-bit linear congruential generator (Knuth's MMIX constants): plenty
/// random for picking ids, and no dependency.
struct Lcg(u64);

impl Lcg {
    fn next_below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        // The high bits of an LCG are the well-mixed ones.
        (self.0 >> 33) % bound
    }
}

fn parse_rate(s: &str) -> Result<f64> {
    let rate: f64 = s
        .trim()
        .parse()
        .with_context(|| format!("RATE={s:?} is not a number"))?;
    ensure!(
        rate > 0.0 && rate <= MAX_RATE,
        "RATE={s:?} must be above 0 and at most {MAX_RATE}"
    );
    Ok(rate)
}

/// `DURATION`: seconds as a plain number (`10`, `2.5`) or with a unit
/// (`500ms`, `10s`, `2m`, `1h`).
fn parse_duration(s: &str) -> Result<Duration> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        _ => bail!("DURATION={s:?}: unknown unit (use ms, s, m or h)"),
    };
    let number: f64 = number
        .parse()
        .with_context(|| format!("DURATION={s:?} is not a duration like 10s"))?;
    // try_from: from_secs_f64 would panic on an absurdly large value.
    Duration::try_from_secs_f64(number * scale)
        .with_context(|| format!("DURATION={s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10").ok(), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("2s").ok(), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_duration(" 1.5s ").ok(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_duration("500ms").ok(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_duration("2m").ok(), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h").ok(), Some(Duration::from_secs(3600)));
        for bad in ["", "s", "-1", "10x", "1e999", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("20").ok(), Some(20.0));
        assert_eq!(parse_rate("0.5").ok(), Some(0.5));
        for bad in ["0", "-3", "abc", "NaN", "inf", "1000000"] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn summary_line() {
        let mut w = Window::default();
        for ms in 1..=100 {
            w.record(StatusCode::OK, Duration::from_millis(ms));
        }
        w.record(StatusCode::NOT_FOUND, Duration::from_millis(1));
        w.record(StatusCode::BAD_GATEWAY, Duration::from_millis(1));
        w.errors = 2;
        // 102 latencies (1, 1, 1, 2, ..., 100 ms): nearest ranks 51 and 101.
        assert_eq!(
            w.summary(Duration::from_secs(1)),
            "traffic: 104 req/s ok=100 4xx=1 5xx=1 errors=2 p50=49.0ms p99=99.0ms"
        );
        assert_eq!(
            Window::default().summary(Duration::from_secs(1)),
            "traffic: 0 req/s ok=0 4xx=0 5xx=0 errors=0 p50=- p99=-"
        );
    }

    #[test]
    fn ids_cover_the_space() {
        let mut lcg = Lcg(42);
        let mut seen = [false; ID_SPACE as usize];
        for _ in 0..10_000 {
            seen[lcg.next_below(ID_SPACE) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
