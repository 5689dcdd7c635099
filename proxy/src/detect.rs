//! Protocol detection in one read with replay: the first bytes of a client
//! connection are read (not peeked, so a partial preface cannot spin) until they
//! say HTTP/1, HTTP/2, TLS or none of them, under the connection's request-head deadline;
//! [`Replay`] then hands those bytes to the protocol handler before the rest of
//! the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use weir_parsers::detect::{Detected, H2_PREFACE, classify};

#[derive(Debug)]
pub enum Undecided {
    /// The client closed before its first bytes said what they are.
    Closed,
    /// The deadline passed first.
    Timeout,
    Io(io::Error),
}

/// Reads until the protocol is known or `deadline` passes. Every byte read is
/// returned for replay.
pub async fn detect(
    stream: &mut TcpStream,
    deadline: Instant,
) -> Result<(Detected, Bytes), Undecided> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await;
        match read {
            Err(_) => return Err(Undecided::Timeout),
            Ok(Err(e)) => return Err(Undecided::Io(e)),
            Ok(Ok(0)) => return Err(Undecided::Closed),
            Ok(Ok(_)) => {}
        }
        if let Some(d) = classify(&buf) {
            return Ok((d, buf.freeze()));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
    }
}

/// A stream whose first reads return bytes already read from it.
pub struct Replay<T> {
    head: Bytes,
    inner: T,
}

impl<T> Replay<T> {
    pub fn new(head: Bytes, inner: T) -> Self {
        Replay { head, inner }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Replay<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            buf.put_slice(&self.head[..n]);
            self.head.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Replay<T> {
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

    #[tokio::test]
    async fn undecided_connections_stop_at_the_deadline_and_bytes_are_replayed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        use tokio::io::AsyncWriteExt;
        // A partial preface and then nothing.
        client.write_all(&H2_PREFACE[..16]).await.unwrap();
        let started = Instant::now();
        let deadline = started + std::time::Duration::from_millis(300);
        let r = detect(&mut server, deadline).await;
        assert!(matches!(r, Err(Undecided::Timeout)), "{r:?}");
        assert!(started.elapsed() >= std::time::Duration::from_millis(300));
        // The rest arrives in pieces: detected, and every byte is replayed.
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client.write_all(&H2_PREFACE[..10]).await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            client.write_all(&H2_PREFACE[10..]).await.unwrap();
            client.write_all(b"tail").await.unwrap();
            client
        });
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let (d, head) = detect(&mut server, deadline).await.unwrap();
        assert_eq!(d, Detected::Http2);
        let _client = writer.await.unwrap();
        let mut replay = Replay::new(head, server);
        let mut all = vec![0u8; 28];
        replay.read_exact(&mut all).await.unwrap();
        assert_eq!(&all[..24], H2_PREFACE);
        assert_eq!(&all[24..], b"tail");
        // A client that closes first.
        let client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        drop(client);
        let r = detect(
            &mut server,
            Instant::now() + std::time::Duration::from_secs(5),
        )
        .await;
        assert!(matches!(r, Err(Undecided::Closed)), "{r:?}");
    }
}
