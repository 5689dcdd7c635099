//! gRPC answers weir writes itself: trailers-only (HTTP 200 with `grpc-status`
//! in the one HEADERS frame, as gRPC clients expect, never a 403 they would
//! report as UNKNOWN). Which requests are gRPC calls, their service and method
//! and deadline are the parsers' (`weir_parsers::grpc`).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
pub use weir_parsers::grpc::{is_grpc, percent_encode, service_method, status_of, timeout};

use super::ProxyBody;

/// gRPC status codes weir produces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    Internal = 13,
    Unavailable = 14,
}

/// A trailers-only response: HTTP 200, `content-type: application/grpc`,
/// `grpc-status` and a percent-encoded `grpc-message`, no body.
pub fn status_response(code: Code, message: &str) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::Own(http_body_util::Full::new(Bytes::new())));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code as u32));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert("grpc-message", v);
    }
    h.insert("x-weir-proxy", HeaderValue::from_static("1"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_are_trailers_only() {
        let r = status_response(Code::PermissionDenied, "denied: 100% é");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(r.headers()["grpc-message"], "denied: 100%25 %C3%A9");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert!(hyper::body::Body::is_end_stream(r.body()));
        assert_eq!(
            status_of(r.headers()),
            Some((7, Some("denied: 100%25 %C3%A9".into())))
        );
    }
}
