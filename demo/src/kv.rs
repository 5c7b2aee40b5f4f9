//! `rig-demo kv`: an in-memory key-value store speaking a line protocol.
//!
//! One command per line, one answer line per command:
//! `SET key value` → `OK`, `GET key` → `VALUE value` | `NONE`,
//! `PING` → `PONG`, anything else → `ERR unknown command`.
//! Connections are kept open and may pipeline commands.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use anyhow::Result;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

use crate::common::{self, Shutdown};

/// Longest accepted command line. Without a cap a client that never sends a
/// newline would make the store buffer without bound.
const MAX_LINE: usize = 64 * 1024;

/// How many `item-N` keys are seeded at start.
pub const SEED_ITEMS: u32 = 100;

pub async fn run(mut shutdown: Shutdown) -> Result<()> {
    let listener = common::bind("kv").await?;
    let store = Arc::new(Store::seeded());
    loop {
        tokio::select! {
            _ = shutdown.recv() => return Ok(()),
            stream = common::accept(&listener) => {
                let store = Arc::clone(&store);
                // A broken connection only concerns its client: drop the error.
                tokio::spawn(async move { let _ = serve_conn(stream, &store).await; });
            }
        }
    }
}

#[derive(Default)]
pub struct Store {
    // RwLock because the demo's load is almost only GETs.
    map: RwLock<HashMap<String, String>>,
}

impl Store {
    /// The store with `item-0`..`item-99`, each a small JSON object. Values
    /// are a pure function of the index so every run serves the same data.
    pub fn seeded() -> Self {
        let store = Self::default();
        for i in 0..SEED_ITEMS {
            let id = format!("item-{i}");
            let value = serde_json::json!({
                "id": id,
                "name": format!("Widget {i}"),
                "price_cents": 199 + (i * 7919) % 10_000,
            });
            store.set(id, value.to_string());
        }
        store
    }

    // A poisoned lock only means another thread panicked while holding it;
    // the map itself is still consistent (inserts are atomic), so keep going.
    fn get(&self, key: &str) -> Option<String> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.get(key).cloned()
    }

    fn set(&self, key: String, value: String) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        map.insert(key, value);
    }

    /// Runs one command line (without its newline) and returns the answer
    /// line (without its newline).
    pub fn execute(&self, line: &[u8]) -> String {
        const UNKNOWN: &str = "ERR unknown command";
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Ok(line) = std::str::from_utf8(line) else {
            return UNKNOWN.to_owned();
        };
        let (cmd, args) = line.split_once(' ').unwrap_or((line, ""));
        if cmd.eq_ignore_ascii_case("PING") && args.is_empty() {
            "PONG".to_owned()
        } else if cmd.eq_ignore_ascii_case("GET") && is_key(args) {
            match self.get(args) {
                Some(value) => format!("VALUE {value}"),
                None => "NONE".to_owned(),
            }
        } else if cmd.eq_ignore_ascii_case("SET") {
            // The value is the rest of the line, spaces included, so JSON
            // with spaces can be stored.
            match args.split_once(' ') {
                Some((key, value)) if is_key(key) => {
                    self.set(key.to_owned(), value.to_owned());
                    "OK".to_owned()
                }
                _ => UNKNOWN.to_owned(),
            }
        } else {
            UNKNOWN.to_owned()
        }
    }
}

fn is_key(s: &str) -> bool {
    !s.is_empty() && !s.contains(' ')
}

async fn serve_conn(stream: TcpStream, store: &Store) -> std::io::Result<()> {
    let (read, write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut writer = BufWriter::new(write);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return writer.flush().await;
        }
        let complete = line.last() == Some(&b'\n');
        if !complete && line.len() > MAX_LINE {
            writer.write_all(b"ERR line too long\n").await?;
            return writer.flush().await;
        }
        // A last command cut by EOF (no newline) is still answered.
        let command = line.strip_suffix(b"\n").unwrap_or(&line);
        let mut answer = store.execute(command);
        answer.push('\n');
        writer.write_all(answer.as_bytes()).await?;
        // Flush only once the pipelined commands already received are all
        // answered: one write per batch instead of one per command.
        if reader.buffer().is_empty() {
            writer.flush().await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol() {
        let store = Store::seeded();
        assert_eq!(store.execute(b"PING"), "PONG");
        assert_eq!(store.execute(b"ping\r"), "PONG");
        assert_eq!(
            store.execute(b"GET item-7"),
            r#"VALUE {"id":"item-7","name":"Widget 7","price_cents":5632}"#
        );
        assert_eq!(store.execute(b"GET item-100"), "NONE");
        assert_eq!(store.execute(b"SET k hello world"), "OK");
        assert_eq!(store.execute(b"GET k"), "VALUE hello world");
        assert_eq!(store.execute(b"SET k "), "OK");
        assert_eq!(store.execute(b"GET k"), "VALUE ");
        for bad in [
            &b""[..],
            b"GET",
            b"GET a b",
            b"SET k",
            b"SET  v",
            b"PING x",
            b"DEL k",
            b"\xff\xfe",
        ] {
            assert_eq!(store.execute(bad), "ERR unknown command", "{bad:?}");
        }
    }
}
