//! HTTP/1.1 and HTTP/2 behind one request-policy layer: every request is checked
//! (not just a connection's first), then either answered by weir (403, 400, 5xx)
//! or streamed to the original destination.
//!
//! The protocol is known before hyper sees the connection (`detect`), so each
//! gets its own connection builder. Until the first request reaches the policy,
//! the connection is under the request-head deadline. An HTTP/2 connection with
//! no open stream and no bytes for the idle timeout gets GOAWAY (HTTP/1's idle
//! timeout is hyper's wait for the next request head).
//!
//! A request that arrived over HTTP/2 goes upstream over HTTP/2 (`h2_upstream`),
//! with trailers, resets and GOAWAY passed on; a gRPC call (`grpc`) that weir
//! answers itself gets a gRPC status, never an HTTP error. A TLS handshake on a
//! port with HTTP rules is refused at once: weir cannot see the requests inside.

pub mod grpc;
mod h2_streams;
mod h2_upstream;
mod responses;
mod tracked_io;
mod tunnel;
mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{debug, info};
use weir_parsers::http::{HeadCheck, RequestReject, RequestTracker, request_facts};
use weir_policy::flow::{self, L7Type};
use weir_policy::http_match::{HeaderMismatch, joined_value};
use weir_policy::model::MismatchAction;

use crate::context::ConnContext;
use crate::detect::{Detected, Replay};
use crate::idle::{ActiveIo, Activity};
use grpc::{GrpcFlow, grpc_error_status, grpc_facts};
use h2_streams::{OpenStream, ResetWindow, StreamBody, http2_connection_error, too_many_resets};
pub use responses::ProxyBody;
use responses::{deny_response, error_response};
pub use upstream::{Upstream, UpstreamConns, UpstreamError};

/// What a connection's driver needs to know about its requests.
#[derive(Default)]
struct ConnState {
    /// A request has reached the policy (the request-head deadline is over).
    decided: AtomicBool,
    first_request: Notify,
    /// HTTP/2 streams whose response has not been sent whole yet.
    open_streams: AtomicUsize,
    /// HTTP/2 streams the client reset (or abandoned) in the current second.
    resets: Mutex<ResetWindow>,
    /// Set (and notified) once the client reset more streams in a second than
    /// `--http2-max-resets-per-sec`.
    too_many_resets: Notify,
}

impl ConnState {
    fn request_arrived(&self) {
        if !self.decided.swap(true, Ordering::Relaxed) {
            self.first_request.notify_one();
        }
    }
}

/// Serves HTTP on a client connection whose first bytes said `kind` (anything
/// that is not HTTP/2 goes to the HTTP/1 server, which answers 400 to what it
/// cannot parse). `deadline` bounds the wait for the first request.
pub async fn serve(
    ctx: Arc<ConnContext>,
    io: Replay<TcpStream>,
    kind: Detected,
    deadline: tokio::time::Instant,
) {
    let state = Arc::new(ConnState::default());
    match kind {
        Detected::Http2 => serve_http2(ctx, io, state, deadline).await,
        Detected::Http1 | Detected::Other => serve_http1(ctx, io, state, deadline).await,
        Detected::Tls => refuse_tls(&ctx),
    }
}

/// TLS where policy has HTTP rules: forwarding it would let every request
/// through unchecked, so the connection is closed at once, with a flow record.
fn refuse_tls(ctx: &ConnContext) {
    const WHY: &str = "TLS on an HTTP-rules port; weir cannot inspect it";
    info!("{WHY}: closing");
    let d = ctx.decide();
    let mut f = ctx.flow(&d, &d.verdict.l4_verdict());
    f.verdict = flow::FlowVerdict::Dropped;
    f.drop_reason_desc = Some("TLS_ON_HTTP_PORT".into());
    f.policy = WHY.into();
    ctx.shared.flows.emit(f);
}

/// How the wait for a connection's first request ended.
enum First {
    Request,
    /// The connection ended first (with hyper's error, if any).
    Ended(Option<hyper::Error>),
    /// The request-head deadline passed: the connection is to be closed.
    Timeout,
}

/// Waits for the first request (or the end of the connection) until `deadline`.
async fn first_request<F>(
    conn: &mut Pin<&mut F>,
    state: &ConnState,
    deadline: tokio::time::Instant,
) -> First
where
    F: Future<Output = hyper::Result<()>>,
{
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = &r {
                debug!(error = %e, "HTTP connection ended with an error");
            }
            First::Ended(r.err())
        }
        () = state.first_request.notified() => First::Request,
        () = tokio::time::sleep_until(deadline) => {
            debug!("no request head by the request-head deadline; closing");
            First::Timeout
        }
    }
}

async fn serve_http1(
    ctx: Arc<ConnContext>,
    io: Replay<TcpStream>,
    state: Arc<ConnState>,
    deadline: tokio::time::Instant,
) {
    let config = &ctx.shared.config;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .max_buf_size(config.max_header_bytes.max(8192))
        // Between requests: hyper's wait for the next head is the idle timeout.
        .header_read_timeout(config.idle_timeout)
        .half_close(true)
        .keep_alive(true);
    let tracker = Arc::new(Mutex::new(RequestTracker::new(
        config.max_header_bytes.max(8192),
    )));
    let h1 = Http1Conn {
        tracker: tracker.clone(),
        tunnel: Arc::default(),
    };
    let svc_ctx = ctx.clone();
    let svc_h1 = h1.clone();
    let svc_state = state.clone();
    let svc = service_fn(move |req| {
        svc_state.request_arrived();
        let ctx = svc_ctx.clone();
        let h1 = svc_h1.clone();
        async move {
            // A reset exists only for HTTP/2 clients; HTTP/1 never gets one.
            let resp = handle(ctx, Some(h1), req)
                .await
                .unwrap_or_else(|e| error_response(StatusCode::BAD_GATEWAY, &e.to_string(), true));
            Ok::<_, Infallible>(resp)
        }
    });
    let io = tracked_io::TrackedIo::new(io, tracker);
    // `with_upgrades`: after a 101 to an allowed upgrade (or a 2xx to CONNECT)
    // hyper hands the socket to the tunnel instead of closing it.
    let conn = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    serve_http1_requests(&ctx, conn, &state, deadline).await;
    // A tunnel runs on this task: it is still this client connection (its
    // `--max-connections` slot, a takeover's drain).
    let tunnel = h1.tunnel.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(tunnel) = tunnel {
        tunnel.await;
    }
}

async fn serve_http1_requests<F>(
    ctx: &ConnContext,
    conn: hyper::server::conn::http1::UpgradeableConnection<TokioIo<tracked_io::TrackedIo>, F>,
    state: &ConnState,
    deadline: tokio::time::Instant,
) where
    F: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    F::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = std::pin::pin!(conn);
    if !matches!(
        first_request(&mut conn, state, deadline).await,
        First::Request
    ) {
        return;
    }
    let mut draining = ctx.shared.draining();
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, "HTTP connection ended with an error");
            }
            return;
        }
        // Another weir took over: finish the request in progress with
        // `Connection: close`, so the client's next one reaches the new weir.
        _ = draining.wait_for(|d| *d) => conn.as_mut().graceful_shutdown(),
    }
    if let Err(e) = conn.await {
        debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// What an HTTP/1 connection's requests share: the framing tracker, and where
/// an allowed protocol switch leaves its tunnel for the connection to run.
#[derive(Clone)]
struct Http1Conn {
    tracker: Arc<Mutex<RequestTracker>>,
    tunnel: tunnel::Parked,
}

async fn serve_http2(
    ctx: Arc<ConnContext>,
    io: Replay<TcpStream>,
    state: Arc<ConnState>,
    deadline: tokio::time::Instant,
) {
    let config = &ctx.shared.config;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(config.http2_max_streams)
        // Fixed windows: what weir buffers per stream and connection is bounded.
        .adaptive_window(false)
        .initial_stream_window_size(config.http2_stream_window)
        .initial_connection_window_size(config.http2_connection_window)
        .max_pending_accept_reset_streams(config.http2_max_pending_resets)
        .max_local_error_reset_streams(config.http2_max_local_resets)
        .keep_alive_interval(None);
    let svc_ctx = ctx.clone();
    let svc_state = state.clone();
    let svc_reset_limit = config.http2_max_resets_per_sec;
    let svc = service_fn(move |req| {
        svc_state.request_arrived();
        let stream = OpenStream::new(svc_state.clone(), svc_reset_limit);
        let ctx = svc_ctx.clone();
        async move {
            // An Err is a stream reset: hyper resets the client's stream with
            // the h2 reason inside (weir's doing, not the client's).
            // `handle`'s future is boxed: inline it made hyper's per-stream
            // task 2.4 KB, which hyper and tokio copy about three times per
            // stream (memmove was 6 % of a gRPC call's samples).
            let resp = match Box::pin(handle(ctx, None, req)).await {
                Ok(r) => r,
                Err(e) => {
                    stream.finish();
                    return Err(e);
                }
            };
            Ok::<_, h2::Error>(resp.map(|body| StreamBody {
                inner: body,
                stream,
            }))
        }
    });
    let activity = Activity::new();
    let io = ActiveIo::new(io, activity.clone());
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    match first_request(&mut conn, &state, deadline).await {
        First::Request => {}
        // Floods and malformed frames usually end a connection before any
        // request is taken: the record says why.
        First::Ended(Some(e)) => {
            http2_connection_error(&ctx, &e);
            return;
        }
        First::Ended(None) | First::Timeout => return,
    }
    let idle = config.idle_timeout;
    let mut check_at = activity.last() + idle;
    let mut draining = ctx.shared.draining();
    let mut policy_changes = ctx.shared.policy_changes();
    let mut abusive = false;
    let mut revoked = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "HTTP/2 connection ended with an error");
                    http2_connection_error(&ctx, &e);
                }
                return;
            }
            // Another weir took over: GOAWAY now, open streams finish.
            _ = draining.wait_for(|d| *d) => break,
            () = state.too_many_resets.notified() => {
                abusive = true;
                break;
            }
            r = policy_changes.changed() => {
                // The sender lives as long as `Shared`; an error means shutdown.
                if r.is_err() || h2_streams::revoked_at_l4(&ctx) {
                    revoked = true;
                    break;
                }
            }
            () = tokio::time::sleep_until(check_at) => {
                let now = tokio::time::Instant::now();
                let quiet_until = activity.last() + idle;
                if state.open_streams.load(Ordering::Relaxed) > 0 {
                    check_at = now + idle;
                } else if quiet_until > now {
                    check_at = quiet_until;
                } else {
                    break;
                }
            }
        }
    }
    if abusive {
        too_many_resets(&ctx, config.http2_max_resets_per_sec);
        conn.as_mut().graceful_shutdown();
        // GOAWAY is sent; the streams in flight get a moment, no more.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn).await;
        return;
    }
    if revoked {
        // No new stream may pass: GOAWAY now. Streams already admitted finish
        // under the policy that admitted them, as on HTTP/1.1, but get a
        // second's grace, no more (a long stream would keep the revoked pair
        // talking).
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn).await;
        return;
    }
    debug!(?idle, "HTTP/2 connection idle; sending GOAWAY");
    conn.as_mut().graceful_shutdown();
    // GOAWAY waits for the client's answer to a PING; a silent client is dropped.
    if tokio::time::timeout(idle, conn).await.is_err() {
        debug!("no answer to GOAWAY; closing");
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

/// A method's name for its record; the standard ones without an allocation.
fn method_name(m: &http::Method) -> std::borrow::Cow<'static, str> {
    const STANDARD: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    match STANDARD.iter().find(|s| **s == m.as_str()) {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(m.as_str().to_owned()),
    }
}

fn flow_http(req_parts: &http::request::Parts, ctx: &ConnContext, code: StatusCode) -> flow::Http {
    let path = req_parts.uri.path_and_query().map_or("/", |p| p.as_str());
    // A CONNECT's target is an authority, not a URL.
    let url = match req_parts.uri.authority() {
        Some(a) if req_parts.method == http::Method::CONNECT => a.as_str().to_string(),
        _ => {
            // Built in place (every request has a record): `http://{host}{path}`.
            let host = req_parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req_parts.uri.authority().map(http::uri::Authority::as_str));
            let mut url = String::with_capacity(7 + host.map_or(21, str::len) + path.len());
            url.push_str("http://");
            match host {
                Some(h) => url.push_str(h),
                None => {
                    use std::fmt::Write;
                    let _ = write!(url, "{}", ctx.orig_dst);
                }
            }
            url.push_str(path);
            url
        }
    };
    flow::Http {
        code: code.as_u16(),
        method: method_name(&req_parts.method),
        url,
        protocol: protocol_name(req_parts.version).into(),
        headers: Vec::new(),
        header_mismatches: Vec::new(),
        grpc: None,
    }
}

/// The framing check for an HTTP/1 request, as the client sent it. Requests the
/// tracker could not follow are refused: weir does not forward what it cannot frame.
fn framing_check(
    tracker: Option<&Mutex<RequestTracker>>,
    http2: bool,
) -> Result<(), RequestReject> {
    let Some(tracker) = tracker else {
        // HTTP/2 frames carry their own lengths; there is no framing to confuse.
        return if http2 {
            Ok(())
        } else {
            Err(RequestReject::Unverified)
        };
    };
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

/// A request's answer: a response, or (HTTP/2 only) a reset of its stream with
/// the upstream's reason.
type Reply = Result<Response<ProxyBody>, h2::Error>;

async fn handle(ctx: Arc<ConnContext>, h1: Option<Http1Conn>, req: Request<Incoming>) -> Reply {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let http2 = parts.version == Version::HTTP_2;
    let is_grpc = grpc::is_grpc(&parts.headers);
    let d = ctx.decide();
    let (policy, cv) = (&d.policy, &d.verdict);
    let checked = framing_check(h1.as_ref().map(|h| &*h.tracker), http2)
        .and_then(|()| request_facts(&parts.method, &parts.uri, &parts.headers, http2));
    let facts = match checked {
        Ok(f) => f,
        Err(reject) => {
            info!(%reject, "malformed or ambiguous request; answering 400 and closing");
            return refuse_before_policy(&ctx, &d, &parts, is_grpc, start, &reject.to_string());
        }
    };
    let mut parts = parts;
    // A protocol switch (HTTP/1 only): its `Upgrade` lines survive the header
    // hygiene below, as part of what policy decides and the server gets.
    let switch = match h1 {
        Some(_) => tunnel::Switch::requested(&parts.method, parts.version, &parts.headers),
        None => None,
    };
    let client_upgrade = switch
        .as_ref()
        .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    // The request policy checks is the request the server gets: connection
    // headers go first (never Host or a header a rule names), several field
    // lines of a checked header become the one value policy matched, and the
    // path is the normalised spelling policy saw.
    let checked_headers = if cv.needs_l7() {
        cv.http_header_names(policy)
    } else {
        Vec::new()
    };
    if let Err(e) = prepare_headers(&mut parts.headers, &checked_headers)
        .and_then(|()| use_checked_path(&mut parts.uri, &facts.path))
    {
        info!(error = %e, "request refused before policy; answering 400");
        return refuse_before_policy(&ctx, &d, &parts, is_grpc, start, &e);
    }
    if http2 && !checked_headers.is_empty() {
        // Request trailers come after this decision: the pump drops these names.
        let names = checked_headers.iter().map(|n| (*n).to_string()).collect();
        parts
            .extensions
            .insert(h2_upstream::CheckedHeaderNames(names));
    }
    if let Some(s) = &switch {
        parts.headers.extend(s.headers());
    }
    let (verdict, mismatches) = request_verdict(&d, &facts, &parts.headers);
    let grpc_call = is_grpc.then(|| grpc_facts(&facts.path));
    if !verdict.allowed {
        info!(method = %facts.method, path = %facts.path, reason = %verdict.reason(), "request denied");
        return deny(&ctx, &d, &parts, &verdict, grpc_call, start);
    }
    // A tunnel is decided again at each policy change, on what was decided now.
    let decided_headers = switch.as_ref().map(|_| parts.headers.clone());
    apply_mismatch_actions(&mut parts.headers, &mismatches);
    // What the server is sent is the request after the actions: a DELETE of
    // `Upgrade` (or `Connection`) cancels the switch, a REPLACE's protocols are
    // the ones sent and the ones the 101 must name.
    let switch = switch.and_then(|_| after_actions(&parts));
    let upstream = &ctx.shared.upstream;
    let call_deadline = if is_grpc {
        grpc::timeout(&parts.headers)
    } else {
        None
    };
    let timeout = upstream.response_timeout(call_deadline);
    let switch_req = switch.map(|switch| {
        Some(tunnel::SwitchRequest {
            switch,
            client: client_upgrade?,
            conn: h1?,
            http: flow_http(&parts, &ctx, StatusCode::OK),
            facts,
            headers: decided_headers?,
            decision: d.clone(),
            verdict: verdict.clone(),
        })
    });
    // Until the response head, a client that resets its stream (or closes)
    // drops this future: the guard still writes the request's record.
    let mut in_flight = InFlight {
        ctx: ctx.clone(),
        d: d.clone(),
        start,
        facts: Some(InFlightFacts {
            // What the record needs of the request, not a copy of its headers.
            http: flow_http(&parts, &ctx, StatusCode::OK),
            verdict,
            mismatches,
            grpc: grpc_call,
        }),
    };
    let upstream_start = Instant::now();
    // The forwarding futures are boxed: inline they made this one over 5 KB, and
    // hyper moves it (and tokio copies it into its task) for every HTTP/2 stream.
    let result = match switch_req {
        Some(Some(sr)) => {
            Box::pin(tunnel::forward(
                &ctx,
                Request::from_parts(parts, body),
                sr,
                timeout,
            ))
            .await
        }
        // hyper marks every HTTP/1.1 upgrade and CONNECT as upgradable.
        Some(None) => Err(UpstreamError::Request(
            "the connection cannot switch protocols".into(),
        )),
        None => {
            Box::pin(upstream.forward(&ctx, Request::from_parts(parts, body), timeout, is_grpc))
                .await
                .and_then(|resp| no_switch(&ctx, resp))
        }
    };
    let upstream_ns = elapsed_ns(upstream_start);
    let Some(facts) = in_flight.facts.take() else {
        return Err(h2::Error::from(h2::Reason::INTERNAL_ERROR));
    };
    answer(&ctx, &d, start, upstream_ns, http2, facts, result)
}

/// The client's answer to a forwarded request (the response, or the error
/// in the protocol's terms) and its record; a gRPC call's record waits for
/// its trailers.
fn answer(
    ctx: &Arc<ConnContext>,
    d: &crate::context::Decision,
    start: Instant,
    upstream_ns: u64,
    http2: bool,
    facts: InFlightFacts,
    result: Result<Response<ProxyBody>, UpstreamError>,
) -> Reply {
    let InFlightFacts {
        mut http,
        verdict,
        mismatches,
        grpc: grpc_call,
    } = facts;
    let (response, code, error) = match result {
        Ok(resp) => {
            let code = resp.status();
            (Ok(resp), code, None)
        }
        Err(e) => {
            let code = e.status();
            info!(error = %e, status = code.as_u16(), "upstream failed");
            let reply = match (&e, &grpc_call) {
                (UpstreamError::Reset(_, reason), _) if http2 => Err(h2::Error::from(*reason)),
                (UpstreamError::TooManyResets(..), _) if http2 => {
                    Err(h2::Error::from(h2::Reason::REFUSED_STREAM))
                }
                (_, Some(_)) => {
                    let status = grpc_error_status(&e);
                    Ok(grpc::status_response(status, &format!("weir: {e}")))
                }
                _ => Ok(error_response(code, &e.to_string(), false)),
            };
            (reply, code, Some(e))
        }
    };
    http.code = code.as_u16();
    http.header_mismatches = mismatches;
    if let (Some(g), Some(e)) = (&grpc_call, &error) {
        let mut g = g.clone();
        g.status = Some(grpc_error_status(e) as u32);
        g.message = Some(e.to_string());
        http.grpc = Some(g);
    }
    let mut f = ctx
        .flow(d, &verdict)
        .with_http(L7Type::Response, elapsed_ns(start), http)
        .with_upstream_ns(upstream_ns);
    if let Some(e) = &error {
        f = f.with_error(e.reason_code());
    }
    let mut response = response;
    // A gRPC call's record waits for its trailers (the status is there).
    if let (Some(g), Ok(resp)) = (grpc_call, &mut response) {
        let head_status = grpc::status_of(resp.headers());
        if let ProxyBody::Http2(body) = resp.body_mut() {
            body.set_on_end(Box::new(GrpcFlow {
                ctx: ctx.clone(),
                flow: Some(f),
                call: g,
                head_status,
            }));
            return response;
        }
        if let Some(http) = f.l7.as_mut().and_then(|l| l.http.as_mut()) {
            let mut g = g;
            if let Some((status, message)) = head_status {
                g.status = Some(status);
                g.message = message;
            }
            http.grpc = Some(g);
        }
    }
    ctx.shared.flows.emit(f);
    response
}

/// The answer to a request policy denies, and its record: a gRPC client gets
/// PERMISSION_DENIED with weir's message (a 403 would read as UNKNOWN /
/// INTERNAL), others 403 — closing the connection when it is denied at L3/L4,
/// as nothing on it will ever pass.
fn deny(
    ctx: &ConnContext,
    d: &crate::context::Decision,
    parts: &http::request::Parts,
    verdict: &weir_policy::Verdict,
    grpc_call: Option<flow::Grpc>,
    start: Instant,
) -> Reply {
    let (response, code, grpc_record) = match grpc_call {
        Some(mut g) => {
            let msg = format!("denied by weir policy: {}", verdict.reason());
            g.status = Some(grpc::Code::PermissionDenied as u32);
            g.message = Some(msg.clone());
            let r = grpc::status_response(grpc::Code::PermissionDenied, &msg);
            (r, StatusCode::OK, Some(g))
        }
        None => (
            deny_response(!d.verdict.l4_allowed()),
            StatusCode::FORBIDDEN,
            None,
        ),
    };
    let mut http = flow_http(parts, ctx, code);
    http.grpc = grpc_record;
    let f = ctx
        .flow(d, verdict)
        .with_http(L7Type::Request, elapsed_ns(start), http);
    ctx.shared.flows.emit(f);
    Ok(response)
}

/// The answer to a request refused before policy (malformed or ambiguous):
/// 400 and close, or for a gRPC call a trailers-only INTERNAL (gRPC's own
/// mapping of HTTP 400; PERMISSION_DENIED is only for policy), and its record.
fn refuse_before_policy(
    ctx: &ConnContext,
    d: &crate::context::Decision,
    parts: &http::request::Parts,
    is_grpc: bool,
    start: Instant,
    detail: &str,
) -> Reply {
    let (response, http) = if is_grpc {
        let message = format!("weir: request refused before policy: {detail}");
        let mut http = flow_http(parts, ctx, StatusCode::OK);
        let mut g = grpc_facts(parts.uri.path());
        g.status = Some(grpc::Code::Internal as u32);
        g.message = Some(message.clone());
        http.grpc = Some(g);
        (grpc::status_response(grpc::Code::Internal, &message), http)
    } else {
        let http = flow_http(parts, ctx, StatusCode::BAD_REQUEST);
        (error_response(StatusCode::BAD_REQUEST, detail, true), http)
    };
    let f = ctx
        .flow(d, &d.verdict.l4_verdict())
        .with_error(format!("MALFORMED_REQUEST: {detail}"))
        .with_http(L7Type::Request, elapsed_ns(start), http);
    ctx.shared.flows.emit(f);
    Ok(response)
}

/// The verdict on a request: its connection's at L3/L4 when that denies it or
/// has no L7 rules, else the HTTP rules' (with their `mismatch` actions).
fn request_verdict(
    d: &crate::context::Decision,
    facts: &weir_parsers::http::RequestFacts,
    headers: &HeaderMap,
) -> (weir_policy::Verdict, Vec<HeaderMismatch>) {
    let cv = &d.verdict;
    if !cv.l4_allowed() || !cv.needs_l7() {
        (cv.l4_verdict(), Vec::new())
    } else {
        cv.http_decision(&d.policy, facts, headers)
    }
}

/// A forwarded request whose response head has not come yet.
struct InFlight {
    ctx: Arc<ConnContext>,
    d: crate::context::Decision,
    start: Instant,
    /// Taken back when the response (or an upstream error) arrives.
    facts: Option<InFlightFacts>,
}

struct InFlightFacts {
    /// The request's record, its status still to come.
    http: flow::Http,
    verdict: weir_policy::Verdict,
    mismatches: Vec<HeaderMismatch>,
    grpc: Option<flow::Grpc>,
}

impl Drop for InFlight {
    /// The client gave up first (RST_STREAM, or closed): the request was
    /// allowed and forwarded, and its record says it was cancelled (gRPC: 1
    /// CANCELLED, as the client itself reports it).
    fn drop(&mut self) {
        let Some(facts) = self.facts.take() else {
            return;
        };
        let mut http = facts.http;
        // No response was produced.
        http.code = 0;
        http.header_mismatches = facts.mismatches;
        http.grpc = facts.grpc.map(|mut g| {
            g.status = Some(1);
            g.message = Some("cancelled by the client before the response".into());
            g
        });
        let mut f = self.ctx.flow(&self.d, &facts.verdict).with_http(
            L7Type::Request,
            elapsed_ns(self.start),
            http,
        );
        // Forwarded as policy allowed; the client ended it.
        f.drop_reason_desc = Some("CLIENT_CANCELLED".into());
        self.ctx.shared.flows.emit(f);
    }
}

/// The request headers as policy checks them and the server gets them:
/// connection-specific headers removed (never `Host` or one of `checked`, the
/// headers the rules name), and several field lines of a checked header joined
/// into the one value policy matches. `weir policy explain` uses it too.
///
/// Refuses (with the reason) a header whose name is a checked header's with `_`
/// for `-`: some servers read `X_Team` as `X-Team` (nginx with
/// `underscores_in_headers`, CGI-style variables), so which one they use is not
/// for policy to guess.
pub fn prepare_headers(headers: &mut HeaderMap, checked: &[&str]) -> Result<(), String> {
    if let Some(alias) = headers.keys().find(|k| {
        let name = k.as_str();
        name.contains('_') && checked.contains(&name.replace('_', "-").as_str())
    }) {
        return Err(format!(
            "header `{alias}` may be read as `{}`, which policy checks",
            alias.as_str().replace('_', "-")
        ));
    }
    upstream::strip_hop_by_hop(headers, checked);
    // `Upgrade` goes even when a rule names it: the switch puts its own line
    // back (see `switch_headers`), so a rule naming `Upgrade` sees one only on
    // a protocol switch, and a request weir does not switch (`Upgrade: h2c`,
    // one without `Connection: upgrade`) never asks the server to.
    headers.remove(header::UPGRADE);
    join_field_lines(headers, checked);
    Ok(())
}

/// A protocol switch's own header lines (`Upgrade`, `Connection: upgrade`)
/// for an HTTP/1.1 request: [`prepare_headers`] removes them, and the proxy puts
/// them back before the check (see `tunnel`), so `weir policy explain` does too.
/// Empty for CONNECT, `Upgrade: h2c` and every other request.
pub fn switch_headers(method: &http::Method, headers: &HeaderMap) -> HeaderMap {
    tunnel::Switch::requested(method, Version::HTTP_11, headers)
        .map(|s| s.headers())
        .unwrap_or_default()
}

/// Several field lines of a header policy checks become one line with the value
/// policy matched (joined with `,`, as Envoy matches them), so the server cannot
/// read another one of them than policy did.
fn join_field_lines(headers: &mut HeaderMap, names: &[&str]) {
    for name in names {
        if headers.get_all(*name).iter().nth(1).is_none() {
            continue;
        }
        let Some(joined) = joined_value(headers, name) else {
            continue;
        };
        // Joined valid values with `,` make a valid value; a failure leaves the
        // lines as they are (and policy matched their joined form, so nothing new
        // passes).
        if let (Ok(v), Ok(n)) = (
            HeaderValue::from_bytes(&joined),
            HeaderName::from_bytes(name.as_bytes()),
        ) {
            headers.insert(n, v);
        }
    }
}

/// Forwards the path as policy saw it, when its spelling differs only in the
/// case of escapes (`%c3` → `%C3`); any other difference was refused earlier.
fn use_checked_path(uri: &mut Uri, checked: &str) -> Result<(), String> {
    let Some(pq) = uri.path_and_query() else {
        return Ok(());
    };
    if pq.as_str() == checked || checked == "*" {
        return Ok(());
    }
    let mut p = uri.clone().into_parts();
    p.path_and_query = Some(
        checked
            .parse()
            .map_err(|e| format!("path {checked:?}: {e}"))?,
    );
    *uri = Uri::from_parts(p).map_err(|e| format!("path {checked:?}: {e}"))?;
    Ok(())
}

/// A 101 to a request weir did not forward as a switch is no switch (RFC 9110
/// §15.2.2: a server switches only to a protocol the request offered); relayed,
/// it would tell the client the connection now carries another protocol.
fn no_switch(
    ctx: &ConnContext,
    resp: Response<ProxyBody>,
) -> Result<Response<ProxyBody>, UpstreamError> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        info!("the server answered 101 to a request that asked for no switch; answering 502");
        return Err(UpstreamError::Failed(
            ctx.orig_dst.to_string(),
            "101 refused: the request asked for no switch".into(),
        ));
    }
    Ok(resp)
}

/// The switch a request still asks for once `mismatch` actions have changed
/// its headers (which hold the switch lines policy checked).
fn after_actions(parts: &http::request::Parts) -> Option<tunnel::Switch> {
    tunnel::Switch::requested(&parts.method, parts.version, &parts.headers)
}

/// Cilium's `mismatch` actions, on the request about to be forwarded: ADD
/// appends the required value, REPLACE sets it, DELETE removes the header, LOG
/// changes nothing. Rules were validated at load, so names and values are valid.
fn apply_mismatch_actions(headers: &mut HeaderMap, mismatches: &[HeaderMismatch]) {
    for m in mismatches {
        let Ok(name) = HeaderName::from_bytes(m.key.as_bytes()) else {
            continue;
        };
        let value = HeaderValue::from_str(m.required.as_deref().unwrap_or(""));
        match (m.action, value) {
            (MismatchAction::Log, _) => {}
            (MismatchAction::Delete, _) => {
                headers.remove(&name);
            }
            (MismatchAction::Add, Ok(v)) => {
                headers.append(name, v);
            }
            (MismatchAction::Replace, Ok(v)) => {
                headers.insert(name, v);
            }
            (MismatchAction::Add | MismatchAction::Replace, Err(_)) => {}
        }
    }
}

fn elapsed_ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mm(key: &str, required: Option<&str>, action: MismatchAction) -> HeaderMismatch {
        HeaderMismatch {
            key: key.into(),
            required: required.map(Into::into),
            found: None,
            action,
        }
    }

    #[test]
    fn mismatch_actions_decide_the_switch() {
        let ws = || {
            let mut p = http::Request::get("/ws")
                .header("upgrade", "websocket")
                .header("connection", "upgrade")
                .body(())
                .unwrap()
                .into_parts()
                .0;
            p.version = Version::HTTP_11;
            p
        };
        let upgrade = |v: &'static str| Some(tunnel::Switch::Upgrade(HeaderValue::from_static(v)));
        assert_eq!(after_actions(&ws()), upgrade("websocket"));
        let mut p = ws();
        apply_mismatch_actions(
            &mut p.headers,
            &[mm("upgrade", Some("chat"), MismatchAction::Delete)],
        );
        assert_eq!(after_actions(&p), None);
        let mut p = ws();
        apply_mismatch_actions(
            &mut p.headers,
            &[mm("upgrade", Some("chat"), MismatchAction::Replace)],
        );
        assert_eq!(after_actions(&p), upgrade("chat"));
        // Two `Upgrade` lines are no switch; neither is one without `Connection`.
        let mut p = ws();
        apply_mismatch_actions(
            &mut p.headers,
            &[mm("upgrade", Some("chat"), MismatchAction::Add)],
        );
        assert_eq!(after_actions(&p), None);
        let mut p = ws();
        apply_mismatch_actions(
            &mut p.headers,
            &[mm("connection", Some("close"), MismatchAction::Delete)],
        );
        assert_eq!(after_actions(&p), None);
    }

    #[test]
    fn checked_headers_are_forwarded_as_one_line() {
        let mut h = HeaderMap::new();
        h.append("x-team", "red".parse().unwrap());
        h.append("x-team", "blue".parse().unwrap());
        h.append("x-free", "a".parse().unwrap());
        h.append("x-free", "b".parse().unwrap());
        join_field_lines(&mut h, &["x-team"]);
        let team: Vec<_> = h.get_all("x-team").iter().collect();
        assert_eq!(team, vec!["red,blue"]);
        // Headers no rule names are left as they came.
        assert_eq!(h.get_all("x-free").iter().count(), 2);
    }

    #[test]
    fn mismatch_actions_edit_the_request() {
        let mut h = HeaderMap::new();
        h.append("x-add", "old".parse().unwrap());
        h.append("x-rep", "old".parse().unwrap());
        h.append("x-rep", "older".parse().unwrap());
        h.append("x-del", "bad".parse().unwrap());
        h.append("x-log", "odd".parse().unwrap());
        apply_mismatch_actions(
            &mut h,
            &[
                mm("x-add", Some("new"), MismatchAction::Add),
                mm("x-rep", Some("new"), MismatchAction::Replace),
                mm("x-rep-absent", Some("new"), MismatchAction::Replace),
                mm("x-del", Some("good"), MismatchAction::Delete),
                mm("x-log", Some("even"), MismatchAction::Log),
            ],
        );
        let all = |n: &str| {
            h.get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("x-add"), vec!["old", "new"]);
        assert_eq!(all("x-rep"), vec!["new"]);
        assert_eq!(all("x-rep-absent"), vec!["new"]);
        assert!(all("x-del").is_empty());
        assert_eq!(all("x-log"), vec!["odd"]);
    }

    #[test]
    fn the_checked_path_spelling_is_forwarded() {
        let mut u: Uri = "/caf%c3%a9?q=%2f".parse().unwrap();
        use_checked_path(&mut u, "/caf%C3%A9?q=%2f").unwrap();
        assert_eq!(u.to_string(), "/caf%C3%A9?q=%2f");
        let mut u: Uri = "http://svc.example/caf%c3%a9".parse().unwrap();
        use_checked_path(&mut u, "/caf%C3%A9").unwrap();
        assert_eq!(u.to_string(), "http://svc.example/caf%C3%A9");
    }
}
