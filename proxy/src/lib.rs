//! weir's data plane: transparent listeners, protocol handlers, upstream pools.
//!
//! Layout follows the data path: `socket` (transparent sockets) → `listener`
//! (accept, original destination, L3/L4 verdict, dispatch) → `detect` (protocol
//! detection in one read, under the request-head deadline) → a protocol handler
//! (`http`, `dns`; Kafka sits beside them) or `tcp` (plain splice for flows
//! policy allows without L7 rules) → upstream. `udp` is the datagram side: its own
//! transparent listener and per-flow sessions (`udp_socket`: their sockets). `flows` writes flow records off the
//! data path; `idle` keeps the time of a connection's last byte.

pub mod config;
pub mod context;
pub mod detect;
pub mod dns;
pub mod flows;
pub mod fqdn;
pub mod http;
pub mod idle;
pub mod kafka;
pub mod listener;
pub mod socket;
pub mod tcp;
pub mod udp;
pub mod udp_socket;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use weir_policy::CompiledPolicy;

pub use config::ProxyConfig;
pub use flows::{FlowBus, FlowFilter, FlowSink, PeerFilter};

/// State every connection handler shares. The policy is swapped whole; a handler
/// loads it once per connection and checks for a newer one before each request.
/// Connections that make no requests of their own (spliced TCP) watch
/// [`Shared::policy_changes`] instead.
pub struct Shared {
    /// Read it freely; change it only with [`Shared::set_policy`].
    pub policy: ArcSwap<CompiledPolicy>,
    pub flows: FlowSink,
    pub config: ProxyConfig,
    pub upstream: http::Upstream,
    pub node_name: Arc<str>,
    generation: watch::Sender<u64>,
    /// Client connections held now (for `max_connections`).
    pub(crate) client_conns: AtomicUsize,
    /// Milliseconds since `started` before which "too many connections" is not
    /// logged again.
    pub(crate) next_full_warning_ms: AtomicU64,
    pub(crate) started: std::time::Instant,
    /// Set once by the agent (see [`Shared::set_fqdn_learner`]).
    fqdn_learner: std::sync::OnceLock<Arc<dyn fqdn::FqdnLearner>>,
    /// True once another weir has taken over the listeners (see
    /// [`Shared::start_draining`]).
    draining: watch::Sender<bool>,
    /// UDP sessions open now.
    pub(crate) udp_sessions: AtomicUsize,
    /// Kafka topic ids → names, learned from the Metadata responses relayed.
    pub kafka_topic_ids: kafka::topic_ids::TopicIds,
    /// Policy changes under way (see [`Shared::policy_change`]).
    policy_changes_under_way: AtomicUsize,
    /// Set by [`Shared::supersede`].
    superseded: std::sync::atomic::AtomicBool,
}

/// While alive, a policy change is under way (see [`Shared::policy_change`]).
pub struct PolicyChange<'a>(&'a Shared);

impl Drop for PolicyChange<'_> {
    fn drop(&mut self) {
        self.0
            .policy_changes_under_way
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Shared {
    pub fn new(policy: Arc<CompiledPolicy>, flows: FlowSink, config: ProxyConfig) -> Arc<Self> {
        let upstream = http::Upstream::new(&config);
        Arc::new(Shared {
            policy: ArcSwap::new(policy),
            flows,
            node_name: Arc::from(config.node_name.as_str()),
            config,
            upstream,
            generation: watch::channel(0).0,
            client_conns: AtomicUsize::new(0),
            next_full_warning_ms: AtomicU64::new(0),
            started: std::time::Instant::now(),
            fqdn_learner: std::sync::OnceLock::new(),
            draining: watch::channel(false).0,
            udp_sessions: AtomicUsize::new(0),
            kafka_topic_ids: Default::default(),
            policy_changes_under_way: AtomicUsize::new(0),
            superseded: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Marks a policy change under way until the guard drops: the agent takes it
    /// before the datapath may hold a policy the proxy has not seen yet, and drops
    /// it once [`Shared::set_policy`] ran (or the change failed). Meanwhile every DNS
    /// answer with addresses waits for the FQDN learner, which runs after the change:
    /// an answer for a name only the incoming policy selects is not released before
    /// the datapath holds its addresses (found by review).
    pub fn policy_change(&self) -> PolicyChange<'_> {
        self.policy_changes_under_way
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        PolicyChange(self)
    }

    /// Whether a policy change is under way.
    pub fn policy_changing(&self) -> bool {
        self.policy_changes_under_way
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
    }

    /// Installs a new policy: the next request on every connection is decided by
    /// it, and open connections without requests of their own (spliced TCP) are
    /// decided again now.
    pub fn set_policy(&self, policy: Arc<CompiledPolicy>) {
        self.policy.store(policy);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Policies installed since start, the first included (`weir status`).
    pub fn policy_revision(&self) -> u64 {
        *self.generation.borrow() + 1
    }

    /// Changes whenever [`Shared::set_policy`] installs a policy.
    pub fn policy_changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Installs the learner DNS answers are handed to (once; later calls are
    /// ignored and return false).
    pub fn set_fqdn_learner(&self, learner: Arc<dyn fqdn::FqdnLearner>) -> bool {
        self.fqdn_learner.set(learner).is_ok()
    }

    /// The learner DNS answers go to; [`fqdn::NoLearner`] until one is set.
    pub fn fqdn_learner(&self) -> Arc<dyn fqdn::FqdnLearner> {
        match self.fqdn_learner.get() {
            Some(l) => l.clone(),
            None => Arc::new(fqdn::NoLearner),
        }
    }

    /// Client connections the proxy holds now.
    pub fn client_connections(&self) -> usize {
        self.client_conns.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// UDP sessions the proxy holds now.
    pub fn udp_sessions(&self) -> usize {
        self.udp_sessions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Another weir serves the listeners now: HTTP connections finish the request
    /// in progress and close instead of waiting for the next one (HTTP/1.1
    /// `Connection: close`, HTTP/2 GOAWAY), so clients reconnect to the new weir.
    pub fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Becomes true when [`Shared::start_draining`] is called.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// This weir has handed over and its policy is stale (the sources changed
    /// since it was compiled): from now on nothing new is decided under it —
    /// DNS queries and UDP datagrams that still reach this weir's sessions are
    /// dropped (their clients retry, and reach the new weir once this one has
    /// closed them) and a Kafka request closes its connection, until the
    /// process ends. (HTTP requests a draining connection still carries are
    /// not covered: see the README's takeover section.)
    pub fn supersede(&self) {
        self.superseded
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether [`Shared::supersede`] was called.
    pub fn superseded(&self) -> bool {
        self.superseded.load(std::sync::atomic::Ordering::Acquire)
    }
}
