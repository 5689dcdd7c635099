//! DNS over TCP framing (RFC 1035 §4.2.2, RFC 7766): each message is preceded by
//! a two-byte length. [`TcpDnsFramer`] takes bytes as they arrive and yields whole
//! messages, so pipelined queries on one connection come out one by one.

use thiserror::Error;

use super::HEADER_LEN;

/// The largest message a two-byte length can announce.
pub const MAX_TCP_MESSAGE: usize = 65_535;

/// Why the stream cannot be framed any further. Both are fatal for the
/// connection: after a bad length nothing that follows can be trusted to start
/// a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("DNS message of {len} bytes is larger than the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("DNS message of {0} bytes is shorter than a header")]
    TooShort(usize),
}

/// Reassembles length-prefixed DNS messages from a TCP byte stream.
#[derive(Debug, Clone)]
pub struct TcpDnsFramer {
    pub(super) buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    start: usize,
    max: usize,
}

impl Default for TcpDnsFramer {
    fn default() -> Self {
        Self::new(MAX_TCP_MESSAGE)
    }
}

impl TcpDnsFramer {
    /// A framer that refuses messages longer than `max` (at most 65 535).
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max: max.min(MAX_TCP_MESSAGE),
        }
    }

    /// Append bytes read from the connection.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message (without its length prefix), `Ok(None)` when
    /// more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let pending = self.buf.get(self.start..).unwrap_or(&[]);
        let Some(&[hi, lo]) = pending.get(..2).and_then(|p| <&[u8; 2]>::try_from(p).ok()) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if len < HEADER_LEN {
            return Err(FrameError::TooShort(len));
        }
        let Some(msg) = pending.get(2..2 + len) else {
            return Ok(None);
        };
        let msg = msg.to_vec();
        self.start += 2 + len;
        // Compact once the consumed prefix dominates, so a long pipelined
        // connection does not keep every byte it ever received.
        if self.start >= 4096 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some(msg))
    }

    /// Bytes received but not yet returned as a message (a partial message at
    /// EOF means the peer closed mid-message).
    pub fn buffered(&self) -> usize {
        self.buf.len().saturating_sub(self.start)
    }
}

/// Prefix `msg` with its two-byte length for sending over TCP.
pub fn tcp_frame(msg: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = u16::try_from(msg.len()).map_err(|_| FrameError::TooLarge {
        len: msg.len(),
        max: MAX_TCP_MESSAGE,
    })?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    Ok(out)
}
