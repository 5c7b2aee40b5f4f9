//! `rig-demo`: the small services rig's demo runs behind its proxies.
//!
//! rigd starts each subcommand as a child process and configures it through
//! the environment:
//!
//! - `HOST` (default `127.0.0.1`) and `PORT` (required): the ingress to listen on.
//! - for each dependency ("egress") `name`: `NAME_ADDR` (`host:port`; falls back
//!   to `NAME_HOST` + `NAME_PORT`) and, for http/grpc, `NAME_URL` (falls back to
//!   `http://NAME_ADDR`).
//! - `RIG_SERVICE`, `RIG_ENV`: this service's name and environment (only logged).
//!
//! Subcommands:
//!
//! - `kv`: TCP key-value store with a line protocol (`SET k v`, `GET k`,
//!   `PING`), seeded with `item-0`..`item-99`.
//! - `catalog`: gRPC `demo.v1.Catalog/GetItem` reading the store (egress
//!   `store`, `STORE_ADDR`), plus `grpc.health.v1.Health`.
//! - `web`: HTTP `GET /healthz` and `GET /items/{id}` calling the catalog
//!   (egress `catalog`, `CATALOG_URL`).
//! - `traffic`: load generator for web (egress `web`, `WEB_URL`) at `RATE`
//!   req/s (default 20) for `DURATION` (default forever), one summary line per
//!   second on stdout; serves `GET /healthz` on its ingress.
//!
//! Every service logs `<name> listening on <addr>` to stderr once bound and
//! exits 0 on SIGTERM or SIGINT.

mod catalog;
mod common;
mod kv;
mod pb;
mod traffic;
mod web;

use std::process::ExitCode;

use common::{Shutdown, log};

const USAGE: &str = "usage: rig-demo <kv|catalog|web|traffic>  (configured through HOST, PORT and <EGRESS>_ADDR/_URL env vars)";

#[tokio::main]
async fn main() -> ExitCode {
    let command = std::env::args().nth(1).unwrap_or_default();
    let shutdown = match Shutdown::install() {
        Ok(shutdown) => shutdown,
        Err(err) => {
            log(format_args!("rig-demo: {err:#}"));
            return ExitCode::FAILURE;
        }
    };
    let result = match command.as_str() {
        "kv" => kv::run(shutdown).await,
        "catalog" => catalog::run(shutdown).await,
        "web" => web::run(shutdown).await,
        "traffic" => traffic::run(shutdown).await,
        "-h" | "--help" | "help" => {
            log(format_args!("{USAGE}"));
            return ExitCode::SUCCESS;
        }
        other => {
            log(format_args!(
                "rig-demo: unknown subcommand {other:?}\n{USAGE}"
            ));
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            log(format_args!("rig-demo {command}: error: {err:#}"));
            ExitCode::FAILURE
        }
    }
}
