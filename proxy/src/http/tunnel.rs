//! HTTP/1.1 protocol switches: an `Upgrade` (WebSocket or any protocol but
//! h2c) and CONNECT. The request is decided like any other; once allowed it
//! goes to the server on a connection of its own, and if the server switches
//! (101 to an upgrade, 2xx to CONNECT) both legs carry opaque bytes. A tunnel
//! ends when either side closes, when no byte has moved either way for
//! `--tcp-idle-timeout` (it is a splice now, not HTTP), or when a new policy no
//! longer allows the request that opened it (decided again at every change).
//! A server that does not switch answers an ordinary response, relayed as
//! usual, and the connection stays HTTP.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, copy_bidirectional};
use tracing::{debug, info};
use weir_parsers::http::RequestFacts;
use weir_policy::flow::{self, FlowVerdict};

use super::{ProxyBody, UpstreamError, request_verdict, upstream::strip_hop_by_hop};
use crate::context::{ConnContext, Decision};
use crate::idle::{ActiveIo, Activity};

/// What a request asks to switch to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Switch {
    /// `Upgrade` with these protocols (the header's value, as sent).
    Upgrade(HeaderValue),
    Connect,
}

impl Switch {
    /// The switch an HTTP/1 request asks for, if any. An `Upgrade` counts only
    /// on HTTP/1.1 with `Connection: upgrade` (RFC 9110 §7.8) and when none of
    /// its protocols is HTTP/2: `Upgrade: h2c` is ignored (RFC 9113 deprecates
    /// it; the request is answered in HTTP/1.1), and a list offering h2c beside
    /// another protocol could let the server pick h2c, whose requests policy
    /// would never see. HTTP/2 counts by prefix: the drafts' `h2c-14`, `h2c-16`
    /// and `HTTP/2.0` are refused the same way.
    pub(super) fn requested(
        method: &Method,
        version: Version,
        headers: &HeaderMap,
    ) -> Option<Switch> {
        if version == Version::HTTP_2 {
            return None;
        }
        if *method == Method::CONNECT {
            return Some(Switch::Connect);
        }
        if version != Version::HTTP_11 || !lists(headers, header::CONNECTION, "upgrade") {
            return None;
        }
        let mut values = headers.get_all(header::UPGRADE).iter();
        let (value, None) = (values.next()?, values.next()) else {
            return None;
        };
        let protocols = tokens(value.as_bytes());
        let is_h2c = |p: &&[u8]| starts_with_ci(p, b"h2c") || starts_with_ci(p, b"http/2");
        if protocols.is_empty() || protocols.iter().any(is_h2c) {
            return None;
        }
        Some(Switch::Upgrade(value.clone()))
    }

    /// The connection-specific lines that carry the switch: weir's header
    /// hygiene removes them from every other request; here they are the request.
    pub(super) fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Switch::Upgrade(protocols) = self {
            h.insert(header::UPGRADE, protocols.clone());
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        h
    }

    /// Whether the server's 101 switched as the request asked (RFC 9110 §7.8,
    /// RFC 6455 §4.1): its `Upgrade` names only protocols the request offered,
    /// its `Connection` lists `upgrade`, and a WebSocket's `Sec-WebSocket-Accept`
    /// proves the server read this request's `Sec-WebSocket-Key`. A bare 101
    /// could be a status a server echoes from a URL parameter: switching on it
    /// would splice every later request on the connection past policy.
    fn check_101(&self, key: Option<&HeaderValue>, response: &HeaderMap) -> Result<(), String> {
        let Switch::Upgrade(offered) = self else {
            return Err("a CONNECT is answered 2xx, not 101".into());
        };
        let mut lines = response.get_all(header::UPGRADE).iter();
        let (Some(chosen), None) = (lines.next(), lines.next()) else {
            return Err("the 101 has no single Upgrade line".into());
        };
        let chosen = tokens(chosen.as_bytes());
        if chosen.is_empty() {
            return Err("the 101's Upgrade names no protocol".into());
        }
        let offered = tokens(offered.as_bytes());
        if let Some(p) = chosen
            .iter()
            .find(|c| !offered.iter().any(|o| o.eq_ignore_ascii_case(c)))
        {
            return Err(format!(
                "the 101 switches to {:?}, which the request did not offer",
                String::from_utf8_lossy(p)
            ));
        }
        if !lists(response, header::CONNECTION, "upgrade") {
            return Err("the 101's Connection does not list upgrade".into());
        }
        if chosen.iter().any(|p| p.eq_ignore_ascii_case(b"websocket")) {
            let Some(key) = key else {
                return Err("WebSocket upgrade without Sec-WebSocket-Key".into());
            };
            let want = websocket_accept(key.as_bytes());
            let mut accepts = response.get_all(header::SEC_WEBSOCKET_ACCEPT).iter();
            match (accepts.next(), accepts.next()) {
                (Some(a), None) if a.as_bytes().trim_ascii() == want.as_bytes() => {}
                _ => return Err("the 101's Sec-WebSocket-Accept does not answer the key".into()),
            }
        }
        Ok(())
    }

    fn accepted(&self, status: StatusCode) -> bool {
        match self {
            Switch::Upgrade(_) => status == StatusCode::SWITCHING_PROTOCOLS,
            Switch::Connect => status.is_success(),
        }
    }

    fn name(&self) -> String {
        match self {
            Switch::Upgrade(p) => format!("upgrade ({})", String::from_utf8_lossy(p.as_bytes())),
            Switch::Connect => "CONNECT".into(),
        }
    }
}

/// The non-empty, trimmed tokens of a comma-separated value.
fn tokens(value: &[u8]) -> Vec<&[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|p| !p.is_empty())
        .collect()
}

fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
}

/// The `Sec-WebSocket-Accept` a server owes a `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
fn websocket_accept(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key.trim_ascii());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Whether a comma-separated header lists `token` (case-insensitive).
fn lists(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Where a request that switched leaves its tunnel: the client connection's
/// task runs it once hyper has handed over the socket.
pub(super) type Parked = Arc<Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>>;

/// An allowed request that asks to switch, with what deciding it again needs.
pub(super) struct SwitchRequest {
    pub switch: Switch,
    /// The client connection, once hyper has written the switch response.
    pub client: OnUpgrade,
    pub conn: super::Http1Conn,
    /// The facts and headers policy decided on (before any `mismatch` action).
    pub facts: RequestFacts,
    pub headers: HeaderMap,
    /// The decision and verdict that allowed it, for the tunnel's record.
    pub decision: Decision,
    pub verdict: weir_policy::Verdict,
    pub http: flow::Http,
}

/// Forwards the request; on a switch, answers the client with the server's
/// switch response and starts the tunnel once both sides have switched.
pub(super) async fn forward(
    ctx: &Arc<ConnContext>,
    req: Request<Incoming>,
    sr: SwitchRequest,
    timeout: std::time::Duration,
) -> Result<Response<ProxyBody>, UpstreamError> {
    let upstream = &ctx.shared.upstream;
    // The key is read as sent (after any `mismatch` action), for the 101's check.
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let mut resp = upstream
        .forward_switch(ctx, req, sr.switch.headers(), timeout)
        .await?;
    let status = resp.status();
    if status == StatusCode::SWITCHING_PROTOCOLS
        && let Err(why) = sr.switch.check_101(key.as_ref(), resp.headers())
    {
        // Dropping the response drops the server's connection unswitched: nothing
        // is spliced, and the client's connection stays HTTP.
        info!(switch = %sr.switch.name(), %why, "the server's 101 did not switch as asked; answering 502");
        return Err(UpstreamError::Failed(
            ctx.orig_dst.to_string(),
            format!("101 refused: {why}"),
        ));
    }
    if !sr.switch.accepted(status) {
        // An ordinary response: relayed as usual, and the connection stays HTTP.
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, &[]);
        return Ok(Response::from_parts(parts, ProxyBody::Http1(body)));
    }
    let server = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    // The server's answer names the protocol it switched to; the client needs
    // those lines, and nothing else connection-specific.
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers, &[]);
    parts.headers.remove(header::CONTENT_LENGTH);
    if let Switch::Upgrade(_) = sr.switch {
        if let Some(u) = upgrade {
            parts.headers.insert(header::UPGRADE, u);
        }
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // What the client sends from here on is not HTTP/1 requests.
    sr.conn
        .tracker
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .switched();
    let SwitchRequest {
        switch,
        client,
        conn,
        facts,
        headers,
        decision,
        verdict,
        mut http,
        ..
    } = sr;
    http.code = status.as_u16();
    let t = Tunnel {
        ctx: ctx.clone(),
        switch,
        facts,
        headers,
        decision,
        verdict,
        http,
    };
    let tunnel = Box::pin(async move {
        // The client's side switches once hyper has written the response below.
        match tokio::try_join!(client, server) {
            Ok((client, server)) => t.run(client, server).await,
            Err(e) => debug!(error = %e, "a side did not switch; no tunnel"),
        }
    });
    *conn.tunnel.lock().unwrap_or_else(|p| p.into_inner()) = Some(tunnel);
    Ok(Response::from_parts(
        parts,
        ProxyBody::Own(Full::new(Bytes::new())),
    ))
}

/// Both legs of a switched connection, and what its record and re-decisions need.
struct Tunnel {
    ctx: Arc<ConnContext>,
    switch: Switch,
    facts: RequestFacts,
    headers: HeaderMap,
    decision: Decision,
    verdict: weir_policy::Verdict,
    http: flow::Http,
}

/// How a tunnel ended, for its record.
enum End {
    Closed,
    Failed(io::Error),
    Idle(std::time::Duration),
    Revoked(weir_policy::Verdict, Decision),
    Shutdown,
}

impl Tunnel {
    async fn run(self, client: hyper::upgrade::Upgraded, server: hyper::upgrade::Upgraded) {
        let start = Instant::now();
        // Every byte either way is read from or written to the client side.
        let activity = Activity::new();
        let counts = Arc::new(Counts::default());
        let mut client = ActiveIo::new(
            Counted {
                inner: TokioIo::new(client),
                counts: counts.clone(),
            },
            activity.clone(),
        );
        let mut server = TokioIo::new(server);
        let idle = self.ctx.shared.config.tcp_idle_timeout;
        let mut policy_changes = self.ctx.shared.policy_changes();
        let end = {
            let copy = copy_bidirectional(&mut client, &mut server);
            let mut copy = std::pin::pin!(copy);
            let mut check_at = activity.last() + idle;
            // The policy may have changed since the request was decided (the
            // check is cheap when it has not: the decision is cached per policy).
            let mut changed = true;
            loop {
                if std::mem::take(&mut changed) {
                    let d = self.ctx.decide();
                    let (v, _) = request_verdict(&d, &self.facts, &self.headers);
                    if !v.allowed {
                        break End::Revoked(v, d);
                    }
                }
                tokio::select! {
                    r = copy.as_mut() => break match r {
                        Ok(_) => End::Closed,
                        Err(e) => End::Failed(e),
                    },
                    r = policy_changes.changed() => {
                        // The sender lives as long as `Shared`; an error means shutdown.
                        if r.is_err() {
                            break End::Shutdown;
                        }
                        changed = true;
                    }
                    () = tokio::time::sleep_until(check_at) => {
                        let quiet_until = activity.last() + idle;
                        if quiet_until > tokio::time::Instant::now() {
                            check_at = quiet_until;
                        } else {
                            break End::Idle(idle);
                        }
                    }
                }
            }
        };
        self.record(&end, &counts, start);
    }

    /// The tunnel's record, when it ends: a connection record (the request
    /// has its own, and metrics count one record per request) whose summary
    /// says how it ended, the bytes each way (the flow schema has no byte
    /// counters) and the request that opened it.
    fn record(self, end: &End, counts: &Counts, start: Instant) {
        let up = counts.read.load(Ordering::Relaxed);
        let down = counts.written.load(Ordering::Relaxed);
        let (why, d, verdict) = match end {
            End::Closed => ("closed".to_string(), &self.decision, &self.verdict),
            End::Failed(e) => (format!("failed ({e})"), &self.decision, &self.verdict),
            End::Idle(t) => (
                format!("closed: idle for {t:?}"),
                &self.decision,
                &self.verdict,
            ),
            End::Shutdown => (
                "closed: weir shut down".to_string(),
                &self.decision,
                &self.verdict,
            ),
            End::Revoked(v, d) => (
                format!(
                    "closed: the new policy no longer allows it ({})",
                    v.reason()
                ),
                d,
                v,
            ),
        };
        let kind = self.switch.name();
        info!(tunnel = %kind, bytes_up = up, bytes_down = down, "tunnel {why}");
        let mut f = self.ctx.flow(d, verdict);
        if let End::Revoked(..) = end {
            f.verdict = FlowVerdict::Dropped;
            f.drop_reason_desc = Some("POLICY_DENIED".into());
            f.policy = format!("policy change: {}", f.policy);
        }
        f.summary = format!(
            "{kind} tunnel {why}: {up} bytes to the server, {down} bytes to the client, \
             after {:.3} s ({} {} => {})",
            start.elapsed().as_secs_f64(),
            self.http.method,
            self.http.url,
            self.http.code
        );
        self.ctx.shared.flows.emit(f);
    }
}

/// Bytes read from and written to one side.
#[derive(Default)]
struct Counts {
    read: AtomicU64,
    written: AtomicU64,
}

struct Counted<T> {
    inner: T,
    counts: Arc<Counts>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counts.read.fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counts.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, version: Version, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = Request::builder().method(method).uri("/").version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn requested(p: &http::request::Parts) -> Option<Switch> {
        Switch::requested(&p.method, p.version, &p.headers)
    }

    #[test]
    fn which_requests_ask_to_switch() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        assert_eq!(
            requested(&parts("GET", Version::HTTP_11, &ws)),
            Some(Switch::Upgrade(HeaderValue::from_static("websocket")))
        );
        // Not without `Connection: upgrade`, not on HTTP/1.0 or HTTP/2.
        assert_eq!(
            requested(&parts("GET", Version::HTTP_11, &[("upgrade", "websocket")])),
            None
        );
        assert_eq!(requested(&parts("GET", Version::HTTP_10, &ws)), None);
        assert_eq!(requested(&parts("GET", Version::HTTP_2, &ws)), None);
        // h2c, alone or offered beside another protocol, is ignored.
        for up in [
            "h2c",
            "websocket, H2C",
            "h2c/1",
            "h2c-14",
            "H2C-16",
            "HTTP/2.0",
            "http/2",
        ] {
            let h = [("connection", "upgrade"), ("upgrade", up)];
            assert_eq!(requested(&parts("GET", Version::HTTP_11, &h)), None, "{up}");
        }
        assert_eq!(
            requested(&parts("CONNECT", Version::HTTP_11, &[])),
            Some(Switch::Connect)
        );
    }

    #[test]
    fn a_101_must_answer_the_request() {
        // RFC 6455 §1.3's example.
        let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
        let good = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
        assert_eq!(websocket_accept(key.as_bytes()), good);
        let ws = Switch::Upgrade(HeaderValue::from_static("websocket"));
        let resp = |h: &[(&str, &str)]| parts("GET", Version::HTTP_11, h).headers;
        let ok = resp(&[
            ("upgrade", "WebSocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", good),
        ]);
        assert_eq!(ws.check_101(Some(&key), &ok), Ok(()));
        // No key to answer, or a wrong, missing or doubled answer.
        assert!(ws.check_101(None, &ok).is_err());
        for accept in [&[][..], &[good, good][..], &["AAAA"][..]] {
            let mut h = resp(&[("upgrade", "websocket"), ("connection", "upgrade")]);
            for a in accept {
                h.append("sec-websocket-accept", HeaderValue::from_static(a));
            }
            assert!(ws.check_101(Some(&key), &h).is_err(), "{accept:?}");
        }
        // A bare 101, one without `Connection: upgrade`, one to another protocol.
        let bad = [
            resp(&[]),
            resp(&[("upgrade", "websocket"), ("sec-websocket-accept", good)]),
            resp(&[
                ("upgrade", "h2c"),
                ("connection", "upgrade"),
                ("sec-websocket-accept", good),
            ]),
        ];
        for h in bad {
            assert!(ws.check_101(Some(&key), &h).is_err(), "{h:?}");
        }
        // Other protocols: any one the request offered, no key needed.
        let other = Switch::Upgrade(HeaderValue::from_static("foo/2, bar"));
        let h = resp(&[("upgrade", "BAR"), ("connection", "upgrade")]);
        assert_eq!(other.check_101(None, &h), Ok(()));
        let h = resp(&[("upgrade", "foo"), ("connection", "upgrade")]);
        assert!(other.check_101(None, &h).is_err());
        assert!(Switch::Connect.check_101(None, &resp(&[])).is_err());
    }

    #[test]
    fn what_counts_as_switched() {
        let ws = Switch::Upgrade(HeaderValue::from_static("websocket"));
        assert!(ws.accepted(StatusCode::SWITCHING_PROTOCOLS));
        assert!(!ws.accepted(StatusCode::OK));
        assert!(Switch::Connect.accepted(StatusCode::OK));
        assert!(!Switch::Connect.accepted(StatusCode::FORBIDDEN));
        assert_eq!(ws.headers().get("upgrade").unwrap(), "websocket");
        assert!(Switch::Connect.headers().is_empty());
    }
}
