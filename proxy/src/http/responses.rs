//! Responses weir writes itself.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// Either a streamed upstream body or a small body of weir's own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Cilium's deny response: 403 with body `Access denied`.
pub fn deny_response(close: bool) -> Response<ProxyBody> {
    let mut r = small(StatusCode::FORBIDDEN, "Access denied\n".into());
    if close {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

pub fn error_response(code: StatusCode, detail: &str, close: bool) -> Response<ProxyBody> {
    let reason = code.canonical_reason().unwrap_or("Error");
    let mut r = small(code, format!("{reason}: {detail}\n"));
    if close {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn small(code: StatusCode, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert("x-weir-proxy", HeaderValue::from_static("1"));
    r
}
