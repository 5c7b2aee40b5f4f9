//! The bits of the gRPC wire protocol the edge needs: reading a status, writing one.

use http::{HeaderMap, HeaderValue, StatusCode};

use crate::policy::GrpcCode;

pub(crate) const GRPC_STATUS: &str = "grpc-status";
pub(crate) const GRPC_MESSAGE: &str = "grpc-message";

/// The `grpc-status` in response headers (a trailers-only response) or trailers.
pub(crate) fn status_of(headers: &HeaderMap) -> Option<GrpcCode> {
    let v = headers.get(GRPC_STATUS)?;
    let code: u32 = std::str::from_utf8(v.as_bytes())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(GrpcCode::from_code(code))
}

/// The code a gRPC client reports for a non-200 HTTP answer without `grpc-status`
/// (gRPC's "HTTP to gRPC status code mapping").
pub(crate) fn from_http_status(s: StatusCode) -> GrpcCode {
    match s.as_u16() {
        400 => GrpcCode::Internal,
        401 => GrpcCode::Unauthenticated,
        403 => GrpcCode::PermissionDenied,
        404 => GrpcCode::Unimplemented,
        429 | 502 | 503 | 504 => GrpcCode::Unavailable,
        _ => GrpcCode::Unknown,
    }
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%` itself.
pub(crate) fn encode_message(msg: &str) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(msg.len());
    for &b in msg.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
        }
    }
    // Only printable ASCII is left, which is always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("rig"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_encoding() {
        assert_eq!(encode_message("plain text"), "plain text");
        assert_eq!(encode_message("100% sure"), "100%25 sure");
        assert_eq!(encode_message("ü\n"), "%C3%BC%0A");
    }

    #[test]
    fn status_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(status_of(&h), None);
        h.insert(GRPC_STATUS, HeaderValue::from_static("14"));
        assert_eq!(status_of(&h), Some(GrpcCode::Unavailable));
        h.insert(GRPC_STATUS, HeaderValue::from_static("0"));
        assert_eq!(status_of(&h), Some(GrpcCode::Ok));
        h.insert(GRPC_STATUS, HeaderValue::from_static("x"));
        assert_eq!(status_of(&h), None);
        assert_eq!(
            from_http_status(StatusCode::NOT_FOUND),
            GrpcCode::Unimplemented
        );
    }
}
