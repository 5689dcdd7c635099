//! The committed view: which (name, address) pairs the datapath already holds,
//! so that an answer made only of such pairs is released by the proxy's own
//! thread, without a round trip to the control thread (issue 9's fast path).
//!
//! Ordering is what makes it safe. The control thread adds a pair only *after*
//! the map writes that allow it have succeeded, and removes a pair *before* any
//! write that could narrow what it allows (expiry, a name pushed over its
//! limit, a new policy, a handover). A pair in the view therefore always means
//! "a connection to this address, for this name's selectors, passes the kernel
//! now". Everything else — a new pair, an expired one, another policy — takes
//! the slow path through the learner, which is ordered.
//!
//! A hit still extends the pair's expiry, as the learner would: the new expiry
//! is kept here (marked dirty) and merged into the cache by the control thread
//! before it expires anything or writes the cache file, under the same lock the
//! proxy takes — so an extension is never lost and never raced by the tick.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use weir_policy::{CompiledPolicy, canonical_ip};

use super::cache::{Cache, Limits};

#[derive(Debug, Clone, Copy)]
struct Committed {
    expires_ms: u64,
    /// Extended by a hit since the last merge.
    dirty: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// The installed policy the pairs were committed under (its address; the
    /// view is emptied before any other policy reaches the datapath). `None`:
    /// the view is off and every answer takes the slow path.
    policy: Option<usize>,
    /// Names are shared with `dirty` (a hit marks a pair without allocating).
    names: HashMap<Arc<str>, HashMap<IpAddr, Committed>>,
    /// Pairs a hit extended since the last merge.
    dirty: Vec<(Arc<str>, IpAddr)>,
    /// Names with a request on its way to the learner: no hit for them until
    /// it is handled, so a later answer never overtakes an earlier one's update.
    in_flight: HashMap<String, u32>,
}

/// Shared by the proxy (hits) and the control thread (everything else).
#[derive(Debug)]
pub struct CommittedView {
    limits: Limits,
    inner: Mutex<Inner>,
}

fn policy_key(p: &CompiledPolicy) -> usize {
    std::ptr::from_ref(p) as usize
}

impl CommittedView {
    pub fn new(limits: Limits) -> Self {
        CommittedView {
            limits,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind, never a
        // half-made promise: what is there is still true.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The proxy's side. When the answer was decided under the policy the view
    /// was committed under and every (name, address) pair of it is committed
    /// and current, extends their expiries and returns true: the answer may go
    /// at once. Otherwise changes nothing and returns false.
    ///
    /// Names and addresses come as iterators (walked more than once) so that
    /// the proxy asks straight from the decoded answer, without building a
    /// learn request first.
    pub fn try_refresh<'a, N, A>(
        &self,
        policy: &CompiledPolicy,
        names: N,
        addresses: A,
        now_ms: u64,
    ) -> bool
    where
        N: Iterator<Item = &'a str> + Clone,
        A: Iterator<Item = (IpAddr, u32)> + Clone,
    {
        if names.clone().next().is_none() || addresses.clone().next().is_none() {
            return false;
        }
        let mut inner = self.lock();
        if inner.policy != Some(policy_key(policy))
            || names.clone().any(|n| inner.in_flight.contains_key(n))
        {
            return false;
        }
        let all_current = names.clone().all(|n| {
            inner.names.get(n).is_some_and(|ips| {
                addresses.clone().all(|(ip, _)| {
                    ips.get(&canonical_ip(ip))
                        .is_some_and(|c| c.expires_ms > now_ms)
                })
            })
        });
        if !all_current {
            return false;
        }
        let Inner {
            names: committed,
            dirty,
            ..
        } = &mut *inner;
        for n in names {
            let Some(name) = committed.get_key_value(n).map(|(k, _)| k.clone()) else {
                continue;
            };
            let Some(ips) = committed.get_mut(&*name) else {
                continue;
            };
            for (ip, ttl) in addresses.clone() {
                let ip = canonical_ip(ip);
                let Some(c) = ips.get_mut(&ip) else {
                    continue;
                };
                let expires_ms = self.limits.expiry_ms(ttl, now_ms);
                if expires_ms > c.expires_ms {
                    c.expires_ms = expires_ms;
                    if !c.dirty {
                        c.dirty = true;
                        dirty.push((name.clone(), ip));
                    }
                }
            }
        }
        true
    }

    /// Moves the expiries hits extended into `cache`. Whether any moved.
    pub fn merge_into(&self, cache: &mut Cache) -> bool {
        let merged = self.merge_in_steps(cache);
        merge(&mut self.lock(), cache) || merged
    }

    /// Merges the extensions [`MERGE_STEP`] at a time, letting the lock go
    /// between steps, until at most one step's worth is left (the caller's
    /// own step under the lock merges the rest). After a burst of hits every
    /// name in the view may be dirty: merged in one step, 25 000 of them held
    /// the lock — which the proxy takes for every answer — for milliseconds
    /// (`tests/perf/dns.sh` saw answers wait). Merging a pair is independent of
    /// every other, and a hit between steps only extends an expiry, which the
    /// pair's merge reads whenever it comes: the caller's final step still
    /// merges everything dirty at that instant.
    fn merge_in_steps(&self, cache: &mut Cache) -> bool {
        let mut merged = false;
        // Bounded by what was dirty at the start: hits during the steps wait
        // for the caller's final one.
        let steps = self.lock().dirty.len() / MERGE_STEP;
        for step in 0..steps {
            // Between steps, the core too (the merge itself costs: ~1 µs a
            // pair with 25 000 names; see `super::offer_cpu`).
            if step > 0 {
                std::thread::yield_now();
            }
            let mut inner = self.lock();
            let Some(from) = inner.dirty.len().checked_sub(MERGE_STEP).filter(|&f| f > 0) else {
                break;
            };
            merged |= merge_from(&mut inner, cache, from);
        }
        merged
    }

    /// Before the learner changes `names` in the cache: merges, then takes
    /// every pair of those names out — in one step, so no hit falls between
    /// (the change may push an address out of a name, narrowing it).
    pub fn take_names(&self, cache: &mut Cache, names: &[String]) -> bool {
        let stepped = self.merge_in_steps(cache);
        let mut inner = self.lock();
        let merged = merge(&mut inner, cache) || stepped;
        for n in names {
            inner.names.remove(n.as_str());
        }
        merged
    }

    /// The tick's first step: merges, finds the pairs expired at `now_ms` and
    /// takes them out, in one step (a hit that extended one of them after
    /// the merge would otherwise be expired under it).
    pub fn take_expired(&self, cache: &mut Cache, now_ms: u64) -> (bool, Vec<(String, IpAddr)>) {
        // The scan runs without the lock (the proxy takes it for every
        // answer); a merge only moves expiries later, so the candidates still
        // expired after it are exactly the expired pairs.
        let candidates = cache.expired(now_ms);
        if candidates.is_empty() {
            // Nothing expires even without the merge; the extensions wait in
            // the view for the next cache write (or expiry).
            return (false, candidates);
        }
        let stepped = self.merge_in_steps(cache);
        let mut inner = self.lock();
        let merged = merge(&mut inner, cache) || stepped;
        let expired: Vec<(String, IpAddr)> = candidates
            .into_iter()
            .filter(|(n, ip)| cache.get(n, *ip).is_some_and(|e| e.expires_ms <= now_ms))
            .collect();
        for (n, ip) in &expired {
            remove(&mut inner, n, *ip);
        }
        (merged, expired)
    }

    /// Marks `names` as having a request on its way to the learner until the
    /// returned guard is dropped (after the learner handled it, or when it
    /// never got there).
    pub fn begin(self: &Arc<Self>, names: &[String]) -> InFlight {
        let mut inner = self.lock();
        for n in names {
            *inner.in_flight.entry(n.clone()).or_default() += 1;
        }
        InFlight {
            view: self.clone(),
            names: names.to_vec(),
        }
    }

    /// Takes out the given pairs that the cache no longer holds (names a full
    /// cache evicted: they would stay in the view for ever otherwise).
    pub fn drop_missing<'a>(&self, cache: &Cache, pairs: impl Iterator<Item = (&'a str, IpAddr)>) {
        let mut inner = self.lock();
        for (name, ip) in pairs {
            if cache.get(name, ip).is_none() {
                remove(&mut inner, name, ip);
            }
        }
    }

    /// Commits pairs the datapath now holds under `policy` (the installed one),
    /// with the cache's expiries. A view committed under another policy is
    /// rebuilt from the whole cache first.
    pub fn commit<'a>(
        &self,
        policy: &CompiledPolicy,
        cache: &Cache,
        pairs: impl Iterator<Item = (&'a str, IpAddr)>,
        now_ms: u64,
    ) {
        let mut inner = self.lock();
        if inner.policy != Some(policy_key(policy)) {
            rebuild(&mut inner, policy, cache, now_ms);
            return;
        }
        for (name, ip) in pairs {
            let ip = canonical_ip(ip);
            match cache.get(name, ip) {
                Some(e) if e.expires_ms > now_ms && !e.kept => {
                    let ips = match inner.names.get_mut(name) {
                        Some(ips) => ips,
                        None => inner.names.entry(Arc::from(name)).or_default(),
                    };
                    let c = ips.entry(ip).or_insert(Committed {
                        expires_ms: e.expires_ms,
                        dirty: false,
                    });
                    c.expires_ms = c.expires_ms.max(e.expires_ms);
                }
                _ => remove(&mut inner, name, ip),
            }
        }
    }

    /// Empties the view (its extensions merged into `cache` first) and turns it
    /// off until the next commit: a new policy is on its way to the datapath,
    /// or another weir owns it. Whether any extension was merged.
    pub fn clear(&self, cache: &mut Cache) -> bool {
        // One step: a hit between the merge and the clear would be lost.
        let stepped = self.merge_in_steps(cache);
        let mut inner = self.lock();
        let merged = merge(&mut inner, cache) || stepped;
        inner.policy = None;
        inner.names.clear();
        inner.dirty.clear();
        merged
    }

    /// Pairs in the view (tests, metrics).
    pub fn len(&self) -> usize {
        self.lock().names.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request on its way to the learner (see [`CommittedView::begin`]).
#[derive(Debug)]
pub struct InFlight {
    view: Arc<CommittedView>,
    names: Vec<String>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut inner = self.view.lock();
        for n in &self.names {
            if let Some(c) = inner.in_flight.get_mut(n.as_str()) {
                *c -= 1;
                if *c == 0 {
                    inner.in_flight.remove(n.as_str());
                }
            }
        }
    }
}

/// Extensions merged per step of [`CommittedView::merge_in_steps`] (a few
/// hundred microseconds of holding the lock).
const MERGE_STEP: usize = 256;

fn merge(inner: &mut Inner, cache: &mut Cache) -> bool {
    merge_from(inner, cache, 0)
}

/// Merges the extensions from index `from` of the dirty list on.
fn merge_from(inner: &mut Inner, cache: &mut Cache, from: usize) -> bool {
    let Inner { names, dirty, .. } = inner;
    let from = from.min(dirty.len());
    let merged = from < dirty.len();
    for (name, ip) in dirty.drain(from..) {
        let Some(c) = names.get_mut(&*name).and_then(|ips| ips.get_mut(&ip)) else {
            continue;
        };
        c.dirty = false;
        match cache.get_mut(&name, ip) {
            Some(e) => {
                if c.expires_ms > e.expires_ms {
                    e.expires_ms = c.expires_ms;
                    e.kept = false;
                }
            }
            // Not cached any more: not committed either.
            None => {
                if let Some(ips) = names.get_mut(&*name) {
                    ips.remove(&ip);
                    if ips.is_empty() {
                        names.remove(&*name);
                    }
                }
            }
        }
    }
    merged
}

fn remove(inner: &mut Inner, name: &str, ip: IpAddr) {
    if let Some(ips) = inner.names.get_mut(name) {
        ips.remove(&ip);
        if ips.is_empty() {
            inner.names.remove(name);
        }
    }
}

/// Every current cache pair, committed under `policy`. Callers merge first: a
/// dirty extension not merged would be lost here.
fn rebuild(inner: &mut Inner, policy: &CompiledPolicy, cache: &Cache, now_ms: u64) {
    inner.names.clear();
    inner.dirty.clear();
    for (name, ips) in cache.iter() {
        let current: HashMap<IpAddr, Committed> = ips
            .iter()
            .filter(|(_, e)| e.expires_ms > now_ms && !e.kept)
            .map(|(ip, e)| {
                (
                    *ip,
                    Committed {
                        expires_ms: e.expires_ms,
                        dirty: false,
                    },
                )
            })
            .collect();
        if !current.is_empty() {
            inner.names.insert(Arc::from(name), current);
        }
    }
    inner.policy = Some(policy_key(policy));
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use weir_proxy::fqdn::LearnRequest;

    use super::super::test_support::*;
    use super::super::{FqdnState, Limits};
    use super::*;

    fn req(p: &Arc<CompiledPolicy>, name: &str, ips: &[(&str, u32)]) -> LearnRequest {
        LearnRequest {
            names: vec![name.to_string()],
            addresses: ips.iter().map(|(i, t)| (i.parse().unwrap(), *t)).collect(),
            policy: p.clone(),
            client: weir_proxy::fqdn::DnsClient::new(std::net::IpAddr::from([10, 0, 0, 1])),
        }
    }

    fn hit(st: &FqdnState, r: &LearnRequest, now_ms: u64) -> bool {
        st.view().try_refresh(
            &r.policy,
            r.names.iter().map(String::as_str),
            r.addresses.iter().copied(),
            now_ms,
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_answer_the_datapath_holds_is_a_hit_and_its_extension_reaches_the_cache() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits::default());
        let mut dp = FakeDatapath::default();
        let r = req(&p, "www.example.com.", &[("192.0.2.1", 60)]);
        assert!(!hit(&st, &r, 0), "nothing committed yet");
        st.learn(&r, &p, Some(&mut dp), 0).unwrap();
        assert!(hit(&st, &r, 50_000), "committed after the write");
        // Another address of the same name is not committed.
        let other = req(
            &p,
            "www.example.com.",
            &[("192.0.2.1", 60), ("192.0.2.2", 60)],
        );
        assert!(!hit(&st, &other, 50_000));
        // The hit at 50 s moved the expiry to 110 s: a tick at 70 s keeps it.
        st.tick(&p, Some(&mut dp), 70_000);
        assert_eq!(
            st.cache
                .get("www.example.com.", ip("192.0.2.1"))
                .unwrap()
                .expires_ms,
            110_000
        );
        assert!(dp.ipcache.contains_key(&ip("192.0.2.1")));
        // Past it, the pair expires, leaves the view first and the datapath after.
        st.tick(&p, Some(&mut dp), 110_000);
        assert!(!hit(&st, &r, 110_001));
        assert!(!dp.ipcache.contains_key(&ip("192.0.2.1")));
    }

    /// Thousands of extensions merge in steps (the lock let go between them)
    /// while hits go on: every extension reaches the cache, none is lost.
    #[test]
    fn extensions_merged_in_steps_all_reach_the_cache_while_hits_go_on() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits::default());
        let mut dp = FakeDatapath::default();
        let n = MERGE_STEP * 3 + 7;
        let reqs: Vec<LearnRequest> = (0..n)
            .map(|i| {
                let ip = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
                req(&p, &format!("h{i}.example.com."), &[(ip.as_str(), 60)])
            })
            .collect();
        for r in &reqs {
            st.learn(r, &p, Some(&mut dp), 0).unwrap();
        }
        let expiry = |st: &FqdnState, r: &LearnRequest| {
            st.cache
                .get(&r.names[0], r.addresses[0].0)
                .map(|e| e.expires_ms)
        };
        // Every pair extended once: the whole view is dirty.
        assert!(reqs.iter().all(|r| hit(&st, r, 10_000)));
        let view = st.view();
        std::thread::scope(|scope| {
            // Hits at later and later times while the control side merges.
            let hitter = scope.spawn(|| {
                for round in 1..=20u64 {
                    for r in &reqs {
                        assert!(view.try_refresh(
                            &r.policy,
                            r.names.iter().map(String::as_str),
                            r.addresses.iter().copied(),
                            10_000 + round * 1_000,
                        ));
                    }
                }
            });
            while !hitter.is_finished() {
                view.merge_into(&mut st.cache);
            }
        });
        view.merge_into(&mut st.cache);
        for r in &reqs {
            assert_eq!(expiry(&st, r), Some(30_000 + 60_000), "{}", r.names[0]);
        }
        assert_eq!(view.lock().dirty.len(), 0);
    }

    #[test]
    fn an_expired_pair_is_never_a_hit() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits::default());
        let mut dp = FakeDatapath::default();
        let r = req(&p, "www.example.com.", &[("192.0.2.1", 10)]);
        st.learn(&r, &p, Some(&mut dp), 0).unwrap();
        // The tick has not run yet, but the pair's own expiry has passed.
        assert!(!hit(&st, &r, 10_000));
        assert!(hit(&st, &r, 9_999));
    }

    #[test]
    fn another_policy_or_a_handover_turns_the_view_off_until_the_next_commit() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits::default());
        let mut dp = FakeDatapath::default();
        let r = req(&p, "www.example.com.", &[("192.0.2.1", 60)]);
        st.learn(&r, &p, Some(&mut dp), 0).unwrap();
        assert!(hit(&st, &r, 1_000));
        let next = Arc::new(compile(POLICY));
        st.learn_all_into(&next);
        assert!(!hit(&st, &r, 1_000), "a new policy clears the view");
        let r2 = req(&next, "www.example.com.", &[("192.0.2.1", 60)]);
        assert!(!hit(&st, &r2, 1_000));
        // The next learn under the installed policy rebuilds it from the cache.
        st.learn(
            &req(&next, "api.example.com.", &[("192.0.2.9", 60)]),
            &next,
            Some(&mut dp),
            1_000,
        )
        .unwrap();
        assert!(hit(&st, &r2, 2_000), "rebuilt from the whole cache");
        assert!(
            !hit(&st, &r, 2_000),
            "answers decided under the old policy still ask"
        );
        st.hand_over(true);
        assert!(
            !hit(&st, &r2, 2_000),
            "after a handover nothing is committed"
        );
        st.learn(&r2, &next, Some(&mut dp), 2_000).unwrap();
        assert!(!hit(&st, &r2, 2_000), "nor recommitted while handed over");
    }

    #[test]
    fn a_failed_write_commits_nothing_and_a_pushed_out_address_is_withdrawn() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits {
            max_ips_per_name: 1,
            ..Limits::default()
        });
        let mut dp = FakeDatapath::default();
        let first = req(&p, "www.example.com.", &[("192.0.2.1", 60)]);
        st.learn(&first, &p, Some(&mut dp), 0).unwrap();
        assert!(hit(&st, &first, 1_000));
        dp.fail = true;
        let second = req(&p, "www.example.com.", &[("192.0.2.2", 60)]);
        st.learn(&second, &p, Some(&mut dp), 1_000).unwrap_err();
        assert!(!hit(&st, &second, 1_000), "not in the datapath");
        // Undone, but withdrawn on the way: it asks the learner again (safe).
        assert!(!hit(&st, &first, 1_000));
        dp.fail = false;
        st.learn(&second, &p, Some(&mut dp), 2_000).unwrap();
        assert!(hit(&st, &second, 2_000));
        assert!(
            !hit(&st, &first, 2_000),
            "pushed out of the name by its limit: no hit"
        );
    }
    #[test]
    fn a_name_with_a_request_on_its_way_gets_no_hit_until_it_is_handled() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits::default());
        let mut dp = FakeDatapath::default();
        let r = req(&p, "www.example.com.", &[("192.0.2.1", 60)]);
        st.learn(&r, &p, Some(&mut dp), 0).unwrap();
        assert!(hit(&st, &r, 1_000));
        let view = st.view();
        let queued = view.begin(&r.names);
        assert!(!hit(&st, &r, 1_000), "an earlier answer's update is queued");
        let other = req(&p, "api.example.com.", &[("192.0.2.1", 60)]);
        st.learn(&other, &p, Some(&mut dp), 0).unwrap();
        assert!(hit(&st, &other, 1_000), "other names are not held up");
        drop(queued);
        assert!(hit(&st, &r, 1_000));
    }

    #[test]
    fn names_a_full_cache_evicts_leave_the_view() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits {
            max_names: 1,
            ..Limits::default()
        });
        let mut dp = FakeDatapath::default();
        // Nobody selects other.org: evictable.
        let first = req(&p, "other.org.", &[("198.51.100.1", 60)]);
        st.learn(&first, &p, Some(&mut dp), 0).unwrap();
        assert!(hit(&st, &first, 1_000));
        assert_eq!(st.view().len(), 1);
        let second = req(&p, "www.example.com.", &[("192.0.2.1", 60)]);
        st.learn(&second, &p, Some(&mut dp), 1_000).unwrap();
        assert!(st.cache.get("other.org.", ip("198.51.100.1")).is_none());
        assert!(!hit(&st, &first, 1_000), "evicted: asks again");
        assert_eq!(st.view().len(), 1, "only www.example.com is left");
    }

    #[test]
    fn a_stopped_or_unsure_state_answers_nothing_from_the_view() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits::default());
        let mut dp = FakeDatapath::default();
        let r = req(&p, "www.example.com.", &[("192.0.2.1", 60)]);
        st.learn(&r, &p, Some(&mut dp), 0).unwrap();
        st.datapath_unsure();
        assert!(!hit(&st, &r, 1_000));
        st.learn(&r, &p, Some(&mut dp), 1_000).unwrap();
        assert!(!hit(&st, &r, 1_000), "not recommitted while a sync is owed");
        st.tick(&p, Some(&mut dp), 2_000);
        st.learn(&r, &p, Some(&mut dp), 2_000).unwrap();
        assert!(hit(&st, &r, 2_000), "the tick's sync made it sure again");
        st.stop();
        assert!(!hit(&st, &r, 2_000));
    }

    /// An empty state dir of this test, and a fresh state in it.
    fn state_in(tag: &str) -> (std::path::PathBuf, FqdnState) {
        let dir = std::env::temp_dir().join(format!("weir-fqdn-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let st = FqdnState::load(&dir, Limits::default());
        (dir, st)
    }

    /// When `name`'s 192.0.2.1 expires in what the next weir would load.
    fn on_disk(dir: &std::path::Path, name: &str) -> Option<u64> {
        super::super::persist::load(dir, Limits::default())
            .unwrap()
            .get(name, ip("192.0.2.1"))
            .map(|e| e.expires_ms)
    }

    /// Extensions alone reach the cache file within the extension interval,
    /// a new entry within a second, everything at shutdown.
    #[test]
    fn extensions_are_written_less_often_than_new_entries() {
        use std::time::{Duration, Instant};

        use super::super::{EXTENSION_SAVE_INTERVAL, now_ms};
        let (dir, mut st) = state_in("view-save");
        let p = Arc::new(compile(POLICY));
        let mut dp = FakeDatapath::default();
        let now = now_ms();
        let r = req(&p, "www.example.com.", &[("192.0.2.1", 60)]);
        st.learn(&r, &p, Some(&mut dp), now).unwrap();
        st.persist_if_due(false);
        assert_eq!(on_disk(&dir, "www.example.com."), Some(now + 60_000));
        // A hit 30 s later moves the expiry; two seconds after the last write
        // that alone is not written ...
        assert!(hit(&st, &r, now + 30_000));
        st.last_saved = Some(Instant::now() - Duration::from_secs(2));
        st.persist_if_due(false);
        assert_eq!(on_disk(&dir, "www.example.com."), Some(now + 60_000));
        // ... but a new entry is, with the extension ...
        let api = req(&p, "api.example.com.", &[("192.0.2.1", 60)]);
        st.learn(&api, &p, Some(&mut dp), now).unwrap();
        st.persist_if_due(false);
        assert_eq!(on_disk(&dir, "api.example.com."), Some(now + 60_000));
        assert_eq!(on_disk(&dir, "www.example.com."), Some(now + 90_000));
        // ... and an extension alone once the interval has passed.
        assert!(hit(&st, &r, now + 40_000));
        st.persist_if_due(false);
        assert_eq!(on_disk(&dir, "www.example.com."), Some(now + 90_000));
        st.last_saved = Some(Instant::now() - EXTENSION_SAVE_INTERVAL);
        st.persist_if_due(false);
        assert_eq!(on_disk(&dir, "www.example.com."), Some(now + 100_000));
        // At shutdown everything is written.
        assert!(hit(&st, &r, now + 50_000));
        st.stop();
        assert_eq!(on_disk(&dir, "www.example.com."), Some(now + 110_000));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A handover writes at once what was learned and extended since the last
    /// write (the new weir starts from that file), and stops the view; if the
    /// file cannot be written, nothing is handed over.
    #[test]
    fn a_handover_writes_the_cache_at_once_or_is_refused() {
        use super::super::{now_ms, persist};
        let (dir, mut st) = state_in("handover");
        let p = Arc::new(compile(POLICY));
        let mut dp = FakeDatapath::default();
        let now = now_ms();
        let r = req(&p, "www.example.com.", &[("192.0.2.1", 60)]);
        st.learn(&r, &p, Some(&mut dp), now).unwrap();
        st.persist_if_due(false);
        // Learned and extended within the second after that write: the tick
        // would not write them yet; the handover does.
        let api = req(&p, "api.example.com.", &[("192.0.2.1", 60)]);
        st.learn(&api, &p, Some(&mut dp), now).unwrap();
        assert!(hit(&st, &r, now + 30_000));
        let in_file = || std::fs::read_to_string(persist::path(&dir)).unwrap();
        assert!(
            !in_file().contains("api.example.com."),
            "in the journal only"
        );
        st.hand_over_with_cache().unwrap();
        assert!(in_file().contains("api.example.com."));
        assert!(st.is_handed_over());
        assert_eq!(on_disk(&dir, "api.example.com."), Some(now + 60_000));
        assert_eq!(on_disk(&dir, "www.example.com."), Some(now + 90_000));
        assert!(
            !hit(&st, &r, now + 40_000),
            "the view still answers after the handover"
        );

        // The state dir is gone (a file in its place): refused, not handed over.
        st.hand_over(false);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, b"").unwrap();
        let err = st.hand_over_with_cache().unwrap_err();
        assert!(err.contains("could not write the FQDN cache"), "{err}");
        assert!(!st.is_handed_over());
        // Serving as before: the next answer is committed to the view again.
        let other = req(&p, "other.example.com.", &[("192.0.2.3", 60)]);
        st.learn(&other, &p, Some(&mut dp), now).unwrap();
        assert!(hit(&st, &other, now + 1_000), "no view after a refusal");
        let _ = std::fs::remove_file(&dir);
    }

    /// A `kill -9` within the second after a cache write forgets nothing: what
    /// each answer changed is in the journal, which loading replays, and the
    /// next cache write empties.
    #[test]
    fn answers_learned_since_the_last_cache_write_survive_a_crash() {
        use super::super::{now_ms, persist};
        let (dir, mut st) = state_in("journal");
        let p = Arc::new(compile(POLICY));
        let mut dp = FakeDatapath::default();
        let now = now_ms();
        let www = req(&p, "www.example.com.", &[("192.0.2.1", 60)]);
        st.learn(&www, &p, Some(&mut dp), now).unwrap();
        st.persist_if_due(false);
        let api = req(&p, "api.example.com.", &[("192.0.2.2", 120)]);
        st.learn(&api, &p, Some(&mut dp), now).unwrap();
        let file_only = |name: &str, ip: &str| {
            let saved = std::fs::read_to_string(persist::path(&dir)).unwrap();
            saved.contains(name) && saved.contains(ip)
        };
        assert!(
            !file_only("api.example.com.", "192.0.2.2"),
            "in the journal only"
        );
        // The crash: nothing more is written.
        drop(st);
        let back = FqdnState::load(&dir, Limits::default());
        assert_eq!(
            back.cache
                .get("api.example.com.", ip("192.0.2.2"))
                .map(|e| e.expires_ms),
            Some(now + 120_000)
        );
        assert!(
            back.cache
                .get("www.example.com.", ip("192.0.2.1"))
                .is_some()
        );
        // The next write covers the journal and empties it.
        let mut back = back;
        back.dirty = true;
        back.persist_if_due(true);
        assert!(file_only("api.example.com.", "192.0.2.2"));
        let journal = super::super::journal::path(&dir);
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
