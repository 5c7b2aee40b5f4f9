//! Zero-copy relay through a pipe with splice(2): socket → pipe → socket, bytes never enter user
//! memory. Used while the policy in force is passthrough.
//!
//! A pipe costs two file descriptors, as many as the connection's two sockets, so a direction
//! holds one only while bytes move: it [`take`]s a pipe from a process-wide pool of empty pipes
//! when its source is readable, and [`give`]s it back once a fill finds nothing more to read
//! (the pipe is drained by then). An idle connection thus holds 2 descriptors, not 6, and a
//! busy one pays two uncontended mutex operations per wakeup, next to a wakeup's splice calls.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::unistd::{pipe2, read};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The capacity a new pipe has (16 pages), assumed until the kernel says otherwise.
const PIPE_DEFAULT: usize = 64 * 1024;

/// The capacity a pipe grows to once a stream fills it: each wakeup then moves up to this much
/// with two splice calls instead of one default pipe's worth (measured with iperf3: 3-4x fewer
/// syscalls per byte than 64 KiB). Only busy directions grow (an idle or chatty connection keeps
/// the default); the pages are kernel memory held only while bytes are in flight, not RSS. Not
/// larger: grown pipes count against the per-user pipe quota
/// (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB by default), past which the kernel gives new
/// pipes one page, and 1 MiB measured no faster than 256 KiB. A refused resize keeps the default.
const PIPE_BULK: usize = 256 * 1024;

/// The most empty pipes the pool keeps (2 descriptors each, so at most 128 descriptors idle).
/// A pipe given back to a full pool is closed; a take from an empty pool makes a new pipe. 64
/// covers many more directions moving bytes at the same instant than 2 cores serve, and bounds
/// what idle pooled pipes hold of the per-user pipe quota (64 × 256 KiB grown = 16 MiB of the
/// default 64 MiB `pipe-user-pages-soft`).
pub(super) const POOL_IDLE_MAX: usize = 64;

/// Empty pipes ready for reuse; capacity as they were grown.
static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// An empty pipe: one from the pool, or a new one.
pub(super) fn take() -> io::Result<Pipe> {
    let pooled = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
    match pooled {
        Some(p) => Ok(p),
        None => Pipe::new(),
    }
}

/// Give back a pipe the caller has drained (it must be empty: the next taker's first fill
/// assumes so). Closed instead when the pool is full.
pub(super) fn give(p: Pipe) {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < POOL_IDLE_MAX {
        pool.push(p);
    }
    // Else `p` drops here, closing both ends.
}

/// A non-blocking pipe; both ends belong to one relay direction while it holds it.
#[derive(Debug)]
pub(super) struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
    /// The pipe's capacity in bytes: the most one fill asks for.
    cap: usize,
    /// Growing was tried (whether or not the kernel allowed it).
    grown: bool,
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

impl Pipe {
    pub(super) fn new() -> io::Result<Pipe> {
        let (rd, wr) = {
            let _gate = crate::limits::fd_gate();
            pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?
        };
        crate::metrics::splice_pipes_open().increment(1.0);
        Ok(Pipe {
            rd,
            wr,
            cap: PIPE_DEFAULT,
            grown: false,
        })
    }

    /// The most one fill should ask for.
    pub(super) fn cap(&self) -> usize {
        self.cap
    }

    /// Note that a fill moved `n` bytes; a fill that took at least half the pipe means bytes
    /// arrive faster than one wakeup's worth, so the pipe grows (once) to cut the syscalls and
    /// wakeups per byte. Call only while the pipe is empty (resizing needs room for its
    /// contents; empty, it always has).
    pub(super) fn filled(&mut self, n: usize) {
        if self.grown || n < self.cap / 2 {
            return;
        }
        self.grown = true;
        let size = i32::try_from(PIPE_BULK).unwrap_or(i32::MAX);
        if let Ok(got) = fcntl(&self.wr, FcntlArg::F_SETPIPE_SZ(size))
            && let Ok(got) = usize::try_from(got)
            && got > 0
        {
            self.cap = got;
        }
    }

    /// Move up to `len` bytes from `src` into the pipe without waiting. Call only while the pipe
    /// is empty: then `WouldBlock` means the socket has nothing to read (not that the pipe is
    /// full), so tokio may clear the socket's read readiness. `Ok(0)` is end of stream.
    pub(super) fn fill(&self, src: &TcpStream, len: usize) -> io::Result<usize> {
        src.try_io(Interest::READABLE, || {
            splice(src.as_fd(), None, self.wr.as_fd(), None, len, flags()).map_err(io::Error::from)
        })
    }

    /// Move up to `len` bytes (at most what the pipe holds) from the pipe into `dst` without
    /// waiting. `WouldBlock` means the socket's send buffer is full.
    pub(super) fn drain(&self, dst: &TcpStream, len: usize) -> io::Result<usize> {
        dst.try_io(Interest::WRITABLE, || {
            splice(self.rd.as_fd(), None, dst.as_fd(), None, len, flags()).map_err(io::Error::from)
        })
    }

    /// Read the pipe's contents (`len` bytes, which it must hold) into user memory, for when
    /// the relay leaves splice mode with bytes still in flight.
    pub(super) fn take(&self, len: usize) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let mut at = 0;
        while at < len {
            match read(self.rd.as_fd(), &mut out[at..]) {
                Ok(0) => break,
                Ok(n) => at += n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        out.truncate(at);
        Ok(out)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        crate::metrics::splice_pipes_open().decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    fn kernel_size(p: &Pipe) -> usize {
        let got = fcntl(&p.wr, FcntlArg::F_GETPIPE_SZ).expect("F_GETPIPE_SZ");
        usize::try_from(got).expect("size")
    }

    /// A trickle leaves the pipe at its default size; a fill of a full pipe grows it, and the
    /// grown pipe relays everything intact in fewer, larger fills.
    #[tokio::test]
    async fn pipe_grows_only_under_bulk_and_relays_intact() {
        let (mut tx, src) = pair().await;
        let (dst, mut rx) = pair().await;
        let mut pipe = Pipe::new().expect("pipe");

        tx.write_all(b"small").await.expect("write");
        src.readable().await.expect("readable");
        let n = pipe.fill(&src, pipe.cap()).expect("fill");
        assert_eq!(n, 5);
        assert_eq!(pipe.drain(&dst, n).expect("drain"), n);
        pipe.filled(n);
        assert_eq!(pipe.cap(), PIPE_DEFAULT, "a trickle must not grow the pipe");
        assert_eq!(kernel_size(&pipe), PIPE_DEFAULT);
        let mut got = [0u8; 5];
        rx.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"small");

        // 4 MiB of a known pattern, relayed by the pipe as the edge does: fill when empty,
        // drain all of it, note the fill.
        const TOTAL: usize = 4 << 20;
        let data: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
        let sender = tokio::spawn({
            let data = data.clone();
            async move { tx.write_all(&data).await }
        });
        let reader = tokio::spawn(async move {
            let mut out = vec![0u8; TOTAL];
            rx.read_exact(&mut out).await.map(|_| out)
        });
        let (mut moved, mut biggest) = (0, 0);
        while moved < TOTAL {
            let n = match pipe.fill(&src, pipe.cap()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src.readable().await.expect("readable");
                    continue;
                }
                Err(e) => panic!("fill: {e}"),
            };
            assert!(n > 0, "early end of stream");
            let mut left = n;
            while left > 0 {
                match pipe.drain(&dst, left) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        dst.writable().await.expect("writable");
                    }
                    Err(e) => panic!("drain: {e}"),
                }
            }
            pipe.filled(n);
            moved += n;
            biggest = biggest.max(n);
        }
        sender.await.expect("sender").expect("write");
        let out = reader.await.expect("reader").expect("read");
        assert!(out == data, "bytes relayed through the grown pipe differ");
        assert_eq!(
            pipe.cap(),
            kernel_size(&pipe),
            "cap must be what the kernel set"
        );
        // Root or within the per-user pipe quota the kernel allows the resize; a refusal keeps
        // the default, which is correct behaviour but would make this check meaningless.
        if pipe.cap() > PIPE_DEFAULT {
            assert!(pipe.cap() >= PIPE_BULK);
        } else {
            eprintln!("pipe resize refused by the kernel; growth not checked");
        }
        assert!(biggest <= pipe.cap());
    }
}
