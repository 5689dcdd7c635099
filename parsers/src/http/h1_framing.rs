//! An HTTP/1.1 request-stream tracker: fed every byte a server reads from a client,
//! it finds each request head and checks its framing headers *as sent*, before any
//! HTTP library normalises them away (hyper, for example, drops Content-Length when
//! Transfer-Encoding is present and merges identical duplicate Content-Lengths,
//! both legal repairs that still hide a smuggling attempt).
//!
//! It skips bodies by their framing (Content-Length or chunked) so that it stays in
//! step with the server, request by request. Once anything is ambiguous it stops:
//! the caller rejects that request and closes the connection.

use std::collections::VecDeque;

use super::RequestReject;

/// What the tracker concluded about the n-th request head on the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadCheck {
    Ok,
    Reject(RequestReject),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    /// Stopped: HTTP/2, a protocol switch, an over-long head, or a rejection.
    Stopped,
}

#[derive(Debug)]
pub struct RequestTracker {
    state: State,
    line: Vec<u8>,
    max_head: usize,
    checks: VecDeque<HeadCheck>,
    http2: bool,
}

const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";
/// Longest chunk-size line (size + extensions) we follow.
const MAX_CHUNK_LINE: usize = 4096;

impl RequestTracker {
    /// `max_head`: heads longer than this are left to the server (which answers 431).
    pub fn new(max_head: usize) -> Self {
        RequestTracker {
            state: State::Head,
            line: Vec::new(),
            max_head,
            checks: VecDeque::new(),
            http2: false,
        }
    }

    /// The check for the next request head, in order. `None` when the tracker has
    /// not seen (or could not follow to) that head.
    pub fn next_check(&mut self) -> Option<HeadCheck> {
        self.checks.pop_front()
    }

    /// Whether the connection turned out to be HTTP/2 (prior knowledge).
    pub fn is_http2(&self) -> bool {
        self.http2
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Stopped => return,
                State::Head => {
                    // Accumulate until the blank line that ends the head.
                    let mut consumed = data.len();
                    for (i, b) in data.iter().enumerate() {
                        self.line.push(*b);
                        if *b == b'\n' && head_complete(&self.line) {
                            consumed = i + 1;
                            break;
                        }
                    }
                    data = &data[consumed..];
                    if self.line.starts_with(H2_PREFACE_START) {
                        self.http2 = true;
                        self.stop();
                        return;
                    }
                    // Empty lines before a request line are allowed (RFC 9112 §2.2).
                    while self.line.first() == Some(&b'\r') || self.line.first() == Some(&b'\n') {
                        if self.line.starts_with(b"\r\n") {
                            self.line.drain(..2);
                        } else if self.line.starts_with(b"\n") {
                            self.line.drain(..1);
                        } else {
                            break;
                        }
                    }
                    if self.line.len() > self.max_head {
                        self.stop();
                        return;
                    }
                    if !self.line.is_empty() && head_complete(&self.line) {
                        let head = std::mem::take(&mut self.line);
                        self.on_head(&head);
                    }
                }
                State::Body(remaining) => {
                    let n = remaining.min(data.len() as u64);
                    data = &data[n as usize..];
                    self.state = if remaining == n {
                        State::Head
                    } else {
                        State::Body(remaining - n)
                    };
                }
                State::ChunkSize => {
                    let Some(pos) = data.iter().position(|b| *b == b'\n') else {
                        self.line.extend_from_slice(data);
                        if self.line.len() > MAX_CHUNK_LINE {
                            self.reject_and_stop(RequestReject::BadChunk);
                        }
                        return;
                    };
                    self.line.extend_from_slice(&data[..=pos]);
                    data = &data[pos + 1..];
                    let line = std::mem::take(&mut self.line);
                    match parse_chunk_size(&line) {
                        Some(0) => self.state = State::Trailers,
                        Some(n) => self.state = State::ChunkData(n),
                        None => self.reject_and_stop(RequestReject::BadChunk),
                    }
                }
                State::ChunkData(remaining) => {
                    let n = remaining.min(data.len() as u64);
                    data = &data[n as usize..];
                    self.state = if remaining == n {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData(remaining - n)
                    };
                }
                State::ChunkDataEnd => {
                    // The CRLF after chunk data.
                    let Some(pos) = data.iter().position(|b| *b == b'\n') else {
                        self.line.extend_from_slice(data);
                        if self.line.len() > 2 {
                            self.reject_and_stop(RequestReject::BadChunk);
                        }
                        return;
                    };
                    self.line.extend_from_slice(&data[..=pos]);
                    data = &data[pos + 1..];
                    let line = std::mem::take(&mut self.line);
                    if line != b"\r\n" {
                        self.reject_and_stop(RequestReject::BadChunk);
                        return;
                    }
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    let Some(pos) = data.iter().position(|b| *b == b'\n') else {
                        self.line.extend_from_slice(data);
                        if self.line.len() > self.max_head {
                            self.stop();
                        }
                        return;
                    };
                    self.line.extend_from_slice(&data[..=pos]);
                    data = &data[pos + 1..];
                    let line = std::mem::take(&mut self.line);
                    if line == b"\r\n" || line == b"\n" {
                        self.state = State::Head;
                    }
                }
            }
        }
    }

    /// The connection switched protocols (a 101 to an upgrade, a 2xx to
    /// CONNECT): what follows is not HTTP/1 and is no longer followed.
    pub fn switched(&mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.state = State::Stopped;
        self.line = Vec::new();
    }

    fn reject_and_stop(&mut self, r: RequestReject) {
        // A body problem belongs to the request already announced; the server will
        // fail that body itself. What matters is that no later head is trusted.
        self.checks.push_back(HeadCheck::Reject(r));
        self.stop();
    }

    fn on_head(&mut self, head: &[u8]) {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => {
                self.reject_and_stop(RequestReject::MalformedHead);
                return;
            }
        }
        let mut content_lengths = Vec::new();
        let mut transfer_encodings = Vec::new();
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                content_lengths.push(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encodings.push(h.value);
            }
        }
        if !content_lengths.is_empty() && !transfer_encodings.is_empty() {
            self.reject_and_stop(RequestReject::ContentLengthWithTransferEncoding);
            return;
        }
        if content_lengths.len() > 1 {
            self.reject_and_stop(RequestReject::DuplicateContentLength);
            return;
        }
        if transfer_encodings.len() > 1 {
            let joined = transfer_encodings
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect::<Vec<_>>()
                .join(", ");
            self.reject_and_stop(RequestReject::UnsupportedTransferEncoding(joined));
            return;
        }
        let next = if let Some(te) = transfer_encodings.first() {
            if !te.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                let te = String::from_utf8_lossy(te).into_owned();
                self.reject_and_stop(RequestReject::UnsupportedTransferEncoding(te));
                return;
            }
            State::ChunkSize
        } else if let Some(cl) = content_lengths.first() {
            let valid = !cl.is_empty() && cl.len() <= 19 && cl.iter().all(u8::is_ascii_digit);
            match std::str::from_utf8(cl)
                .ok()
                .filter(|_| valid)
                .and_then(|s| s.parse::<u64>().ok())
            {
                Some(0) => State::Head,
                Some(n) => State::Body(n),
                None => {
                    self.reject_and_stop(RequestReject::InvalidContentLength);
                    return;
                }
            }
        } else {
            State::Head
        };
        self.checks.push_back(HeadCheck::Ok);
        // An upgrade or CONNECT is followed as HTTP until it happens: a server
        // that refuses it keeps reading requests, and so does the tracker. The
        // proxy calls `switched` when the connection becomes a tunnel.
        self.state = next;
    }
}

fn head_complete(buf: &[u8]) -> bool {
    buf.ends_with(b"\r\n\r\n") || buf.ends_with(b"\n\n") || buf.ends_with(b"\n\r\n")
}

/// `1a;ext=1\r\n` → 26. Only hex digits, optional extensions, CRLF.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n")?;
    let size = match line.iter().position(|b| *b == b';') {
        Some(i) => &line[..i],
        None => line,
    };
    if size.is_empty() || size.len() > 15 || !size.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks(stream: &[u8], split: usize) -> Vec<HeadCheck> {
        let mut t = RequestTracker::new(16 * 1024);
        let split = split.min(stream.len());
        t.feed(&stream[..split]);
        t.feed(&stream[split..]);
        std::iter::from_fn(|| t.next_check()).collect()
    }

    #[test]
    fn follows_bodies_request_by_request() {
        let s = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nTrailer: 1\r\n\r\nGET /c HTTP/1.1\r\n\r\n";
        for split in 0..s.len() {
            assert_eq!(checks(s, split), vec![HeadCheck::Ok; 3], "split at {split}");
        }
    }

    #[test]
    fn flags_smuggling_shapes() {
        let cases: &[(&[u8], RequestReject)] = &[
            (b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", RequestReject::ContentLengthWithTransferEncoding),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n", RequestReject::ContentLengthWithTransferEncoding),
            (b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n", RequestReject::DuplicateContentLength),
            (b"POST / HTTP/1.1\r\nContent-Length: +4\r\n\r\n", RequestReject::InvalidContentLength),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", RequestReject::UnsupportedTransferEncoding("chunked, chunked".into())),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n", RequestReject::UnsupportedTransferEncoding("xchunked".into())),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", RequestReject::BadChunk),
            (b"GET / HTTP/1.1\r\nBad Header: 1\r\n\r\n", RequestReject::MalformedHead),
        ];
        for (stream, want) in cases {
            assert_eq!(
                checks(stream, 7),
                if *want == RequestReject::BadChunk {
                    vec![HeadCheck::Ok, HeadCheck::Reject(want.clone())]
                } else {
                    vec![HeadCheck::Reject(want.clone())]
                },
                "{}",
                String::from_utf8_lossy(stream)
            );
        }
    }

    #[test]
    fn stops_for_http2_and_upgrades() {
        let mut t = RequestTracker::new(1024);
        t.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(t.is_http2());
        assert_eq!(t.next_check(), None);
        // An upgrade the server refused: the connection stays HTTP and the
        // next head is checked like any other.
        let mut t = RequestTracker::new(1024);
        t.feed(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nGET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n");
        assert_eq!(t.next_check(), Some(HeadCheck::Ok));
        assert_eq!(
            t.next_check(),
            Some(HeadCheck::Reject(RequestReject::DuplicateContentLength))
        );
        // An upgrade that happened: the bytes after it are not followed.
        let mut t = RequestTracker::new(1024);
        t.feed(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n");
        assert_eq!(t.next_check(), Some(HeadCheck::Ok));
        t.switched();
        t.feed(b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n");
        assert_eq!(t.next_check(), None);
    }

    #[test]
    fn long_heads_are_left_to_the_server() {
        let mut t = RequestTracker::new(64);
        t.feed(&[b'a'; 100]);
        t.feed(b"\r\n\r\n");
        assert_eq!(t.next_check(), None);
    }
}
