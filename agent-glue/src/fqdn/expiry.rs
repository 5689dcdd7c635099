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
        let mut newly_kept = Vec::new();
        for (name, ip) in expired {
            if live.contains(&ip) && policy.learned_fqdn_ip(ip).is_some() {
                if let Some(e) = self.cache.get_mut(&name, ip)
                    && !e.kept
                {
                    e.kept = true;
                    self.dirty = true;
                    newly_kept.push((name, ip));
                }
                continue;
            }
            debug!(%name, %ip, "FQDN entry expired");
            self.cache.remove(&name, ip);
            self.dirty = true;
            affected.insert(ip);
        }
        // Expired but kept: a crash now must not drop it at load (and with
        // it the live connection's address from the maps).
        self.journal_pairs(newly_kept.iter().map(|(n, ip)| (n.as_str(), *ip)));
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
            client: weir_proxy::fqdn::DnsClient::new(std::net::IpAddr::from([10, 0, 0, 1])),
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
