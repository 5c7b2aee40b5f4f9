//! The tcp edge: a byte relay in both directions, with chaos per connection and per chunk.
//!
//! Every accepted connection runs as one task on the edge's tracker:
//!
//! 1. accept phase, with the policy snapshot in force at accept: partition `reject` and the error
//!    fault's reset on accept (both RST the client), a hang (hold without forwarding; released
//!    by a policy change, closed when its duration runs out), and a full blackhole (read and
//!    discard until the partition lifts; the target is only dialled then);
//! 2. connect to the edge's target (never anywhere else);
//! 3. relay, one `Pump` per direction, joined in the same task. A pump relays with splice(2)
//!    through a pipe while the policy is passthrough, and with a copy loop that applies the
//!    faults otherwise; it re-reads the policy between chunks and wakes on every policy change
//!    even when idle, so a new policy acts on open connections from the next chunk.
//!
//! A pump that reads end of stream half-closes the other side (after `slow_close`) and ends; the
//! connection ends when both have, or at once when either pump stops it (reset by chaos, a
//! partition cutting it, `limit_data`, an I/O error, the edge shutting down).

mod splice;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, debug};

use crate::context::EdgeCtx;
use crate::events::{ConnectionInfo, EventKind, FaultKind};
use crate::limits::{Reserve, is_fd_exhausted, shed};
use crate::policy::{BandwidthFault, ChaosPolicy, Direction, Latency};
use crate::snapshot::{Active, Limiter};

use self::splice::Pipe;

/// The most a copy-loop read takes at once. The buffer is allocated for each read, once the
/// socket is readable, and lives only as long as its bytes are queued: an idle connection holds
/// no buffer at all.
const READ_CHUNK: usize = 64 * 1024;

/// The most bytes a direction keeps queued (read, not yet written) in the copy loop. Latency
/// pipelines chunks, so this bounds throughput under latency to `QUEUE_CAP / latency` per
/// connection; past it the pump stops reading and tcp flow control pushes back on the sender.
const QUEUE_CAP: usize = 1024 * 1024;

/// The error of a connection refused because rig is out of file descriptors: it names rig's
/// limit, never the target.
pub const FD_LIMIT_REFUSAL: &str = "refused by rig: out of file descriptors (fd_limit)";

/// `Conn::doom` when the connection is not doomed to a reset.
const NO_DOOM: u64 = u64::MAX;

pub(crate) async fn serve(listener: TcpListener, ctx: Arc<EdgeCtx>) {
    let mut reserve = Reserve::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Per-connection draws happen here, in accept order, so a seeded policy gives
                // the same faults to the same sequence of connections on every run.
                let act = ctx.cell.current();
                let fate = Fate::draw(&act);
                let id = ctx.next_id();
                let span = ctx.connection_span(id, peer);
                ctx.tracker
                    .spawn(handle(ctx.clone(), stream, id, peer, act, fate).instrument(span));
            }
            Err(e)
                if is_fd_exhausted(&e)
                    && shed(&listener, &ctx.info.edge, &ctx.metrics, &mut reserve) => {}
            Err(e) => {
                debug!(edge = %ctx.info.edge, error = %e, "accept failed");
                // Out of file descriptors or memory: back off instead of spinning on the error.
                if !is_per_connection(&e) {
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
            }
        }
    }
    debug!(edge = %ctx.info.edge, "tcp edge stopped accepting");
}

/// Dial `addr` with the socket made under the [`fd_gate`](crate::limits::fd_gate).
async fn dial(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = {
        let _gate = crate::limits::fd_gate();
        if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
    }?;
    socket.connect(addr).await
}

/// Errors of `accept` that concern one connection only (the next accept may well succeed).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// What the accept-time snapshot decided for one connection.
#[derive(Debug, Clone, Copy, Default)]
struct Fate {
    /// The error fault picked it: reset on accept (`Some(0)`) or after that many bytes.
    reset_after: Option<u64>,
    /// The hang fault picked it.
    hang: bool,
}

impl Fate {
    fn draw(act: &Active) -> Fate {
        let pol = &act.policy;
        Fate {
            reset_after: pol
                .error
                .as_ref()
                .filter(|e| act.roll(e.rate))
                .map(|e| e.reset_after.unwrap_or(0)),
            hang: pol.hang.is_some_and(|h| act.roll(h.rate)),
        }
    }
}

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// Both directions reached end of stream and were half-closed in turn.
    Done,
    /// Close both sides normally (FIN); the reason, when it is not a normal close.
    Close(Option<String>),
    /// Reset both sides (RST), for the reason given.
    Reset(String),
    /// The edge is stopping.
    Shutdown,
}

/// Which way a pump moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client → target.
    Up,
    /// Target → client.
    Down,
}

impl Dir {
    fn covered_by(self, d: Direction) -> bool {
        match self {
            Dir::Up => d.upstream(),
            Dir::Down => d.downstream(),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Dir::Up => "upstream",
            Dir::Down => "downstream",
        }
    }

    /// Who the pump reads from and writes to, for error messages.
    fn src_name(self) -> &'static str {
        match self {
            Dir::Up => "client",
            Dir::Down => "target",
        }
    }

    fn dst_name(self) -> &'static str {
        match self {
            Dir::Up => "target",
            Dir::Down => "client",
        }
    }
}

fn latency_for(p: &ChaosPolicy, dir: Dir) -> Option<Latency> {
    p.latency.filter(|l| dir.covered_by(l.direction))
}

/// Is `dir` cut by the policy's partition? A `reject` partition also blackholes the connections
/// it keeps (`keep_connections`); new ones never get this far.
fn blackholes(p: &ChaosPolicy, dir: Dir) -> bool {
    p.partition.is_some_and(|p| dir.covered_by(p.direction))
}

fn rate_for(bw: &BandwidthFault, dir: Dir) -> Option<u64> {
    match dir {
        Dir::Up => bw.upstream,
        Dir::Down => bw.downstream,
    }
}

/// The bandwidth limiter of `dir`: the connection's own (`bandwidth_per_connection`), else the
/// edge-wide one of the snapshot.
fn limiter_for<'a>(
    own: &'a Option<(BandwidthFault, Limiter)>,
    act: &'a Active,
    dir: Dir,
) -> Option<&'a Limiter> {
    match (own, &act.limiters) {
        (Some((_, l)), _) => Some(l),
        (None, Some(ls)) => match dir {
            Dir::Up => ls.upstream.as_ref(),
            Dir::Down => ls.downstream.as_ref(),
        },
        _ => None,
    }
}

/// An io error as an event reads it: `connection reset`, `broken pipe`.
fn describe(e: &io::Error) -> String {
    let kind = e.kind().to_string();
    if e.kind() != io::ErrorKind::Other && !kind.contains("uncategorized") {
        return kind;
    }
    let s = e.to_string();
    let s = s.split(" (os error").next().unwrap_or(&s);
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => s.to_owned(),
    }
}

/// One accepted connection: its identity, the faults that acted on it and the bytes it moved.
/// Both pumps share it by reference inside the connection's task.
struct Conn {
    ctx: Arc<EdgeCtx>,
    id: u64,
    peer: SocketAddr,
    /// The version of the policy in force at accept; later partitions with `cut_existing` reset
    /// the connection.
    accepted: u64,
    /// Client → target bytes written to the target.
    up: AtomicU64,
    /// Target → client bytes written to the client.
    down: AtomicU64,
    /// The error fault's `reset_after` for a connection it picked; [`NO_DOOM`] otherwise.
    doom: AtomicU64,
    /// Bit per [`FaultKind`] already counted: the per-chunk check that a fault is known is one
    /// atomic load, not a lock.
    seen: AtomicU64,
    /// The faults in the order they acted.
    faults: Mutex<Vec<FaultKind>>,
}

impl Conn {
    /// Note that `kind` acted on this connection; counted once per connection.
    fn fault(&self, kind: FaultKind) {
        let bit = 1u64.checked_shl(kind as u32).unwrap_or(0);
        if bit != 0 && self.seen.load(Ordering::Relaxed) & bit != 0 {
            return;
        }
        self.seen.fetch_or(bit, Ordering::Relaxed);
        {
            let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
            if faults.contains(&kind) {
                return;
            }
            faults.push(kind);
        }
        self.ctx.metrics.fault(kind);
        debug!(edge = %self.ctx.info.edge, conn = self.id, fault = ?kind, "injected");
    }

    fn passed(&self) -> u64 {
        self.up.load(Ordering::Relaxed) + self.down.load(Ordering::Relaxed)
    }

    fn count(&self, dir: Dir, n: usize) {
        let n = n as u64;
        match dir {
            Dir::Up => {
                self.up.fetch_add(n, Ordering::Relaxed);
                self.ctx.metrics.bytes_upstream(n);
            }
            Dir::Down => {
                self.down.fetch_add(n, Ordering::Relaxed);
                self.ctx.metrics.bytes_downstream(n);
            }
        }
    }

    fn info(&self, duration: Option<Duration>, error: Option<String>) -> ConnectionInfo {
        ConnectionInfo {
            connection_id: self.id,
            peer: self.peer,
            bytes_upstream: self.up.load(Ordering::Relaxed),
            bytes_downstream: self.down.load(Ordering::Relaxed),
            duration,
            faults: self
                .faults
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            error,
        }
    }

    /// How many more bytes may pass, both ways together, under the error fault's `reset_after`
    /// and `limit_data`; the end of the connection once a budget is spent.
    fn allowance(&self, pol: &ChaosPolicy) -> Result<usize, End> {
        let passed = self.passed();
        let doom = self.doom.load(Ordering::Relaxed);
        if passed >= doom {
            self.fault(FaultKind::Reset);
            return Err(End::Reset("reset by chaos".into()));
        }
        let limit = pol.limit_data.unwrap_or(u64::MAX);
        if passed >= limit {
            self.fault(FaultKind::LimitData);
            return Err(End::Close(Some("data limit reached".into())));
        }
        Ok(usize::try_from(doom.min(limit) - passed).unwrap_or(usize::MAX))
    }

    /// A connection opened before a partition with `cut_existing` arrived is reset by it.
    fn cut_by(&self, act: &Active) -> Result<(), End> {
        if let Some(p) = act.policy.partition
            && p.cut_existing
            && act.version > self.accepted
        {
            self.fault(FaultKind::Partition);
            return Err(End::Reset("cut by partition".into()));
        }
        Ok(())
    }

    /// Everything between accept and close. Returns how it ended and the target connection,
    /// if one was made, so the caller can close (or reset) both.
    async fn serve(
        &self,
        client: &TcpStream,
        act: Arc<Active>,
        fate: Fate,
    ) -> (End, Option<TcpStream>) {
        match self.accept_phase(client, &act, fate).await {
            Ok(()) => {}
            Err(end) => return (end, None),
        }
        let ctx = &self.ctx;
        let connect = tokio::select! {
            _ = ctx.shutdown.cancelled() => return (End::Shutdown, None),
            r = dial(ctx.target) => r,
        };
        let target = match connect {
            Ok(t) => t,
            Err(e) if is_fd_exhausted(&e) => {
                // rig's own limit, not the target's fault.
                ctx.metrics.refused_fd_limit();
                crate::limits::warn_fd_limit(&ctx.info.edge, "connection to the target");
                return (End::Reset(FD_LIMIT_REFUSAL.into()), None);
            }
            Err(e) => {
                ctx.metrics.upstream_error();
                let msg = format!("target unreachable: {}", describe(&e));
                return (End::Close(Some(msg)), None);
            }
        };
        let _ = target.set_nodelay(true);
        drop(act);
        let end = self.relay(client, &target).await;
        (end, Some(target))
    }

    /// The faults that act before the target is dialled.
    async fn accept_phase(&self, client: &TcpStream, act: &Active, fate: Fate) -> Result<(), End> {
        let pol = &act.policy;
        if let Some(p) = pol.partition
            && p.mode == crate::policy::PartitionMode::Reject
        {
            self.fault(FaultKind::Partition);
            return Err(End::Reset("rejected by partition".into()));
        }
        match fate.reset_after {
            None => {}
            Some(0) => {
                self.fault(FaultKind::Reset);
                return Err(End::Reset("reset by chaos".into()));
            }
            Some(n) => self.doom.store(n, Ordering::Relaxed),
        }
        if let Some(h) = pol.hang
            && fate.hang
        {
            self.fault(FaultKind::Hang);
            let elapsed = tokio::select! {
                full = crate::context::hold(&self.ctx, act.version, h.duration) => full,
                _ = client_gone(client) => return Err(End::Close(None)),
            };
            if elapsed {
                return Err(End::Close(Some("closed after hang".into())));
            }
            if self.ctx.shutdown.is_cancelled() {
                return Err(End::Shutdown);
            }
            // Released by a policy change: go on under the new policy.
            let now = self.ctx.cell.current();
            self.cut_by(&now)?;
            if now.policy.error.is_none() {
                self.doom.store(NO_DOOM, Ordering::Relaxed);
            }
        }
        self.wait_out_blackhole(client).await
    }

    /// While both directions are blackholed, read and discard what the client sends (so it is
    /// not stalled by flow control) without dialling the target, as a real partition would.
    async fn wait_out_blackhole(&self, client: &TcpStream) -> Result<(), End> {
        let mut rx = self.ctx.cell.subscribe();
        loop {
            let act = rx.borrow_and_update().clone();
            self.cut_by(&act)?;
            if !(blackholes(&act.policy, Dir::Up) && blackholes(&act.policy, Dir::Down)) {
                return Ok(());
            }
            self.fault(FaultKind::Partition);
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => return Err(End::Shutdown),
                r = rx.changed() => if r.is_err() { return Err(End::Shutdown) },
                r = client.readable() => {
                    if let Err(e) = r {
                        return Err(End::Close(Some(format!("client: {}", describe(&e)))));
                    }
                    match discard(client) {
                        Ok(0) => return Err(End::Close(None)),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(End::Close(Some(format!("client: {}", describe(&e))))),
                    }
                }
            }
        }
    }

    /// Run both directions until both are done or one ends the connection.
    async fn relay(&self, client: &TcpStream, target: &TcpStream) -> End {
        let act = self.ctx.cell.current();
        let up = Pump::new(self, Dir::Up, client, target, act.clone()).run();
        let down = Pump::new(self, Dir::Down, target, client, act).run();
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        while !(up_done && down_done) {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(end) => return end,
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(end) => return end,
                },
            }
        }
        End::Done
    }
}

/// Errors that say splice(2) itself is unavailable, which a socket read or write never returns.
fn splice_refused(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported | io::ErrorKind::PermissionDenied
    )
}

/// Read and drop what is available, without waiting. The buffer lives on the thread's stack.
fn discard(s: &TcpStream) -> io::Result<usize> {
    let mut buf = [0u8; 8192];
    s.try_read(&mut buf)
}

/// Resolves when the client has closed or reset the connection. Pending for good once the
/// client has sent data (it cannot be told from a close without reading it, and a held
/// connection must not consume what the client sent).
async fn client_gone(client: &TcpStream) {
    let mut one = [0u8; 1];
    match client.peek(&mut one).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

async fn handle(
    ctx: Arc<EdgeCtx>,
    client: TcpStream,
    id: u64,
    peer: SocketAddr,
    act: Arc<Active>,
    fate: Fate,
) {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let conn = Conn {
        id,
        peer,
        accepted: act.version,
        up: AtomicU64::new(0),
        down: AtomicU64::new(0),
        doom: AtomicU64::new(NO_DOOM),
        seen: AtomicU64::new(0),
        faults: Mutex::new(Vec::new()),
        ctx,
    };
    let ctx = conn.ctx.clone();
    ctx.metrics.connection_opened();
    if ctx.events.has_subscribers() {
        ctx.events.send(
            &ctx.info,
            EventKind::ConnectionOpened(conn.info(None, None)),
        );
    }
    debug!(edge = %ctx.info.edge, conn = conn.id, %peer, "connection opened");

    let (end, target) = conn.serve(&client, act, fate).await;
    let error = match end {
        End::Done => None,
        End::Close(e) => e,
        End::Reset(e) => {
            // SO_LINGER 0: close sends RST instead of FIN, and drops unsent data.
            let _ = client.set_zero_linger();
            if let Some(t) = &target {
                let _ = t.set_zero_linger();
            }
            Some(e)
        }
        End::Shutdown => Some("edge shut down".into()),
    };
    drop(target);
    drop(client);

    let duration = started.elapsed();
    ctx.metrics.connection_closed();
    debug!(
        edge = %ctx.info.edge,
        conn = conn.id,
        bytes_upstream = conn.up.load(Ordering::Relaxed),
        bytes_downstream = conn.down.load(Ordering::Relaxed),
        error = error.as_deref().unwrap_or(""),
        "connection closed"
    );
    if ctx.events.has_subscribers() {
        ctx.events.send(
            &ctx.info,
            EventKind::ConnectionClosed(conn.info(Some(duration), error)),
        );
    }
}

/// Bytes read and not yet written, with the time they may be written.
struct Chunk {
    data: Bytes,
    due: Instant,
}

/// One direction of a connection.
struct Pump<'a> {
    conn: &'a Conn,
    dir: Dir,
    src: &'a TcpStream,
    dst: &'a TcpStream,
    rx: watch::Receiver<Arc<Active>>,
    /// The policy this pump last acted on.
    act: Arc<Active>,
    queue: VecDeque<Chunk>,
    queued: usize,
    eof: bool,
    /// splice(2) is unavailable (no pipe could be made): copy even when passthrough.
    no_splice: bool,
    /// Slicer: bytes left in the current piece (0: draw a new size).
    piece_left: usize,
    /// Slicer: no write before this (the delay between pieces).
    not_before: Option<Instant>,
    /// Bandwidth tokens acquired and not yet spent.
    credit: usize,
    /// The per-connection limiter of a `bandwidth_per_connection` policy, with the fault it
    /// was built for (kept across policy changes that leave the limit alone).
    own: Option<(BandwidthFault, Limiter)>,
}

impl<'a> Pump<'a> {
    fn new(
        conn: &'a Conn,
        dir: Dir,
        src: &'a TcpStream,
        dst: &'a TcpStream,
        act: Arc<Active>,
    ) -> Self {
        Pump {
            conn,
            dir,
            src,
            dst,
            rx: conn.ctx.cell.subscribe(),
            act,
            queue: VecDeque::new(),
            queued: 0,
            eof: false,
            no_splice: false,
            piece_left: 0,
            not_before: None,
            credit: 0,
            own: None,
        }
    }

    async fn run(mut self) -> Result<(), End> {
        // The policy may have changed between accept and now.
        let now = self.rx.borrow_and_update().clone();
        self.apply(now, true)?;
        loop {
            if self.eof && self.queue.is_empty() {
                break;
            }
            if self.act.policy.is_passthrough() && self.queue.is_empty() && !self.no_splice {
                self.splice_phase().await?;
            } else {
                self.copy_phase().await?;
            }
        }
        self.finish().await
    }

    /// Take up the policy in force if it changed (a cheap check between chunks).
    fn refresh(&mut self) -> Result<(), End> {
        if !self.rx.has_changed().unwrap_or(false) {
            return Ok(());
        }
        self.sync()
    }

    /// Take up the policy in force. Call after `rx.changed()`, which marks the change seen.
    fn sync(&mut self) -> Result<(), End> {
        let act = self.rx.borrow_and_update().clone();
        self.apply(act, false)
    }

    /// Take up a new policy snapshot.
    fn apply(&mut self, act: Arc<Active>, first: bool) -> Result<(), End> {
        if act.version == self.act.version && !first {
            return Ok(());
        }
        self.conn.cut_by(&act)?;
        if act.policy.error.is_none() {
            self.conn.doom.store(NO_DOOM, Ordering::Relaxed);
        }
        let old = &self.act.policy;
        let new = &act.policy;
        if latency_for(old, self.dir) != latency_for(new, self.dir) {
            // Chunks held by the old latency are released at once, as a hold is.
            let now = Instant::now();
            for c in &mut self.queue {
                c.due = c.due.min(now);
            }
        }
        if old.slicer != new.slicer {
            self.piece_left = 0;
            self.not_before = None;
        }
        // Tokens belong to the limiter they came from; the edge-wide one is new with every
        // snapshot.
        self.credit = 0;
        self.own = match new.bandwidth.filter(|b| b.per_connection) {
            Some(bw) => match rate_for(&bw, self.dir) {
                None => None,
                Some(rate) => match self.own.take() {
                    Some((was, l)) if was == bw => Some((was, l)),
                    _ => Some((bw, Limiter::new(rate))),
                },
            },
            None => None,
        };
        self.act = act;
        Ok(())
    }

    /// Relay with splice(2) while the policy stays passthrough. Returns at end of stream, or
    /// when the policy stops being passthrough (bytes still in the pipe then move to the queue
    /// and go out under the new policy).
    ///
    /// A pipe is held only while bytes move: taken from the pool once the source is readable,
    /// given back (drained) when a fill finds nothing more to read. A pipe dropped with an error
    /// may hold bytes and is closed, never pooled.
    async fn splice_phase(&mut self) -> Result<(), End> {
        let (src, dst) = (self.src, self.dst);
        let ctx = self.conn.ctx.clone();
        let mut held: Option<Pipe> = None;
        loop {
            // Without this a fast stream would never yield: splice calls that succeed do not
            // touch tokio's cooperative budget.
            tokio::task::coop::consume_budget().await;
            self.refresh()?;
            if !self.act.policy.is_passthrough() {
                if let Some(p) = held {
                    splice::give(p);
                }
                return Ok(());
            }
            let Some(pipe) = held.as_mut() else {
                // Idle: wait for bytes without holding a pipe.
                tokio::select! {
                    biased;
                    _ = ctx.shutdown.cancelled() => return Err(End::Shutdown),
                    r = self.rx.changed() => {
                        if r.is_err() {
                            return Err(End::Shutdown);
                        }
                        self.sync()?;
                        if !self.act.policy.is_passthrough() {
                            return Ok(());
                        }
                    }
                    r = src.readable() => {
                        if let Err(e) = r {
                            return Err(self.src_error(&e));
                        }
                        match splice::take() {
                            Ok(p) => held = Some(p),
                            Err(e) => {
                                // Out of descriptors, most likely: this direction copies
                                // instead, which needs none.
                                debug!(edge = %ctx.info.edge, conn = self.conn.id, error = %e, "no pipe for splice; copying");
                                self.no_splice = true;
                                return Ok(());
                            }
                        }
                    }
                }
                continue;
            };
            let n = match pipe.fill(src, pipe.cap()) {
                Ok(0) => {
                    self.eof = true;
                    if let Some(p) = held {
                        splice::give(p);
                    }
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Drained and nothing to read: back to the pool until the next bytes.
                    if let Some(p) = held.take() {
                        splice::give(p);
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if splice_refused(&e) => {
                    self.give_up_splice(&e);
                    if let Some(p) = held {
                        splice::give(p);
                    }
                    return Ok(());
                }
                Err(e) => return Err(self.src_error(&e)),
            };
            let mut left = n;
            while left > 0 {
                match pipe.drain(dst, left) {
                    Ok(0) => {
                        return Err(End::Reset(format!(
                            "{}: splice moved nothing",
                            self.dir.dst_name()
                        )));
                    }
                    Ok(m) => {
                        left -= m;
                        self.conn.count(self.dir, m);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        tokio::select! {
                            biased;
                            _ = ctx.shutdown.cancelled() => return Err(End::Shutdown),
                            r = self.rx.changed() => {
                                if r.is_err() {
                                    return Err(End::Shutdown);
                                }
                                self.sync()?;
                                if !self.act.policy.is_passthrough() {
                                    // Hand the bytes in flight to the copy loop.
                                    return self.unpipe(held, left);
                                }
                            }
                            r = dst.writable() => if let Err(e) = r { return Err(self.dst_error(&e)) },
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if splice_refused(&e) => {
                        self.give_up_splice(&e);
                        return self.unpipe(held, left);
                    }
                    Err(e) => return Err(self.dst_error(&e)),
                }
            }
            pipe.filled(n);
        }
    }

    /// Move `left` bytes still in the pipe to the copy loop's queue; the emptied pipe goes back
    /// to the pool.
    fn unpipe(&mut self, held: Option<Pipe>, left: usize) -> Result<(), End> {
        let Some(pipe) = held else {
            return Ok(());
        };
        let data = pipe
            .take(left)
            .map_err(|e| End::Reset(format!("pipe: {}", describe(&e))))?;
        if data.len() == left {
            splice::give(pipe);
        }
        self.queued += data.len();
        self.queue.push_back(Chunk {
            data: Bytes::from(data),
            due: Instant::now(),
        });
        Ok(())
    }

    /// splice(2) is not allowed here (a sandbox, an odd socket): copy from now on.
    fn give_up_splice(&mut self, e: &io::Error) {
        debug!(edge = %self.conn.ctx.info.edge, conn = self.conn.id, error = %e, "splice refused; copying");
        self.no_splice = true;
    }

    /// Relay through user memory, applying the faults. Returns at end of stream (with the queue
    /// written out), or when the policy is passthrough and nothing is queued, so splice can
    /// take over.
    async fn copy_phase(&mut self) -> Result<(), End> {
        let (src, dst) = (self.src, self.dst);
        let ctx = self.conn.ctx.clone();
        loop {
            self.refresh()?;
            let act = self.act.clone();
            let pol = &act.policy;
            if pol.is_passthrough() && self.queue.is_empty() && !self.no_splice {
                return Ok(());
            }
            let blackholed = blackholes(pol, self.dir);
            if blackholed {
                self.conn.fault(FaultKind::Partition);
                // What had not gone through when the partition started never will.
                self.queue.clear();
                self.queued = 0;
            }
            if self.eof && self.queue.is_empty() {
                return Ok(());
            }

            let allowance = self.conn.allowance(pol)?;
            let limiter = limiter_for(&self.own, &act, self.dir);

            // Plan the next write: when it may happen, how much, and the tokens it needs.
            let now = Instant::now();
            let mut gate = None;
            let mut want = 0;
            let mut need = 0;
            if let Some(head) = self.queue.front() {
                let at = match self.not_before {
                    Some(nb) => head.due.max(nb),
                    None => head.due,
                };
                if at > now {
                    gate = Some(at);
                } else {
                    want = head.data.len().min(allowance);
                    if let Some(s) = pol.slicer {
                        self.conn.fault(FaultKind::Slicer);
                        if self.piece_left == 0 {
                            let lo = s.average_size.saturating_sub(s.size_variation);
                            let hi = s.average_size + s.size_variation;
                            let size = act.range(lo, hi).max(1);
                            self.piece_left = usize::try_from(size).unwrap_or(usize::MAX);
                        }
                        want = want.min(self.piece_left);
                    }
                    if let Some(l) = limiter {
                        self.conn.fault(FaultKind::Bandwidth);
                        want = want.min(l.burst());
                        need = want.saturating_sub(self.credit);
                    }
                }
            }
            let can_write = want > 0 && need == 0;
            let can_read = !self.eof && (blackholed || self.queued < QUEUE_CAP);

            tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => return Err(End::Shutdown),
                r = self.rx.changed() => {
                    if r.is_err() {
                        return Err(End::Shutdown);
                    }
                    self.sync()?;
                }
                _ = crate::timer::sleep_until(gate.unwrap_or(now)), if gate.is_some() => {}
                _ = async { if let Some(l) = limiter { l.acquire(need).await } }, if need > 0 => {
                    self.credit += need;
                }
                r = dst.writable(), if can_write => {
                    if let Err(e) = r {
                        return Err(self.dst_error(&e));
                    }
                    self.write_head(want, &act)?;
                }
                r = src.readable(), if can_read => {
                    if let Err(e) = r {
                        return Err(self.src_error(&e));
                    }
                    self.read_chunk(blackholed, &act)?;
                }
            }
        }
    }

    /// One non-blocking read into a chunk stamped with its due time (or into the void, when
    /// blackholed).
    fn read_chunk(&mut self, blackholed: bool, act: &Active) -> Result<(), End> {
        let read = if blackholed {
            discard(self.src).map(|n| (n, None))
        } else {
            let mut buf = Vec::with_capacity(READ_CHUNK);
            self.src.try_read_buf(&mut buf).map(|n| (n, Some(buf)))
        };
        match read {
            Ok((0, _)) => self.eof = true,
            Ok((_, None)) => {}
            Ok((n, Some(buf))) => {
                // A mostly full buffer becomes the chunk as it is (no copy for bulk transfers);
                // a small read is copied out, so queued small chunks do not pin 64 KiB each.
                let data = if n >= READ_CHUNK / 2 {
                    Bytes::from(buf)
                } else {
                    Bytes::copy_from_slice(&buf)
                };
                let now = Instant::now();
                let due = match latency_for(&act.policy, self.dir) {
                    Some(_) => {
                        self.conn.fault(FaultKind::Latency);
                        now + act.sample_latency().unwrap_or_default()
                    }
                    None => now,
                };
                self.queued += n;
                self.queue.push_back(Chunk { data, due });
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(self.src_error(&e)),
        }
        Ok(())
    }

    /// Write up to `want` bytes of the queue's head.
    fn write_head(&mut self, want: usize, act: &Active) -> Result<(), End> {
        let Some(head) = self.queue.front_mut() else {
            return Ok(());
        };
        let n = match self.dst.try_write(&head.data[..want]) {
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return Ok(());
            }
            Err(e) => return Err(self.dst_error(&e)),
        };
        head.data.advance(n);
        if head.data.is_empty() {
            self.queue.pop_front();
        }
        self.queued -= n;
        self.credit = self.credit.saturating_sub(n);
        if let Some(s) = act.policy.slicer {
            self.piece_left = self.piece_left.saturating_sub(n);
            if self.piece_left == 0 && !s.delay.is_zero() {
                self.not_before = Some(Instant::now() + s.delay);
            }
        }
        self.conn.count(self.dir, n);
        Ok(())
    }

    /// End of stream read and everything before it written: pass the end on.
    async fn finish(&mut self) -> Result<(), End> {
        let ctx = self.conn.ctx.clone();
        // A FIN does not cross a partition either: it goes through once the partition lifts.
        loop {
            self.refresh()?;
            if !blackholes(&self.act.policy, self.dir) {
                break;
            }
            self.conn.fault(FaultKind::Partition);
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Err(End::Shutdown),
                r = self.rx.changed() => {
                    if r.is_err() {
                        return Err(End::Shutdown);
                    }
                    self.sync()?;
                }
            }
        }
        if let Some(d) = self.act.policy.slow_close {
            self.conn.fault(FaultKind::SlowClose);
            // Held like any delay: a policy change releases it.
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Err(End::Shutdown),
                _ = self.rx.changed() => self.sync()?,
                _ = tokio::time::sleep(d) => {}
            }
        }
        if let Err(e) =
            nix::sys::socket::shutdown(self.dst.as_raw_fd(), nix::sys::socket::Shutdown::Write)
        {
            // The peer may already be gone; the other direction will see that itself.
            debug!(edge = %ctx.info.edge, conn = self.conn.id, direction = self.dir.as_str(), error = %e, "half-close failed");
        }
        Ok(())
    }

    fn src_error(&self, e: &io::Error) -> End {
        End::Reset(format!("{}: {}", self.dir.src_name(), describe(e)))
    }

    fn dst_error(&self, e: &io::Error) -> End {
        End::Reset(format!("{}: {}", self.dir.dst_name(), describe(e)))
    }
}
