//! Forwarding to the original destination through a keep-alive pool, bodies
//! streamed both ways. The upstream is always the connection's original
//! destination, never anything taken from `Host` or the request target.

use std::error::Error as _;
use std::io;
use std::time::Duration;

use http::{HeaderMap, HeaderName, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use thiserror::Error;

use super::ProxyBody;
use crate::ProxyConfig;
use crate::listener::ConnContext;

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
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Failed(..) => StatusCode::BAD_GATEWAY,
            UpstreamError::Request(..) => StatusCode::BAD_REQUEST,
        }
    }

    pub fn reason_code(&self) -> &'static str {
        match self {
            UpstreamError::Unavailable(..) => "UPSTREAM_UNAVAILABLE",
            UpstreamError::Timeout(..) => "UPSTREAM_TIMEOUT",
            UpstreamError::Failed(..) => "UPSTREAM_ERROR",
            UpstreamError::Request(..) => "MALFORMED_REQUEST",
        }
    }
}

pub struct Upstream {
    client: Client<HttpConnector, Incoming>,
    upstream_mark: Option<u32>,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl Upstream {
    pub fn new(config: &ProxyConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.upstream_connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_upstream)
            .build(connector);
        Upstream {
            client,
            upstream_mark: config.upstream_mark,
            connect_timeout: config.upstream_connect_timeout,
            response_timeout: config.upstream_timeout,
        }
    }

    pub async fn forward(
        &self,
        ctx: &ConnContext,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let dst = ctx.orig_dst.to_string();
        let (mut parts, body) = req.into_parts();
        if parts.version == Version::HTTP_2
            && !parts.headers.contains_key(header::HOST)
            && let Some(auth) = parts.uri.authority()
        {
            {
                let v = auth
                    .as_str()
                    .parse()
                    .map_err(|_| UpstreamError::Request("bad :authority".into()))?;
                parts.headers.insert(header::HOST, v);
            }
        }
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let downstream_http2 = parts.version == Version::HTTP_2;
        // The pool wants an absolute URI (it picks the connection by authority);
        // a connection of our own is sent the origin form, as HTTP/1.1 requires.
        parts.uri = if downstream_http2 {
            Uri::builder()
                .scheme("http")
                .authority(dst.as_str())
                .path_and_query(pq)
                .build()
        } else {
            Uri::builder().path_and_query(pq).build()
        }
        .map_err(|e| UpstreamError::Request(e.to_string()))?;
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        let req = Request::from_parts(parts, body);
        let resp = if downstream_http2 {
            // Multiplexed requests share the pool.
            let fut = self.client.request(req);
            match tokio::time::timeout(self.response_timeout, fut).await {
                Err(_) => return Err(UpstreamError::Timeout(dst, self.response_timeout)),
                Ok(Err(e)) => return Err(classify(dst, &e, self.connect_timeout)),
                Ok(Ok(r)) => r,
            }
        } else {
            let fut = self.sticky(ctx, req);
            match tokio::time::timeout(self.response_timeout, fut).await {
                Err(_) => return Err(UpstreamError::Timeout(dst, self.response_timeout)),
                Ok(r) => r?,
            }
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, Either::Left(body)))
    }
}

impl Upstream {
    /// HTTP/1 requests on one client connection come one at a time, so each client
    /// connection keeps its own upstream connection: it is always free when the
    /// next request arrives (a shared pool can race and open a new one), and the
    /// upstream is keyed by (client, original destination) by construction.
    async fn sticky(
        &self,
        ctx: &ConnContext,
        mut req: Request<Incoming>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let dst = ctx.orig_dst.to_string();
        let kept = ctx
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|s| !s.is_closed());
        let mut sender = match kept {
            Some(s) => s,
            None => self.connect(ctx).await?,
        };
        // One retry, only for a request the old connection never wrote (e.g. the
        // server closed an idle keep-alive connection).
        for attempt in 0..2 {
            if sender.ready().await.is_err() {
                sender = self.connect(ctx).await?;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    *ctx.upstream.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if attempt == 0 => {
                        req = unsent;
                        sender = self.connect(ctx).await?;
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
    ) -> Result<http1::SendRequest<Incoming>, UpstreamError> {
        let dst = ctx.orig_dst.to_string();
        let connecting =
            crate::socket::connect_upstream_tcp(ctx.client.ip(), ctx.orig_dst, self.upstream_mark);
        let stream = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => return Err(UpstreamError::Timeout(dst, self.connect_timeout)),
            Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(UpstreamError::Timeout(dst, self.connect_timeout));
            }
            Ok(Err(e)) => return Err(UpstreamError::Unavailable(dst, e.to_string())),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Failed(dst, e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

fn classify(
    dst: String,
    e: &hyper_util::client::legacy::Error,
    connect_timeout: Duration,
) -> UpstreamError {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>()
            && io.kind() == io::ErrorKind::TimedOut
        {
            return UpstreamError::Timeout(dst, connect_timeout);
        }
        source = s.source();
    }
    let detail = match e.source() {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    };
    if e.is_connect() {
        UpstreamError::Unavailable(dst, detail)
    } else {
        UpstreamError::Failed(dst, detail)
    }
}

/// RFC 9110 §7.6.1: connection-specific headers are not forwarded.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
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
