//! Protocol detection from a connection's first bytes: HTTP/1, HTTP/2 prior
//! knowledge, a TLS handshake, or none of them. The proxy reads (and later
//! replays) the bytes; this decides what they are, or that more are needed.

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest method token taken for HTTP/1 (longer runs of capitals are not HTTP).
const MAX_METHOD: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A request line's method and space: HTTP/1.x.
    Http1,
    /// The full HTTP/2 preface.
    Http2,
    /// A TLS handshake record (content type 22, version 3.x): weir cannot read
    /// what is inside, so on a port with HTTP rules it is refused.
    Tls,
    /// Something else.
    Other,
}

/// What the bytes seen so far say, or `None` when more are needed.
pub fn classify(head: &[u8]) -> Option<Detected> {
    if head.is_empty() {
        return None;
    }
    if head.len() >= H2_PREFACE.len() && head.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if H2_PREFACE.starts_with(head) {
        return None;
    }
    if head[0] == 0x16 {
        return match head.get(1) {
            None => None,
            Some(3) => Some(Detected::Tls),
            Some(_) => Some(Detected::Other),
        };
    }
    let method = head.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match head.get(method) {
        _ if method > MAX_METHOD => Some(Detected::Other),
        Some(b' ') if method > 0 => Some(Detected::Http1),
        None => None,
        Some(_) => Some(Detected::Other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_the_first_bytes() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"G"), None);
        assert_eq!(classify(b"GET"), None);
        assert_eq!(classify(b"GET "), Some(Detected::Http1));
        assert_eq!(classify(b"POST /x HTTP/1.1\r\n"), Some(Detected::Http1));
        // Every strict prefix of the preface waits for more.
        for n in 1..H2_PREFACE.len() {
            assert_eq!(classify(&H2_PREFACE[..n]), None, "{n}");
        }
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(&[0, 0, 0, 4]);
        assert_eq!(classify(&more), Some(Detected::Http2));
        // "PRI " that is not the preface is a (strange) HTTP/1 method.
        assert_eq!(classify(b"PRI /x HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"\x16"), None);
        assert_eq!(classify(b"\x16\x03\x01\x02"), Some(Detected::Tls));
        assert_eq!(classify(b"\x16\x01"), Some(Detected::Other));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Detected::Other));
        assert_eq!(classify(b" GET"), Some(Detected::Other));
        assert_eq!(classify(&[b'A'; 40]), Some(Detected::Other));
    }
}
