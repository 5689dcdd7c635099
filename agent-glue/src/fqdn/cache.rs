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
use weir_proxy::fqdn::DnsClient;

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
    /// The client whose answer brought it (its share counts it while the name
    /// is selected); saved, so a restart hands no client a fresh share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<DnsClient>,
}

/// However short the TTL (0 included), an address stays this long after its
/// answer: the client connects right after it reads the answer, and an expiry
/// tick in between would drop that first SYN. Once the connection exists,
/// conntrack keeps the address (see `expiry.rs`).
pub const CONNECT_GRACE_MS: u64 = 2_000;

/// Cache limits (`--fqdn-min-ttl`, `--fqdn-max-ttl`, `--fqdn-max-ips-per-name`,
/// `--fqdn-max-ips`, `--fqdn-max-names`, `--fqdn-max-entries-per-client`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub min_ttl_secs: u32,
    /// Longer TTLs are cut to this (an answer cannot pin an address for years).
    pub max_ttl_secs: u32,
    pub max_ips_per_name: usize,
    /// Distinct addresses in the cache (so at most this many learned ipcache
    /// entries; the kernel's ipcache holds 65 536 with the CIDR and host ones).
    pub max_ips: usize,
    pub max_names: usize,
    /// (name, address) entries of selected names one client may bring into
    /// the cache however full it is; beyond, only while this many addresses
    /// and names stay free for the others. Selected names are never evicted to
    /// make room, so without shares one client could fill the cache (with
    /// lookups of `*.example.com` names, say) and every other client's new
    /// selected answers would get SERVFAIL; with them, only its own do.
    pub max_entries_per_client: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            min_ttl_secs: 0,
            max_ttl_secs: 86_400,
            max_ips_per_name: 1000,
            max_ips: 32_768,
            max_names: 65_536,
            max_entries_per_client: 8_192,
        }
    }
}

impl Limits {
    /// When an answer's `ttl` (seconds) received at `now_ms` runs out: at most
    /// the maximum TTL, at least the minimum and never before the connect grace.
    pub fn expiry_ms(&self, ttl: u32, now_ms: u64) -> u64 {
        // RFC 2181 §8: a TTL with the top bit set is zero.
        let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
        let ttl = ttl.min(self.max_ttl_secs).max(self.min_ttl_secs);
        now_ms
            .saturating_add(u64::from(ttl) * 1000)
            .max(now_ms.saturating_add(CONNECT_GRACE_MS))
    }
}

/// Why an insert was refused: the cache is at a limit and only names some
/// selector selects are left to evict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("the FQDN cache holds --fqdn-max-names names, all selected")]
    Names,
    #[error("the FQDN cache holds --fqdn-max-ips addresses, all of selected names")]
    Ips,
    #[error(
        "the client holds --fqdn-max-entries-per-client entries of selected names and the cache is nearly full"
    )]
    Client,
}

/// Per name: when it entered the cache and whether a selector of the installed
/// policy selects it (names nobody selects are the first to go when full).
#[derive(Debug, Clone, Copy)]
struct NameMeta {
    created_ms: u64,
    selected: bool,
}

/// What one insert did to the cache (to put it back when the datapath refuses).
#[derive(Debug, Default)]
pub struct Inserted {
    /// Every change, in the order made: (name, address, the entry before, if
    /// any). One journal, undone in reverse: with separate lists an entry
    /// changed, evicted and changed again in one answer came back wrong.
    pub journal: Vec<(String, IpAddr, Option<Entry>)>,
    /// How many of the changes pushed an entry out: expired now by the
    /// per-name limit, or removed with a name a full cache evicted.
    pub evictions: usize,
    /// Names a full cache evicted, with their metadata (an undo restores it:
    /// a restored name would otherwise count as selected, so never evictable).
    names: Vec<(String, NameMeta)>,
}

impl Inserted {
    /// Every address changed or pushed out.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.journal.iter().map(|(_, ip, _)| *ip)
    }

    pub fn is_empty(&self) -> bool {
        self.journal.is_empty()
    }

    fn evicted(&mut self, name: &str, ip: IpAddr, before: Entry) {
        self.journal.push((name.to_string(), ip, Some(before)));
        self.evictions += 1;
    }
}

#[derive(Debug, Default, Clone)]
pub struct Cache {
    names: BTreeMap<String, BTreeMap<IpAddr, Entry>>,
    /// address → the names it is cached under.
    by_ip: HashMap<IpAddr, BTreeSet<String>>,
    meta: HashMap<String, NameMeta>,
    /// Names no selector selects, oldest first: what a full cache evicts.
    evictable: BTreeSet<(u64, String)>,
    /// Per client: its entries (`Entry::owner`) in selected names.
    shares: HashMap<DnsClient, usize>,
    pub limits: Limits,
}

impl Cache {
    pub fn new(limits: Limits) -> Self {
        Cache {
            limits,
            ..Default::default()
        }
    }

    /// Caches `ip` for `name` for `ttl` seconds (at most the maximum TTL, at
    /// least the minimum). A later expiry replaces an earlier one, never the
    /// other way round; a name at its limit drops its oldest address.
    /// `selected`: some selector of the installed policy selects `name`. A new
    /// name or address beyond the cache's limits first evicts names nobody
    /// selects (oldest first); when none are left it is refused (what was
    /// evicted is in `out`, for the caller's undo).
    pub fn insert(
        &mut self,
        name: &str,
        ip: IpAddr,
        ttl: u32,
        selected: bool,
        now_ms: u64,
        out: &mut Inserted,
    ) -> Result<(), Full> {
        self.insert_for(None, name, ip, ttl, selected, now_ms, out)
    }

    /// [`Cache::insert`] for `client`'s answer: a new entry of a selected name
    /// counts against its share; beyond its share, while fewer than a share's
    /// worth of addresses or names are left free for the others, it is refused
    /// (before anything changes) — the client's own new selected answers fail,
    /// nobody else's.
    #[allow(clippy::too_many_arguments)]
    pub fn insert_for(
        &mut self,
        client: Option<DnsClient>,
        name: &str,
        ip: IpAddr,
        ttl: u32,
        selected: bool,
        now_ms: u64,
        out: &mut Inserted,
    ) -> Result<(), Full> {
        let ip = canonical_ip(ip);
        let share = self.limits.max_entries_per_client.max(1);
        if let Some(c) = client
            && selected
            && self.get(name, ip).is_none()
            && self.share(c) >= share
            && (self.by_ip.len().saturating_add(share) >= self.limits.max_ips
                || self.names.len().saturating_add(share) >= self.limits.max_names)
        {
            return Err(Full::Client);
        }
        if !self.names.contains_key(name) {
            while self.names.len() >= self.limits.max_names.max(1) {
                if !self.evict_one(name, out) {
                    return Err(Full::Names);
                }
            }
        }
        if !self.by_ip.contains_key(&ip) {
            while self.by_ip.len() >= self.limits.max_ips.max(1) {
                if !self.evict_one(name, out) {
                    return Err(Full::Ips);
                }
            }
        }
        self.set_meta(name, now_ms, Some(selected));
        let expires_ms = self.limits.expiry_ms(ttl, now_ms);
        let ips = self.names.entry(name.to_string()).or_default();
        let before = ips.get(&ip).copied();
        // An entry another client's answer keeps alive becomes that client's
        // when it has room in its share: the first client's share is not held
        // by what others use.
        let owner = match (before.and_then(|e| e.owner), client) {
            (o, Some(c)) if o != Some(c) && selected && self.share(c) < share => Some(c),
            (o, _) => o,
        };
        let ips = self.names.entry(name.to_string()).or_default();
        let entry = match before {
            Some(e) => Entry {
                expires_ms: e.expires_ms.max(expires_ms),
                learned_ms: e.learned_ms,
                kept: e.kept && e.expires_ms >= expires_ms,
                owner,
            },
            None => Entry {
                expires_ms,
                learned_ms: now_ms,
                kept: false,
                owner: client,
            },
        };
        if before == Some(entry) {
            return Ok(());
        }
        ips.insert(ip, entry);
        if selected {
            match before {
                None => self.charge(client, 1),
                Some(b) if b.owner != owner => {
                    self.charge(b.owner, -1);
                    self.charge(owner, 1);
                }
                Some(_) => {}
            }
        }
        let Some(ips) = self.names.get_mut(name) else {
            return Ok(());
        };
        out.journal.push((name.to_string(), ip, before));
        let max = self.limits.max_ips_per_name.max(1);
        // A name over its limit pushes out its oldest learned addresses (the new
        // one last of all, as it is the newest) by expiring them now rather than
        // removing them: the expiry tick then keeps one a live connection still
        // uses (a removal here would cut it). Expired entries do not count
        // against the limit; the tick removes them within a second.
        loop {
            let current = ips.iter().filter(|(_, e)| e.expires_ms > now_ms);
            if current.clone().count() <= max {
                break;
            }
            let Some((old_ip, old)) = current
                .filter(|(i, _)| **i != ip)
                .min_by_key(|(i, e)| (e.learned_ms, **i))
                .map(|(i, e)| (*i, *e))
            else {
                break;
            };
            ips.insert(
                old_ip,
                Entry {
                    expires_ms: now_ms,
                    kept: false,
                    ..old
                },
            );
            out.evicted(name, old_ip, old);
        }
        self.by_ip.entry(ip).or_default().insert(name.to_string());
        Ok(())
    }

    /// Evicts the oldest name nobody selects (never `keep`). Whether there was one.
    fn evict_one(&mut self, keep: &str, out: &mut Inserted) -> bool {
        let Some((_, victim)) = self.evictable.iter().find(|(_, n)| n != keep).cloned() else {
            return false;
        };
        if let Some(m) = self.meta.get(&victim) {
            out.names.push((victim.clone(), *m));
        }
        let ips = self.names.get(&victim).cloned().unwrap_or_default();
        for (ip, e) in ips {
            self.remove(&victim, ip);
            out.evicted(&victim, ip, e);
        }
        true
    }

    /// Records `name`'s metadata: created at `now_ms` when new; `selected`
    /// when known (an entry restored without a policy counts as selected, so
    /// it is never evicted on a guess; `mark_selected` corrects it).
    fn set_meta(&mut self, name: &str, now_ms: u64, selected: Option<bool>) {
        let m = self.meta.entry(name.to_string()).or_insert(NameMeta {
            created_ms: now_ms,
            selected: true,
        });
        let was = m.selected;
        if let Some(sel) = selected {
            m.selected = sel;
        }
        let m = *m;
        if was != m.selected {
            self.recharge_name(name, m.selected);
        }
        let key = (m.created_ms, name.to_string());
        if m.selected {
            self.evictable.remove(&key);
        } else {
            self.evictable.insert(key);
        }
    }

    /// Re-reads which names the installed policy selects (after a policy change).
    /// Returns the names that were not selected before and are now (their
    /// entries count against their owners' shares from now on).
    pub fn mark_selected(&mut self, mut selected: impl FnMut(&str) -> bool) -> Vec<String> {
        let names: Vec<String> = self.names.keys().cloned().collect();
        let mut newly = Vec::new();
        for n in names {
            let sel = selected(&n);
            if sel && !self.counts(&n) {
                newly.push(n.clone());
            }
            self.set_meta(&n, 0, Some(sel));
        }
        newly
    }

    /// Puts back what `insert`s did (in reverse).
    pub fn undo(&mut self, done: Inserted) {
        for (name, ip, before) in done.journal.into_iter().rev() {
            self.set(&name, ip, before);
        }
        for (name, m) in done.names {
            if !self.names.contains_key(&name) {
                continue;
            }
            if let Some(cur) = self.meta.insert(name.clone(), m) {
                self.evictable.remove(&(cur.created_ms, name.clone()));
                if cur.selected != m.selected {
                    self.recharge_name(&name, m.selected);
                }
            }
            if !m.selected {
                self.evictable.insert((m.created_ms, name));
            }
        }
    }

    /// After a policy change selected `newly` (names clients brought while
    /// nobody selected them, now counting against their shares): while fewer
    /// than a share's worth of addresses or names are free, the entries of
    /// those names whose clients are now beyond their share expire, newest
    /// first, until each is back at its share or has none of them left (the
    /// expiry tick removes them, or keeps one a live connection uses). Only
    /// what the change charged: what a client brought while it had room stays.
    /// How many expired.
    pub fn shed_beyond_shares(&mut self, newly: &[String], now_ms: u64) -> usize {
        let share = self.limits.max_entries_per_client.max(1);
        let nearly_full = self.by_ip.len().saturating_add(share) >= self.limits.max_ips
            || self.names.len().saturating_add(share) >= self.limits.max_names;
        let over: HashMap<DnsClient, usize> = self
            .shares
            .iter()
            .filter(|(_, n)| **n > share)
            .map(|(c, n)| (*c, n - share))
            .collect();
        if !nearly_full || over.is_empty() || newly.is_empty() {
            return 0;
        }
        let mut current: HashMap<DnsClient, Vec<(u64, String, IpAddr)>> = HashMap::new();
        for name in newly {
            let Some(ips) = self.names.get(name) else {
                continue;
            };
            if !self.counts(name) {
                continue;
            }
            for (ip, e) in ips {
                if let Some(o) = e.owner
                    && over.contains_key(&o)
                    && e.expires_ms > now_ms
                {
                    current
                        .entry(o)
                        .or_default()
                        .push((e.learned_ms, name.clone(), *ip));
                }
            }
        }
        let mut shed = 0;
        for (client, mut entries) in current {
            entries.sort_unstable_by(|a, b| b.cmp(a));
            let excess = over.get(&client).copied().unwrap_or(0);
            for (_, name, ip) in entries.into_iter().take(excess) {
                if let Some(e) = self.get_mut(&name, ip) {
                    e.expires_ms = now_ms;
                    e.kept = false;
                    shed += 1;
                }
            }
        }
        shed
    }

    /// How many entries of selected names `client` brought.
    pub fn share(&self, client: DnsClient) -> usize {
        self.shares.get(&client).copied().unwrap_or(0)
    }

    /// Adds `delta` (±1) to `client`'s share.
    fn charge(&mut self, client: Option<DnsClient>, delta: isize) {
        let Some(c) = client else { return };
        let n = self.shares.entry(c).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            self.shares.remove(&c);
        }
    }

    /// `name` became selected (or stopped being): its entries count against
    /// their owners' shares (or stop counting).
    fn recharge_name(&mut self, name: &str, selected: bool) {
        let owners: Vec<Option<DnsClient>> = self
            .names
            .get(name)
            .into_iter()
            .flat_map(|ips| ips.values().map(|e| e.owner))
            .collect();
        for o in owners {
            self.charge(o, if selected { 1 } else { -1 });
        }
    }

    /// Whether `name`'s entries count against their owners' shares.
    fn counts(&self, name: &str) -> bool {
        self.meta.get(name).is_some_and(|m| m.selected)
    }

    /// The shares counted from scratch (a test compares them with the kept ones).
    #[cfg(test)]
    fn recounted_shares(&self) -> HashMap<DnsClient, usize> {
        let mut out = HashMap::new();
        for (name, ips) in &self.names {
            if self.counts(name) {
                for e in ips.values() {
                    if let Some(o) = e.owner {
                        *out.entry(o).or_insert(0) += 1;
                    }
                }
            }
        }
        out
    }

    /// Sets or removes one entry.
    pub fn set(&mut self, name: &str, ip: IpAddr, entry: Option<Entry>) {
        match entry {
            Some(e) => {
                // The name's metadata first: whether it is selected decides
                // what the entry counts against its owner's share.
                self.set_meta(name, e.learned_ms, None);
                let before = self
                    .names
                    .entry(name.to_string())
                    .or_default()
                    .insert(ip, e);
                self.by_ip.entry(ip).or_default().insert(name.to_string());
                if self.counts(name) {
                    self.charge(before.and_then(|b| b.owner), -1);
                    self.charge(e.owner, 1);
                }
            }
            None => self.remove(name, ip),
        }
    }

    /// Removes one entry.
    pub fn remove(&mut self, name: &str, ip: IpAddr) {
        let counts = self.counts(name);
        if let Some(ips) = self.names.get_mut(name) {
            let gone = ips.remove(&ip);
            let empty = ips.is_empty();
            if counts {
                self.charge(gone.and_then(|e| e.owner), -1);
            }
            if empty {
                self.names.remove(name);
                if let Some(m) = self.meta.remove(name) {
                    self.evictable.remove(&(m.created_ms, name.to_string()));
                }
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

    /// (name, address) pairs whose expiry has passed (the tick's scan, once a
    /// second: it offers the CPU as it goes, [`super::offer_cpu`]).
    pub fn expired(&self, now_ms: u64) -> Vec<(String, IpAddr)> {
        self.names
            .iter()
            .enumerate()
            .flat_map(|(i, (n, ips))| {
                super::offer_cpu(i);
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

    pub fn name_count(&self) -> usize {
        self.names.len()
    }

    /// Distinct addresses.
    pub fn ip_count(&self) -> usize {
        self.by_ip.len()
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
            ..Limits::default()
        });
        let mut out = Inserted::default();
        c.insert("a.example.com.", ip("192.0.2.1"), 5, true, 1_000, &mut out)
            .unwrap();
        assert_eq!(
            c.get("a.example.com.", ip("192.0.2.1")).unwrap().expires_ms,
            61_000
        );
        c.insert(
            "a.example.com.",
            ip("192.0.2.2"),
            300,
            true,
            1_000,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            c.get("a.example.com.", ip("192.0.2.2")).unwrap().expires_ms,
            301_000
        );
        // A shorter TTL later does not cut the entry short.
        c.insert("a.example.com.", ip("192.0.2.2"), 0, true, 2_000, &mut out)
            .unwrap();
        let e = c.get("a.example.com.", ip("192.0.2.2")).unwrap();
        assert_eq!((e.expires_ms, e.learned_ms), (301_000, 1_000));
        assert!(
            c.expired(61_000)
                .contains(&("a.example.com.".into(), ip("192.0.2.1")))
        );
        assert_eq!(c.expired(60_999), vec![]);
        c.insert(
            "b.example.com.",
            ip("192.0.2.3"),
            u32::MAX,
            true,
            1_000,
            &mut out,
        )
        .unwrap();
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
            ..Limits::default()
        });
        let mut out = Inserted::default();
        for (i, a) in ["192.0.2.1", "192.0.2.2", "192.0.2.3"].iter().enumerate() {
            c.insert("n.", ip(a), 60, true, 1_000 * i as u64, &mut out)
                .unwrap();
        }
        // The oldest is expired now, not removed: the expiry tick removes it
        // unless a live connection still uses it.
        let old = c.get("n.", ip("192.0.2.1")).unwrap();
        assert_eq!((old.expires_ms, old.kept), (2_000, false));
        assert!(c.has_ip(ip("192.0.2.1")));
        assert_eq!(c.expired(2_000), vec![("n.".to_string(), ip("192.0.2.1"))]);
        assert!(c.get("n.", ip("192.0.2.3")).is_some());
        assert_eq!(out.evictions, 1);
        // Expired entries do not count: the next address expires .2 only.
        c.insert("n.", ip("192.0.2.4"), 60, true, 3_000, &mut out)
            .unwrap();
        assert_eq!(c.get("n.", ip("192.0.2.2")).unwrap().expires_ms, 3_000);
        assert_eq!(c.get("n.", ip("192.0.2.1")).unwrap().expires_ms, 2_000);
        assert_eq!(out.evictions, 2);
        // Undo puts the oldest back and takes the newest out.
        c.undo(out);
        assert!(c.is_empty());
        assert!(!c.has_ip(ip("192.0.2.3")));
    }

    #[test]
    fn an_address_is_indexed_under_every_name_and_v4_mapped_is_v4() {
        let mut c = Cache::new(Limits::default());
        let mut out = Inserted::default();
        c.insert("a.", ip("::ffff:192.0.2.9"), 60, true, 0, &mut out)
            .unwrap();
        c.insert("b.", ip("192.0.2.9"), 60, true, 0, &mut out)
            .unwrap();
        let names: Vec<&str> = c.names_of(ip("192.0.2.9")).collect();
        assert_eq!(names, ["a.", "b."]);
        c.remove("a.", ip("192.0.2.9"));
        assert!(c.has_ip(ip("192.0.2.9")));
        c.remove("b.", ip("192.0.2.9"));
        assert!(!c.has_ip(ip("192.0.2.9")));
    }

    #[test]
    fn a_ttl_above_the_maximum_is_cut() {
        let mut c = Cache::new(Limits {
            max_ttl_secs: 3_600,
            ..Limits::default()
        });
        let mut out = Inserted::default();
        c.insert("a.", ip("192.0.2.1"), i32::MAX as u32, true, 0, &mut out)
            .unwrap();
        assert_eq!(c.get("a.", ip("192.0.2.1")).unwrap().expires_ms, 3_600_000);
        assert_eq!(Limits::default().max_ttl_secs, 86_400);
    }

    #[test]
    fn a_full_cache_evicts_unselected_names_oldest_first_then_refuses() {
        let mut c = Cache::new(Limits {
            max_names: 3,
            max_ips: 3,
            ..Limits::default()
        });
        let mut out = Inserted::default();
        c.insert("sel.", ip("192.0.2.1"), 60, true, 0, &mut out)
            .unwrap();
        c.insert("old.", ip("192.0.2.2"), 60, false, 1, &mut out)
            .unwrap();
        c.insert("new.", ip("192.0.2.3"), 60, false, 2, &mut out)
            .unwrap();
        // A fourth name: the oldest unselected one goes.
        c.insert("sel2.", ip("192.0.2.4"), 60, true, 3, &mut out)
            .unwrap();
        assert!(c.get("old.", ip("192.0.2.2")).is_none());
        assert!(!c.has_ip(ip("192.0.2.2")));
        assert!(c.get("new.", ip("192.0.2.3")).is_some());
        // Known names and addresses are never refused.
        c.insert("sel.", ip("192.0.2.4"), 60, true, 4, &mut out)
            .unwrap();
        // A fifth address: the last unselected name goes.
        c.insert("sel.", ip("192.0.2.5"), 60, true, 5, &mut out)
            .unwrap();
        assert!(c.get("new.", ip("192.0.2.3")).is_none());
        // Only selected names left: refused, for names and addresses alike.
        let before = c.clone();
        let mut out = Inserted::default();
        c.insert("sel3.", ip("192.0.2.1"), 60, true, 6, &mut out)
            .unwrap();
        assert_eq!(
            c.insert("sel4.", ip("192.0.2.1"), 60, true, 6, &mut out),
            Err(Full::Names)
        );
        assert_eq!(
            c.insert("sel.", ip("192.0.2.7"), 60, true, 6, &mut out),
            Err(Full::Ips)
        );
        c.undo(out);
        assert_eq!(format!("{:?}", c.names), format!("{:?}", before.names));
        assert_eq!(c.evictable, before.evictable);
        // A policy that no longer selects a name makes it evictable.
        let _ = c.mark_selected(|n| n != "sel.");
        let mut out = Inserted::default();
        c.insert("sel3.", ip("192.0.2.6"), 60, true, 7, &mut out)
            .unwrap();
        assert!(c.get("sel.", ip("192.0.2.1")).is_none());
        assert!(c.get("sel2.", ip("192.0.2.4")).is_some());
    }

    /// An address changed, pushed out and changed again in one answer comes
    /// back exactly as it was.
    #[test]
    fn undo_replays_one_journal_in_reverse() {
        let mut c = Cache::new(Limits {
            max_ips_per_name: 2,
            ..Limits::default()
        });
        let mut out = Inserted::default();
        c.insert("n.", ip("192.0.2.10"), 60, true, 0, &mut out) // X, oldest
            .unwrap();
        c.insert("n.", ip("192.0.2.11"), 60, true, 1_000, &mut out) // W
            .unwrap();
        let before = c.clone();
        let mut out = Inserted::default();
        // [Y, X]: Y pushes X out, X comes back and pushes W out.
        c.insert("n.", ip("192.0.2.12"), 600, true, 2_000, &mut out)
            .unwrap();
        c.insert("n.", ip("192.0.2.10"), 600, true, 2_000, &mut out)
            .unwrap();
        c.undo(out);
        assert_eq!(format!("{:?}", c.names), format!("{:?}", before.names));
        assert_eq!(
            format!("{:?}", c.by_ip.get(&ip("192.0.2.10"))),
            format!("{:?}", before.by_ip.get(&ip("192.0.2.10")))
        );
        assert!(!c.has_ip(ip("192.0.2.12")));
    }

    /// An unselected name a refused answer evicted comes back evictable.
    #[test]
    fn undoing_a_name_eviction_keeps_the_name_evictable() {
        let mut c = Cache::new(Limits {
            max_names: 1,
            ..Limits::default()
        });
        let mut out = Inserted::default();
        c.insert("free.", ip("192.0.2.1"), 60, false, 0, &mut out)
            .unwrap();
        let before = c.clone();
        let mut out = Inserted::default();
        c.insert("sel.", ip("192.0.2.2"), 60, true, 1, &mut out)
            .unwrap();
        assert!(!c.has_ip(ip("192.0.2.1")));
        c.undo(out);
        assert_eq!(format!("{:?}", c.names), format!("{:?}", before.names));
        assert_eq!(c.evictable, before.evictable);
    }

    /// `client` learns `addr` for the selected `name` (TTL 60 s) at `now`.
    fn learn(
        c: &mut Cache,
        client: DnsClient,
        name: &str,
        addr: &str,
        now: u64,
    ) -> Result<(), Full> {
        c.insert_for(
            Some(client),
            name,
            ip(addr),
            60,
            true,
            now,
            &mut Inserted::default(),
        )
    }

    const POD_A: DnsClient = DnsClient(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
    const POD_B: DnsClient = DnsClient(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)));

    /// A client beyond its share may fill the cache only up to a share's
    /// worth of room left for the others; then it is refused new selected
    /// entries, before anything changes; other clients, unselected names and
    /// entries it already has are not; a removal gives the share back.
    #[test]
    fn one_client_at_its_share_is_refused_and_nobody_else_is() {
        let mut c = Cache::new(Limits {
            max_entries_per_client: 2,
            max_ips: 6,
            ..Limits::default()
        });
        let mut out = Inserted::default();
        let a = Some(POD_A);
        learn(&mut c, POD_A, "x1.", "192.0.2.1", 0).unwrap();
        learn(&mut c, POD_A, "x2.", "192.0.2.2", 0).unwrap();
        // Beyond its share while the cache has room to spare ...
        learn(&mut c, POD_A, "x0.", "192.0.2.10", 0).unwrap();
        learn(&mut c, POD_A, "x0.", "192.0.2.11", 0).unwrap();
        assert_eq!(c.share(POD_A), 4);
        // ... but no further once only a share's worth (2 of 6) is left.
        let before = format!("{:?}", c.names);
        assert_eq!(
            learn(&mut c, POD_A, "x3.", "192.0.2.3", 0),
            Err(Full::Client)
        );
        assert_eq!(
            learn(&mut c, POD_A, "x1.", "192.0.2.9", 0),
            Err(Full::Client)
        );
        assert_eq!(
            format!("{:?}", c.names),
            before,
            "a refusal changes nothing"
        );
        // What it has already: learned again (a later expiry), not refused.
        c.insert_for(a, "x1.", ip("192.0.2.1"), 600, true, 1, &mut out)
            .unwrap();
        // Unselected names do not count (a full cache evicts them anyway).
        c.insert_for(a, "free.", ip("192.0.2.4"), 60, false, 1, &mut out)
            .unwrap();
        // Another client is untouched by A's share.
        learn(&mut c, POD_B, "x3.", "192.0.2.3", 1).unwrap();
        learn(&mut c, POD_B, "x1.", "192.0.2.1", 1).unwrap();
        // (x1 is B's now: B asked for it and had room.)
        assert_eq!((c.share(POD_A), c.share(POD_B)), (3, 2));
        // Removals (expiry) give the room back.
        c.remove("x0.", ip("192.0.2.10"));
        c.remove("x0.", ip("192.0.2.11"));
        assert_eq!(c.share(POD_A), 1);
        learn(&mut c, POD_A, "x5.", "192.0.2.5", 2).unwrap();
        assert_eq!(c.recounted_shares(), c.shares);
    }

    /// A policy change that selects names a client brought while unselected
    /// charges them all; on a nearly full cache the excess expires at once
    /// (newest first) and the other client gets room again.
    #[test]
    fn a_policy_change_does_not_lift_a_client_past_its_share_for_long() {
        let mut c = Cache::new(Limits {
            max_entries_per_client: 2,
            max_ips: 5,
            ..Limits::default()
        });
        let mut out = Inserted::default();
        for i in 1..=5u8 {
            let name = format!("u{i}.");
            c.insert_for(
                Some(POD_A),
                &name,
                IpAddr::from([192, 0, 2, i]),
                600,
                false,
                u64::from(i),
                &mut out,
            )
            .unwrap();
        }
        assert_eq!(c.share(POD_A), 0, "unselected names do not count");
        let newly = c.mark_selected(|_| true);
        assert_eq!(newly.len(), 5);
        assert_eq!(c.share(POD_A), 5);
        assert_eq!(
            c.insert_for(Some(POD_B), "b.", ip("192.0.2.9"), 600, true, 10, &mut out),
            Err(Full::Ips)
        );
        assert_eq!(c.shed_beyond_shares(&newly, 10), 3);
        // The expiry tick removes them; the oldest two stay.
        for (n, a) in c.expired(10) {
            c.remove(&n, a);
        }
        assert_eq!(c.share(POD_A), 2);
        assert!(c.get("u1.", ip("192.0.2.1")).is_some() && c.get("u5.", ip("192.0.2.5")).is_none());
        c.insert_for(Some(POD_B), "b.", ip("192.0.2.9"), 600, true, 11, &mut out)
            .unwrap();
        // A policy change that selects nothing new sheds nothing, however far
        // beyond its share a client went while it had room.
        assert!(c.mark_selected(|_| true).is_empty());
        assert_eq!(c.shed_beyond_shares(&[], 12), 0);
        assert_eq!(c.recounted_shares(), c.shares);
    }

    /// An entry another client keeps asking for becomes that client's when it
    /// has room: the first client's share is not held by what others use.
    #[test]
    fn an_entry_others_keep_alive_moves_to_their_share() {
        let mut c = Cache::new(Limits {
            max_entries_per_client: 2,
            max_ips: 4,
            ..Limits::default()
        });
        learn(&mut c, POD_A, "x1.", "192.0.2.1", 0).unwrap();
        learn(&mut c, POD_A, "x2.", "192.0.2.2", 0).unwrap();
        assert_eq!(
            learn(&mut c, POD_A, "x3.", "192.0.2.3", 0),
            Err(Full::Client)
        );
        // B asks for x1 and x2 (A no longer does): they become B's.
        learn(&mut c, POD_B, "x1.", "192.0.2.1", 100_000).unwrap();
        learn(&mut c, POD_B, "x2.", "192.0.2.2", 100_000).unwrap();
        assert_eq!((c.share(POD_A), c.share(POD_B)), (0, 2));
        learn(&mut c, POD_A, "x3.", "192.0.2.3", 100_000).unwrap();
        // A full share keeps nothing from another: B at its share leaves x3 A's.
        learn(&mut c, POD_B, "x3.", "192.0.2.3", 100_000).unwrap();
        assert_eq!((c.share(POD_A), c.share(POD_B)), (1, 2));
        assert_eq!(c.recounted_shares(), c.shares);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert {
            client: u8,
            name: u8,
            ip: u8,
            selected: bool,
        },
        InsertThenUndo {
            client: u8,
            name: u8,
            ip: u8,
            selected: bool,
        },
        Remove {
            name: u8,
            ip: u8,
        },
        Select {
            mask: u8,
        },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let ins = (0u8..3, 0u8..6, 0u8..6, any::<bool>());
        prop_oneof![
            ins.clone()
                .prop_map(|(client, name, ip, selected)| Op::Insert {
                    client,
                    name,
                    ip,
                    selected
                }),
            ins.prop_map(|(client, name, ip, selected)| Op::InsertThenUndo {
                client,
                name,
                ip,
                selected
            }),
            (0u8..6, 0u8..6).prop_map(|(name, ip)| Op::Remove { name, ip }),
            any::<u8>().prop_map(|mask| Op::Select { mask }),
        ]
    }

    proptest::proptest! {
        /// Whatever happens to the cache (inserts by several clients with
        /// evictions at the limits, refused inserts undone, expiries, policy
        /// changes that select other names), each client's share is exactly
        /// its entries in selected names.
        #[test]
        fn shares_always_equal_a_recount(ops in proptest::collection::vec(op(), 1..60)) {
            let mut c = Cache::new(Limits {
                max_names: 4,
                max_ips: 4,
                max_ips_per_name: 2,
                max_entries_per_client: 3,
                ..Limits::default()
            });
            let name = |n: u8| format!("n{n}.");
            let addr = |i: u8| IpAddr::from([192, 0, 2, i]);
            let client = |k: u8| (k > 0).then_some(DnsClient(IpAddr::from([10, 0, 0, k])));
            for (t, op) in ops.into_iter().enumerate() {
                let now = t as u64 * 1000;
                match op {
                    Op::Insert { client: k, name: n, ip: i, selected } => {
                        let mut out = Inserted::default();
                        let _ = c.insert_for(client(k), &name(n), addr(i), 60, selected, now, &mut out);
                    }
                    Op::InsertThenUndo { client: k, name: n, ip: i, selected } => {
                        let mut out = Inserted::default();
                        let _ = c.insert_for(client(k), &name(n), addr(i), 60, selected, now, &mut out);
                        c.undo(out);
                    }
                    Op::Remove { name: n, ip: i } => c.remove(&name(n), addr(i)),
                    Op::Select { mask } => {
                        let newly = c.mark_selected(|s| {
                            s.strip_prefix('n')
                                .and_then(|r| r.trim_end_matches('.').parse::<u8>().ok())
                                .is_some_and(|n| mask & (1 << n) != 0)
                        });
                        c.shed_beyond_shares(&newly, now);
                        // The expiry tick.
                        for (n, a) in c.expired(now) {
                            c.remove(&n, a);
                        }
                    }
                }
                proptest::prop_assert_eq!(c.recounted_shares(), c.shares.clone());
                for (k, n) in &c.shares {
                    proptest::prop_assert!(*n > 0, "{:?} kept at 0", k);
                }
            }
        }
    }
}
