//! Turning a child's stdout/stderr pipes into [`LogLine`]s.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc::UnboundedSender;
use tracing::debug;

use super::{LogLine, MAX_LINE_BYTES, Stream};

/// Marks a line that was cut at [`MAX_LINE_BYTES`].
const CUT_MARK: &str = "…";

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

/// Where the lines of one stream go.
pub(crate) struct LineSink<'a> {
    pub service: &'a str,
    pub stream: Stream,
    pub out: &'a UnboundedSender<LogLine>,
    pub recent: &'a RecentLogs,
}

impl LineSink<'_> {
    fn emit(&self, bytes: &[u8], cut: bool) {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let mut line = String::from_utf8_lossy(bytes).into_owned();
        if cut {
            line.push_str(CUT_MARK);
        }
        let line = LogLine {
            service: self.service.to_owned(),
            stream: self.stream,
            line,
            time: SystemTime::now(),
        };
        self.recent.push(line.clone());
        // Nobody listening is fine: the ring buffer still has the tail.
        let _ = self.out.send(line);
    }
}

/// Reads `reader` to its end, line by line, into `sink`. Lines longer than
/// [`MAX_LINE_BYTES`] are cut there (and the rest up to the newline dropped),
/// so a child writing without newlines cannot make rigd buffer without bound.
pub(crate) async fn pump(reader: impl AsyncRead + Unpin, sink: LineSink<'_>) {
    let mut reader = BufReader::with_capacity(8 * 1024, reader);
    let mut line: Vec<u8> = Vec::new();
    // True while skipping the rest of a line that was already cut.
    let mut skipping = false;
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(e) => {
                debug!(service = %sink.service, stream = %sink.stream, error = %e, "cannot read child output");
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    async fn lines_of(input: &[u8]) -> Vec<String> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let recent = RecentLogs::new(3);
        let sink = LineSink {
            service: "svc",
            stream: Stream::Stderr,
            out: &tx,
            recent: &recent,
        };
        pump(input, sink).await;
        drop(tx);
        let mut out = Vec::new();
        while let Some(line) = rx.recv().await {
            assert_eq!(line.service, "svc");
            assert_eq!(line.stream, Stream::Stderr);
            out.push(line.line);
        }
        let tail: Vec<String> = recent.snapshot().into_iter().map(|l| l.line).collect();
        assert_eq!(tail, out[out.len().saturating_sub(3)..]);
        out
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
