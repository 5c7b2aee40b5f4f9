//! Turning a child's stdout/stderr pipes into [`LogLine`]s.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use metrics::Counter;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc::error::TrySendError;
use tracing::debug;

use super::{LogLine, LogOutput, MAX_LINE_BYTES, Stream};

/// Marks a line that was cut at [`MAX_LINE_BYTES`].
const CUT_MARK: &str = "…";
/// The counter of dropped lines, by `env`, `service` and `reason` (`rate`, `queue_full`).
pub(crate) const DROPPED_METRIC: &str = "rig_service_log_lines_dropped_total";

/// The last lines of both streams of one child (a ring buffer: the oldest
/// line goes when a new one comes and the buffer is full).
#[derive(Debug)]
pub(crate) struct RecentLogs {
    lines: Mutex<VecDeque<LogLine>>,
    capacity: usize,
}

impl RecentLogs {
    pub(crate) fn new(capacity: usize) -> RecentLogs {
        RecentLogs {
            lines: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
        }
    }

    pub(crate) fn push(&self, line: LogLine) {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub(crate) fn snapshot(&self) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines.iter().cloned().collect()
    }
}

/// What both output pumps of one child share.
pub(crate) struct Outlet {
    service: String,
    out: LogOutput,
    recent: Arc<RecentLogs>,
    /// One per service: stdout and stderr draw from the same budget.
    limiter: DefaultDirectRateLimiter,
    dropped_rate: Counter,
    dropped_queue_full: Counter,
}

impl Outlet {
    pub(crate) fn new(service: &str, out: LogOutput, recent: Arc<RecentLogs>) -> Outlet {
        let quota = Quota::per_second(out.limits.lines_per_sec).allow_burst(out.limits.burst);
        let counter = |reason: &'static str| metrics::counter!(DROPPED_METRIC, "env" => out.env.clone(), "service" => service.to_owned(), "reason" => reason);
        Outlet {
            service: service.to_owned(),
            dropped_rate: counter("rate"),
            dropped_queue_full: counter("queue_full"),
            limiter: RateLimiter::direct(quota),
            out,
            recent,
        }
    }
}

/// Lines of one stream dropped since its last notice.
struct Dropped {
    rate: u64,
    queue_full: u64,
    last_notice: Instant,
}

/// Where the lines of one stream go.
struct LineSink<'a> {
    outlet: &'a Outlet,
    stream: Stream,
    dropped: Dropped,
}

impl LineSink<'_> {
    fn emit(&mut self, bytes: &[u8], cut: bool) {
        // Checked first: a line over the rate costs no allocation.
        if self.outlet.limiter.check().is_err() {
            self.dropped.rate += 1;
            self.outlet.dropped_rate.increment(1);
            return;
        }
        if self.dropped.rate + self.dropped.queue_full > 0
            && self.dropped.last_notice.elapsed() >= self.outlet.out.limits.notice_interval
        {
            self.notice();
        }
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        // Sized for the cut mark too: pushing it onto an exact-size 16 KiB String would double
        // its capacity, and the event log (which counts the line's length) would hold twice the
        // memory it budgets (found by tests/service_flood.rs).
        let mut line = String::with_capacity(bytes.len() + CUT_MARK.len());
        line.push_str(&String::from_utf8_lossy(bytes));
        if cut {
            line.push_str(CUT_MARK);
        }
        self.send(line);
    }

    /// Says how many lines were dropped since the last notice (this one passes the rate limit;
    /// if the queue is full it is lost, as the counter still has the count).
    fn notice(&mut self) {
        let Dropped {
            rate, queue_full, ..
        } = self.dropped;
        self.dropped = Dropped {
            rate: 0,
            queue_full: 0,
            last_notice: Instant::now(),
        };
        self.send(format!(
            "[rig] {} lines of {} dropped (rate: {rate}, queue_full: {queue_full})",
            rate + queue_full,
            self.stream
        ));
    }

    fn send(&mut self, line: String) {
        let line = LogLine {
            service: self.outlet.service.clone(),
            stream: self.stream,
            line,
            time: SystemTime::now(),
        };
        self.outlet.recent.push(line.clone());
        match self.outlet.out.tx.try_send(line) {
            // Nobody listening is fine: the ring buffer still has the tail.
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.queue_full += 1;
                self.outlet.dropped_queue_full.increment(1);
            }
        }
    }

    fn finish(&mut self) {
        if self.dropped.rate + self.dropped.queue_full > 0 {
            self.notice();
        }
    }
}

/// Reads `reader` to its end, line by line, into `sink`. Lines longer than
/// [`MAX_LINE_BYTES`] are cut there (and the rest up to the newline dropped),
/// so a child writing without newlines cannot make rigd buffer without bound.
/// The pipe is drained whatever happens to the lines (rate limit, full queue).
pub(crate) async fn pump(reader: impl AsyncRead + Unpin, outlet: &Outlet, stream: Stream) {
    let mut sink = LineSink {
        outlet,
        stream,
        dropped: Dropped {
            rate: 0,
            queue_full: 0,
            last_notice: Instant::now(),
        },
    };
    let mut reader = BufReader::with_capacity(8 * 1024, reader);
    let mut line: Vec<u8> = Vec::new();
    // True while skipping the rest of a line that was already cut.
    let mut skipping = false;
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(e) => {
                debug!(service = %outlet.service, %stream, error = %e, "cannot read child output");
                break;
            }
        };
        if buf.is_empty() {
            break;
        }
        let (chunk, newline) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], true),
            None => (buf, false),
        };
        let used = chunk.len() + usize::from(newline);
        if !skipping {
            let room = MAX_LINE_BYTES - line.len();
            if chunk.len() > room {
                line.extend_from_slice(&chunk[..room]);
                sink.emit(&line, true);
                line.clear();
                skipping = !newline;
            } else {
                line.extend_from_slice(chunk);
                if newline {
                    sink.emit(&line, false);
                    line.clear();
                }
            }
        } else if newline {
            skipping = false;
        }
        reader.consume(used);
    }
    if !line.is_empty() {
        sink.emit(&line, false);
    }
    sink.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    use crate::supervisor::LogLimits;
    use std::num::NonZeroU32;
    use std::time::Duration;

    /// Pumps `input` through an outlet with `limits`, a channel of `queue` lines and a ring of
    /// `ring` lines; returns what the channel got and what the ring kept.
    async fn run(
        input: &[u8],
        limits: LogLimits,
        queue: usize,
        ring: usize,
    ) -> (Vec<String>, Vec<String>) {
        let (tx, mut rx) = mpsc::channel(queue);
        let recent = Arc::new(RecentLogs::new(ring));
        let out = LogOutput {
            tx,
            env: "e".into(),
            limits,
        };
        let outlet = Outlet::new("svc", out, recent.clone());
        pump(input, &outlet, Stream::Stderr).await;
        drop(outlet);
        let mut got = Vec::new();
        while let Some(line) = rx.recv().await {
            assert_eq!(line.service, "svc");
            assert_eq!(line.stream, Stream::Stderr);
            got.push(line.line);
        }
        let tail = recent.snapshot().into_iter().map(|l| l.line).collect();
        (got, tail)
    }

    fn limits(lines_per_sec: u32, burst: u32) -> LogLimits {
        LogLimits {
            lines_per_sec: NonZeroU32::new(lines_per_sec).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
            notice_interval: Duration::from_secs(3600),
        }
    }

    async fn lines_of(input: &[u8]) -> Vec<String> {
        let (out, tail) = run(input, LogLimits::default(), 1024, 3).await;
        assert_eq!(tail, out[out.len().saturating_sub(3)..]);
        out
    }

    fn numbered(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| format!("{i}\n").into_bytes()).collect()
    }

    #[tokio::test]
    async fn lines_over_the_rate_are_dropped_and_counted_in_one_notice() {
        // A burst of 5, then one line a second: pumping 100 lines takes far less than that.
        let (got, tail) = run(&numbered(100), limits(1, 5), 1024, 1000).await;
        let passed = got.len() - 1;
        assert!((5..10).contains(&passed), "{got:?}");
        let first: Vec<String> = (0..passed).map(|i| i.to_string()).collect();
        assert_eq!(got[..passed], first);
        let dropped = 100 - passed;
        assert_eq!(
            got[passed],
            format!("[rig] {dropped} lines of stderr dropped (rate: {dropped}, queue_full: 0)")
        );
        assert_eq!(tail, got, "dropped lines are not kept in the ring either");
    }

    #[tokio::test]
    async fn lines_that_find_the_queue_full_are_dropped_and_counted() {
        // Nobody reads while the pump runs: 3 lines fit, 7 do not, nor does the notice.
        let (got, tail) = run(&numbered(10), LogLimits::default(), 3, 100).await;
        assert_eq!(got, ["0", "1", "2"]);
        assert_eq!(tail.len(), 11, "the ring keeps them all: {tail:?}");
        assert_eq!(
            tail[10],
            "[rig] 7 lines of stderr dropped (rate: 0, queue_full: 7)"
        );
    }

    #[tokio::test]
    async fn splits_lines_strips_cr_and_keeps_an_unterminated_tail() {
        let got = lines_of(b"one\r\n\ntwo\nthree").await;
        assert_eq!(got, ["one", "", "two", "three"]);
    }

    #[tokio::test]
    async fn invalid_utf8_is_replaced() {
        let got = lines_of(b"a\xffb\n").await;
        assert_eq!(got, ["a\u{fffd}b"]);
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_the_next_line_is_intact() {
        let mut input = vec![b'x'; 3 * MAX_LINE_BYTES + 5];
        input.extend_from_slice(b"\nnext\n");
        let got = lines_of(&input).await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], format!("{}{CUT_MARK}", "x".repeat(MAX_LINE_BYTES)));
        assert_eq!(got[1], "next");
    }

    #[tokio::test]
    async fn a_line_of_exactly_the_limit_is_not_cut() {
        let mut input = vec![b'y'; MAX_LINE_BYTES];
        input.push(b'\n');
        let got = lines_of(&input).await;
        assert_eq!(got, ["y".repeat(MAX_LINE_BYTES)]);
    }

    #[test]
    fn ring_keeps_the_last_lines() {
        let recent = RecentLogs::new(2);
        for i in 0..5 {
            recent.push(LogLine {
                service: "s".into(),
                stream: Stream::Stdout,
                line: i.to_string(),
                time: SystemTime::now(),
            });
        }
        let tail: Vec<String> = recent.snapshot().into_iter().map(|l| l.line).collect();
        assert_eq!(tail, ["3", "4"]);
    }
}
