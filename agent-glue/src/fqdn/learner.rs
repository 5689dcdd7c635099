//! The proxy's side ([`LearnerHandle`], a message to the control thread that
//! never blocks) and the control thread's side ([`FqdnState::learn`]: cache,
//! policy, datapath, reply).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;

use tokio::sync::oneshot;
use tracing::warn;
use weir_parsers::dns::AnswerFacts;
use weir_policy::{CompiledPolicy, LearnedIdentity, canonical_ip};
use weir_proxy::fqdn::{FqdnLearner, LearnError, LearnRequest};

use super::cache::{Full, Inserted};
use super::{CommittedView, FqdnDatapath, FqdnState};
use crate::control::ControlMsg;

/// The error of an answer refused because the cache is full (logged here, at
/// most once a second, rather than by the caller for every answer).
pub const CACHE_FULL: &str = "the FQDN cache is full";
/// The error of an answer refused because its client's share of the cache is
/// used up (`--fqdn-max-entries-per-client`); logged here like [`CACHE_FULL`].
pub const CLIENT_FULL: &str = "this DNS client holds more than --fqdn-max-entries-per-client entries of selected names and the FQDN cache is nearly full";

/// Requests nobody waits for that may be queued; beyond, they are dropped (they
/// only feed the cache).
pub const MAX_UNWAITED: usize = 1024;
/// Requests an answer waits for that may be queued; beyond, the answer gets
/// SERVFAIL (`LearnError::Unavailable`) rather than an unbounded queue.
pub const MAX_WAITED: usize = 16384;

/// One learning request on its way to the control thread.
pub struct LearnJob {
    pub req: LearnRequest,
    pub reply: oneshot::Sender<Result<(), LearnError>>,
    _pending: Pending,
    /// Dropped after the control thread handled the job (or lost it): until
    /// then its names get no hit from the view.
    _in_flight: super::view::InFlight,
}

/// Counts a queued request; dropping it (handled, or lost with the channel)
/// frees its place.
struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The [`FqdnLearner`] the proxy calls: the committed view, else a channel
/// send and two counters.
pub struct LearnerHandle {
    tx: Sender<ControlMsg>,
    view: Arc<CommittedView>,
    unwaited: Arc<AtomicUsize>,
    waited: Arc<AtomicUsize>,
}

impl LearnerHandle {
    pub fn new(tx: Sender<ControlMsg>, view: Arc<CommittedView>) -> Self {
        LearnerHandle {
            tx,
            view,
            unwaited: Arc::default(),
            waited: Arc::default(),
        }
    }
}

impl FqdnLearner for LearnerHandle {
    fn try_committed(&self, policy: &CompiledPolicy, answer: &AnswerFacts) -> bool {
        self.view.try_refresh(
            policy,
            answer.names(),
            answer.addresses.iter().map(|a| (a.ip, a.ttl)),
            super::now_ms(),
        )
    }

    fn learn(&self, req: LearnRequest, wait: bool) -> oneshot::Receiver<Result<(), LearnError>> {
        let (reply, rx) = oneshot::channel();
        // Every pair already in the datapath: nothing to wait for, and no
        // wake-up of the control thread (the expiries are extended in the view).
        if self.view.try_refresh(
            &req.policy,
            req.names.iter().map(String::as_str),
            req.addresses.iter().copied(),
            super::now_ms(),
        ) {
            let _ = reply.send(Ok(()));
            return rx;
        }
        let (counter, max) = if wait {
            (&self.waited, MAX_WAITED)
        } else {
            (&self.unwaited, MAX_UNWAITED)
        };
        if counter.fetch_add(1, Ordering::Relaxed) >= max {
            counter.fetch_sub(1, Ordering::Relaxed);
            let _ = reply.send(Err(LearnError::Unavailable(
                "too many DNS answers wait for the datapath",
            )));
            return rx;
        }
        let in_flight = self.view.begin(&req.names);
        let job = LearnJob {
            req,
            reply,
            _pending: Pending(counter.clone()),
            _in_flight: in_flight,
        };
        if let Err(std::sync::mpsc::SendError(ControlMsg::Learn(job))) =
            self.tx.send(ControlMsg::Learn(job))
        {
            let _ = job.reply.send(Err(LearnError::Unavailable(
                "the control thread has stopped",
            )));
        }
        rx
    }
}

impl FqdnState {
    /// Learns an allowed answer: caches every (name, address), learns each
    /// address into `policy` (the installed one) with the selectors of every
    /// name it is cached under, then writes the datapath — only ipcache entries
    /// when the policy entries already know the identities, a full sync
    /// otherwise. Returns once the writes are done; on failure everything this
    /// request learned is undone and the answer must not be released.
    pub fn learn(
        &mut self,
        req: &LearnRequest,
        policy: &CompiledPolicy,
        dp: Option<&mut dyn FqdnDatapath>,
        now_ms: u64,
    ) -> Result<(), LearnError> {
        // Out of the view before the cache changes (and merged, so no hit's
        // extension is lost); back in once the datapath holds the answer.
        let merged = self.view.take_names(&mut self.cache, &req.names);
        self.extended |= merged;
        let mut done = Inserted::default();
        let selected: Vec<bool> = req
            .names
            .iter()
            .map(|n| !policy.fqdn_selectors_matching(n).is_empty())
            .collect();
        for (ip, ttl) in &req.addresses {
            for (name, sel) in req.names.iter().zip(&selected) {
                let inserted = self.cache.insert_for(
                    Some(req.client),
                    name,
                    *ip,
                    *ttl,
                    *sel,
                    now_ms,
                    &mut done,
                );
                if let Err(full) = inserted {
                    // The whole answer or nothing: a waited answer gets
                    // SERVFAIL, one nobody waits for is dropped.
                    self.cache.undo(done);
                    let last = match full {
                        Full::Client => &mut self.last_client_full_log,
                        Full::Names | Full::Ips => &mut self.last_full_log,
                    };
                    if last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)) {
                        *last = Some(std::time::Instant::now());
                        warn!(names = ?req.names, client = %req.client, error = %full, "refusing a DNS answer's new addresses");
                    }
                    return Err(LearnError::Full(match full {
                        Full::Client => CLIENT_FULL,
                        Full::Names | Full::Ips => CACHE_FULL,
                    }));
                }
            }
        }
        if !done.is_empty() {
            self.dirty = true;
        }
        // Addresses of this answer, and those a name's limit pushed out (which
        // may have lost selectors).
        let affected: BTreeSet<IpAddr> = req
            .addresses
            .iter()
            .map(|(ip, _)| canonical_ip(*ip))
            .chain(done.addresses())
            .collect();
        let before = self.ids.assignments().count();
        let mut undo: Vec<(IpAddr, Option<LearnedIdentity>)> = Vec::new();
        let mut writes: Vec<(IpAddr, Option<u32>)> = Vec::new();
        let mut full_sync = false;
        for ip in affected {
            let sels = self.cache.selectors_for(ip, policy);
            let (old, new) = self.relearn(policy, ip, &sels);
            let old_id = old.as_ref().map(|o| o.identity);
            if old_id == new {
                continue;
            }
            undo.push((ip, old));
            match new {
                Some(id) => {
                    writes.push((ip, Some(id)));
                    full_sync |= dp.as_ref().is_some_and(|d| !d.has_fqdn_identity(id));
                }
                // The datapath puts back what the policy gives the address
                // (a CIDR rule's own /32, say).
                None => writes.push((ip, None)),
            }
        }
        self.save_ids_if_grown(before);
        let Some(dp) = dp else {
            self.commit_answer(req, policy, &done, now_ms);
            return Ok(());
        };
        if writes.is_empty() && !full_sync {
            self.commit_answer(req, policy, &done, now_ms);
            return Ok(());
        }
        let written = if full_sync {
            dp.sync(policy)
        } else {
            dp.write_learned(policy, &writes)
        };
        if let Err(e) = written {
            for (ip, old) in undo.into_iter().rev() {
                self.restore(policy, ip, old.as_ref());
            }
            self.cache.undo(done);
            return Err(LearnError::Datapath(e.to_string()));
        }
        self.commit_answer(req, policy, &done, now_ms);
        Ok(())
    }

    /// The datapath holds `req`'s pairs under `policy` (the installed one):
    /// what changed goes to the journal, and the proxy may answer the pairs
    /// from the view from now on. Not after a handover (the datapath is the
    /// new weir's), nor while a sync is owed.
    fn commit_answer(
        &mut self,
        req: &LearnRequest,
        policy: &CompiledPolicy,
        done: &Inserted,
        now_ms: u64,
    ) {
        self.journal_pairs(done.journal.iter().map(|(n, ip, _)| (n.as_str(), *ip)));
        // Names a full cache evicted for this answer leave the view too.
        self.view.drop_missing(
            &self.cache,
            done.journal.iter().map(|(n, ip, _)| (n.as_str(), *ip)),
        );
        // Not while the datapath may lack what the policy says (a failed sync
        // the tick retries): the view would promise what the kernel lacks.
        if self.handed_over || self.resync {
            return;
        }
        let pairs = req
            .names
            .iter()
            .flat_map(|n| req.addresses.iter().map(move |(ip, _)| (n.as_str(), *ip)));
        self.view.commit(policy, &self.cache, pairs, now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::super::Limits;
    use super::super::test_support::*;
    use super::*;

    fn req(policy: &Arc<CompiledPolicy>, names: &[&str], ips: &[(&str, u32)]) -> LearnRequest {
        LearnRequest {
            names: names.iter().map(ToString::to_string).collect(),
            addresses: ips.iter().map(|(i, t)| (i.parse().unwrap(), *t)).collect(),
            policy: policy.clone(),
            client: weir_proxy::fqdn::DnsClient::new(std::net::IpAddr::from([10, 0, 0, 1])),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_carries_the_selectors_of_every_name_it_answered() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits::default());
        let mut dp = FakeDatapath::default();
        st.learn(
            &req(&p, &["www.example.com."], &[("192.0.2.1", 60)]),
            &p,
            Some(&mut dp),
            0,
        )
        .unwrap();
        let one = p.learned_fqdn_ip(ip("192.0.2.1")).unwrap();
        assert_eq!(one.selectors.len(), 1, "*.example.com only");
        assert_eq!(dp.syncs, 1, "a new identity needs the policy entries");
        assert_eq!(dp.ipcache[&ip("192.0.2.1")], one.identity);
        // The same address for api.example.com: both selectors.
        st.learn(
            &req(&p, &["api.example.com."], &[("192.0.2.1", 60)]),
            &p,
            Some(&mut dp),
            0,
        )
        .unwrap();
        let both = p.learned_fqdn_ip(ip("192.0.2.1")).unwrap();
        assert_eq!(both.selectors.len(), 2);
        assert_eq!(dp.ipcache[&ip("192.0.2.1")], both.identity);
        // Another address with an identity the entries know: only the ipcache.
        let syncs = dp.syncs;
        st.learn(
            &req(&p, &["api.example.com."], &[("192.0.2.2", 60)]),
            &p,
            Some(&mut dp),
            0,
        )
        .unwrap();
        assert_eq!(dp.syncs, syncs, "no full sync for a known identity");
        assert_eq!(dp.writes, 1);
        assert_eq!(dp.ipcache[&ip("192.0.2.2")], both.identity);
        // An answer nobody selects is cached, not learned.
        st.learn(
            &req(&p, &["other.org."], &[("198.51.100.1", 60)]),
            &p,
            Some(&mut dp),
            0,
        )
        .unwrap();
        assert!(st.cache.has_ip(ip("198.51.100.1")));
        assert!(p.learned_fqdn_ip(ip("198.51.100.1")).is_none());
    }

    #[test]
    fn a_failed_datapath_write_undoes_the_learning_and_the_cache() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits::default());
        let mut dp = FakeDatapath::default();
        st.learn(
            &req(&p, &["www.example.com."], &[("192.0.2.1", 60)]),
            &p,
            Some(&mut dp),
            0,
        )
        .unwrap();
        let before = p.learned_fqdn_ip(ip("192.0.2.1")).unwrap();
        dp.fail = true;
        let e = st
            .learn(
                &req(
                    &p,
                    &["api.example.com."],
                    &[("192.0.2.1", 60), ("192.0.2.7", 60)],
                ),
                &p,
                Some(&mut dp),
                1_000,
            )
            .unwrap_err();
        assert!(matches!(e, LearnError::Datapath(_)));
        assert_eq!(
            p.learned_fqdn_ip(ip("192.0.2.1")),
            Some(before),
            "back as it was"
        );
        assert!(
            p.learned_fqdn_ip(ip("192.0.2.7")).is_none(),
            "new: forgotten"
        );
        assert!(!st.cache.has_ip(ip("192.0.2.7")));
        assert!(st.cache.get("api.example.com.", ip("192.0.2.1")).is_none());
        assert!(st.cache.get("www.example.com.", ip("192.0.2.1")).is_some());
    }

    #[test]
    fn a_new_policy_learns_the_cached_addresses_before_it_is_installed() {
        // Seen while no policy selected it ...
        let none = Arc::new(compile(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector: {matchLabels: {app: other}}\n  egress: [{toEndpoints: [{}]}]\n",
        ));
        let mut st = FqdnState::in_memory(Limits::default());
        st.learn(
            &req(&none, &["api.example.com."], &[("192.0.2.5", 60)]),
            &none,
            None,
            0,
        )
        .unwrap();
        assert!(none.learned_fqdn_ips().is_empty());
        // ... selected by the next one as soon as it is compiled.
        let next = compile(POLICY);
        st.learn_all_into(&next);
        let l = next.learned_fqdn_ip(ip("192.0.2.5")).unwrap();
        assert_eq!(
            l.selectors.len(),
            2,
            "both selectors select api.example.com"
        );
    }

    #[test]
    fn the_queue_bounds_refuse_rather_than_block() {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = LearnerHandle::new(tx, Arc::new(CommittedView::new(Limits::default())));
        let p = Arc::new(compile(POLICY));
        let mut receivers = Vec::new();
        for _ in 0..MAX_UNWAITED {
            receivers.push(h.learn(req(&p, &["a.example.com."], &[]), false));
        }
        let mut over = h.learn(req(&p, &["a.example.com."], &[]), false);
        assert!(matches!(
            over.try_recv(),
            Ok(Err(LearnError::Unavailable(_)))
        ));
        // Handling one frees its place.
        drop(rx.recv().unwrap());
        let mut again = h.learn(req(&p, &["a.example.com."], &[]), false);
        assert!(again.try_recv().is_err(), "queued, no reply yet");
        // The control thread gone: waited requests are told at once.
        drop(rx);
        let mut gone = h.learn(req(&p, &["a.example.com."], &[]), true);
        assert!(matches!(
            gone.try_recv(),
            Ok(Err(LearnError::Unavailable(_)))
        ));
    }

    #[test]
    fn a_full_cache_refuses_new_addresses_and_undoes_the_answer() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits {
            max_ips: 1,
            ..Limits::default()
        });
        let mut dp = FakeDatapath::default();
        st.learn(
            &req(&p, &["www.example.com."], &[("192.0.2.1", 60)]),
            &p,
            Some(&mut dp),
            0,
        )
        .unwrap();
        let e = st
            .learn(
                &req(
                    &p,
                    &["api.example.com."],
                    &[("192.0.2.1", 60), ("192.0.2.2", 60)],
                ),
                &p,
                Some(&mut dp),
                0,
            )
            .unwrap_err();
        assert!(matches!(e, LearnError::Full(m) if m == CACHE_FULL));
        assert!(st.cache.get("api.example.com.", ip("192.0.2.1")).is_none());
        assert!(!st.cache.has_ip(ip("192.0.2.2")));
        assert!(p.learned_fqdn_ip(ip("192.0.2.2")).is_none());
        assert_eq!(
            p.learned_fqdn_ip(ip("192.0.2.1")).unwrap().selectors.len(),
            1
        );
        // Known addresses still refresh.
        st.learn(
            &req(&p, &["www.example.com."], &[("192.0.2.1", 600)]),
            &p,
            Some(&mut dp),
            0,
        )
        .unwrap();
    }

    /// Per-name limit 2, the name holds {X (oldest), W}, the answer is [Y, X]
    /// and the datapath write fails: the cache and the learning come back as
    /// they were (X neither lost from the cache nor left learned).
    #[test]
    fn a_failed_answer_that_pushed_out_and_brought_back_an_address_is_undone() {
        let p = Arc::new(compile(POLICY));
        let mut st = FqdnState::in_memory(Limits {
            max_ips_per_name: 2,
            ..Limits::default()
        });
        let mut dp = FakeDatapath::default();
        let (x, w, y) = ("192.0.2.10", "192.0.2.11", "192.0.2.12");
        st.learn(
            &req(&p, &["www.example.com."], &[(x, 60)]),
            &p,
            Some(&mut dp),
            0,
        )
        .unwrap();
        st.learn(
            &req(&p, &["www.example.com."], &[(w, 60)]),
            &p,
            Some(&mut dp),
            1_000,
        )
        .unwrap();
        let cache = format!("{:?}", st.cache.iter().collect::<Vec<_>>());
        let learned = p.learned_fqdn_ips();
        let ipcache = dp.ipcache.clone();
        dp.fail = true;
        st.learn(
            &req(&p, &["www.example.com."], &[(y, 600), (x, 600)]),
            &p,
            Some(&mut dp),
            2_000,
        )
        .unwrap_err();
        assert_eq!(format!("{:?}", st.cache.iter().collect::<Vec<_>>()), cache);
        assert_eq!(p.learned_fqdn_ips(), learned);
        assert_eq!(dp.ipcache, ipcache);
        // X's own TTL (60 s from 0) still holds: it expires, no earlier, no later.
        assert!(st.cache.expired(59_999).is_empty());
        assert_eq!(st.cache.expired(60_000).len(), 1);
    }
}
