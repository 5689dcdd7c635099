//! The once-a-second tick: entries whose TTL ran out leave the cache unless a
//! live connection still uses the address; addresses no longer cached under any
//! name are forgotten, and those still cached under others keep only those
//! names' selectors. Removals are single ipcache writes (no full sync); at most
//! one datapath sync per tick, only for an identity the entries do not know.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;

use tracing::{debug, warn};
use weir_policy::CompiledPolicy;

use super::{FqdnDatapath, FqdnState};

/// How often addresses kept for a live connection are checked again.
const KEPT_RECHECK_MS: u64 = 5_000;

impl FqdnState {
    /// One tick at `now_ms` against the installed `policy`.
    pub fn tick(
        &mut self,
        policy: &CompiledPolicy,
        dp: Option<&mut dyn FqdnDatapath>,
        now_ms: u64,
    ) {
        // Out of the view before anything is written (see `view.rs`).
        let (merged, expired) = self.view.take_expired(&mut self.cache, now_ms);
        self.extended |= merged;
        if expired.is_empty() && !self.resync && self.pending.is_empty() {
            return;
        }
        // Reading conntrack walks the whole map: entries already kept for a
        // connection are checked again every few seconds, not every tick.
        let only_kept = expired
            .iter()
            .all(|(n, ip)| self.cache.get(n, *ip).is_some_and(|e| e.kept));
        if only_kept
            && !self.resync
            && self.pending.is_empty()
            && self
                .last_ct_check_ms
                .is_some_and(|t| now_ms.saturating_sub(t) < KEPT_RECHECK_MS)
        {
            return;
        }
        if !expired.is_empty() {
            self.last_ct_check_ms = Some(now_ms);
        }
        // Only learned addresses can carry connections that toFQDNs allows:
        // the others leave without a look at conntrack.
        let learned_expired = expired
            .iter()
            .any(|(_, ip)| policy.learned_fqdn_ip(*ip).is_some());
        let live: HashSet<IpAddr> = match dp.as_deref() {
            None => HashSet::new(),
            Some(d) if learned_expired => d.live_destinations().unwrap_or_else(|e| {
                // Fail closed: without conntrack, expiry goes by the TTL alone.
                warn!(error = %e, "could not read conntrack; expiring FQDN addresses by TTL");
                HashSet::new()
            }),
            Some(_) => HashSet::new(),
        };
        let mut affected = BTreeSet::new();
        for (name, ip) in expired {
            if live.contains(&ip) && policy.learned_fqdn_ip(ip).is_some() {
                if let Some(e) = self.cache.get_mut(&name, ip)
                    && !e.kept
                {
                    e.kept = true;
                    self.dirty = true;
                }
                continue;
            }
            debug!(%name, %ip, "FQDN entry expired");
            self.cache.remove(&name, ip);
            self.dirty = true;
            affected.insert(ip);
        }
        let before = self.ids.assignments().count();
        for ip in affected {
            let sels = self.cache.selectors_for(ip, policy);
            let (old, new) = self.relearn(policy, ip, &sels);
            if old.map(|o| o.identity) != new {
                self.pending.insert(ip);
            }
        }
        self.save_ids_if_grown(before);
        let Some(d) = dp else {
            self.pending.clear();
            return;
        };
        // Removals (and narrowings to an identity the entries know) are single
        // ipcache writes: they must not depend on a full sync, which reads
        // every endpoint's interface and fails while one is gone. These
        // addresses have no live connection, so no generation bump is needed.
        // Only a narrowing to an identity the entries do not know needs a sync.
        let mut writes = Vec::new();
        for ip in &self.pending {
            let want = policy.learned_fqdn_ip(*ip).map(|l| l.identity);
            match want {
                Some(id) if !d.has_fqdn_identity(id) => self.resync = true,
                _ => writes.push((*ip, want)),
            }
        }
        if !writes.is_empty() {
            match d.write_learned(policy, &writes) {
                Ok(()) => {
                    for (ip, _) in &writes {
                        self.pending.remove(ip);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "could not remove expired FQDN addresses from the datapath; retrying");
                }
            }
        }
        if self.resync {
            match d.sync(policy) {
                Ok(()) => {
                    self.resync = false;
                    self.pending.clear();
                }
                Err(e) => {
                    warn!(error = %e, "could not sync the datapath for narrowed FQDN addresses; retrying");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use weir_proxy::fqdn::LearnRequest;

    use super::super::Limits;
    use super::super::test_support::*;
    use super::*;

    fn learn(
        st: &mut FqdnState,
        p: &Arc<CompiledPolicy>,
        dp: &mut FakeDatapath,
        name: &str,
        ip: &str,
        ttl: u32,
        now: u64,
    ) {
        let req = LearnRequest {
            names: vec![name.into()],
            addresses: vec![(ip.parse().unwrap(), ttl)],
            policy: p.clone(),
        };
        st.learn(&req, p, Some(dp), now).unwrap();
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn expiry_forgets_narrows_and_keeps_live_connections() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits::default());
        let mut dp = FakeDatapath::default();
        learn(&mut st, &p, &mut dp, "www.example.com.", "192.0.2.1", 10, 0);
        learn(
            &mut st,
            &p,
            &mut dp,
            "api.example.com.",
            "192.0.2.1",
            100,
            0,
        );
        learn(&mut st, &p, &mut dp, "www.example.com.", "192.0.2.2", 10, 0);
        learn(&mut st, &p, &mut dp, "www.example.com.", "192.0.2.3", 10, 0);
        dp.live.insert(ip("192.0.2.3"));
        let (syncs, writes) = (dp.syncs, dp.writes);
        st.tick(&p, Some(&mut dp), 9_999);
        assert_eq!(dp.writes, writes, "nothing expired yet");
        st.tick(&p, Some(&mut dp), 10_000);
        assert_eq!(dp.syncs, syncs, "removals need no full sync");
        assert_eq!(dp.writes, writes + 1, "one write for the whole tick");
        // .2: gone everywhere.
        assert!(p.learned_fqdn_ip(ip("192.0.2.2")).is_none());
        assert!(!dp.ipcache.contains_key(&ip("192.0.2.2")));
        // .1: still api.example.com's, with that name's selectors only ...
        let one = p.learned_fqdn_ip(ip("192.0.2.1")).unwrap();
        let api_only = p.fqdn_selectors_matching("api.example.com.");
        let www = p.fqdn_selectors_matching("www.example.com.");
        assert_eq!(api_only.len(), 2, "*.example.com and api.example.com");
        assert_eq!(one.selectors, api_only);
        assert_eq!(www.len(), 1);
        // .3: expired but its connection lives: kept.
        assert!(p.learned_fqdn_ip(ip("192.0.2.3")).is_some());
        assert!(
            st.cache
                .get("www.example.com.", ip("192.0.2.3"))
                .unwrap()
                .kept
        );
        // The connection ends: it goes at the next tick.
        dp.live.clear();
        st.tick(&p, Some(&mut dp), 11_000);
        assert!(
            p.learned_fqdn_ip(ip("192.0.2.3")).is_some(),
            "checked again only every 5 s"
        );
        st.tick(&p, Some(&mut dp), 15_000);
        assert!(p.learned_fqdn_ip(ip("192.0.2.3")).is_none());
        assert!(!dp.ipcache.contains_key(&ip("192.0.2.3")));
        // A failed sync is tried again at the next tick.
        learn(
            &mut st,
            &p,
            &mut dp,
            "www.example.com.",
            "192.0.2.4",
            1,
            20_000,
        );
        dp.fail = true;
        st.tick(&p, Some(&mut dp), 30_000);
        assert!(dp.ipcache.contains_key(&ip("192.0.2.4")));
        dp.fail = false;
        st.tick(&p, Some(&mut dp), 31_000);
        assert!(!dp.ipcache.contains_key(&ip("192.0.2.4")));
    }

    /// A name's limit pushes an address out, but its live connection keeps it
    /// allowed until the connection ends.
    #[test]
    fn an_address_a_names_limit_pushes_out_stays_while_its_connection_lives() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits {
            max_ips_per_name: 1,
            ..Limits::default()
        });
        let mut dp = FakeDatapath::default();
        learn(&mut st, &p, &mut dp, "www.example.com.", "192.0.2.1", 60, 0);
        dp.live.insert(ip("192.0.2.1"));
        learn(
            &mut st,
            &p,
            &mut dp,
            "www.example.com.",
            "192.0.2.2",
            60,
            1_000,
        );
        // Still allowed right after the answer that pushed it out ...
        assert!(p.learned_fqdn_ip(ip("192.0.2.1")).is_some());
        assert!(dp.ipcache.contains_key(&ip("192.0.2.1")));
        assert!(dp.ipcache.contains_key(&ip("192.0.2.2")));
        // ... and at the tick, while the connection lives.
        st.tick(&p, Some(&mut dp), 2_000);
        assert!(dp.ipcache.contains_key(&ip("192.0.2.1")));
        assert!(
            st.cache
                .get("www.example.com.", ip("192.0.2.1"))
                .unwrap()
                .kept
        );
        // It does not count against the limit: a refresh of .2 keeps .1 kept.
        learn(
            &mut st,
            &p,
            &mut dp,
            "www.example.com.",
            "192.0.2.2",
            60,
            3_000,
        );
        assert!(dp.ipcache.contains_key(&ip("192.0.2.1")));
        // The connection ends: it goes.
        dp.live.clear();
        st.tick(&p, Some(&mut dp), 8_000);
        assert!(p.learned_fqdn_ip(ip("192.0.2.1")).is_none());
        assert!(!dp.ipcache.contains_key(&ip("192.0.2.1")));
        assert!(dp.ipcache.contains_key(&ip("192.0.2.2")));
    }
}

// ---- dns-review reproducers (branch `dns-review`): each asserts what an
// attacker gets TODAY; a fix flips the marked assertions. ----
#[cfg(test)]
mod review_repro {
    use std::sync::Arc;

    use weir_proxy::fqdn::{LearnError, LearnRequest};

    use super::super::learner::CACHE_FULL;
    use super::super::test_support::*;
    use super::super::{FqdnState, Limits};
    use weir_policy::CompiledPolicy;

    fn req(p: &Arc<CompiledPolicy>, name: &str, ip: &str, ttl: u32) -> LearnRequest {
        LearnRequest {
            names: vec![name.into()],
            addresses: vec![(ip.parse().unwrap(), ttl)],
            policy: p.clone(),
        }
    }

    /// REVIEW REPRO F3 (node-wide DoS from one pod): names a `toFQDNs`
    /// selector selects are never evicted, and the name cap is one global
    /// cap (`--fqdn-max-names`, 65 536). One pod that may resolve names under
    /// a selected wildcard (`*.example.com` here; in practice `*.s3.amazonaws.com`
    /// and the like, where every label resolves) fills the cache with distinct
    /// selected names — all pointing at one address — and from then on every
    /// other pod's answer with a new selected name is refused (SERVFAIL) until
    /// the attacker's names expire. Scaled down: max_names = 4.
    #[test]
    fn review_repro_selected_names_fill_the_global_cache_and_refuse_everyone() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits {
            max_names: 4,
            ..Limits::default()
        });
        let mut dp = FakeDatapath::default();
        for i in 0..4 {
            st.learn(
                &req(&p, &format!("junk{i}.example.com."), "192.0.2.9", 86_400),
                &p,
                Some(&mut dp),
                0,
            )
            .unwrap();
        }
        // TODAY: the victim's answer for a selected name is refused.
        let e = st
            .learn(
                &req(&p, "api.example.com.", "192.0.2.50", 60),
                &p,
                Some(&mut dp),
                1_000,
            )
            .unwrap_err();
        assert!(matches!(e, LearnError::Unavailable(m) if m == CACHE_FULL));
        assert!(p.learned_fqdn_ip("192.0.2.50".parse().unwrap()).is_none());
    }

    /// REVIEW REPRO F4: an address whose TTL ran out stays in the ipcache with
    /// its FQDN identity while conntrack has any live flow to it (expiry.rs:
    /// `live.contains(&ip)`; `live_destinations` keys on the destination address
    /// alone), so NEW connections to it — from every endpoint the selector
    /// allows, on every port the rule allows — keep being allowed for as long
    /// as one connection is kept alive (a TCP keepalive, or a UDP flow the rule
    /// allows, refreshed within its lifetime). Issue 9: "TTL expiry → new
    /// connections dropped, an established connection still alive keeps its IP
    /// until it closes".
    #[test]
    fn review_repro_one_live_flow_keeps_the_address_open_for_new_flows() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits::default());
        let mut dp = FakeDatapath::default();
        let x: std::net::IpAddr = "192.0.2.77".parse().unwrap();
        st.learn(&req(&p, "www.example.com.", "192.0.2.77", 1), &p, Some(&mut dp), 0)
            .unwrap();
        let id = p.learned_fqdn_ip(x).unwrap().identity;
        dp.live.insert(x); // one connection to X, from anyone
        // An hour later, the TTL (1 s) long gone:
        for t in (10_000..3_600_000).step_by(10_000) {
            st.tick(&p, Some(&mut dp), t);
        }
        // TODAY: X still carries the FQDN identity in the ipcache, which is
        // what the kernel matches NEW flows against.
        assert_eq!(dp.ipcache.get(&x), Some(&id));
        assert!(p.learned_fqdn_ip(x).is_some());
        // Once the connection is gone, X goes.
        dp.live.clear();
        st.tick(&p, Some(&mut dp), 3_700_000);
        assert_eq!(dp.ipcache.get(&x), None);
    }

    /// REVIEW REPRO F5: a handed-over (draining) weir still learns answers into
    /// the maps the new weir owns (`HandedOverDatapath::write_learned`), but may
    /// not remove them ("removing a learned address" is refused). When such an
    /// address's TTL ends during the drain, the old weir's tick drops it from
    /// its cache anyway, so the cache file it leaves for the new weir
    /// (`persist_handed_over` → `merge_handed_over`) does not mention it: the
    /// ipcache entry stays with its FQDN identity and no weir will ever expire
    /// it (the new weir's syncs delete only what its own `installed` record
    /// holds; it is cleaned only by the next restart's `read_installed`).
    #[test]
    fn review_repro_address_learned_while_draining_is_orphaned_in_the_ipcache() {
        use super::super::handover::HandedOverDatapath;
        let dir = std::env::temp_dir().join(format!("weir-review-orphan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = Arc::new(compile(POLICY));
        let mut old = FqdnState::load(&dir, Limits::default());
        let mut maps = FakeDatapath::default();
        // Before the takeover: the identity for {*.example.com} is in the maps.
        old.learn(&req(&p, "www.example.com.", "192.0.2.1", 3600), &p, Some(&mut maps), 0)
            .unwrap();
        old.hand_over(true);
        // During the drain: an answer with a short TTL for a selected name.
        let x: std::net::IpAddr = "192.0.2.66".parse().unwrap();
        old.learn(
            &req(&p, "cdn.example.com.", "192.0.2.66", 5),
            &p,
            Some(&mut HandedOverDatapath(&mut maps)),
            1_000,
        )
        .unwrap();
        let id = maps.ipcache[&x];
        // The TTL ends while the old weir still drains (default drain 30 s).
        for t in (2_000..30_000).step_by(1_000) {
            old.tick(&p, Some(&mut HandedOverDatapath(&mut maps)), t);
        }
        old.persist_handed_over();
        // TODAY: the maps still allow X ...
        assert_eq!(maps.ipcache.get(&x), Some(&id));
        // ... and the cache handed to the new weir does not mention it.
        // (read as text: `persist::load` would drop these 1970 test expiries)
        let mut text = String::new();
        for f in std::fs::read_dir(dir.join("handover")).unwrap() {
            text.push_str(&std::fs::read_to_string(f.unwrap().path()).unwrap());
        }
        assert!(text.contains("192.0.2.1"), "the file holds the old entries: {text}");
        assert!(!text.contains("192.0.2.66"), "{text}");
        assert!(!old.cache.has_ip(x));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
