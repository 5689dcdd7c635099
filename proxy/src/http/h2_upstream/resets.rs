//! Streams a client cancelled on the server, per pool key (client address and
//! destination) and second: the shared upstream connection carries every
//! RST_STREAM weir sends for that client, from all its downstream connections,
//! so the per-connection budget (`--http2-max-resets-per-sec`) alone would let
//! a client with many connections reset that many times more streams on the
//! server. Past the budget, the key's new streams are refused (REFUSED_STREAM,
//! gRPC UNAVAILABLE) for the rest of the second: the resets weir sends the
//! server stay bounded by the budget plus the streams already open. The budget
//! lives with the key, which goes only once it has no connection (nothing left
//! to reset on).

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(super) struct ResetBudget {
    limit: u32,
    /// The current second's start and the cancels counted in it.
    window: Mutex<(Option<Instant>, u32)>,
}

impl ResetBudget {
    pub(super) fn new(limit: u32) -> Self {
        ResetBudget {
            limit,
            window: Mutex::new((None, 0)),
        }
    }

    pub(super) fn limit(&self) -> u32 {
        self.limit
    }

    /// Counts one stream the client cancelled on the server at `now`.
    pub(super) fn count(&self, now: Instant) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        match w.0 {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => {
                w.1 = w.1.saturating_add(1);
            }
            _ => *w = (Some(now), 1),
        }
    }

    /// More than the limit this second: new streams are refused.
    pub(super) fn exhausted(&self, now: Instant) -> bool {
        let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        matches!(w.0, Some(t) if now.duration_since(t) < Duration::from_secs(1)) && w.1 > self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_limit_within_a_second_then_free_again() {
        let b = ResetBudget::new(2);
        let t0 = Instant::now();
        b.count(t0);
        b.count(t0 + Duration::from_millis(10));
        assert!(!b.exhausted(t0 + Duration::from_millis(20)));
        b.count(t0 + Duration::from_millis(30));
        assert!(b.exhausted(t0 + Duration::from_millis(40)));
        assert!(!b.exhausted(t0 + Duration::from_millis(1001)));
        b.count(t0 + Duration::from_millis(1100));
        assert!(!b.exhausted(t0 + Duration::from_millis(1100)));
    }
}
