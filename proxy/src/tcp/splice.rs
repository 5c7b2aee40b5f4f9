//! Zero-copy relay through a pipe with splice(2): socket → pipe → socket, bytes never enter user
//! memory. Used while the policy in force is passthrough.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use nix::unistd::{pipe2, read};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// How much one splice call moves at most: the default pipe capacity (16 pages). A larger pipe
/// buys little on loopback and counts against the per-user pipe quota
/// (`/proc/sys/fs/pipe-user-pages-soft`), past which new pipes shrink to one page.
pub(super) const PIPE_CHUNK: usize = 64 * 1024;

/// A non-blocking pipe; both ends belong to one relay direction.
#[derive(Debug)]
pub(super) struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

impl Pipe {
    pub(super) fn new() -> io::Result<Pipe> {
        let (rd, wr) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe { rd, wr })
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
