//! HTTP/2 to the server (h2c prior knowledge), on the `h2` crate: hyper's client
//! hides RST_STREAM codes and GOAWAY, which a proxy must pass on.
//!
//! Connections are shared: one multiplexed connection per (client address,
//! original destination), used by every downstream connection of that client and
//! opened from the client's address like HTTP/1's. Another one opens only when
//! every connection has as many streams open as the server's
//! SETTINGS_MAX_CONCURRENT_STREAMS allows (at most `--upstream-conns-per-client`;
//! beyond, h2 queues the stream until one ends).
//!
//! Flow control uses fixed windows (`--http2-stream-window`,
//! `--http2-connection-window`), never adaptive ones: a response's bytes are
//! released to the server's window only as the client side takes them, and a
//! request's bytes are read from the client only as the server's window allows, so
//! a slow reader stops its sender instead of growing weir's buffers. (A body
//! already received whole, one DATA frame with END_STREAM, is queued behind its
//! HEADERS at once: one write, no pump task; see `pump::start`.)
//!
//! A server that answers the preface in HTTP/1 (`HTTP/1.`: an HTTP/1-only
//! server) is remembered for a minute per pool key (`http1_marks`); meanwhile
//! that client's HTTP/2 requests to it go as HTTP/1.1, except gRPC calls, which
//! need trailers (UNAVAILABLE). Any other answer (or none) fails the request as
//! unavailable and marks nothing.
//!
//! A checkout (waiting for the pool key's lock, connecting, the probe) has one
//! deadline, `--upstream-connect-timeout` or the request's own timeout if sooner:
//! past it the request is UNAVAILABLE (503, gRPC 14).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;
use h2::client::SendRequest;
use http::{HeaderValue, Request, Response, Uri, header, request};
use hyper::body::{Body, Incoming};
use tokio::sync::oneshot;
use tracing::debug;

mod body;
mod http1_marks;
mod pump;
mod resets;
mod sniff;

pub use body::{H2Body, OnEnd};
use http1_marks::{HTTP1_ONLY_FOR, Http1Marks};
pub use pump::CheckedHeaderNames;
use resets::ResetBudget;
use sniff::{FirstBytes, SniffIo};

use super::UpstreamError;
use crate::ProxyConfig;
use crate::context::ConnContext;
use crate::socket::UpstreamSource;

/// Upstream connections are shared by the downstream connections of one client
/// address to one destination (and source kind: the client's address or the node's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PoolKey {
    source: Option<IpAddr>,
    dst: SocketAddr,
}

impl PoolKey {
    fn of(ctx: &ConnContext) -> Self {
        let source = match ctx.upstream_source {
            UpstreamSource::Client(ip, _) => Some(ip),
            UpstreamSource::Node => None,
        };
        // Node-sourced connections are still kept per client: the server's
        // per-connection state (and limits) must not mix clients.
        PoolKey {
            source: source.or(Some(ctx.client.ip())),
            dst: ctx.orig_dst,
        }
    }
}

/// Where a checkout's connection goes and leaves from.
#[derive(Debug, Clone, Copy)]
struct Target {
    key: PoolKey,
    source: UpstreamSource,
    dst: SocketAddr,
}

impl Target {
    fn of(ctx: &ConnContext) -> Self {
        Target {
            key: PoolKey::of(ctx),
            source: ctx.upstream_source,
            dst: ctx.orig_dst,
        }
    }
}

/// A pool key's connections, and the streams its client cancelled on them.
struct KeySlot {
    conns: tokio::sync::Mutex<Vec<Arc<H2Conn>>>,
    resets: Arc<ResetBudget>,
}

type Slot = Arc<KeySlot>;

pub struct H2Pool {
    /// A key is here only while a checkout uses it or it has a connection.
    slots: Mutex<HashMap<PoolKey, Slot>>,
    http1_only: Mutex<Http1Marks<PoolKey>>,
    next_id: AtomicU64,
    stream_window: u32,
    conn_window: u32,
    max_header_list: u32,
    max_conns: usize,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// `--http2-max-resets-per-sec`, also per pool key (`resets`).
    reset_limit: u32,
}

/// One upstream HTTP/2 connection.
struct H2Conn {
    id: u64,
    send: SendRequest<Bytes>,
    /// Streams weir has open on it (the server's limit is compared to this).
    active: AtomicUsize,
    /// Streams ever opened (the idle check compares it between ticks).
    opened: AtomicU64,
    /// The connection ended or received GOAWAY: no new streams.
    closed: AtomicBool,
    /// Its pool key's budget of client cancels.
    resets: Arc<ResetBudget>,
}

/// A stream's claim on its connection, released when the response is over.
/// Released before [`StreamLease::settle`], the client cancelled the stream
/// (weir resets it on the server): that counts against the key's budget.
pub struct StreamLease {
    conn: Arc<H2Conn>,
    settled: bool,
}

impl StreamLease {
    /// The connection got GOAWAY or failed: no new streams on it.
    fn retire(&self) {
        self.conn.closed.store(true, Ordering::Relaxed);
    }

    /// The stream ended by the server's doing or weir's, not the client's.
    fn settle(&mut self) {
        self.settled = true;
    }
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.conn.active.fetch_sub(1, Ordering::Relaxed);
        if !self.settled {
            self.conn.resets.count(Instant::now());
        }
    }
}

/// Why a request could not go over HTTP/2.
pub enum H2Failure {
    /// The server does not speak HTTP/2: send it HTTP/1.1 (the request is intact).
    NotHttp2(Box<Request<Incoming>>),
    Upstream(UpstreamError),
}

impl From<UpstreamError> for H2Failure {
    fn from(e: UpstreamError) -> Self {
        H2Failure::Upstream(e)
    }
}

impl H2Pool {
    pub fn new(config: &ProxyConfig) -> Self {
        H2Pool {
            slots: Mutex::new(HashMap::new()),
            http1_only: Mutex::new(Http1Marks::new(HTTP1_ONLY_FOR)),
            next_id: AtomicU64::new(0),
            stream_window: config.http2_stream_window,
            conn_window: config.http2_connection_window,
            max_header_list: u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX),
            max_conns: config.upstream_conns_per_client.max(1),
            connect_timeout: config.upstream_connect_timeout,
            idle_timeout: config.idle_timeout,
            reset_limit: config.http2_max_resets_per_sec,
        }
    }

    /// The destination answered this client's HTTP/2 preface in HTTP/1 lately.
    pub fn is_http1_only(&self, ctx: &ConnContext) -> bool {
        self.marked(PoolKey::of(ctx))
    }

    fn marked(&self, key: PoolKey) -> bool {
        let mut m = self.http1_only.lock().unwrap_or_else(|p| p.into_inner());
        m.is_marked(key, Instant::now())
    }

    fn slot(&self, key: PoolKey) -> Slot {
        let mut m = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key)
            .or_insert_with(|| {
                Arc::new(KeySlot {
                    conns: tokio::sync::Mutex::new(Vec::new()),
                    resets: Arc::new(ResetBudget::new(self.reset_limit)),
                })
            })
            .clone()
    }

    /// Removes `key`'s slot when no checkout but the caller's holds it and it
    /// has no open connection left (so keys do not pile up, one per client and
    /// destination ever seen). Never waits for the slot's lock.
    fn release_slot(&self, key: PoolKey, slot: &Slot) {
        let mut m = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let Some(current) = m.get(&key) else { return };
        // The map's reference and the caller's: nobody else is waiting on it.
        if !Arc::ptr_eq(current, slot) || Arc::strong_count(slot) > 2 {
            return;
        }
        let Ok(mut conns) = slot.conns.try_lock() else {
            return;
        };
        conns.retain(|c| !c.closed.load(Ordering::Relaxed));
        let empty = conns.is_empty();
        drop(conns);
        if empty {
            m.remove(&key);
        }
    }

    /// Drops a finished connection from its slot, and the slot once empty.
    fn forget(&self, key: PoolKey, id: u64) {
        let mut m = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = m.get(&key) else { return };
        // A checkout holding the slot's lock prunes closed connections itself.
        let Ok(mut conns) = slot.conns.try_lock() else {
            return;
        };
        conns.retain(|c| c.id != id);
        let empty = conns.is_empty();
        drop(conns);
        if empty {
            m.remove(&key);
        }
    }

    /// [`H2Pool::checkout`] within `limit` (the wait for the key's lock, the
    /// connect and the probe together); past it the server is unavailable.
    async fn checkout_within(
        self: &Arc<Self>,
        t: Target,
        limit: Duration,
    ) -> Result<StreamLease, Checkout> {
        match tokio::time::timeout(limit, self.checkout(t)).await {
            Ok(r) => r,
            Err(_) => Err(Checkout::Failed(UpstreamError::Unavailable(
                t.dst.to_string(),
                format!("no HTTP/2 connection within {limit:?}"),
            ))),
        }
    }

    /// A connection with room for one more stream, opened if needed.
    async fn checkout(self: &Arc<Self>, t: Target) -> Result<StreamLease, Checkout> {
        let key = t.key;
        // Declared before the lock's guard, so dropped after it (also when the
        // checkout is cancelled): the key goes if nothing came of it.
        let held = HeldSlot {
            pool: self,
            key,
            slot: self.slot(key),
        };
        // This client cancelled too many streams on the server this second.
        if held.slot.resets.exhausted(Instant::now()) {
            return Err(Checkout::Failed(UpstreamError::TooManyResets(
                t.dst.to_string(),
                held.slot.resets.limit(),
            )));
        }
        // Held while connecting: concurrent streams wait for this connection
        // rather than each opening their own.
        let mut conns = held.slot.conns.lock().await;
        // Streams that waited for a probe that found HTTP/1 do not probe again.
        if self.marked(key) {
            return Err(Checkout::NotHttp2);
        }
        conns.retain(|c| !c.closed.load(Ordering::Relaxed));
        let least_loaded = |conns: &[Arc<H2Conn>], with_room: bool| {
            conns
                .iter()
                .filter(|c| {
                    !with_room
                        || c.active.load(Ordering::Relaxed) < c.send.current_max_send_streams()
                })
                .min_by_key(|c| c.active.load(Ordering::Relaxed))
                .cloned()
        };
        let conn = match least_loaded(&conns, true) {
            Some(c) => c,
            None if conns.len() < self.max_conns => {
                let resets = held.slot.resets.clone();
                let c = self.connect(t, !conns.is_empty(), resets).await?;
                conns.push(c.clone());
                c
            }
            // Every connection is full and no more may open: h2 queues the
            // stream on the least loaded one until a stream there ends.
            None => least_loaded(&conns, false).ok_or(Checkout::Failed(UpstreamError::Failed(
                t.dst.to_string(),
                "no upstream connection".into(),
            )))?,
        };
        conn.active.fetch_add(1, Ordering::Relaxed);
        conn.opened.fetch_add(1, Ordering::Relaxed);
        Ok(StreamLease {
            conn,
            settled: false,
        })
    }

    /// Opens a connection and probes it; `live_http2`: the key already has an
    /// open HTTP/2 connection (so an HTTP/1 answer marks nothing).
    async fn connect(
        self: &Arc<Self>,
        t: Target,
        live_http2: bool,
        resets: Arc<ResetBudget>,
    ) -> Result<Arc<H2Conn>, Checkout> {
        let dst = t.dst.to_string();
        // No connection in time is "unreachable" (gRPC UNAVAILABLE: clients may fail
        // over), not a deadline: DEADLINE_EXCEEDED is for the response's own timeout.
        let timeout = |d: &str| {
            Checkout::Failed(UpstreamError::Unavailable(
                d.to_string(),
                format!("no HTTP/2 connection within {:?}", self.connect_timeout),
            ))
        };
        let connecting = crate::socket::connect_upstream_tcp(t.source, t.dst);
        let stream = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => return Err(timeout(&dst)),
            Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => return Err(timeout(&dst)),
            Ok(Err(e)) => {
                return Err(Checkout::Failed(UpstreamError::Unavailable(
                    dst,
                    e.to_string(),
                )));
            }
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (first, mut spoke) = oneshot::channel();
        let io = SniffIo::new(stream, first);
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(self.stream_window)
            .initial_connection_window_size(self.conn_window)
            .max_header_list_size(self.max_header_list)
            .enable_push(false)
            // Until the server's SETTINGS say otherwise.
            .initial_max_send_streams(100)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| Checkout::Failed(UpstreamError::Failed(dst.clone(), e.to_string())))?;
        let conn = Arc::new(H2Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            send,
            active: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            resets,
        });
        // The server's first bytes say whether it speaks HTTP/2 at all. The
        // connection is driven here until they do: a checkout given up meanwhile
        // (its deadline) drops it, and the socket closes with it; only a
        // connection that speaks HTTP/2 gets a task of its own.
        let mut connection = Box::pin(connection);
        let probe = async {
            tokio::select! {
                biased;
                said = &mut spoke => said.map_err(|_| ()),
                // Ended before its first bytes were reported: an HTTP/1 answer
                // still counts as one; an HTTP/2 connection that already ended
                // is no connection.
                _ = connection.as_mut() => match spoke.try_recv() {
                    Ok(FirstBytes::Http2) | Err(_) => Err(()),
                    Ok(other) => Ok(other),
                },
            }
        };
        let said = tokio::time::timeout(self.connect_timeout, probe).await;
        if !matches!(said, Ok(Ok(FirstBytes::Http2))) {
            conn.closed.store(true, Ordering::Relaxed);
        }
        match said {
            Ok(Ok(FirstBytes::Http2)) => {
                tokio::spawn(drive(self.clone(), t.key, conn.clone(), connection));
                Ok(conn)
            }
            Ok(Ok(FirstBytes::Http1)) => {
                let mut marks = self.http1_only.lock().unwrap_or_else(|p| p.into_inner());
                let marked = marks.mark(t.key, live_http2, Instant::now());
                debug!(%dst, marked, "upstream answered HTTP/2's preface in HTTP/1; using HTTP/1.1");
                Err(Checkout::NotHttp2)
            }
            // A reset, a close or a stranger protocol says nothing about HTTP/1:
            // this request fails, nobody's later ones are changed.
            Ok(Ok(FirstBytes::Other) | Err(_)) => {
                Err(Checkout::Failed(UpstreamError::Unavailable(
                    dst,
                    "the server answered the HTTP/2 preface with neither HTTP/2 nor HTTP/1".into(),
                )))
            }
            Err(_) => Err(timeout(&dst)),
        }
    }

    /// Sends `req` (a request that arrived over HTTP/2) over HTTP/2; waits at
    /// most `timeout` for the response head.
    pub async fn forward(
        self: &Arc<Self>,
        ctx: &ConnContext,
        req: Request<Incoming>,
        timeout: Duration,
    ) -> Result<(Response<RecvStream>, StreamLease), H2Failure> {
        // Formatted only for an error: most calls never need it.
        let dst = || ctx.orig_dst.to_string();
        let (mut parts, body) = req.into_parts();
        let checked = parts
            .extensions
            .remove::<CheckedHeaderNames>()
            .unwrap_or_default();
        prepare_request(&mut parts, ctx)?;
        let end_of_stream = body.is_end_stream();
        let mut body = Some(body);
        let target = Target::of(ctx);
        let checkout_limit = self.connect_timeout.min(timeout);
        // One retry: a connection that closed (or got GOAWAY) between checkout and
        // sending never saw this request.
        for attempt in 0..2 {
            let mut lease = match self.checkout_within(target, checkout_limit).await {
                Ok(c) => c,
                Err(Checkout::NotHttp2) => {
                    let body = body.take().ok_or_else(|| internal(&dst()))?;
                    return Err(H2Failure::NotHttp2(Box::new(Request::from_parts(
                        restore_for_http1(parts, end_of_stream),
                        body,
                    ))));
                }
                Err(Checkout::Failed(e)) => return Err(e.into()),
            };
            let head = Request::from_parts(parts.clone(), ());
            // A stream queued behind a full connection waits at most as long as
            // the response head may take.
            let ready = tokio::time::timeout(timeout, lease.conn.send.clone().ready());
            // Until the response head comes, a return is the server's doing or
            // weir's; only a drop of this future (the client cancelled) is not.
            let sent = match ready.await {
                Err(_) => {
                    lease.settle();
                    return Err(UpstreamError::Timeout(dst(), timeout).into());
                }
                Ok(Ok(mut s)) => s.send_request(head, end_of_stream),
                Ok(Err(e)) => Err(e),
            };
            let (response, stream) = match sent {
                Ok(r) => r,
                Err(e) if attempt == 0 => {
                    debug!(error = %e, "upstream HTTP/2 connection unusable; retrying on another");
                    lease.retire();
                    lease.settle();
                    continue;
                }
                Err(e) => {
                    lease.settle();
                    return Err(UpstreamError::Failed(dst(), e.to_string()).into());
                }
            };
            if let Some(b) = body.take().filter(|_| !end_of_stream) {
                pump::start(b, stream, checked.clone());
            }
            let resp = match tokio::time::timeout(timeout, response).await {
                Err(_) => {
                    lease.settle();
                    return Err(UpstreamError::Timeout(dst(), timeout).into());
                }
                Ok(Err(e)) => {
                    if e.is_go_away() || e.is_io() {
                        lease.retire();
                    }
                    lease.settle();
                    return Err(upstream_stream_error(&dst(), &e).into());
                }
                Ok(Ok(r)) => r,
            };
            return Ok((resp, lease));
        }
        Err(internal(&dst()).into())
    }
}

/// A checkout's hold on its key's slot; releases the key when it is unused.
struct HeldSlot<'a> {
    pool: &'a H2Pool,
    key: PoolKey,
    slot: Slot,
}

impl Drop for HeldSlot<'_> {
    fn drop(&mut self) {
        self.pool.release_slot(self.key, &self.slot);
    }
}

/// A checkout's failure.
#[derive(Debug)]
enum Checkout {
    NotHttp2,
    Failed(UpstreamError),
}

fn internal(dst: &str) -> UpstreamError {
    UpstreamError::Failed(dst.to_string(), "request lost before sending".into())
}

/// An upstream stream failure as the client should see it: a reset with the
/// server's reason; the server's GOAWAY before it processed the stream becomes
/// REFUSED_STREAM (safe for the client to retry). h2 gives a stream the remote
/// GOAWAY error only when its id is above the frame's last-stream-id (streams
/// the server took end later, with the connection's own error); a GOAWAY weir's
/// side sent (a protocol error of the server's) is a plain failure: the server
/// may have processed the request, so the client must not be told to retry.
pub fn upstream_stream_error(dst: &str, e: &h2::Error) -> UpstreamError {
    match stream_error_reset(e.is_go_away(), e.is_remote(), e.is_reset(), e.reason()) {
        Some(r) => UpstreamError::Reset(dst.to_string(), r),
        None => UpstreamError::Failed(dst.to_string(), e.to_string()),
    }
}

/// The reason the client's stream is reset with, or `None` for a failure
/// answered with 502 / UNAVAILABLE.
fn stream_error_reset(
    go_away: bool,
    remote: bool,
    reset: bool,
    reason: Option<h2::Reason>,
) -> Option<h2::Reason> {
    if go_away {
        return remote.then_some(h2::Reason::REFUSED_STREAM);
    }
    reason.filter(|_| remote || reset)
}

/// The request as the server gets it over HTTP/2: an absolute URI (`:scheme`
/// http, `:authority` from the target or Host, else the destination), no Host
/// header beside it, no connection-specific headers (`te: trailers` is not one:
/// gRPC servers require it).
fn prepare_request(parts: &mut request::Parts, ctx: &ConnContext) -> Result<(), UpstreamError> {
    super::upstream::strip_hop_by_hop(&mut parts.headers, &[]);
    parts.version = http::Version::HTTP_2;
    // What an HTTP/2 client sends (`:scheme http`, `:authority`, `:path`) is
    // already the URI the server gets: kept as it is, not rebuilt. Host is
    // then no header beside `:authority` (h2 sends none of its own).
    let u = &parts.uri;
    if u.scheme() == Some(&http::uri::Scheme::HTTP)
        && u.authority().is_some()
        && u.path_and_query().is_some()
    {
        parts.headers.remove(header::HOST);
        return Ok(());
    }
    let authority = match parts.uri.authority() {
        Some(a) => a.as_str().to_string(),
        None => match parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
        {
            Some(h) => h.to_string(),
            None => ctx.orig_dst.to_string(),
        },
    };
    parts.headers.remove(header::HOST);
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|e| UpstreamError::Request(e.to_string()))?;
    Ok(())
}

/// Undoes [`prepare_request`]'s URI change for the HTTP/1.1 path (which reads
/// the authority back into Host).
fn restore_for_http1(mut parts: request::Parts, end_of_stream: bool) -> request::Parts {
    if let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
    empty_body_length(&mut parts, end_of_stream);
    parts
}

/// An HTTP/2 request going out as HTTP/1.1: one whose body ended with its
/// HEADERS and that has no `content-length` gets `content-length: 0` when its
/// method gives content a meaning (HTTP/2 needs no length to say "no body";
/// HTTP/1.1 servers may answer such a POST with 411 or wait for a body).
pub fn empty_body_length(parts: &mut request::Parts, end_of_stream: bool) {
    let has_content = matches!(
        parts.method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    );
    if end_of_stream && has_content && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
}

/// Drives one upstream connection; retires it when idle for the idle timeout,
/// and drops it from the pool when it ends.
async fn drive(
    pool: Arc<H2Pool>,
    key: PoolKey,
    conn: Arc<H2Conn>,
    mut connection: Pin<Box<h2::client::Connection<SniffIo, Bytes>>>,
) {
    let idle = pool.idle_timeout;
    let mut last_opened = conn.opened.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            r = connection.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
                break;
            }
            () = tokio::time::sleep(idle) => {
                let opened = conn.opened.load(Ordering::Relaxed);
                if opened == last_opened && conn.active.load(Ordering::Relaxed) == 0 {
                    // No stream for a whole idle period: stop handing it out; h2
                    // sends GOAWAY and ends once the last handle is gone.
                    conn.closed.store(true, Ordering::Relaxed);
                    pool.forget(key, conn.id);
                }
                last_opened = opened;
            }
        }
        if conn.closed.load(Ordering::Relaxed) && conn.active.load(Ordering::Relaxed) == 0 {
            // Retired: finish what h2 still has to say, but not forever.
            let _ = tokio::time::timeout(idle, connection.as_mut()).await;
            break;
        }
    }
    conn.closed.store(true, Ordering::Relaxed);
    pool.forget(key, conn.id);
}

#[cfg(test)]
mod tests;
