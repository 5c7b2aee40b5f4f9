//! `rig-demo catalog`: the gRPC service `demo.v1.Catalog`, backed by the kv
//! store at `$STORE_ADDR`, plus `grpc.health.v1.Health` for readiness.

use std::io;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::common::{self, Shutdown};
use crate::pb::catalog_server::{Catalog, CatalogServer};
use crate::pb::{GetItemRequest, Item};

/// Bound on connecting to the store. Short: a refused or black-holed store
/// should turn into UNAVAILABLE quickly rather than eat the caller's deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on one GET round trip. Callers usually send a shorter gRPC deadline
/// (web uses 2 s), which cancels the call first; this only protects callers
/// that send none from hanging forever on a stalled store.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle store connections kept for reuse; extra ones are closed.
const MAX_IDLE: usize = 16;
/// Longest accepted store reply, so a garbled stream cannot grow a buffer forever.
const MAX_REPLY: u64 = 1024 * 1024;
/// Ids are sent on the store's line protocol: bound them and forbid
/// whitespace/control characters so an id cannot smuggle in another command.
const MAX_ID_LEN: usize = 256;

pub async fn run(mut shutdown: Shutdown) -> Result<()> {
    let store = StorePool::new(common::egress_addr("store")?);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CatalogServer<CatalogService>>().await;

    let listener = common::bind("catalog").await?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = Server::builder()
        .add_service(health_service)
        .add_service(CatalogServer::new(CatalogService { store }))
        .serve_with_incoming(incoming);
    // Dropping the server on a signal (rather than a graceful drain) keeps
    // the exit prompt even when a call is stuck on a stalled store.
    tokio::select! {
        res = server => res.context("gRPC server failed"),
        _ = shutdown.recv() => Ok(()),
    }
}

pub struct CatalogService {
    store: StorePool,
}

#[tonic::async_trait]
impl Catalog for CatalogService {
    async fn get_item(&self, request: Request<GetItemRequest>) -> Result<Response<Item>, Status> {
        let id = request.into_inner().id;
        if id.is_empty()
            || id.len() > MAX_ID_LEN
            || id.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Status::invalid_argument(
                "id must be 1-256 characters without whitespace",
            ));
        }
        match self.store.get(&id).await {
            Ok(Some(value)) => parse_item(&id, &value).map(Response::new),
            Ok(None) => Err(Status::not_found(format!("no item {id}"))),
            Err(err) if err.kind() == io::ErrorKind::InvalidData => Err(Status::internal(format!(
                "store at {} answered garbage: {err}",
                self.store.addr
            ))),
            Err(err) => Err(Status::unavailable(format!(
                "store at {} unreachable: {err}",
                self.store.addr
            ))),
        }
    }
}

/// Turns the stored JSON into an `Item`; a value that is not an item is the
/// store's fault, reported as INTERNAL rather than a half-empty item.
fn parse_item(id: &str, value: &str) -> Result<Item, Status> {
    let bad = |what: &str| Status::internal(format!("stored value for {id} {what}"));
    let json: serde_json::Value = serde_json::from_str(value).map_err(|_| bad("is not JSON"))?;
    let field = |name: &str| json.get(name).ok_or_else(|| bad(&format!("has no {name}")));
    Ok(Item {
        id: field("id")?
            .as_str()
            .ok_or_else(|| bad("has a non-string id"))?
            .to_owned(),
        name: field("name")?
            .as_str()
            .ok_or_else(|| bad("has a non-string name"))?
            .to_owned(),
        price_cents: field("price_cents")?
            .as_i64()
            .ok_or_else(|| bad("has a non-integer price_cents"))?,
    })
}

type StoreConn = BufStream<TcpStream>;

/// A small pool of keep-alive connections to the kv store.
///
/// A connection is checked out for exactly one round trip and only put back
/// after a clean answer; any error (or the call being cancelled by its
/// deadline) drops it, so a pooled connection is never left mid-reply.
struct StorePool {
    addr: String,
    idle: Mutex<Vec<StoreConn>>,
}

impl StorePool {
    fn new(addr: String) -> Self {
        Self {
            addr,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// `GET key` on the store: `Ok(None)` when it answers `NONE`.
    /// Errors are `InvalidData` for an unexpected answer, other kinds for I/O.
    async fn get(&self, key: &str) -> io::Result<Option<String>> {
        if let Some(conn) = self.checkout() {
            match self.round_trip(conn, key).await {
                // An idle connection may have been closed or reset by the
                // store (or a proxy) since its last use; GET is idempotent,
                // so retry once on a fresh one. Timeouts and garbage are not
                // retried: they are not staleness and retrying would hide
                // them or double the latency.
                Err(err)
                    if !matches!(
                        err.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::InvalidData
                    ) => {}
                done => return done,
            }
        }
        let conn = self.connect().await?;
        self.round_trip(conn, key).await
    }

    fn checkout(&self) -> Option<StoreConn> {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    fn checkin(&self, conn: StoreConn) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    async fn connect(&self) -> io::Result<StoreConn> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(BufStream::new(stream))
    }

    async fn round_trip(&self, mut conn: StoreConn, key: &str) -> io::Result<Option<String>> {
        let answer = tokio::time::timeout(IO_TIMEOUT, async {
            conn.write_all(format!("GET {key}\n").as_bytes()).await?;
            conn.flush().await?;
            let mut line = Vec::new();
            (&mut conn)
                .take(MAX_REPLY)
                .read_until(b'\n', &mut line)
                .await?;
            match line.strip_suffix(b"\n") {
                Some(line) => Ok(line.strip_suffix(b"\r").unwrap_or(line).to_vec()),
                None if line.is_empty() => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "store closed the connection",
                )),
                None => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "reply too long or cut short",
                )),
            }
        })
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {IO_TIMEOUT:?}"),
            )
        })??;

        let value = if answer == b"NONE" {
            None
        } else if let Some(value) = answer.strip_prefix(b"VALUE ") {
            let value = String::from_utf8(value.to_vec())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "value is not UTF-8"))?;
            Some(value)
        } else {
            let shown = String::from_utf8_lossy(&answer[..answer.len().min(80)]).into_owned();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected reply {shown:?}"),
            ));
        };
        self.checkin(conn);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seeded_items_and_rejects_others() {
        let item = parse_item(
            "item-7",
            r#"{"id":"item-7","name":"Widget 7","price_cents":5632}"#,
        )
        .expect("valid item");
        assert_eq!(item.id, "item-7");
        assert_eq!(item.name, "Widget 7");
        assert_eq!(item.price_cents, 5632);
        for bad in [
            "nope",
            "{}",
            r#"{"id":1,"name":"x","price_cents":1}"#,
            r#"{"id":"a","name":"x","price_cents":"1"}"#,
        ] {
            let err = parse_item("a", bad).expect_err(bad);
            assert_eq!(err.code(), tonic::Code::Internal);
        }
    }
}
