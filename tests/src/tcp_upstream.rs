//! tcp upstreams on `127.0.0.1:0` for the tcp data-plane tests:
//!
//! * [`TcpUpstream::echo`] writes back what it reads, and half-closes after the client does;
//! * [`TcpUpstream::sink`] reads and discards, counting bytes (upstream bandwidth);
//! * [`TcpUpstream::source`] writes a known byte pattern (see [`pattern_byte`]) as fast as the
//!   client takes it, forever or up to a total and then half-closes (downstream bandwidth, data
//!   limits, resets);
//! * [`TcpUpstream::greeter`] writes a banner on accept and again at an interval, on its own,
//!   while counting what it receives (one-way partitions).
//!
//! Every upstream counts accepted connections and bytes each way, and stops (with all its
//! connections) when dropped.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Byte `i` of the pattern a source sends: a cycle of 251 (a prime, so it never lines up with
/// power-of-two chunk sizes and a shifted or repeated chunk shows).
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// Fill `buf` with the pattern starting at stream offset `offset`.
pub fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(offset + k as u64);
    }
}

/// `len` bytes of the pattern from offset 0.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(0, &mut v);
    v
}

/// The position of the first byte of `buf` that is not the pattern at stream offset `offset`.
pub fn pattern_mismatch(offset: u64, buf: &[u8]) -> Option<usize> {
    buf.iter()
        .enumerate()
        .find(|(k, b)| **b != pattern_byte(offset + *k as u64))
        .map(|(k, _)| k)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Echo,
    Sink,
    Source {
        total: Option<u64>,
    },
    Greeter {
        banner: &'static [u8],
        every: Duration,
    },
}

#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
}

/// A running tcp upstream; stops when dropped.
#[derive(Debug)]
pub struct TcpUpstream {
    addr: SocketAddr,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl TcpUpstream {
    /// Write back everything; after the client's end of stream, finish and half-close.
    pub async fn echo() -> io::Result<TcpUpstream> {
        Self::start(Kind::Echo).await
    }

    /// Read and discard everything.
    pub async fn sink() -> io::Result<TcpUpstream> {
        Self::start(Kind::Sink).await
    }

    /// Send the pattern: `total` bytes then half-close, or without a total until the client
    /// goes away. What the client sends is read and counted.
    pub async fn source(total: Option<u64>) -> io::Result<TcpUpstream> {
        Self::start(Kind::Source { total }).await
    }

    /// Send `banner` on accept and again every `every`, reading and counting what comes in.
    pub async fn greeter(banner: &'static [u8], every: Duration) -> io::Result<TcpUpstream> {
        Self::start(Kind::Greeter { banner, every }).await
    }

    async fn start(kind: Kind) -> io::Result<TcpUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let task = tokio::spawn(async move {
            // Connection tasks live in the set, so aborting this task ends them too.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    r = listener.accept() => {
                        let Ok((s, _)) = r else { continue };
                        let _ = s.set_nodelay(true);
                        st.accepted.fetch_add(1, Ordering::Relaxed);
                        conns.spawn(serve(kind, s, st.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(TcpUpstream { addr, stats, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::Relaxed)
    }

    /// Bytes received from clients so far.
    pub fn received(&self) -> u64 {
        self.stats.received.load(Ordering::Relaxed)
    }

    /// Bytes sent to clients so far.
    pub fn sent(&self) -> u64 {
        self.stats.sent.load(Ordering::Relaxed)
    }
}

impl Drop for TcpUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(kind: Kind, s: TcpStream, st: Arc<Stats>) {
    let _ = match kind {
        Kind::Echo => echo(s, &st).await,
        Kind::Sink => sink(s, &st).await,
        Kind::Source { total } => source(s, total, &st).await,
        Kind::Greeter { banner, every } => greeter(s, banner, every, &st).await,
    };
}

async fn echo(mut s: TcpStream, st: &Stats) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        st.received.fetch_add(n as u64, Ordering::Relaxed);
        s.write_all(&buf[..n]).await?;
        st.sent.fetch_add(n as u64, Ordering::Relaxed);
    }
    s.shutdown().await
}

async fn sink(mut s: TcpStream, st: &Stats) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        st.received.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn source(s: TcpStream, total: Option<u64>, st: &Stats) -> io::Result<()> {
    let (mut rd, mut wr) = s.into_split();
    let reader = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            st.received.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let writer = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut off = 0u64;
        loop {
            let n = match total {
                Some(t) if off >= t => break,
                Some(t) => (t - off).min(buf.len() as u64) as usize,
                None => buf.len(),
            };
            fill_pattern(off, &mut buf[..n]);
            wr.write_all(&buf[..n]).await?;
            off += n as u64;
            st.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        wr.shutdown().await
    };
    // The reader keeps the connection open until the client closes; the writer may end first.
    let (_, w) = tokio::join!(reader, writer);
    w
}

async fn greeter(s: TcpStream, banner: &[u8], every: Duration, st: &Stats) -> io::Result<()> {
    let (mut rd, mut wr) = s.into_split();
    let reader = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            st.received.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let writer = async {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if wr.write_all(banner).await.is_err() {
                break;
            }
            st.sent.fetch_add(banner.len() as u64, Ordering::Relaxed);
        }
    };
    // Stop greeting once the client has gone.
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
    Ok(())
}
