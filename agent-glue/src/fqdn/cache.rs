//! The cache of names seen in allowed DNS answers: name → { address → expiry }.
//!
//! It lives outside any compiled policy (a reload starts a new, empty one) and
//! holds every allowed answer, selected or not, so that a policy loaded later
//! selects addresses seen before (as Cilium does). Times are wall-clock unix
//! milliseconds so the cache can be written to disk and read back after a crash.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use weir_policy::{CompiledPolicy, FqdnSelectorId, canonical_ip};

/// One address of one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When the answer's TTL (or `--fqdn-min-ttl`) runs out, unix ms.
    pub expires_ms: u64,
    /// When the address was first learned for the name, unix ms (the oldest goes
    /// first when a name has too many addresses).
    pub learned_ms: u64,
    /// Expired, but kept while a connection to it is alive.
    #[serde(default)]
    pub kept: bool,
}

/// However short the TTL (0 included), an address stays this long after its
/// answer: the client connects right after it reads the answer, and an expiry
/// tick in between would drop that first SYN. Once the connection exists,
/// conntrack keeps the address (see `expiry.rs`).
pub const CONNECT_GRACE_MS: u64 = 2_000;

/// Cache limits (`--fqdn-min-ttl`, `--fqdn-max-ips-per-name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub min_ttl_secs: u32,
    pub max_ips_per_name: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            min_ttl_secs: 0,
            max_ips_per_name: 1000,
        }
    }
}

/// What one insert did to the cache (to put it back when the datapath refuses).
#[derive(Debug, Default)]
pub struct Inserted {
    /// (name, address, the entry before, if any).
    pub changed: Vec<(String, IpAddr, Option<Entry>)>,
    /// Entries pushed out by the per-name limit.
    pub evicted: Vec<(String, IpAddr, Entry)>,
}

#[derive(Debug, Default, Clone)]
pub struct Cache {
    names: BTreeMap<String, BTreeMap<IpAddr, Entry>>,
    /// address → the names it is cached under.
    by_ip: HashMap<IpAddr, BTreeSet<String>>,
    pub limits: Limits,
}

impl Cache {
    pub fn new(limits: Limits) -> Self {
        Cache {
            limits,
            ..Default::default()
        }
    }

    /// Caches `ip` for `name` for `ttl` seconds (at least the minimum TTL). A
    /// later expiry replaces an earlier one, never the other way round; a name at
    /// its limit drops its oldest address.
    pub fn insert(&mut self, name: &str, ip: IpAddr, ttl: u32, now_ms: u64, out: &mut Inserted) {
        let ip = canonical_ip(ip);
        // RFC 2181 §8: a TTL with the top bit set is zero.
        let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
        let ttl = ttl.max(self.limits.min_ttl_secs);
        let expires_ms = now_ms
            .saturating_add(u64::from(ttl) * 1000)
            .max(now_ms.saturating_add(CONNECT_GRACE_MS));
        let ips = self.names.entry(name.to_string()).or_default();
        let before = ips.get(&ip).copied();
        let entry = match before {
            Some(e) => Entry {
                expires_ms: e.expires_ms.max(expires_ms),
                learned_ms: e.learned_ms,
                kept: e.kept && e.expires_ms >= expires_ms,
            },
            None => Entry {
                expires_ms,
                learned_ms: now_ms,
                kept: false,
            },
        };
        if before == Some(entry) {
            return;
        }
        ips.insert(ip, entry);
        out.changed.push((name.to_string(), ip, before));
        let max = self.limits.max_ips_per_name.max(1);
        let mut evicted = Vec::new();
        while ips.len() > max {
            // The oldest learned (the new one last of all, as it is the newest).
            let Some((old_ip, old)) = ips
                .iter()
                .filter(|(i, _)| **i != ip)
                .min_by_key(|(i, e)| (e.learned_ms, **i))
                .map(|(i, e)| (*i, *e))
            else {
                break;
            };
            ips.remove(&old_ip);
            evicted.push((name.to_string(), old_ip, old));
        }
        self.by_ip.entry(ip).or_default().insert(name.to_string());
        for (n, i, _) in &evicted {
            self.unindex(n, *i);
        }
        out.evicted.extend(evicted);
    }

    /// Puts back what `insert`s did (in reverse).
    pub fn undo(&mut self, done: Inserted) {
        for (name, ip, entry) in done.evicted.into_iter().rev() {
            self.set(&name, ip, Some(entry));
        }
        for (name, ip, before) in done.changed.into_iter().rev() {
            self.set(&name, ip, before);
        }
    }

    /// Sets or removes one entry.
    pub fn set(&mut self, name: &str, ip: IpAddr, entry: Option<Entry>) {
        match entry {
            Some(e) => {
                self.names
                    .entry(name.to_string())
                    .or_default()
                    .insert(ip, e);
                self.by_ip.entry(ip).or_default().insert(name.to_string());
            }
            None => self.remove(name, ip),
        }
    }

    /// Removes one entry.
    pub fn remove(&mut self, name: &str, ip: IpAddr) {
        if let Some(ips) = self.names.get_mut(name) {
            ips.remove(&ip);
            if ips.is_empty() {
                self.names.remove(name);
            }
        }
        self.unindex(name, ip);
    }

    fn unindex(&mut self, name: &str, ip: IpAddr) {
        if let Some(ns) = self.by_ip.get_mut(&ip) {
            ns.remove(name);
            if ns.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }

    pub fn get(&self, name: &str, ip: IpAddr) -> Option<&Entry> {
        self.names.get(name).and_then(|ips| ips.get(&ip))
    }

    pub fn get_mut(&mut self, name: &str, ip: IpAddr) -> Option<&mut Entry> {
        self.names.get_mut(name).and_then(|ips| ips.get_mut(&ip))
    }

    /// The names `ip` is cached under.
    pub fn names_of(&self, ip: IpAddr) -> impl Iterator<Item = &str> {
        self.by_ip
            .get(&canonical_ip(ip))
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// Whether `ip` is cached under any name.
    pub fn has_ip(&self, ip: IpAddr) -> bool {
        self.by_ip.contains_key(&canonical_ip(ip))
    }

    /// Every cached address.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.by_ip.keys().copied()
    }

    /// The `toFQDNs` selectors of `policy` that select any name `ip` is cached
    /// under: the learned identity of an address carries all of them.
    pub fn selectors_for(&self, ip: IpAddr, policy: &CompiledPolicy) -> Vec<FqdnSelectorId> {
        let mut sels: Vec<FqdnSelectorId> = self
            .names_of(ip)
            .flat_map(|n| policy.fqdn_selectors_matching(n))
            .collect();
        sels.sort_unstable();
        sels.dedup();
        sels
    }

    /// (name, address) pairs whose expiry has passed.
    pub fn expired(&self, now_ms: u64) -> Vec<(String, IpAddr)> {
        self.names
            .iter()
            .flat_map(|(n, ips)| {
                ips.iter()
                    .filter(move |(_, e)| e.expires_ms <= now_ms)
                    .map(move |(ip, _)| (n.clone(), *ip))
            })
            .collect()
    }

    /// Every name with its addresses, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &BTreeMap<IpAddr, Entry>)> {
        self.names.iter().map(|(n, ips)| (n.as_str(), ips))
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn expiry_is_the_ttl_or_the_minimum_and_later_answers_extend_it() {
        let mut c = Cache::new(Limits {
            min_ttl_secs: 60,
            max_ips_per_name: 10,
        });
        let mut out = Inserted::default();
        c.insert("a.example.com.", ip("192.0.2.1"), 5, 1_000, &mut out);
        assert_eq!(
            c.get("a.example.com.", ip("192.0.2.1")).unwrap().expires_ms,
            61_000
        );
        c.insert("a.example.com.", ip("192.0.2.2"), 300, 1_000, &mut out);
        assert_eq!(
            c.get("a.example.com.", ip("192.0.2.2")).unwrap().expires_ms,
            301_000
        );
        // A shorter TTL later does not cut the entry short.
        c.insert("a.example.com.", ip("192.0.2.2"), 0, 2_000, &mut out);
        let e = c.get("a.example.com.", ip("192.0.2.2")).unwrap();
        assert_eq!((e.expires_ms, e.learned_ms), (301_000, 1_000));
        assert!(
            c.expired(61_000)
                .contains(&("a.example.com.".into(), ip("192.0.2.1")))
        );
        assert_eq!(c.expired(60_999), vec![]);
        c.insert("b.example.com.", ip("192.0.2.3"), u32::MAX, 1_000, &mut out);
        assert_eq!(
            c.get("b.example.com.", ip("192.0.2.3")).unwrap().expires_ms,
            61_000,
            "a TTL above 2^31-1 is 0 (then the minimum)"
        );
    }

    #[test]
    fn a_name_over_its_limit_drops_its_oldest_address() {
        let mut c = Cache::new(Limits {
            min_ttl_secs: 0,
            max_ips_per_name: 2,
        });
        let mut out = Inserted::default();
        for (i, a) in ["192.0.2.1", "192.0.2.2", "192.0.2.3"].iter().enumerate() {
            c.insert("n.", ip(a), 60, 1_000 * i as u64, &mut out);
        }
        assert!(c.get("n.", ip("192.0.2.1")).is_none());
        assert!(!c.has_ip(ip("192.0.2.1")));
        assert!(c.get("n.", ip("192.0.2.3")).is_some());
        assert_eq!(out.evicted.len(), 1);
        // Undo puts the oldest back and takes the newest out.
        c.undo(out);
        assert!(c.is_empty());
        assert!(!c.has_ip(ip("192.0.2.3")));
    }

    #[test]
    fn an_address_is_indexed_under_every_name_and_v4_mapped_is_v4() {
        let mut c = Cache::new(Limits::default());
        let mut out = Inserted::default();
        c.insert("a.", ip("::ffff:192.0.2.9"), 60, 0, &mut out);
        c.insert("b.", ip("192.0.2.9"), 60, 0, &mut out);
        let names: Vec<&str> = c.names_of(ip("192.0.2.9")).collect();
        assert_eq!(names, ["a.", "b."]);
        c.remove("a.", ip("192.0.2.9"));
        assert!(c.has_ip(ip("192.0.2.9")));
        c.remove("b.", ip("192.0.2.9"));
        assert!(!c.has_ip(ip("192.0.2.9")));
    }
}
