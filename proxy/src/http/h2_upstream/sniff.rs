//! Does the server speak HTTP/2? Its first bytes tell, without a round trip of
//! our own: h2 writes the preface, this watches what comes back.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// What the server's first bytes said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FirstBytes {
    /// A frame header of type SETTINGS: an HTTP/2 server.
    Http2,
    /// `HTTP/1.`: an HTTP/1 server answering the preface (with 400 or 505).
    Http1,
    /// Anything else, or the end of the stream (or an error) first: nothing to
    /// conclude about the server (a blip, a reset, a stranger protocol).
    Other,
}

/// Bytes needed to tell: `HTTP/1.` is 7.
const NEED: usize = 7;

/// Classifies the server's first bytes; `None` while more are needed.
pub(super) fn classify(seen: &[u8]) -> Option<FirstBytes> {
    // A frame header's 4th byte is its type; `HTTP/1.` has `P` there.
    if seen.len() < 4 {
        return None;
    }
    if seen.get(3) == Some(&4) {
        return Some(FirstBytes::Http2);
    }
    let prefix = b"HTTP/1.";
    let n = seen.len().min(NEED);
    if seen.get(..n) != prefix.get(..n) {
        return Some(FirstBytes::Other);
    }
    (n == NEED).then_some(FirstBytes::Http1)
}

/// The upstream stream, watched for its server's first bytes (see [`classify`]).
pub(super) struct SniffIo {
    inner: TcpStream,
    seen: Vec<u8>,
    first: Option<oneshot::Sender<FirstBytes>>,
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
                        self.answer(FirstBytes::Other);
                    } else {
                        let need = NEED.saturating_sub(self.seen.len());
                        let take = need.min(new.len());
                        let head = new.get(..take).unwrap_or_default().to_vec();
                        self.seen.extend_from_slice(&head);
                        if let Some(said) = classify(&self.seen) {
                            self.answer(said);
                        }
                    }
                }
                Poll::Ready(Err(_)) => self.answer(FirstBytes::Other),
                Poll::Pending => {}
            }
        }
        res
    }
}

impl SniffIo {
    /// `first` gets what the server's first bytes (or the end of the stream)
    /// said, once they are seen.
    pub(super) fn new(inner: TcpStream, first: oneshot::Sender<FirstBytes>) -> Self {
        SniffIo {
            inner,
            seen: Vec::new(),
            first: Some(first),
        }
    }

    fn answer(&mut self, said: FirstBytes) {
        if let Some(tx) = self.first.take() {
            let _ = tx.send(said);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http1_words_mark_a_server_http1() {
        // nginx's SETTINGS frame header.
        assert_eq!(classify(&[0, 0, 18, 4]), Some(FirstBytes::Http2));
        assert_eq!(classify(&[0, 0, 18]), None);
        assert_eq!(classify(b"HTTP/1.1 400 Bad"), Some(FirstBytes::Http1));
        assert_eq!(classify(b"HTTP/1.0 505"), Some(FirstBytes::Http1));
        // Not enough yet to tell.
        assert_eq!(classify(b"HTTP/"), None);
        assert_eq!(classify(b""), None);
        // Anything else concludes nothing about HTTP/1.
        assert_eq!(classify(b"SSH-2.0"), Some(FirstBytes::Other));
        assert_eq!(classify(b"HTTP/2.0 "), Some(FirstBytes::Other));
        assert_eq!(classify(&[0x15, 3, 3, 0, 2]), Some(FirstBytes::Other));
    }
}
