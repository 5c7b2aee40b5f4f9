//! rigd's HTTP surface refuses what a web page can forge: a "simple" cross-origin POST, a
//! foreign `Host` (DNS rebinding) or a foreign `Origin` never reaches the gRPC API.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use rig_tests::rigd::Rigd;

/// Send one raw HTTP/1.1 request and return the status code of the answer.
fn status_of(addr: SocketAddr, head: &str, body: &[u8]) -> u16 {
    let mut s = TcpStream::connect(addr).expect("connect to rigd");
    let req = format!(
        "{head}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"))
}

/// A gRPC-framed `Up` request whose spec would create a marker file.
fn up_body(marker: &std::path::Path) -> Vec<u8> {
    let spec = format!(
        "name = \"pwn\"\n[services.x]\ncommand = [\"sh\", \"-c\", \"touch {} && sleep 30\"]\n",
        marker.display()
    );
    let mut msg = vec![0x0a];
    let mut len = spec.len();
    while len >= 0x80 {
        msg.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    msg.push(len as u8);
    msg.extend_from_slice(spec.as_bytes());
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    framed
}

#[test]
fn forged_browser_requests_are_refused_and_start_nothing() {
    let rigd = Rigd::start();
    let port = rigd.addr.port();
    let marker = rigd.state.path().join("pwned");
    let body = up_body(&marker);
    let up = "POST /rig.v1.Environments/Up HTTP/1.1";
    let cases = [
        // A "simple" cross-origin POST: text/plain, no preflight.
        format!(
            "{up}\r\nhost: 127.0.0.1:{port}\r\norigin: http://evil.example\r\ncontent-type: text/plain"
        ),
        // The same with the right content type but a foreign Origin.
        format!(
            "{up}\r\nhost: 127.0.0.1:{port}\r\norigin: http://evil.example\r\ncontent-type: application/grpc"
        ),
        // DNS rebinding: the page's own origin, a foreign Host.
        format!(
            "{up}\r\nhost: evil.example:{port}\r\norigin: http://evil.example:{port}\r\ncontent-type: text/plain"
        ),
        format!("{up}\r\nhost: evil.example:{port}\r\ncontent-type: application/grpc"),
        // No Origin, same Host, but not gRPC's content type.
        format!("{up}\r\nhost: 127.0.0.1:{port}\r\ncontent-type: text/plain"),
    ];
    for head in &cases {
        let code = status_of(rigd.addr, head, &body);
        assert!(
            matches!(code, 403 | 405 | 415),
            "rigd answered {code} to a forged request:\n{head}"
        );
    }
    let events = format!("GET /events HTTP/1.1\r\nhost: evil.example:{port}");
    assert_eq!(
        status_of(rigd.addr, &events, b""),
        403,
        "/events to a foreign Host"
    );
    let unknown = format!("GET /nope HTTP/1.1\r\nhost: 127.0.0.1:{port}");
    assert_eq!(status_of(rigd.addr, &unknown, b""), 404);
    let metrics = format!("GET /metrics HTTP/1.1\r\nhost: localhost:{port}");
    assert_eq!(status_of(rigd.addr, &metrics, b""), 200);

    // Nothing started: the real API lists no environment and the marker was never made.
    let ls = rigd.ok(&["ls"]);
    assert!(!ls.contains("pwn"), "an environment was started: {ls}");
    assert!(!marker.exists(), "the forged spec's command ran");
}

#[test]
fn the_token_admits_a_caller_that_names_another_host() {
    let rigd = Rigd::start_with(&[], Some("s3cret"));
    let port = rigd.addr.port();
    let head = format!("GET /metrics HTTP/1.1\r\nhost: rig.example:{port}");
    assert_eq!(
        status_of(rigd.addr, &head, b""),
        403,
        "foreign Host, no token"
    );
    let with = format!("{head}\r\nauthorization: Bearer s3cret");
    assert_eq!(
        status_of(rigd.addr, &with, b""),
        200,
        "foreign Host, valid token"
    );
    let wrong = format!("{head}\r\nauthorization: Bearer nope");
    assert_eq!(
        status_of(rigd.addr, &wrong, b""),
        403,
        "foreign Host, wrong token"
    );
}
