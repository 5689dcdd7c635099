//! A response body from the server, as hyper sends it on to the client.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::RecvStream;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use super::StreamLease;

/// What happens when a response ends: the gRPC flow record is written then,
/// with the status from the trailers.
pub trait OnEnd: Send + Sync {
    /// `trailers` are the response's trailers, `None` when it ended without
    /// (or was cancelled / reset: `error` says how).
    fn ended(&mut self, trailers: Option<&HeaderMap>, error: Option<&h2::Error>);
}

/// A response body streamed from the server: each chunk's bytes go back to the
/// server's window once hyper has taken it, trailers pass through, and the
/// server's RST_STREAM reaches the client with its reason.
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
    finished: bool,
    lease: StreamLease,
    on_end: Option<Box<dyn OnEnd>>,
}

impl H2Body {
    pub fn new(recv: RecvStream, lease: StreamLease) -> Self {
        H2Body {
            recv,
            data_done: false,
            finished: false,
            lease,
            on_end: None,
        }
    }

    /// Called when the response ends (see [`OnEnd`]).
    pub fn set_on_end(&mut self, on_end: Box<dyn OnEnd>) {
        self.on_end = Some(on_end);
    }

    fn end(&mut self, trailers: Option<&HeaderMap>, error: Option<&h2::Error>) {
        self.finished = true;
        // A cancel by the client ends here too (from `drop`): counted then.
        if error.is_none_or(|e| e.reason() != Some(h2::Reason::CANCEL) || e.is_remote()) {
            self.lease.settle();
        }
        if let Some(mut f) = self.on_end.take() {
            f.ended(trailers, error);
        }
    }
}

impl Drop for H2Body {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if self.recv.is_end_stream() {
            // Nothing after the head (hyper never polled): the head said it all.
            self.end(None, None);
        } else {
            // The client went away (or hyper stopped reading): dropping the
            // RecvStream makes h2 cancel the server's stream.
            let cancelled = h2::Error::from(h2::Reason::CANCEL);
            self.end(None, Some(&cancelled));
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.end(None, Some(&e));
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => this.data_done = true,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(t))) => {
                this.end(Some(&t), None);
                Poll::Ready(Some(Ok(Frame::trailers(t))))
            }
            Poll::Ready(Ok(None)) => {
                this.end(None, None);
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                this.end(None, Some(&e));
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
