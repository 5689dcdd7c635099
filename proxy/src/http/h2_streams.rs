//! A client's HTTP/2 streams on one connection: which are open (the idle check
//! needs none open), which the client ended before their response (RST_STREAM:
//! counted, and past `--http2-max-resets-per-sec` the connection is closed), and
//! the flow records for connections ended for abuse or protocol errors.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tracing::info;
use weir_policy::flow;

use super::{ConnState, ProxyBody};
use crate::context::ConnContext;

#[derive(Default)]
pub(super) struct ResetWindow {
    started: Option<Instant>,
    count: u32,
}

impl ConnState {
    /// Counts a stream the client ended before its response did; past `limit`
    /// in one second, the connection is to be closed (Rapid Reset and its kin
    /// make weir start work, upstream included, that the client throws away).
    pub(super) fn stream_reset(&self, limit: u32) {
        let mut w = self.resets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match w.started {
            Some(t) if now.duration_since(t) < std::time::Duration::from_secs(1) => {
                w.count = w.count.saturating_add(1);
            }
            _ => {
                w.started = Some(now);
                w.count = 1;
            }
        }
        if w.count == limit.saturating_add(1) {
            self.too_many_resets.notify_one();
        }
    }
}

/// An HTTP/2 connection that ended with a protocol error or one of weir's
/// limits (GOAWAY with ENHANCE_YOUR_CALM, PROTOCOL_ERROR, ...) gets a flow
/// record naming the reason: only that connection is closed.
pub(super) fn http2_connection_error(ctx: &ConnContext, e: &hyper::Error) {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h2e) = err.downcast_ref::<h2::Error>()
            && let Some(reason) = h2e.reason()
            && reason != h2::Reason::NO_ERROR
            && reason != h2::Reason::CANCEL
        {
            // Which side sent the GOAWAY: weir (a limit, a protocol error of the
            // client's) or the client itself.
            let by = if h2e.is_remote() {
                "the client"
            } else {
                "weir"
            };
            info!(%reason, by, "HTTP/2 connection closed with GOAWAY");
            let d = ctx.decide();
            let mut f = ctx
                .flow(&d, &d.verdict.l4_verdict())
                .with_error(format!("HTTP2_GOAWAY: {reason:?}"));
            f.policy = format!("HTTP/2 connection closed with GOAWAY by {by}: {h2e}");
            ctx.shared.flows.emit(f);
            return;
        }
        source = err.source();
    }
}

/// Decides the connection again after a policy change: `true` (with a DROPPED
/// flow record) when L3/L4 policy no longer allows the client to reach the
/// server, so the connection is to be closed like a splice would be. A change
/// of HTTP rules alone keeps it: each new stream is decided anew.
pub(super) fn revoked_at_l4(ctx: &ConnContext) -> bool {
    let d = ctx.decide();
    if d.verdict.l4_allowed() {
        return false;
    }
    info!("policy no longer allows this HTTP/2 connection; GOAWAY and closing");
    let mut f = ctx.flow(&d, &d.verdict.l4_verdict());
    f.verdict = flow::FlowVerdict::Dropped;
    f.drop_reason_desc = Some("POLICY_DENIED".into());
    f.policy = format!("policy change: {}", f.policy);
    f.summary = "HTTP/2 connection closed with GOAWAY: the new policy no longer allows it".into();
    ctx.shared.flows.emit(f);
    true
}

/// The flow record for a connection closed for resetting too many streams.
pub(super) fn too_many_resets(ctx: &ConnContext, limit: u32) {
    info!(
        limit,
        "HTTP/2 client resets too many streams; closing the connection with GOAWAY"
    );
    let d = ctx.decide();
    let mut f = ctx.flow(&d, &d.verdict.l4_verdict());
    f.verdict = flow::FlowVerdict::Dropped;
    f.drop_reason_desc = Some("HTTP2_TOO_MANY_RESETS".into());
    f.policy = format!(
        "HTTP/2 client reset more than {limit} streams in a second (--http2-max-resets-per-sec); connection closed"
    );
    ctx.shared.flows.emit(f);
}

/// An HTTP/2 stream from its request until its response has been sent (or the
/// stream was reset): the response body carries it. Dropped before
/// [`OpenStream::finish`], the client ended the stream first (RST_STREAM).
pub(super) struct OpenStream {
    state: Arc<ConnState>,
    reset_limit: u32,
    finished: std::sync::atomic::AtomicBool,
}

impl OpenStream {
    pub(super) fn new(state: Arc<ConnState>, reset_limit: u32) -> Self {
        state.open_streams.fetch_add(1, Ordering::Relaxed);
        OpenStream {
            state,
            reset_limit,
            finished: AtomicBool::new(false),
        }
    }

    pub(super) fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.state.open_streams.fetch_sub(1, Ordering::Relaxed);
        if !self.finished.load(Ordering::Relaxed) {
            self.state.stream_reset(self.reset_limit);
        }
    }
}

/// A response body that keeps its stream counted as open until hyper drops it.
pub(super) struct StreamBody {
    pub(super) inner: ProxyBody,
    pub(super) stream: OpenStream,
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // The end, trailers, or the upstream's error: over, not by the client.
        let over = match &polled {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(f))) => f.is_trailers(),
            Poll::Pending => false,
        };
        if over {
            self.stream.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.stream.finish();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
