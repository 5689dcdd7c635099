//! Where the DNS proxy hands allowed answers to the FQDN allowlist.
//!
//! The proxy does not write kernel maps itself (nothing blocking on its runtime
//! threads): it asks a [`FqdnLearner`] (the agent's control thread) to learn an
//! answer's addresses, and — when a `toFQDNs` selector selects a name of the
//! answer — waits for the learner's reply before it releases the answer to the
//! client. The learner replies only after the datapath holds the addresses (or
//! with an error, and the client gets SERVFAIL). Requests are handled in the
//! order they are made, so a second answer for a name never overtakes the
//! first one's update.

use std::net::IpAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::oneshot;
use weir_parsers::dns::AnswerFacts;
use weir_policy::CompiledPolicy;

/// Who asked, by the query's source address: what a client's share of the
/// FQDN cache is counted by (`--fqdn-max-entries-per-client`), so that one
/// client cannot fill the cache every other client's `toFQDNs` rules need.
///
/// The address, not the endpoint's identity: every replica of a Deployment
/// shares one identity (its labels), and one replica must not use up its
/// siblings' share. A pod with an IPv4 and an IPv6 address has two shares.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct DnsClient(pub IpAddr);

impl DnsClient {
    /// The client of a query from `addr` (IPv4-mapped IPv6 counts as IPv4).
    pub fn new(addr: IpAddr) -> Self {
        DnsClient(weir_policy::canonical_ip(addr))
    }
}

impl std::fmt::Display for DnsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// An allowed answer's names and addresses.
#[derive(Debug, Clone)]
pub struct LearnRequest {
    /// The question name and its CNAME chain, lower-cased with a trailing dot.
    pub names: Vec<String>,
    /// The chain's last name's A/AAAA addresses with their TTLs (seconds).
    pub addresses: Vec<(IpAddr, u32)>,
    /// The policy the proxy decided the query under (the learner computes the
    /// selectors from the policy it has installed, which may be newer).
    pub policy: Arc<CompiledPolicy>,
    /// The client whose query it answers (the entries it adds count against
    /// that client's share).
    pub client: DnsClient,
}

impl LearnRequest {
    /// Whether the policy selects any of the names with a `toFQDNs` selector:
    /// then the answer must wait for the learner.
    pub fn selected(&self) -> bool {
        self.selected_by(&self.policy)
    }

    /// Whether `policy` selects any of the names with a `toFQDNs` selector.
    pub fn selected_by(&self, policy: &CompiledPolicy) -> bool {
        self.names
            .iter()
            .any(|n| !policy.fqdn_selectors_matching(n).is_empty())
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LearnError {
    /// Writing the datapath failed; the addresses are not allowed.
    #[error("the datapath update failed: {0}")]
    Datapath(String),
    /// The learner is gone or its queue is full.
    #[error("the FQDN learner is not available: {0}")]
    Unavailable(&'static str),
    /// The FQDN cache has no room for the answer's new addresses (the node's
    /// limits, or the client's share).
    #[error("{0}")]
    Full(&'static str),
}

/// Learns answers' addresses into the allowlist.
pub trait FqdnLearner: Send + Sync {
    /// Whether the datapath already holds every (name, address) pair of
    /// `answer`, decided under `policy`, for the selectors of its names; if so
    /// their expiries are extended as learning them again would, and the
    /// answer may go at once. Asked before a [`LearnRequest`] is built, so an
    /// answer seen before costs no allocation and no selector match.
    fn try_committed(&self, _policy: &CompiledPolicy, _answer: &AnswerFacts) -> bool {
        false
    }

    /// Learns `req`. The receiver resolves once the datapath holds every
    /// address (with the identities of every selector selecting their names),
    /// or with the reason it does not. `wait` says the caller will wait for the
    /// reply (a selected name); otherwise the request only feeds the cache of
    /// names (so a later policy selects addresses seen before) and may be
    /// dropped under load.
    fn learn(&self, req: LearnRequest, wait: bool) -> oneshot::Receiver<Result<(), LearnError>>;
}

/// The learner of a proxy run without an agent (tests, `--steering none`): it
/// learns nothing into a datapath, and says so to answers that need it.
pub struct NoLearner;

impl FqdnLearner for NoLearner {
    fn learn(&self, _req: LearnRequest, _wait: bool) -> oneshot::Receiver<Result<(), LearnError>> {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err(LearnError::Unavailable(
            "no FQDN learner in this process",
        )));
        rx
    }
}
