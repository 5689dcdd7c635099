//! Forwarding to the original destination, bodies streamed both ways. The
//! upstream is always the connection's original destination, never anything taken
//! from `Host` or the request target. HTTP/1.1: each client connection keeps its
//! own upstream connections (from the client's address when steering allows), so
//! the server sees the real client and no two clients ever share a connection.
//! HTTP/2 (`h2_upstream`): one multiplexed connection per client address and
//! destination, shared by that client's connections.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::ProxyBody;
use super::h2_upstream::{H2Body, H2Failure, H2Pool};
use crate::ProxyConfig;
use crate::context::ConnContext;

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("upstream {0} refused or unreachable: {1}")]
    Unavailable(String, String),
    #[error("upstream {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("upstream {0} failed: {1}")]
    Failed(String, String),
    #[error("cannot build upstream request: {0}")]
    Request(String),
    /// The server reset the HTTP/2 stream (or refused it with GOAWAY): the client's
    /// stream is reset with the same reason.
    #[error("upstream {0} reset the stream: {1:?}")]
    Reset(String, h2::Reason),
    /// HTTP/2: this client cancelled more streams on the server this second than
    /// `--http2-max-resets-per-sec` (per client address and destination): the
    /// stream is refused (REFUSED_STREAM) before it reaches the server.
    #[error(
        "upstream {0}: the client reset more than {1} streams on it in a second (--http2-max-resets-per-sec, per client address and destination); stream refused"
    )]
    TooManyResets(String, u32),
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Failed(..) => StatusCode::BAD_GATEWAY,
            UpstreamError::Request(..) => StatusCode::BAD_REQUEST,
            UpstreamError::Reset(..) => StatusCode::BAD_GATEWAY,
            UpstreamError::TooManyResets(..) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn reason_code(&self) -> &'static str {
        match self {
            UpstreamError::Unavailable(..) => "UPSTREAM_UNAVAILABLE",
            UpstreamError::Timeout(..) => "UPSTREAM_TIMEOUT",
            UpstreamError::Failed(..) => "UPSTREAM_ERROR",
            UpstreamError::Request(..) => "MALFORMED_REQUEST",
            UpstreamError::Reset(..) => "UPSTREAM_RESET",
            UpstreamError::TooManyResets(..) => "HTTP2_TOO_MANY_RESETS",
        }
    }
}

pub struct Upstream {
    connect_timeout: Duration,
    response_timeout: Duration,
    /// Upstream connections kept per client connection.
    max_per_client: usize,
    /// HTTP/2 upstream connections, shared per (client address, destination).
    h2: Arc<H2Pool>,
}

/// A client connection's upstream connections (HTTP/1.1 to the server): at most
/// `--upstream-conns-per-client` open at once, a hard limit. A request that finds
/// them all busy waits for one rather than opening another.
pub struct UpstreamConns {
    /// Connections not lent to a request (some may still be finishing a response).
    pool: std::sync::Mutex<Vec<http1::SendRequest<Incoming>>>,
    /// One permit per open connection, held by the task that drives it.
    slots: Arc<Semaphore>,
    /// Signalled when a connection comes back to the pool or closes.
    changed: Arc<Notify>,
}

impl UpstreamConns {
    pub fn new(max: usize) -> Self {
        UpstreamConns {
            pool: std::sync::Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(max.max(1))),
            changed: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<http1::SendRequest<Incoming>>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The right to one open upstream connection; frees it (and wakes waiters) on drop.
struct Slot {
    _permit: OwnedSemaphorePermit,
    changed: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.changed.notify_waiters();
    }
}

impl Upstream {
    pub fn new(config: &ProxyConfig) -> Self {
        Upstream {
            connect_timeout: config.upstream_connect_timeout,
            response_timeout: config.upstream_timeout,
            max_per_client: config.upstream_conns_per_client.max(1),
            h2: Arc::new(H2Pool::new(config)),
        }
    }

    /// The response-head timeout: `--upstream-timeout`, or a gRPC call's own
    /// deadline when that is sooner.
    pub fn response_timeout(&self, call_deadline: Option<Duration>) -> Duration {
        call_deadline.map_or(self.response_timeout, |d| d.min(self.response_timeout))
    }

    /// Sends a request to the original destination: over HTTP/2 when it came
    /// over HTTP/2 and the server speaks it, else over HTTP/1.1. A gRPC call
    /// (`grpc`) never goes over HTTP/1.1: it needs trailers.
    pub async fn forward(
        &self,
        ctx: &ConnContext,
        req: Request<Incoming>,
        timeout: Duration,
        grpc: bool,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let mut req = req;
        if req.version() == Version::HTTP_2 {
            let not_http2 = || {
                UpstreamError::Unavailable(
                    ctx.orig_dst.to_string(),
                    "the server does not speak HTTP/2".into(),
                )
            };
            if self.h2.is_http1_only(ctx) {
                if grpc {
                    return Err(not_http2());
                }
                let (mut parts, body) = req.into_parts();
                super::h2_upstream::empty_body_length(&mut parts, body.is_end_stream());
                req = Request::from_parts(parts, body);
            } else {
                match self.h2.forward(ctx, req, timeout).await {
                    Ok((resp, lease)) => {
                        let (parts, recv) = resp.into_parts();
                        let body = H2Body::new(recv, lease);
                        return Ok(Response::from_parts(parts, ProxyBody::Http2(body)));
                    }
                    Err(H2Failure::Upstream(e)) => return Err(e),
                    Err(H2Failure::NotHttp2(_)) if grpc => return Err(not_http2()),
                    Err(H2Failure::NotHttp2(r)) => req = *r,
                }
            }
        }
        self.forward_http1(ctx, req, timeout).await
    }

    async fn forward_http1(
        &self,
        ctx: &ConnContext,
        req: Request<Incoming>,
        timeout: Duration,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let dst = ctx.orig_dst.to_string();
        let (mut parts, body) = req.into_parts();
        let downstream_http2 = parts.version == Version::HTTP_2;
        http1_head(&mut parts)?;
        strip_hop_by_hop(&mut parts.headers, &[]);
        let req = Request::from_parts(parts, body);
        // HTTP/1 requests come one at a time: wait for the connection the last one
        // used. HTTP/2 requests run side by side: take a free one or open another,
        // up to the cap (the wait for one counts towards the response timeout).
        let fut = self.send(ctx, req, !downstream_http2);
        let resp = match tokio::time::timeout(timeout, fut).await {
            Err(_) => return Err(UpstreamError::Timeout(dst, timeout)),
            Ok(r) => r?,
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, &[]);
        Ok(Response::from_parts(parts, ProxyBody::Http1(body)))
    }
}

/// Makes a request's head what an HTTP/1.1 server is sent.
fn http1_head(parts: &mut http::request::Parts) -> Result<(), UpstreamError> {
    // The target's authority is the host policy checked (HTTP/2's
    // `:authority`, HTTP/1's absolute form; a Host header beside it had to
    // agree): the server gets it as Host, whatever the version, or it would
    // route an origin-form request without Host to another virtual host.
    if !parts.headers.contains_key(header::HOST)
        && let Some(auth) = parts.uri.authority()
    {
        let v = auth
            .as_str()
            .parse()
            .map_err(|_| UpstreamError::Request("bad :authority".into()))?;
        parts.headers.insert(header::HOST, v);
    }
    // Our own connection is sent the origin form, as HTTP/1.1 requires; a
    // CONNECT keeps its authority-form target (the request's whole point).
    if parts.method != http::Method::CONNECT {
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        parts.uri = Uri::builder()
            .path_and_query(pq)
            .build()
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
    }
    // HTTP/1.0 stays HTTP/1.0 (its requests may lack Host, which HTTP/1.1
    // requires); HTTP/1.1 and HTTP/2 go out as HTTP/1.1.
    if parts.version != Version::HTTP_10 {
        parts.version = Version::HTTP_11;
    }
    Ok(())
}

impl Upstream {
    /// Sends a request that may switch protocols (an `Upgrade` or CONNECT) on
    /// an upstream connection of its own, never pooled: if the server switches,
    /// the connection becomes the tunnel's server leg. `switch_headers` (the
    /// `Upgrade` and `Connection: upgrade` lines) are sent although they are
    /// connection-specific: they are the request. Only the HTTP/1.1 request
    /// path calls this; the response is the server's, hop-by-hop headers and all.
    pub(super) async fn forward_switch(
        &self,
        ctx: &ConnContext,
        req: Request<Incoming>,
        switch_headers: HeaderMap,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let dst = ctx.orig_dst.to_string();
        let (mut parts, body) = req.into_parts();
        http1_head(&mut parts)?;
        strip_hop_by_hop(&mut parts.headers, &[]);
        parts.headers.extend(switch_headers);
        let req = Request::from_parts(parts, body);
        let send = async {
            let (mut sender, conn) = self.open(ctx).await?;
            // `with_upgrades`: on a switch the connection hands its socket to
            // `hyper::upgrade::on` instead of closing it.
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            });
            sender
                .send_request(req)
                .await
                .map_err(|e| UpstreamError::Failed(dst.clone(), e.to_string()))
        };
        match tokio::time::timeout(timeout, send).await {
            Err(_) => Err(UpstreamError::Timeout(ctx.orig_dst.to_string(), timeout)),
            Ok(r) => r,
        }
    }

    /// A new HTTP/1.1 connection to the original destination (from the client's
    /// address when steering allows), within `--upstream-connect-timeout`.
    async fn open(
        &self,
        ctx: &ConnContext,
    ) -> Result<
        (
            http1::SendRequest<Incoming>,
            http1::Connection<TokioIo<tokio::net::TcpStream>, Incoming>,
        ),
        UpstreamError,
    > {
        let dst = ctx.orig_dst.to_string();
        let connecting = crate::socket::connect_upstream_tcp(ctx.upstream_source, ctx.orig_dst);
        let stream = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => return Err(UpstreamError::Timeout(dst, self.connect_timeout)),
            Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(UpstreamError::Timeout(dst, self.connect_timeout));
            }
            Ok(Err(e)) => return Err(UpstreamError::Unavailable(dst, e.to_string())),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Failed(dst, e.to_string()))
    }

    /// A connection of this client connection's that can take a request now.
    /// With `wait_for_busy` (or when the cap is reached), one still finishing a
    /// response is waited for rather than opening another; with every connection
    /// lent to other requests and the cap reached, this waits for one to come
    /// back or close.
    async fn checkout(
        &self,
        ctx: &ConnContext,
        wait_for_busy: bool,
    ) -> Result<http1::SendRequest<Incoming>, UpstreamError> {
        let conns = &ctx.upstream;
        loop {
            let changed = conns.changed.notified();
            let mut changed = std::pin::pin!(changed);
            // Registered before looking, so a change in between is not missed.
            changed.as_mut().enable();
            let (candidate, slot) = {
                let mut pool = conns.lock();
                pool.retain(|c| !c.is_closed());
                if let Some(i) = pool.iter().position(|c| c.is_ready()) {
                    (Some(pool.swap_remove(i)), None)
                } else {
                    let slot = if wait_for_busy && !pool.is_empty() {
                        None
                    } else {
                        conns.slots.clone().try_acquire_owned().ok()
                    };
                    match slot {
                        Some(s) => (None, Some(s)),
                        None => (pool.pop(), None),
                    }
                }
            };
            match (candidate, slot) {
                (Some(mut c), _) => {
                    if c.ready().await.is_ok() {
                        return Ok(c);
                    }
                }
                (None, Some(permit)) => {
                    let slot = Slot {
                        _permit: permit,
                        changed: conns.changed.clone(),
                    };
                    return self.connect(ctx, slot).await;
                }
                (None, None) => changed.await,
            }
        }
    }

    fn checkin(&self, ctx: &ConnContext, conn: http1::SendRequest<Incoming>) {
        {
            let mut pool = ctx.upstream.lock();
            if pool.len() < self.max_per_client {
                pool.push(conn);
            }
        }
        ctx.upstream.changed.notify_waiters();
    }

    async fn send(
        &self,
        ctx: &ConnContext,
        mut req: Request<Incoming>,
        wait_for_busy: bool,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let dst = ctx.orig_dst.to_string();
        let mut sender = self.checkout(ctx, wait_for_busy).await?;
        // One retry, only for a request the old connection never wrote (e.g. the
        // server closed an idle keep-alive connection).
        for attempt in 0..2 {
            if sender.ready().await.is_err() {
                sender = self.checkout(ctx, wait_for_busy).await?;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.checkin(ctx, sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if attempt == 0 => {
                        req = unsent;
                        drop(sender);
                        sender = self.checkout(ctx, wait_for_busy).await?;
                    }
                    _ => {
                        let err = e.into_error();
                        return Err(UpstreamError::Failed(dst, err.to_string()));
                    }
                },
            }
        }
        Err(UpstreamError::Failed(
            dst,
            "upstream connection closed twice".into(),
        ))
    }

    async fn connect(
        &self,
        ctx: &ConnContext,
        slot: Slot,
    ) -> Result<http1::SendRequest<Incoming>, UpstreamError> {
        let (sender, conn) = self.open(ctx).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
            // The connection is closed: its slot is free.
            drop(slot);
        });
        Ok(sender)
    }
}

/// RFC 9110 §7.6.1: connection-specific headers are not forwarded. A name the
/// `Connection` header lists is removed unless it is `Host` or in `protected`
/// (the headers policy checks): a client cannot make weir drop what the policy
/// looked at.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, protected: &[&str]) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if name == header::HOST || protected.contains(&name.as_str()) {
            continue;
        }
        headers.remove(name);
    }
    // `te: trailers` is the one TE value HTTP/2 allows, and gRPC servers
    // require it; any other TE is connection-specific.
    let te_trailers = headers.get_all(header::TE).iter().count() == 1
        && headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(header::TE);
    }
    for name in [
        header::CONNECTION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_cannot_remove_host_or_checked_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "svc".parse().unwrap());
        h.insert("x-team", "blue".parse().unwrap());
        h.insert("x-other", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.append(header::CONNECTION, "Host, X-Team".parse().unwrap());
        h.append(header::CONNECTION, "x-other".parse().unwrap());
        strip_hop_by_hop(&mut h, &["x-team"]);
        assert_eq!(h.get(header::HOST).unwrap(), "svc");
        assert_eq!(h.get("x-team").unwrap(), "blue");
        assert!(h.get("x-other").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
    }
}
