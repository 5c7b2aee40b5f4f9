//! File-descriptor limits: raise the soft `RLIMIT_NOFILE` to the hard limit at start-up, and
//! shed connections cleanly when the process runs out of descriptors anyway.
//!
//! Shedding frees a reserve descriptor so that `accept` can take the waiting connection and
//! reset it. Descriptors are one table for the whole process, so a slot freed on one thread can
//! be taken by another thread's `socket`/`pipe2` in between: the data plane's connection then
//! keeps it, the reserve cannot be taken back, and with every descriptor held by live
//! connections the accept loop could neither accept nor refuse, leaving new clients hanging in
//! the backlog until some connection closes (seen under a low hard limit: the edge stopped
//! answering for as long as the relayed connections stayed open). So the data plane allocates
//! its descriptors under [`fd_gate`] (shared, one uncontended lock per connection or new pipe)
//! and shedding runs under the exclusive side: the freed slot is the accept's.

use std::fs::File;
use std::io;
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::net::TcpListener;

use crate::metrics::EdgeMetrics;

/// Raise the soft `RLIMIT_NOFILE` to the hard limit. Returns the `(soft, hard)` now in force.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok((soft, hard))
}

static FD_GATE: RwLock<()> = RwLock::new(());

/// Hold while creating a descriptor for a connection (a socket, a pipe), so that it cannot take
/// the slot a shedding accept loop has just freed. Hold it only around the system call.
pub fn fd_gate() -> RwLockReadGuard<'static, ()> {
    FD_GATE.read().unwrap_or_else(|e| e.into_inner())
}

/// Held by an accept loop while it frees its reserve, accepts and resets a connection and takes
/// the reserve back; never across an await.
pub(crate) fn fd_gate_exclusive() -> RwLockWriteGuard<'static, ()> {
    FD_GATE.write().unwrap_or_else(|e| e.into_inner())
}

/// Is `e` the process (`EMFILE`) or the system (`ENFILE`) out of file descriptors?
pub fn is_fd_exhausted(e: &io::Error) -> bool {
    let code = e.raw_os_error();
    code == Some(nix::errno::Errno::EMFILE as i32) || code == Some(nix::errno::Errno::ENFILE as i32)
}

/// One descriptor held in reserve (`/dev/null`) so an accept loop that hits `EMFILE` can free
/// it, accept the waiting connection and close it at once, instead of leaving it in the
/// backlog and spinning on the error.
#[derive(Debug)]
pub struct Reserve {
    fd: Option<File>,
}

/// At most one fd-limit warning per this interval.
const WARN_EVERY: Duration = Duration::from_secs(5);

impl Default for Reserve {
    fn default() -> Self {
        Self::new()
    }
}

impl Reserve {
    pub fn new() -> Reserve {
        Reserve {
            fd: File::open("/dev/null").ok(),
        }
    }

    /// Free the reserved descriptor; true if there was one to free.
    pub fn release(&mut self) -> bool {
        self.fd.take().is_some()
    }

    /// Take the reserve descriptor back (best effort: retried at the next release).
    pub fn restore(&mut self) {
        if self.fd.is_none() {
            self.fd = File::open("/dev/null").ok();
        }
    }

    /// Log a rate-limited warning that a connection was refused for want of descriptors.
    pub fn warn(&mut self, edge: &str, what: &str) {
        warn_fd_limit(edge, what);
    }
}

/// Log, at most once per `WARN_EVERY` (5 s) for the whole process, that `what` was refused on
/// `edge` for want of file descriptors; the refusals in between are counted in the next line.
pub fn warn_fd_limit(edge: &str, what: &str) {
    static LAST: Mutex<(Option<Instant>, u64)> = Mutex::new((None, 0));
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if last.0.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
        last.1 += 1;
        return;
    }
    let also = std::mem::take(&mut last.1);
    last.0 = Some(now);
    drop(last);
    tracing::warn!(
        edge,
        also_refused = also,
        "out of file descriptors: {what} refused (raise RLIMIT_NOFILE)"
    );
}

/// Out of file descriptors with a connection waiting (both accept loops call this): free the reserve descriptor, accept the
/// connection and reset it at once (the client sees a refusal, not a hang in the backlog),
/// count it and take the reserve back, all under the exclusive [`fd_gate`] so no
/// other thread takes the freed slot. False when there was no reserve to free or nothing could
/// be accepted (the caller backs off).
pub(crate) fn shed(
    listener: &TcpListener,
    edge: &str,
    metrics: &EdgeMetrics,
    reserve: &mut Reserve,
) -> bool {
    let _gate = fd_gate_exclusive();
    if !reserve.release() {
        reserve.restore();
        return false;
    }
    // One non-blocking try (no await while holding the gate): the listener is still readable,
    // since the accept that failed with EMFILE did not clear its readiness.
    let accepted = {
        let accept = std::pin::pin!(listener.accept());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::future::Future::poll(accept, &mut cx) {
            std::task::Poll::Ready(r) => r.ok(),
            std::task::Poll::Pending => None,
        }
    };
    let shed = match accepted {
        Some((stream, _)) => {
            let _ = stream.set_zero_linger();
            drop(stream);
            metrics.refused_fd_limit();
            reserve.warn(edge, "new connection");
            true
        }
        None => false,
    };
    reserve.restore();
    shed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emfile_and_enfile_are_exhaustion() {
        assert!(is_fd_exhausted(&io::Error::from_raw_os_error(
            nix::errno::Errno::EMFILE as i32
        )));
        assert!(is_fd_exhausted(&io::Error::from_raw_os_error(
            nix::errno::Errno::ENFILE as i32
        )));
        assert!(!is_fd_exhausted(&io::Error::from_raw_os_error(
            nix::errno::Errno::ECONNREFUSED as i32
        )));
    }
}
