//! Responses weir writes itself, and the body type every response has.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::h2_upstream::H2Body;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body: streamed from an HTTP/1 or an HTTP/2 upstream connection,
/// or a small one of weir's own.
pub enum ProxyBody {
    Http1(Incoming),
    Http2(H2Body),
    Own(Full<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    /// An `h2::Error` stays findable in it: hyper resets the client's stream
    /// with the upstream's reason (RST_STREAM propagation).
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Http1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ProxyBody::Http2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ProxyBody::Own(b) => Pin::new(b).poll_frame(cx).map_err(|e| match e {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Http1(b) => b.is_end_stream(),
            ProxyBody::Http2(b) => b.is_end_stream(),
            ProxyBody::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Http1(b) => b.size_hint(),
            ProxyBody::Http2(b) => b.size_hint(),
            ProxyBody::Own(b) => b.size_hint(),
        }
    }
}

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
    let mut r = Response::new(ProxyBody::Own(Full::new(Bytes::from(body))));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert("x-weir-proxy", HeaderValue::from_static("1"));
    r
}
