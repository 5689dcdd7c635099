//! The FQDN allowlist feedback loop: addresses from allowed DNS answers become
//! learned identities of the current policy and ipcache entries of the
//! datapath, before the answer is released (issue 9).
//!
//! The proxy hands answers to a [`LearnerHandle`] (never blocking); the control
//! thread, which owns the datapath and installs every policy, keeps a
//! [`FqdnState`]: the name cache (kept across reloads and restarts), the identity
//! allocator the learned identities come from, and the expiry tick.

pub mod cache;
pub mod expiry;
pub mod handover;
pub mod journal;
pub mod learner;
pub mod persist;
pub mod view;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::warn;
use weir_policy::identity::IdentityAllocator;
use weir_policy::{CompiledPolicy, FqdnSelectorId, LearnedIdentity};

use crate::datapath::{Datapath, DatapathError};
use crate::state;

pub use cache::{Cache, Limits};
pub use learner::LearnerHandle;
pub use view::CommittedView;

/// How long the cache file may lag behind when the only change is expiries
/// moved later. Every answer served from the view extends its pairs, so with a
/// busy resolver the cache "changes" every second, and rewriting a 25 000-name
/// file each second cost the control thread 3 µs per query at 10 000 q/s
/// (`tests/perf/dns.sh`). New, removed and kept entries are still written
/// within a second; a crash forgets at most this much of the extensions (an
/// address then expires after the new weir starts as its earlier answer said,
/// unless it is asked for again or a connection keeps it).
const EXTENSION_SAVE_INTERVAL: Duration = Duration::from_secs(10);

/// What the FQDN loop needs of the datapath (a trait so the loop is testable
/// without a kernel).
pub trait FqdnDatapath {
    /// Whether the installed policy entries already know learned identity `id`.
    fn has_fqdn_identity(&self, id: u32) -> bool;
    /// Writes single-address ipcache entries (`None`: no longer learned, the
    /// entry `policy` gives the address without learning), all or nothing.
    fn write_learned(
        &mut self,
        policy: &CompiledPolicy,
        ips: &[(IpAddr, Option<u32>)],
    ) -> Result<(), DatapathError>;
    /// Brings every map in line with `policy` (learned addresses included).
    fn sync(&mut self, policy: &CompiledPolicy) -> Result<(), DatapathError>;
    /// Destinations of live connections (conntrack).
    fn live_destinations(&self) -> Result<HashSet<IpAddr>, DatapathError>;
}

impl FqdnDatapath for Datapath {
    fn has_fqdn_identity(&self, id: u32) -> bool {
        Datapath::has_fqdn_identity(self, id)
    }
    fn write_learned(
        &mut self,
        policy: &CompiledPolicy,
        ips: &[(IpAddr, Option<u32>)],
    ) -> Result<(), DatapathError> {
        Datapath::write_learned(self, policy, ips)
    }
    fn sync(&mut self, policy: &CompiledPolicy) -> Result<(), DatapathError> {
        Datapath::sync(self, policy)
    }
    fn live_destinations(&self) -> Result<HashSet<IpAddr>, DatapathError> {
        Datapath::live_destinations(self)
    }
}

/// Wall-clock now, unix milliseconds (the cache's clock: it survives restarts).
/// Items of a whole-cache walk between two offers of the CPU (see
/// [`offer_cpu`]): a few hundred microseconds of work.
pub(crate) const WALK_SLICE: usize = 256;

/// Called with the index of each item of a walk over the whole cache (the
/// tick's expiry scan, a merge after a burst, the cache file): every
/// [`WALK_SLICE`] items the control thread yields its core. It shares that
/// core with the proxy's workers (one in the benchmarks), and a 25 000-name
/// walk in one go kept DNS answers waiting for milliseconds.
pub(crate) fn offer_cpu(i: usize) {
    if i > 0 && i.is_multiple_of(WALK_SLICE) {
        std::thread::yield_now();
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The control thread's FQDN state.
pub struct FqdnState {
    pub cache: Cache,
    /// The same assignments `Sources::compile` uses (both go through the state
    /// dir's `identities.json`, on this one thread), so ids never collide.
    ids: IdentityAllocator,
    /// `None`: nothing is written (tests).
    state_dir: Option<PathBuf>,
    /// What learned answers changed since the cache file was last written
    /// (`None` with no state dir; see `persist.rs`).
    journal: Option<journal::Journal>,
    last_journal_log: Option<Instant>,
    /// The cache changed beyond expiries moving later: written within a second.
    dirty: bool,
    /// Only expiries moved later (hits the proxy answered from the view): written
    /// within [`EXTENSION_SAVE_INTERVAL`] (see there).
    extended: bool,
    last_saved: Option<Instant>,
    /// A tick's sync failed: the next tick tries again.
    resync: bool,
    /// Addresses whose ipcache entry a failed tick could not bring in line
    /// with the policy: the next tick writes them again.
    pending: std::collections::BTreeSet<IpAddr>,
    /// When conntrack was last read for expired entries (unix ms).
    last_ct_check_ms: Option<u64>,
    /// A new weir has taken over (see `handover.rs`).
    handed_over: bool,
    /// When a refusal of a full cache, and of a client beyond its share, was
    /// last logged (apart: a client hammering its share must not hide the
    /// node's cache filling up).
    last_full_log: Option<Instant>,
    last_client_full_log: Option<Instant>,
    /// What the proxy may answer from without asking (see `view.rs`).
    view: std::sync::Arc<CommittedView>,
}

impl FqdnState {
    /// The cache of the previous run (after a crash too) and the identity
    /// assignments. An unreadable cache file is logged and starts empty.
    pub fn load(state_dir: &Path, limits: Limits) -> Self {
        let (cache, epoch) = persist::load_with_epoch(state_dir, limits).unwrap_or_else(|e| {
            warn!(error = %e, "could not read the FQDN cache; starting with an empty one");
            // Lines of no file: only what this run writes under its own.
            (Cache::new(limits), persist::fresh_epoch())
        });
        FqdnState {
            cache,
            ids: state::load_identities(state_dir),
            state_dir: Some(state_dir.to_path_buf()),
            journal: Some(journal::Journal::new(state_dir, epoch)),
            last_journal_log: None,
            dirty: false,
            extended: false,
            last_saved: None,
            resync: false,
            pending: Default::default(),
            last_ct_check_ms: None,
            handed_over: false,
            last_full_log: None,
            last_client_full_log: None,
            view: std::sync::Arc::new(CommittedView::new(limits)),
        }
    }

    /// A state that keeps nothing on disk.
    pub fn in_memory(limits: Limits) -> Self {
        FqdnState {
            cache: Cache::new(limits),
            ids: IdentityAllocator::default(),
            state_dir: None,
            journal: None,
            last_journal_log: None,
            dirty: false,
            extended: false,
            last_saved: None,
            resync: false,
            pending: Default::default(),
            last_ct_check_ms: None,
            handed_over: false,
            last_full_log: None,
            last_client_full_log: None,
            view: std::sync::Arc::new(CommittedView::new(limits)),
        }
    }

    /// The datapath may not hold what the installed policy says (a failed
    /// restore): the tick syncs until it succeeds, and nothing is committed
    /// to the view meanwhile.
    pub fn datapath_unsure(&mut self) {
        self.resync = true;
        let merged = self.view.clear(&mut self.cache);
        self.extended |= merged;
    }

    /// The control thread stops: no answer is released from the view any
    /// more, and the cache (with every extension) is written.
    pub fn stop(&mut self) {
        let merged = self.view.clear(&mut self.cache);
        self.extended |= merged;
        self.persist_if_due(true);
    }

    /// The committed view the proxy's learner handle answers from.
    pub fn view(&self) -> std::sync::Arc<CommittedView> {
        self.view.clone()
    }

    /// Moves the expiries the proxy extended into the cache.
    fn merge_view(&mut self) {
        let merged = self.view.merge_into(&mut self.cache);
        self.extended |= merged;
    }

    /// Learns every cached address into a newly compiled `policy`, before it is
    /// installed, so its `toFQDNs` selectors (new ones included) select the
    /// addresses already seen. Expired entries kept for a live connection are
    /// cached still, so they stay learned too.
    pub fn learn_all_into(&mut self, policy: &CompiledPolicy) {
        // A new policy is on its way to the datapath: nothing is committed
        // until the learner commits again under the installed one.
        let merged = self.view.clear(&mut self.cache);
        self.extended |= merged;
        // `compile` may have assigned identities since: start from its file.
        if let Some(dir) = &self.state_dir {
            self.ids = state::load_identities(dir);
        }
        let before = self.ids.assignments().count();
        // What a full cache may evict depends on the policy.
        let newly = self
            .cache
            .mark_selected(|n| !policy.fqdn_selectors_matching(n).is_empty());
        // Names a client brought while nobody selected them count against its
        // share now: beyond it, on a nearly full cache, they expire (a live
        // connection still keeps its address).
        let shed = self.cache.shed_beyond_shares(&newly, now_ms());
        if shed > 0 {
            self.dirty = true;
            warn!(
                entries = shed,
                "the new policy selects names clients brought beyond their --fqdn-max-entries-per-client share while the FQDN cache is nearly full; those entries expire now"
            );
        }
        let ips: Vec<IpAddr> = self.cache.ips().collect();
        for ip in ips {
            let sels = self.cache.selectors_for(ip, policy);
            if !sels.is_empty() {
                policy.learn_fqdn_ip(ip, &sels, &mut self.ids);
            }
        }
        self.save_ids_if_grown(before);
    }

    /// Makes `ip`'s learned identity carry exactly `sels` (forgetting it when
    /// there are none). Its identity before and after.
    fn relearn(
        &mut self,
        policy: &CompiledPolicy,
        ip: IpAddr,
        sels: &[FqdnSelectorId],
    ) -> (Option<LearnedIdentity>, Option<u32>) {
        let old = policy.learned_fqdn_ip(ip);
        if let Some(o) = &old {
            if o.selectors == sels {
                return (old.clone(), Some(o.identity));
            }
            // `learn_fqdn_ip` adds to what was learned: narrowing needs a forget.
            policy.forget_fqdn_ip(ip);
        }
        let new = if sels.is_empty() {
            None
        } else {
            policy.learn_fqdn_ip(ip, sels, &mut self.ids)
        };
        (old, new)
    }

    /// Puts `ip`'s learning back to `old`.
    fn restore(&mut self, policy: &CompiledPolicy, ip: IpAddr, old: Option<&LearnedIdentity>) {
        policy.forget_fqdn_ip(ip);
        if let Some(o) = old {
            policy.learn_fqdn_ip(ip, &o.selectors, &mut self.ids);
        }
    }

    fn save_ids_if_grown(&mut self, before: usize) {
        // After a handover the identities file is the new weir's.
        if self.handed_over || self.ids.assignments().count() == before {
            return;
        }
        if let Some(dir) = &self.state_dir
            && let Err(e) = state::save_identities(dir, &self.ids)
        {
            warn!(error = %e, dir = %dir.display(), "could not save identities");
        }
    }

    /// Writes the cache when it changed and the last write is a second old —
    /// [`EXTENSION_SAVE_INTERVAL`] old when only expiries moved later — or, with
    /// `force` (at shutdown), whenever it changed.
    pub fn persist_if_due(&mut self, force: bool) {
        if self.state_dir.is_none() {
            return;
        }
        let since = |d: Duration| self.last_saved.is_none_or(|t| t.elapsed() >= d);
        // Extensions wait in the view until a write may take them (a merge
        // takes the view's lock, which the proxy takes for every answer).
        let due = force
            || since(EXTENSION_SAVE_INTERVAL)
            || (self.dirty && since(Duration::from_secs(1)));
        if !due {
            return;
        }
        self.merge_view();
        if self.handed_over {
            // The cache file is the new weir's now; ours goes beside it at the end.
            if force {
                self.persist_handed_over();
            }
            return;
        }
        if !self.dirty && !self.extended {
            return;
        }
        if let Err(e) = self.save_cache() {
            warn!(error = %e, "could not write the FQDN cache");
        }
    }

    /// Writes the cache file, then empties the journal it now covers.
    fn save_cache(&mut self) -> Result<(), persist::PersistError> {
        let Some(dir) = &self.state_dir else {
            return Ok(());
        };
        let epoch = persist::save(dir, &self.cache)?;
        self.dirty = false;
        self.extended = false;
        self.last_saved = Some(Instant::now());
        if let Some(j) = &mut self.journal
            && let Err(e) = j.restart(epoch)
        {
            // Its lines carry the older epoch: they no longer replay.
            warn!(error = %e, "could not empty the FQDN journal");
        }
        Ok(())
    }

    /// Appends the cache's entries for `pairs` (just changed) to the journal:
    /// a learned answer's before it is released. Not after a handover (the
    /// state files are the new weir's). A failure is logged: the maps hold the
    /// addresses either way, only a crash before the next cache write would
    /// forget them.
    fn journal_pairs<'a>(&mut self, pairs: impl Iterator<Item = (&'a str, IpAddr)>) {
        if self.handed_over {
            return;
        }
        let Some(j) = &mut self.journal else {
            return;
        };
        let cache = &self.cache;
        let changes = pairs.map(|(name, ip)| (name, ip, cache.get(name, ip).copied()));
        if let Err(e) = j.append(changes)
            && self
                .last_journal_log
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last_journal_log = Some(Instant::now());
            warn!(error = %e, "could not append to the FQDN journal; a crash before the next cache write forgets these addresses");
        }
    }

    /// `weir fqdn list`: every cached name with its addresses as `policy` (the
    /// installed one) sees them, with the expiries the proxy extended.
    pub fn list(&mut self, policy: &CompiledPolicy, now_ms: u64) -> Vec<crate::api::pb::FqdnName> {
        use crate::api::pb;
        self.merge_view();
        let sel_text = |s: &FqdnSelectorId| {
            policy
                .fqdn_selectors()
                .get(s.0 as usize)
                .map_or_else(|| format!("#{}", s.0), ToString::to_string)
        };
        self.cache
            .iter()
            .map(|(name, ips)| pb::FqdnName {
                name: name.to_string(),
                selectors: policy
                    .fqdn_selectors_matching(name)
                    .iter()
                    .map(sel_text)
                    .collect(),
                addresses: ips
                    .iter()
                    .map(|(ip, e)| {
                        let learned = policy.learned_fqdn_ip(*ip);
                        pb::FqdnAddress {
                            ip: ip.to_string(),
                            identity: learned.as_ref().map_or(0, |l| l.identity),
                            expires_in_secs: e.expires_ms.saturating_sub(now_ms).div_ceil(1000),
                            kept: e.kept,
                            selectors: learned
                                .iter()
                                .flat_map(|l| l.selectors.iter().map(sel_text))
                                .collect(),
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use std::collections::HashMap;

    /// A datapath in memory: the ipcache, the identities its entries know, and
    /// switches to make writes fail.
    #[derive(Default)]
    pub struct FakeDatapath {
        pub ipcache: HashMap<IpAddr, u32>,
        pub known: HashSet<u32>,
        pub live: HashSet<IpAddr>,
        pub fail: bool,
        pub syncs: usize,
        pub writes: usize,
    }

    impl FqdnDatapath for FakeDatapath {
        fn has_fqdn_identity(&self, id: u32) -> bool {
            self.known.contains(&id)
        }
        fn write_learned(
            &mut self,
            _policy: &CompiledPolicy,
            ips: &[(IpAddr, Option<u32>)],
        ) -> Result<(), DatapathError> {
            if self.fail {
                return Err(DatapathError::Map {
                    map: "weir_ipcache",
                    detail: "injected".into(),
                });
            }
            self.writes += 1;
            for (ip, id) in ips {
                match id {
                    Some(id) => self.ipcache.insert(*ip, *id),
                    None => self.ipcache.remove(ip),
                };
            }
            Ok(())
        }
        fn sync(&mut self, policy: &CompiledPolicy) -> Result<(), DatapathError> {
            if self.fail {
                return Err(DatapathError::Map {
                    map: "weir_policy",
                    detail: "injected".into(),
                });
            }
            self.syncs += 1;
            let learned = policy.learned_fqdn_ips();
            self.known = learned.iter().map(|(_, l)| l.identity).collect();
            self.ipcache = learned
                .into_iter()
                .map(|(ip, l)| (ip, l.identity))
                .collect();
            Ok(())
        }
        fn live_destinations(&self) -> Result<HashSet<IpAddr>, DatapathError> {
            Ok(self.live.clone())
        }
    }

    pub const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toFQDNs: [{matchPattern: '*.example.com'}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  - toFQDNs: [{matchName: api.example.com}]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
"#;

    pub const ENDPOINTS: &str =
        "endpoints:\n  - {name: client, ips: [10.0.0.1], labels: {app: client}}\n";

    pub fn compile(policy: &str) -> CompiledPolicy {
        let p = weir_policy::parse_policies(policy, "p.yaml").unwrap();
        let e = weir_policy::parse_endpoints(ENDPOINTS, "e.yaml").unwrap();
        CompiledPolicy::compile(&p, &e, &mut IdentityAllocator::default()).unwrap()
    }
}
