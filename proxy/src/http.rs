//! HTTP/1.1 (and, through the same auto builder, HTTP/2) behind one request-policy
//! layer: every request is checked (not just a connection's first), then either
//! answered by weir (403, 400, 5xx) or streamed to the original destination.

mod responses;
mod tracked_io;
mod upstream;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::{Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tracing::{debug, info};
use weir_parsers::http::{HeadCheck, RequestReject, RequestTracker, request_facts};
use weir_policy::flow::{self, L7Type};

use crate::listener::ConnContext;
pub use responses::ProxyBody;
use responses::{deny_response, error_response};
pub use upstream::{Upstream, UpstreamConns, UpstreamError};

pub async fn serve(ctx: Arc<ConnContext>, stream: TcpStream) {
    let config = &ctx.shared.config;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(config.max_header_bytes.max(8192))
        .header_read_timeout(config.idle_timeout)
        .half_close(true)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.max_header_bytes as u32)
        .keep_alive_interval(None);
    let tracker = Arc::new(Mutex::new(RequestTracker::new(
        config.max_header_bytes.max(8192),
    )));
    let svc_ctx = ctx.clone();
    let svc_tracker = tracker.clone();
    let svc = service_fn(move |req| {
        let ctx = svc_ctx.clone();
        let tracker = svc_tracker.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(ctx, tracker, req).await) }
    });
    let io = tracked_io::TrackedIo::new(stream, tracker);
    if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
        debug!(error = %e, "HTTP connection ended with an error");
    }
}

fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

fn flow_http(req_parts: &http::request::Parts, ctx: &ConnContext, code: StatusCode) -> flow::Http {
    let host = req_parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req_parts.uri.authority().map(ToString::to_string))
        .unwrap_or_else(|| ctx.orig_dst.to_string());
    let path = req_parts.uri.path_and_query().map_or("/", |p| p.as_str());
    flow::Http {
        code: code.as_u16(),
        method: req_parts.method.to_string(),
        url: format!("http://{host}{path}"),
        protocol: protocol_name(req_parts.version).to_string(),
        headers: Vec::new(),
    }
}

/// The framing check for an HTTP/1 request, as the client sent it. Requests the
/// tracker could not follow are refused: weir does not forward what it cannot frame.
fn framing_check(tracker: &Mutex<RequestTracker>, http2: bool) -> Result<(), RequestReject> {
    if http2 {
        return Ok(());
    }
    match tracker
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .next_check()
    {
        Some(HeadCheck::Ok) => Ok(()),
        Some(HeadCheck::Reject(r)) => Err(r),
        None => Err(RequestReject::Unverified),
    }
}

async fn handle(
    ctx: Arc<ConnContext>,
    tracker: Arc<Mutex<RequestTracker>>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let http2 = parts.version == Version::HTTP_2;
    let d = ctx.decide();
    let (policy, cv) = (&d.policy, &d.verdict);
    let checked = framing_check(&tracker, http2)
        .and_then(|()| request_facts(&parts.method, &parts.uri, &parts.headers, http2));
    let facts = match checked {
        Ok(f) => f,
        Err(reject) => {
            info!(%reject, "malformed or ambiguous request; answering 400 and closing");
            let v = cv.l4_verdict();
            let f = ctx
                .flow(&d, &v)
                .with_error(format!("MALFORMED_REQUEST: {reject}"))
                .with_http(
                    L7Type::Request,
                    elapsed_ns(start),
                    flow_http(&parts, &ctx, StatusCode::BAD_REQUEST),
                );
            ctx.shared.flows.emit(&f);
            return error_response(StatusCode::BAD_REQUEST, &reject.to_string(), true);
        }
    };
    let verdict = if !cv.l4_allowed() || !cv.needs_l7() {
        cv.l4_verdict()
    } else {
        cv.http_verdict(policy, &facts, &parts.headers)
    };
    if !verdict.allowed {
        info!(method = %facts.method, path = %facts.path, reason = %verdict.reason(), "request denied");
        let f = ctx.flow(&d, &verdict).with_http(
            L7Type::Request,
            elapsed_ns(start),
            flow_http(&parts, &ctx, StatusCode::FORBIDDEN),
        );
        ctx.shared.flows.emit(&f);
        // Denied at L3/L4: nothing on this connection will ever pass, so close it.
        return deny_response(!cv.l4_allowed());
    }
    let flow_parts = parts.clone();
    let result = ctx
        .shared
        .upstream
        .forward(&ctx, Request::from_parts(parts, body))
        .await;
    let (response, code, error) = match result {
        Ok(resp) => {
            let code = resp.status();
            (resp, code, None)
        }
        Err(e) => {
            let code = e.status();
            info!(error = %e, status = code.as_u16(), "upstream failed");
            (error_response(code, &e.to_string(), false), code, Some(e))
        }
    };
    let mut f = ctx.flow(&d, &verdict).with_http(
        L7Type::Response,
        elapsed_ns(start),
        flow_http(&flow_parts, &ctx, code),
    );
    if let Some(e) = error {
        f = f.with_error(e.reason_code());
    }
    ctx.shared.flows.emit(&f);
    response
}

fn elapsed_ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
