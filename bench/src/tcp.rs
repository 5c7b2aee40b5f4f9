//! Measurement 1, tcp throughput with iperf3: direct, through a rig tcp edge (splice path, and
//! the copy path forced by a no-op fault), and through HAProxy in tcp mode.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

use crate::ext::{Ctx, ProxyServer, haproxy};
use crate::procs::{self, Cpus, Proc, Spec};
use crate::report::{Row, gbits, median};

/// `slow_close = "0s"` changes nothing a client sees but is not passthrough, so the edge relays
/// with its copy loop instead of splice(2).
const COPY_PATH_CHAOS: &str = r#"{"slow_close":"0s"}"#;

pub async fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let iperf = procs::which("iperf3").ok_or_else(|| anyhow!("iperf3 is not installed"))?;
    let port = procs::free_port()?;
    let server_spec = Spec::new("iperf3-server", &iperf).args([
        "-s".to_string(),
        "-B".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "--forceflush".into(),
    ]);
    let mut server = Proc::spawn(server_spec, &ctx.work)?;
    server
        .line_containing("Server listening", Duration::from_secs(10))
        .await?;
    // iperf3 reports every test on stdout: keep reading it, or the server blocks on a full pipe.
    server.discard_stdout();
    let target = procs::local(port);

    let mut proxy = ProxyServer::start(ctx, "tcp-edges", Cpus::Any).await?;
    let splice_edge = proxy.edge("tcp", target, "").await?;
    let copy_edge = proxy.edge("tcp", target, COPY_PATH_CHAOS).await?;
    let (hap, hap_addr) = haproxy(ctx, "haproxy-tcp", "tcp", target, None, Cpus::Any).await?;

    let secs = ctx.scale(5, 1);
    // Rounds interleave the paths so a burst of load from elsewhere hits them alike; each figure
    // is the median of its rounds.
    let rounds = ctx.scale(3, 1);
    let paths = [
        ("direct", target),
        ("rig", splice_edge),
        ("rig copy path", copy_edge),
        ("HAProxy", hap_addr),
    ];
    let mut rows = Vec::new();
    for streams in [1u32, 8] {
        let plural = if streams == 1 { "stream" } else { "streams" };
        let mut runs: [Vec<f64>; 4] = Default::default();
        for round in 1..=rounds {
            for (i, (name, addr)) in paths.iter().enumerate() {
                let bps = iperf_client(ctx, *addr, streams, secs)
                    .await
                    .with_context(|| format!("iperf3 -P {streams} via {name} ({addr})"))?;
                runs[i].push(bps);
            }
            println!(
                "tcp {streams} {plural}, round {round}: direct {}, rig {}, rig copy path {}, haproxy {}",
                gbits(runs[0][round - 1]),
                gbits(runs[1][round - 1]),
                gbits(runs[2][round - 1]),
                gbits(runs[3][round - 1])
            );
        }
        let [direct, rig, copy, hap_bps] = runs.map(|mut r| median(&mut r));
        let ratio = rig / direct;
        rows.push(
            Row::new(format!(
                "tcp throughput, {streams} {plural}, no chaos (iperf3 -t {secs} -P {streams}, median of {rounds})"
            ))
            .rig(gbits(rig))
            .baselines(format!("direct {}, HAProxy {}", gbits(direct), gbits(hap_bps)))
            .ratio(format!("rig÷direct {ratio:.2} (HAProxy÷direct {:.2})", hap_bps / direct))
            .target("rig÷direct ≥ 0.9", ratio >= 0.9),
        );
        rows.push(
            Row::new(format!(
                "tcp throughput, {streams} {plural}, copy path (slow_close = \"0s\")"
            ))
            .rig(gbits(copy))
            .baselines(format!(
                "direct {}, rig splice {}",
                gbits(direct),
                gbits(rig)
            ))
            .ratio(format!(
                "copy÷direct {:.2}, copy÷splice {:.2}",
                copy / direct,
                copy / rig
            )),
        );
    }
    proxy.stop().await;
    hap.stop(Duration::from_secs(5)).await;
    server.stop(Duration::from_secs(5)).await;
    Ok(rows)
}

/// Bits per second the iperf3 server received from a client sending to `addr`.
async fn iperf_client(ctx: &Ctx, addr: SocketAddr, streams: u32, secs: u32) -> Result<f64> {
    let iperf = procs::which("iperf3").ok_or_else(|| anyhow!("iperf3 is not installed"))?;
    let spec = Spec::new("iperf3-client", iperf).args([
        "-c".to_string(),
        addr.ip().to_string(),
        "-p".into(),
        addr.port().to_string(),
        "-t".into(),
        secs.to_string(),
        "-P".into(),
        streams.to_string(),
        "-J".into(),
    ]);
    let out = Proc::spawn(spec, &ctx.work)?
        .wait_output(Duration::from_secs(secs as u64 + 30))
        .await?
        .join("\n");
    let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(anyhow!("iperf3 via {addr}: {e}"));
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("iperf3 via {addr}: no end.sum_received in its output"))
}
