//! Kafka framing: every request and response is a four-byte big-endian length followed by
//! that many bytes. [`FrameSplitter`] takes bytes as they arrive and yields whole frames
//! (prefix included, so an allowed request is forwarded exactly as it came).

use bytes::{Bytes, BytesMut};
use thiserror::Error;

/// The proxy's default for `--kafka-max-frame` (the broker's own `socket.request.max.bytes`
/// default is 100 MiB too).
pub const DEFAULT_MAX_FRAME: usize = 100 * 1024 * 1024;

/// Why the stream cannot be framed any further. Both are fatal for the connection:
/// after a bad length nothing that follows can be trusted to start a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("Kafka frame length {0} is negative")]
    NegativeLength(i32),
    #[error("Kafka frame of {len} bytes is larger than the limit of {max}")]
    TooLarge { len: usize, max: usize },
}

/// One whole frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    bytes: Bytes,
}

impl Frame {
    /// The frame as it was on the wire, length prefix included.
    pub fn wire(&self) -> &Bytes {
        &self.bytes
    }

    /// The bytes after the length prefix (request or response header, then body).
    pub fn payload(&self) -> Bytes {
        self.bytes.slice(4..)
    }
}

/// Splits a byte stream into length-prefixed frames.
#[derive(Debug)]
pub struct FrameSplitter {
    buf: BytesMut,
    max: usize,
}

impl FrameSplitter {
    /// A splitter that refuses frames whose length field exceeds `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Append bytes read from the connection.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The buffer to read the connection's next bytes into (tokio's `read_buf` appends
    /// to it), with room for at least `room` more: reading straight into it saves a
    /// copy of every byte relayed. Room is never reserved for an announced length.
    pub fn read_space(&mut self, room: usize) -> &mut BytesMut {
        self.buf.reserve(room);
        &mut self.buf
    }

    /// Bytes received but not yet handed out as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `Ok(None)` while it is incomplete. The length is checked as
    /// soon as its four bytes are there, so an oversized frame is refused before weir
    /// buffers any of it.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(prefix) = self.buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = i32::from_be_bytes(*prefix);
        let len = usize::try_from(len).map_err(|_| FrameError::NegativeLength(len))?;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        let total = len + 4;
        if self.buf.len() < total {
            // No reservation for the announced size: four bytes claiming 100 MiB
            // must not cost 100 MiB; the buffer grows with the bytes that come.
            return Ok(None);
        }
        Ok(Some(Frame {
            bytes: self.buf.split_to(total).freeze(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announced_length_costs_no_memory_until_the_bytes_come() {
        let mut s = FrameSplitter::new(DEFAULT_MAX_FRAME);
        s.push(&(100 * 1024 * 1024i32).to_be_bytes());
        assert_eq!(s.next_frame(), Ok(None));
        assert!(s.buf.capacity() < 64 * 1024, "{}", s.buf.capacity());
    }
}
