//! The DNS proxy: every query on a flow whose port has DNS rules is inspected and
//! decided by name, and only allowed queries reach the resolver. Answers are
//! matched to their query by ID and question, their addresses handed to the FQDN
//! learner (waiting for it when a `toFQDNs` selector selects a name), and then
//! released unchanged.
//!
//! This module holds what UDP ([`udp`]) and TCP ([`tcp`]) share: deciding a query
//! ([`decide_query`]), the table of outstanding queries ([`Outstanding`]),
//! answering from it ([`Outstanding::take_answer`]), the learner gate
//! ([`learn_gate`]) and the flow records.

pub mod tcp;
pub mod udp;

use std::time::{Duration, Instant};

use weir_parsers::dns::{
    self, AnswerFacts, AnswerReject, DnsFlow, QueryFacts, QueryReject, RawHeader,
};
use weir_policy::Verdict;
use weir_policy::flow::{Flow, FlowVerdict, L7Type};

use crate::Shared;
use crate::context::{ConnContext, Decision};
use crate::fqdn::{DnsClient, LearnRequest};

/// What to do with one client message.
// Made and taken apart once per message: boxing the large variant would cost an
// allocation per query to save a copy.
#[allow(clippy::large_enum_variant)]
pub(crate) enum QueryAction {
    /// Send these bytes back to the client (a denial, FORMERR, REFUSED for an
    /// opcode weir does not match); nothing goes upstream.
    Reply(Vec<u8>),
    /// Nothing to answer (unreadable header, a response sent as a query).
    Drop,
    /// Allowed: forward the message unchanged and remember it, and emit the
    /// query's record ([`query_record`]: UDP builds it after the send, so that
    /// neither building nor rendering it delays the query; TCP before, as
    /// forwarding may answer SERVFAIL itself).
    Forward(Pending),
}

/// A query forwarded to the resolver and not yet (fully) answered.
///
/// It keeps the query's facts, not its bytes: a query over TCP may be up to
/// 64 KiB (EDNS padding, additional records), and the SERVFAIL weir answers in
/// the resolver's place needs only the ID, flags, question and OPT's DO bit
/// ([`dns::servfail_for`]). About 1 KiB per query at most (an escaped name).
pub(crate) struct Pending {
    pub facts: QueryFacts,
    pub decision: Decision,
    pub verdict: Verdict,
    /// `verdict.reason_for("DNS")`, the records' `policy`: rendered once for
    /// the query's record and kept for the answer's.
    pub reason: String,
    pub sent: Instant,
    pub deadline: Instant,
    /// How long the resolver may take (for a zone transfer: between messages).
    pub timeout: Duration,
    /// A zone transfer that has had at least one answer message (it stays until
    /// its deadline: more messages may follow).
    pub answered: bool,
    /// Who asked (the FQDN cache's share it counts against).
    pub client: DnsClient,
}

impl Pending {
    /// The heap bytes this query keeps (a test bounds them).
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.facts.name.capacity() + self.facts.question_wire.capacity() + self.reason.capacity()
    }
}

/// Inspects and decides one client message under the current policy, and
/// records the decision. `room` says whether the flow may have another query
/// outstanding; an allowed query beyond that is answered SERVFAIL.
pub(crate) fn decide_query(ctx: &ConnContext, msg: &[u8], room: bool) -> QueryAction {
    if ctx.shared.superseded() {
        tracing::debug!(
            "DNS query dropped: this weir has handed over and its policy is stale (the client's retry reaches the new weir)"
        );
        return QueryAction::Drop;
    }
    let d = ctx.decide();
    let cfg = &ctx.shared.config;
    let facts = match dns::inspect_query(msg) {
        Ok(f) => f,
        Err(reject) => {
            let reply = reject.response(msg);
            ctx.shared.flows.emit(rejected_flow(ctx, &d, &reject));
            tracing::debug!(reason = %reject, "DNS query rejected");
            return match reply {
                Some(r) => QueryAction::Reply(r),
                None => QueryAction::Drop,
            };
        }
    };
    let verdict = d.verdict.dns_verdict(&d.policy, &facts.name);
    if !verdict.allowed {
        let rcode = cfg.dns_deny_rcode;
        let mut flow = query_flow(
            ctx,
            &d,
            &verdict,
            DnsFlow::from_rcode(&facts, rcode.rcode()),
        );
        flow.verdict = FlowVerdict::Dropped;
        ctx.shared.flows.emit(flow);
        tracing::debug!(name = %facts.name, "DNS query denied");
        return match dns::refused(msg, rcode) {
            Some(r) => QueryAction::Reply(r),
            None => QueryAction::Drop,
        };
    }
    if !room {
        let flow = query_flow(
            ctx,
            &d,
            &verdict,
            DnsFlow::from_rcode(&facts, dns::rcode::SERVFAIL),
        )
        .with_error("DNS_TOO_MANY_OUTSTANDING");
        ctx.shared.flows.emit(flow);
        tracing::debug!(
            name = %facts.name,
            max = cfg.dns_max_outstanding,
            "too many DNS queries outstanding on this flow; answered SERVFAIL"
        );
        return match dns::servfail(msg) {
            Some(r) => QueryAction::Reply(r),
            None => QueryAction::Drop,
        };
    }
    // The records' reason is the verdict's: an allowed verdict's reason names
    // its rules whatever the layer (what `ctx.flow` would write).
    let reason = verdict.reason();
    debug_assert_eq!(reason, verdict.reason_for("DNS"));
    let now = Instant::now();
    let client = DnsClient::new(ctx.client.ip());
    QueryAction::Forward(Pending {
        facts,
        decision: d,
        verdict,
        reason,
        sent: now,
        deadline: now + cfg.dns_upstream_timeout,
        timeout: cfg.dns_upstream_timeout,
        answered: false,
        client,
    })
}

/// The REQUEST record of a forwarded query.
pub(crate) fn query_record(ctx: &ConnContext, p: &Pending) -> Flow {
    ctx.flow_with_policy(&p.decision, &p.verdict, p.reason.clone())
        .with_dns(L7Type::Request, 0, DnsFlow::from_query(&p.facts))
}

/// What an upstream message turned out to be.
pub(crate) enum AnswerMatch {
    /// No outstanding query has this ID and question: dropped.
    Unmatched,
    /// The answer to `pending`'s query (inspected: `Err` means it is unusable and
    /// the client gets SERVFAIL instead).
    Matched(Box<Pending>, Result<AnswerFacts, AnswerReject>),
}

/// The queries of one client flow (a UDP 4-tuple or a TCP connection) that were
/// forwarded and not yet answered.
pub(crate) struct Outstanding {
    items: Vec<Pending>,
    max: usize,
}

/// What [`Outstanding::add`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AddOutcome {
    Added,
    /// The same query (ID and question) is outstanding already: a client's
    /// retransmission, forwarded again but tracked once.
    Retransmission,
}

impl Outstanding {
    pub fn new(max: usize) -> Self {
        Outstanding {
            items: Vec::new(),
            max: max.max(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether another query may be added, `parked` answers (taken from here,
    /// waiting for the learner or the client's queue) counting too: they hold
    /// memory until released.
    pub fn has_room(&self, parked: usize) -> bool {
        self.items.len().saturating_add(parked) < self.max
    }

    /// The cap on outstanding queries (and parked answers).
    pub fn max(&self) -> usize {
        self.max
    }

    /// Adds a forwarded query (callers check [`Outstanding::has_room`] first;
    /// the cap holds regardless: beyond it the oldest query is given up).
    pub fn add(&mut self, p: Pending) -> AddOutcome {
        if self
            .items
            .iter()
            .any(|o| o.facts.id == p.facts.id && o.facts.question_wire == p.facts.question_wire)
        {
            return AddOutcome::Retransmission;
        }
        if self.items.len() >= self.max
            && let Some(oldest) = (0..self.items.len()).min_by_key(|&i| self.items[i].sent)
        {
            self.items.swap_remove(oldest);
        }
        self.items.push(p);
        AddOutcome::Added
    }

    /// Finds the query `msg` answers: same ID, and a question that matches (an
    /// answer with the right ID for another question is someone else's, or a
    /// forgery, and is dropped). A zone transfer stays outstanding for the
    /// messages that follow.
    ///
    /// The query is picked by the answer's header and question bytes alone,
    /// then the answer is decoded once (many queries may share an ID: decoding
    /// per candidate would cost up to `dns_max_outstanding` decodes).
    pub fn take_answer(&mut self, msg: &[u8]) -> AnswerMatch {
        let Some(h) = RawHeader::read(msg) else {
            return AnswerMatch::Unmatched;
        };
        if !h.qr {
            return AnswerMatch::Unmatched;
        }
        let same_id = |p: &&Pending| p.facts.id == h.id;
        let pick = match h.qdcount {
            1 => self
                .items
                .iter()
                .position(|p| same_id(&p) && dns::question_matches(msg, &p.facts.question_wire)),
            // No question: a zone transfer's continuation, or an error answer
            // (header only) to the one query with this ID; `inspect_answer`
            // decides. With several queries of that ID outstanding it could be
            // any one's: ambiguous, so nobody's (each gets its own answer or
            // times out into SERVFAIL).
            0 => self
                .items
                .iter()
                .position(|p| same_id(&p) && p.facts.is_zone_transfer())
                .or_else(|| {
                    let mut with_id = self.items.iter().enumerate().filter(|(_, p)| same_id(p));
                    match (with_id.next(), with_id.next()) {
                        (Some((i, _)), None) => Some(i),
                        _ => None,
                    }
                }),
            _ => None,
        };
        let Some(i) = pick else {
            return AnswerMatch::Unmatched;
        };
        let mut r = inspect_answer(msg, &self.items[i].facts);
        if let Ok(a) = &mut r {
            withhold_unaskable_names(&self.items[i], a);
        }
        if matches!(
            r,
            Err(AnswerReject::IdMismatch { .. }
                | AnswerReject::QuestionMismatch(_)
                | AnswerReject::NotAResponse)
        ) {
            return AnswerMatch::Unmatched;
        }
        let p = &mut self.items[i];
        if p.facts.is_zone_transfer() && r.is_ok() {
            p.answered = true;
            // The timeout applies between a transfer's messages, not to the
            // whole transfer.
            p.deadline = Instant::now() + p.timeout;
            let copy = Pending {
                facts: p.facts.clone(),
                decision: p.decision.clone(),
                verdict: p.verdict.clone(),
                reason: p.reason.clone(),
                sent: p.sent,
                deadline: p.deadline,
                timeout: p.timeout,
                answered: true,
                client: p.client,
            };
            return AnswerMatch::Matched(Box::new(copy), r);
        }
        let p = self.items.swap_remove(i);
        AnswerMatch::Matched(Box::new(p), r)
    }

    /// The earliest deadline of an outstanding query.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.items.iter().map(|p| p.deadline).min()
    }

    /// Removes and returns the queries whose deadline has passed (zone transfers
    /// that were answered end here quietly: the caller skips `answered` ones).
    pub fn expire(&mut self, now: Instant) -> Vec<Pending> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.items.len() {
            if self.items[i].deadline <= now {
                out.push(self.items.swap_remove(i));
            } else {
                i += 1;
            }
        }
        out
    }

    /// Removes every outstanding query (the upstream is gone).
    pub fn drain(&mut self) -> Vec<Pending> {
        std::mem::take(&mut self.items)
    }
}

#[cfg(test)]
thread_local! {
    /// Answers decoded on this thread (a test counts them).
    pub(crate) static ANSWER_DECODES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn inspect_answer(msg: &[u8], facts: &QueryFacts) -> Result<AnswerFacts, AnswerReject> {
    #[cfg(test)]
    ANSWER_DECODES.with(|c| c.set(c.get() + 1));
    dns::inspect_answer(msg, facts)
}

/// Keeps out of learning each name of the answer's CNAME chain that the
/// client's DNS rules would not have let it ask for (under the decision its
/// query was allowed by). The chain is the resolver's word: a client allowed
/// only `*.attacker.example`, whose resolver answers `x.attacker.example CNAME
/// bank.example` and an address of its choosing, must not teach the node's
/// `toFQDNs: bank.example` selectors that address. The names stay in the
/// answer's record. (Cilium learns under the question name alone.)
fn withhold_unaskable_names(p: &Pending, a: &mut AnswerFacts) {
    let (verdict, policy) = (&p.decision.verdict, &p.decision.policy);
    for i in 0..a.cnames.len() {
        if !verdict.dns_verdict(policy, &a.cnames[i]).allowed {
            tracing::debug!(question = %a.name, name = %a.cnames[i], "CNAME target not allowed by the client's DNS rules; not learned");
            a.withhold_cname(i);
        }
    }
}

/// The request to learn an answer's addresses, or `None` when it has none.
pub(crate) fn learn_request(p: &Pending, a: &AnswerFacts) -> Option<LearnRequest> {
    if a.addresses.is_empty() {
        return None;
    }
    Some(LearnRequest {
        names: a.names().map(str::to_string).collect(),
        addresses: a.addresses.iter().map(|x| (x.ip, x.ttl)).collect(),
        policy: p.decision.policy.clone(),
        client: p.client,
    })
}

/// Whether an answer may go to the client.
pub(crate) enum Gate {
    /// At once: no selector selects its names, or the datapath holds them.
    Open,
    /// Not before the learner says the datapath holds the addresses.
    Wait(LearnReply),
    /// Never: the client gets SERVFAIL, for this reason.
    Closed(String),
}

/// What the client gets in place of the resolver's answer, if not the answer
/// itself: a truncated answer that did not decode is never released as it
/// came (its records were not read, so not learned: see
/// [`AnswerFacts::decoded`]); the client gets TC and the question, and retries
/// over TCP.
pub(crate) fn replacement(p: &Pending, a: &AnswerFacts) -> Option<Vec<u8>> {
    (!a.decoded).then(|| dns::truncated_for(&p.facts, a.rcode))
}

/// An answer that reached the proxy in IP fragments is neither learned nor
/// released: whoever can guess the resolver's IP ID can splice a fragment of
/// their own into it (the UDP checksum kept, the addresses theirs), and
/// nothing in the reassembled message tells. Its records are dropped and the
/// client gets TC and the question ([`replacement`]), then asks again over
/// TCP, whose answer weir reads and learns. Resolvers that keep to the 1 232
/// bytes of the 2020 DNS flag day never fragment.
pub(crate) fn distrust_reassembled(facts: &mut AnswerFacts) {
    tracing::debug!(name = %facts.name, "DNS answer came in IP fragments; the client gets TC");
    facts.decoded = false;
    facts.truncated = true;
    facts.ignored_records += facts.addresses.len() + facts.cnames.len();
    facts.addresses.clear();
    facts.cnames.clear();
    facts.min_ttl = None;
}

/// The gate for an answer: none without addresses or when the datapath holds
/// every pair already (as [`learn`] would find), else [`learn`]'s.
pub(crate) fn gate(shared: &Shared, p: &Pending, a: &AnswerFacts) -> Gate {
    if a.addresses.is_empty() {
        return Gate::Open;
    }
    if shared.fqdn_learner().try_committed(&p.decision.policy, a) {
        return Gate::Open;
    }
    learn_request(p, a).map_or(Gate::Open, |req| learn(shared, req))
}

/// Hands `req` to the learner. When a `toFQDNs` selector selects one of its
/// names, the answer must wait for the learner's reply (see [`wait_for`]) —
/// unless the reply is already there (the learner answered from what the
/// datapath is known to hold): then no task has to wait for it. Otherwise the
/// request only feeds the learner and the answer goes at once.
/// Selected means under the policy the query was decided by or the one in
/// force now: a policy installed while the query was out may add the selector,
/// and the answer must not reach the client before the datapath allows it.
pub(crate) fn learn(shared: &Shared, req: LearnRequest) -> Gate {
    let revision = shared.policy_revision();
    let wait = req.selected() || shared.policy_changing() || req.selected_by(&shared.policy.load());
    let mut reply = shared.fqdn_learner().learn(req, wait);
    // A policy change that began between the check above and queueing the
    // request runs before it on the control thread: the incoming policy may
    // select a name, and its datapath cannot hold these addresses until the
    // request is learned. Wait for it then as well (an answer released at
    // once had its connection dropped until then; found by review).
    let wait = wait || shared.policy_changing() || shared.policy_revision() != revision;
    if !wait {
        return Gate::Open;
    }
    match reply.try_recv() {
        Ok(Ok(())) => Gate::Open,
        Ok(Err(e)) => Gate::Closed(e.to_string()),
        Err(tokio::sync::oneshot::error::TryRecvError::Empty) => Gate::Wait(reply),
        Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
            Gate::Closed(LEARNER_DROPPED.into())
        }
    }
}

const LEARNER_DROPPED: &str = "the FQDN learner dropped the request";

pub(crate) type LearnReply = tokio::sync::oneshot::Receiver<Result<(), crate::fqdn::LearnError>>;

/// Waits (at most `dns_learn_timeout`) until the datapath holds the addresses;
/// `Err` says why the answer must not be released.
pub(crate) async fn wait_for(shared: &Shared, reply: LearnReply) -> Result<(), String> {
    match tokio::time::timeout(shared.config.dns_learn_timeout, reply).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(_)) => Err(LEARNER_DROPPED.into()),
        Err(_) => Err(format!(
            "the FQDN learner did not answer within {:?}",
            shared.config.dns_learn_timeout
        )),
    }
}

impl Gate {
    /// Waits for the gate to open, or says why it will not.
    pub(crate) async fn passed(self, shared: &Shared) -> Result<(), String> {
        match self {
            Gate::Open => Ok(()),
            Gate::Wait(reply) => wait_for(shared, reply).await,
            Gate::Closed(why) => Err(why),
        }
    }
}

/// [`learn`] and, when the answer must wait, [`wait_for`].
#[cfg(test)]
pub(crate) async fn learn_gate(shared: &Shared, req: LearnRequest) -> Result<(), String> {
    learn(shared, req).passed(shared).await
}

/// A REQUEST record for a decided query (the deciding rules in `policy`).
fn query_flow(ctx: &ConnContext, d: &Decision, verdict: &Verdict, dns: DnsFlow) -> Flow {
    ctx.flow_with_policy(d, verdict, verdict.reason_for("DNS"))
        .with_dns(L7Type::Request, 0, dns)
}

/// The record for a message that was not matched against policy.
fn rejected_flow(ctx: &ConnContext, d: &Decision, reject: &QueryReject) -> Flow {
    let dns = DnsFlow {
        rcode: reject.response_rcode().map_or(0, u32::from),
        observation_source: dns::OBSERVATION_SOURCE_PROXY.into(),
        ..DnsFlow::default()
    };
    let mut f = ctx
        .flow(d, &d.verdict.l4_verdict())
        .with_dns(L7Type::Request, 0, dns);
    f.verdict = FlowVerdict::Dropped;
    f.drop_reason_desc = Some(format!("DNS_QUERY_REJECTED:{}", reject.reason_code()));
    f.policy = format!("query not matched against policy: {reject}");
    f
}

fn latency_ns(p: &Pending) -> u64 {
    u64::try_from(p.sent.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A RESPONSE record for an answer released to the client.
pub(crate) fn answer_flow(ctx: &ConnContext, p: &Pending, a: &AnswerFacts) -> Flow {
    ctx.flow_with_policy(&p.decision, &p.verdict, p.reason.clone())
        .with_dns(
            L7Type::Response,
            latency_ns(p),
            DnsFlow::from_answer(&p.facts, a),
        )
}

/// A RESPONSE record for a SERVFAIL weir answered in the resolver's place.
pub(crate) fn servfail_flow(ctx: &ConnContext, p: &Pending, why: &str) -> Flow {
    ctx.flow_with_policy(&p.decision, &p.verdict, format!("{} ({why})", p.reason))
        .with_dns(
            L7Type::Response,
            latency_ns(p),
            DnsFlow::from_rcode(&p.facts, dns::rcode::SERVFAIL),
        )
        .with_error("DNS_SERVFAIL")
}

/// SERVFAIL for `p`, with its flow record.
pub(crate) fn servfail(ctx: &ConnContext, p: &Pending, why: &str) -> Option<Vec<u8>> {
    tracing::debug!(name = %p.facts.name, why, "DNS query answered SERVFAIL");
    ctx.shared.flows.emit(servfail_flow(ctx, p, why));
    Some(dns::servfail_for(&p.facts))
}

/// How long a query may wait for its answer, for log messages.
pub(crate) fn upstream_timeout_reason(t: Duration) -> String {
    format!("the resolver did not answer within {t:?}")
}

#[cfg(test)]
mod tests;
