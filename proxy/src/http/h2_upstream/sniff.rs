//! Does the server speak HTTP/2? Its first bytes tell, without a round trip of
//! our own: h2 writes the preface, this watches what comes back.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// The upstream stream, watched for its server's first bytes: an HTTP/2 server
/// starts with a frame header (its SETTINGS, type 4); anything else, or the
/// end of the stream first, means it does not speak HTTP/2.
pub(super) struct SniffIo {
    inner: TcpStream,
    seen: Vec<u8>,
    first: Option<oneshot::Sender<bool>>,
}

impl AsyncRead for SniffIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.first.is_some() {
            match &res {
                Poll::Ready(Ok(())) => {
                    let new = &buf.filled()[before..];
                    if new.is_empty() {
                        self.answer(false);
                    } else {
                        let need = 4usize.saturating_sub(self.seen.len());
                        let take = need.min(new.len());
                        let head = new.get(..take).unwrap_or_default().to_vec();
                        self.seen.extend_from_slice(&head);
                        if self.seen.len() >= 4 {
                            let settings = self.seen.get(3) == Some(&4);
                            self.answer(settings);
                        }
                    }
                }
                Poll::Ready(Err(_)) => self.answer(false),
                Poll::Pending => {}
            }
        }
        res
    }
}

impl SniffIo {
    /// `first` gets `true` (HTTP/2) or `false` once the server's first bytes
    /// (or the end of the stream) are seen.
    pub(super) fn new(inner: TcpStream, first: oneshot::Sender<bool>) -> Self {
        SniffIo {
            inner,
            seen: Vec::new(),
            first: Some(first),
        }
    }

    fn answer(&mut self, http2: bool) {
        if let Some(tx) = self.first.take() {
            let _ = tx.send(http2);
        }
        self.seen = Vec::new();
    }
}

impl AsyncWrite for SniffIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
