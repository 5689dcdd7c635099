//! gRPC answers weir writes itself: trailers-only (HTTP 200 with `grpc-status`
//! in the one HEADERS frame, as gRPC clients expect, never a 403 they would
//! report as UNKNOWN). Which requests are gRPC calls, their service and method
//! and deadline are the parsers' (`weir_parsers::grpc`).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
pub use weir_parsers::grpc::{is_grpc, percent_encode, service_method, status_of, timeout};
use weir_policy::flow;

use super::h2_upstream::OnEnd;
use super::{ProxyBody, UpstreamError};
use crate::context::ConnContext;

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

/// The service and method of a gRPC call's path (empty when the path is not
/// `/service/method`: policy matched it as it is).
pub(super) fn grpc_facts(path: &str) -> flow::Grpc {
    let (service, method) = service_method(path).unwrap_or(("", ""));
    flow::Grpc {
        service: service.to_string(),
        method: method.to_string(),
        status: None,
        message: None,
    }
}

/// An upstream failure as gRPC clients expect it: no connection →
/// UNAVAILABLE, deadline (weir's or the call's) → DEADLINE_EXCEEDED.
pub(super) fn grpc_error_status(e: &UpstreamError) -> Code {
    match e {
        UpstreamError::Unavailable(..)
        | UpstreamError::Failed(..)
        | UpstreamError::Reset(..)
        | UpstreamError::TooManyResets(..) => Code::Unavailable,
        UpstreamError::Timeout(..) => Code::DeadlineExceeded,
        UpstreamError::Request(..) => Code::Internal,
    }
}

/// Writes a gRPC call's flow record when its response ends, with the status
/// from the trailers (or the trailers-only head).
pub(super) struct GrpcFlow {
    pub(super) ctx: Arc<ConnContext>,
    pub(super) flow: Option<flow::Flow>,
    pub(super) call: flow::Grpc,
    pub(super) head_status: Option<(u32, Option<String>)>,
}

impl OnEnd for GrpcFlow {
    fn ended(&mut self, trailers: Option<&HeaderMap>, error: Option<&h2::Error>) {
        let Some(mut f) = self.flow.take() else {
            return;
        };
        // `flow` is taken: this runs once, so the call's facts can go with it.
        let mut g = std::mem::take(&mut self.call);
        let status = trailers
            .and_then(status_of)
            .or_else(|| self.head_status.clone());
        match (status, error) {
            (Some((status, message)), _) => {
                g.status = Some(status);
                g.message = message;
            }
            (None, Some(e)) => g.message = Some(format!("stream ended without a status: {e}")),
            (None, None) => g.message = Some("response ended without grpc-status".into()),
        }
        if let Some(http) = f.l7.as_mut().and_then(|l| l.http.as_mut()) {
            http.grpc = Some(g);
        }
        self.ctx.shared.flows.emit(f);
    }
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
