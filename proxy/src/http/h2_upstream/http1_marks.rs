//! Which servers answered HTTP/2's preface in HTTP/1, per pool key (client
//! address and destination): their HTTP/2 requests go as HTTP/1.1 for a while.
//!
//! Keyed by pool key, not by destination: what one client's probe saw (or what a
//! client could provoke) changes only that client's traffic. A mark is set only
//! on the server's own words (`HTTP/1.` first), never while the key has a live
//! HTTP/2 connection (the server evidently speaks HTTP/2), and it expires so a
//! server that gains HTTP/2 is probed again.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How long a server that answered in HTTP/1 is sent HTTP/1.1 instead.
pub(super) const HTTP1_ONLY_FOR: Duration = Duration::from_secs(60);

/// Marks with their expiry; expired ones are dropped as new ones come, so the
/// map holds at most the keys marked within the last [`HTTP1_ONLY_FOR`].
pub(super) struct Http1Marks<K> {
    until: HashMap<K, Instant>,
    ttl: Duration,
}

impl<K: Hash + Eq + Copy> Http1Marks<K> {
    pub(super) fn new(ttl: Duration) -> Self {
        Http1Marks {
            until: HashMap::new(),
            ttl,
        }
    }

    /// `key` is marked (and the mark has not expired at `now`).
    pub(super) fn is_marked(&mut self, key: K, now: Instant) -> bool {
        match self.until.get(&key) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.until.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Marks `key` unless it has a live HTTP/2 connection (`live_http2`);
    /// returns whether it did.
    pub(super) fn mark(&mut self, key: K, live_http2: bool, now: Instant) -> bool {
        if live_http2 {
            return false;
        }
        self.until.retain(|_, until| *until > now);
        self.until.insert(key, now + self.ttl);
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.until.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_per_key_refused_beside_live_http2_and_expires() {
        let mut m = Http1Marks::new(Duration::from_secs(60));
        let t0 = Instant::now();
        // Client 1's probe answered in HTTP/1: client 2 (same server) still
        // goes over HTTP/2.
        assert!(m.mark((1, 80), false, t0));
        assert!(m.is_marked((1, 80), t0));
        assert!(!m.is_marked((2, 80), t0));
        // A key with a live HTTP/2 connection is never marked.
        assert!(!m.mark((3, 80), true, t0));
        assert!(!m.is_marked((3, 80), t0));
        // A minute later the server is probed again.
        let later = t0 + Duration::from_secs(61);
        assert!(!m.is_marked((1, 80), later));
        // Expired marks go as new ones come.
        m.mark((4, 80), false, t0);
        m.mark((5, 80), false, later);
        assert_eq!(m.len(), 1);
    }
}
