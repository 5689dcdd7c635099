//! Answer inspection: does this answer belong to the query, and which addresses
//! does it give for the question name?
//!
//! Only addresses owned by the question name — or, when the name is an alias, by
//! the end of its CNAME chain — are reported. An answer section may carry other
//! records (a resolver's glue, or a forged `A` for `bank.example.` tucked into the
//! answer for `ads.example.`): learning those would let whoever answers one allowed
//! name open the allowlist for any other name. That is the classic cache-poisoning
//! pattern (Kaminsky-style out-of-bailiwick data), and it is ignored here; the
//! records are counted in [`AnswerFacts::ignored_records`].

use std::net::IpAddr;

use hickory_proto::op::Message;
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use thiserror::Error;

use super::{
    HEADER_LEN, MalformedReason, QueryFacts, RawHeader, decode_message, policy_name, rcode,
    rr_type_name,
};

/// The longest CNAME chain followed (BIND's limit is 16 as well; unbound stops
/// at 11 restarts).
pub const MAX_CNAME_CHAIN: usize = 16;

/// One address learned from an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerAddress {
    pub ip: IpAddr,
    /// The address record's TTL, capped by the TTLs of the CNAMEs that lead to it:
    /// the name → address mapping is only as fresh as its weakest link.
    pub ttl: u32,
}

/// What the proxy and the allowlist need from an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerFacts {
    pub id: u16,
    /// The full rcode, EDNS extended bits merged.
    pub rcode: u16,
    /// TC set. A truncated answer that decodes is learned like any other
    /// (some clients use its records instead of retrying over TCP); one that
    /// does not decode yields nothing (see `decoded`).
    pub truncated: bool,
    /// The whole message decoded. False only for a truncated answer cut off
    /// mid-record (or with bytes past its end): its header and question were
    /// checked, its records were not read, so nothing was learned from them —
    /// the client must not get them either (some stub resolvers use the
    /// complete records before the cut rather than retry over TCP, and the
    /// datapath would drop their connections). The proxy answers such a
    /// message with [`crate::dns::truncated_for`] instead: TC set, the
    /// question only.
    pub decoded: bool,
    /// The question name (lower-cased, trailing dot), as in [`QueryFacts::name`].
    pub name: String,
    /// CNAME targets in chain order, starting from the question name.
    pub cnames: Vec<String>,
    /// Address records (A and AAAA, class of the query) owned by the chain's last
    /// name, in answer order, duplicates removed.
    pub addresses: Vec<AnswerAddress>,
    /// Smallest TTL of the chain's CNAMEs and the addresses (`None` if neither).
    pub min_ttl: Option<u32>,
    /// Types of all answer-section records, in first-seen order (Hubble `rrtypes`).
    pub rrtypes: Vec<u16>,
    /// Answer-section records that are neither part of the chain nor its
    /// addresses (unrelated names, RRSIGs, ...).
    pub ignored_records: usize,
    /// Bit `i` set: `cnames[i]` teaches no selector ([`AnswerFacts::withhold_cname`]).
    withheld_cnames: u32,
}

// Every chain name has a bit in `withheld_cnames`.
const _: () = assert!(MAX_CNAME_CHAIN <= u32::BITS as usize);

impl AnswerFacts {
    /// Every name a toFQDNs selector may match for this answer: the question name
    /// and then each name of its CNAME chain that is not withheld.
    pub fn names(&self) -> impl Iterator<Item = &str> + Clone {
        let withheld = self.withheld_cnames;
        std::iter::once(self.name.as_str()).chain(
            self.cnames
                .iter()
                .enumerate()
                .filter(move |(i, _)| withheld & (1 << i) == 0)
                .map(|(_, n)| n.as_str()),
        )
    }

    /// Keeps `cnames[i]` out of [`AnswerFacts::names`]: the answer's addresses
    /// are not learned under it (the proxy withholds a chain name its client
    /// could not have asked for). It stays in `cnames`, for the flow record.
    pub fn withhold_cname(&mut self, i: usize) {
        if i < self.cnames.len() {
            self.withheld_cnames |= 1 << i;
        }
    }

    pub fn rrtype_names(&self) -> Vec<std::borrow::Cow<'static, str>> {
        self.rrtypes.iter().map(|t| rr_type_name(*t)).collect()
    }
}

/// Why an answer was not accepted for the query it claims to answer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AnswerReject {
    #[error("malformed answer: {0}")]
    Malformed(MalformedReason),
    #[error("QR not set: not a response")]
    NotAResponse,
    #[error("answer id {got} does not match query id {expected}")]
    IdMismatch { expected: u16, got: u16 },
    #[error("answer opcode {got} does not match query opcode {expected}")]
    OpcodeMismatch { expected: u8, got: u8 },
    #[error("answer question does not match the query ({0})")]
    QuestionMismatch(String),
    #[error("CNAME chain loops back to {0}")]
    CnameLoop(String),
    #[error("CNAME chain longer than {MAX_CNAME_CHAIN}")]
    CnameChainTooLong,
    #[error("{0} has more than one CNAME")]
    AmbiguousCname(String),
}

impl AnswerReject {
    pub fn reason_code(&self) -> &'static str {
        match self {
            Self::Malformed(r) => r.code(),
            Self::NotAResponse => "not_a_response",
            Self::IdMismatch { .. } => "id_mismatch",
            Self::OpcodeMismatch { .. } => "opcode_mismatch",
            Self::QuestionMismatch(_) => "question_mismatch",
            Self::CnameLoop(_) => "cname_loop",
            Self::CnameChainTooLong => "cname_chain_too_long",
            Self::AmbiguousCname(_) => "ambiguous_cname",
        }
    }
}

/// Inspect an upstream answer to `query`. The bytes are not changed (the proxy
/// forwards them as they are); this only decides whether they answer this query
/// and what they say about the question name.
///
/// A message with no question is accepted only when it is an error (rcode other
/// than NOERROR, as servers answer FORMERR/NOTIMP header-only) or a zone
/// transfer (AXFR/IXFR continuation messages may omit it).
pub fn inspect_answer(bytes: &[u8], query: &QueryFacts) -> Result<AnswerFacts, AnswerReject> {
    let h = RawHeader::read(bytes).ok_or(AnswerReject::Malformed(MalformedReason::ShortHeader(
        bytes.len(),
    )))?;
    if h.id != query.id {
        return Err(AnswerReject::IdMismatch {
            expected: query.id,
            got: h.id,
        });
    }
    if !h.qr {
        return Err(AnswerReject::NotAResponse);
    }
    if h.opcode != query.opcode {
        return Err(AnswerReject::OpcodeMismatch {
            expected: query.opcode,
            got: h.opcode,
        });
    }
    let msg = match decode_message(bytes, &h) {
        Ok(msg) => msg,
        // A truncated answer may be cut anywhere after the question; what the
        // client gets is its business, weir checks the question and learns nothing.
        Err(_) if h.tc => return truncated_answer(bytes, &h, query),
        Err(e) => return Err(AnswerReject::Malformed(e)),
    };
    check_question(&msg, &h, query)?;
    let rc = u16::from(msg.metadata.response_code);
    let mut facts = AnswerFacts {
        id: h.id,
        rcode: rc,
        truncated: h.tc,
        decoded: true,
        name: query.name.clone(),
        cnames: Vec::new(),
        withheld_cnames: 0,
        addresses: Vec::new(),
        min_ttl: None,
        rrtypes: Vec::new(),
        ignored_records: 0,
    };
    for r in &msg.answers {
        let t = u16::from(r.record_type());
        if !facts.rrtypes.contains(&t) {
            facts.rrtypes.push(t);
        }
    }
    // Learn nothing from an error answer (an NXDOMAIN's or SERVFAIL's records are
    // not the name's addresses). Everything else a client may use is learned, so
    // that it is gated: a truncated answer whose records decoded (some clients use
    // them rather than retry over TCP), and an answer whose question came back in
    // another case (it matched this query — ID, and the question compared as DNS
    // compares names — on the flow's own resolver socket; a client that compares
    // names the same way uses it). Both used to be released unlearned: their
    // addresses were then dropped by the datapath (found by review).
    if rc != rcode::NOERROR {
        facts.ignored_records = msg.answers.len();
        return Ok(facts);
    }
    collect(&msg, query, &mut facts)?;
    Ok(facts)
}

/// Whether the message's first question is `question_wire` (a query's
/// question as sent): the name compared case-insensitively (a resolver may not
/// keep 0x20 case), the type and class bytes exactly. Reads only those bytes:
/// the proxy picks the query an answer belongs to with it before decoding the
/// answer once. Label length bytes are <= 63, below any ASCII letter, so
/// folding case cannot make two lengths equal; the name's terminating zero is
/// compared, so a longer name never matches.
pub fn question_matches(bytes: &[u8], question_wire: &[u8]) -> bool {
    let name_len = question_wire.len().saturating_sub(4);
    let got = HEADER_LEN
        .checked_add(question_wire.len())
        .and_then(|end| bytes.get(HEADER_LEN..end));
    got.is_some_and(|g| {
        g.get(..name_len)
            .zip(question_wire.get(..name_len))
            .is_some_and(|(a, b)| a.eq_ignore_ascii_case(b))
            && g.get(name_len..) == question_wire.get(name_len..)
    })
}

fn truncated_answer(
    bytes: &[u8],
    h: &RawHeader,
    query: &QueryFacts,
) -> Result<AnswerFacts, AnswerReject> {
    if h.qdcount == 1 {
        if !question_matches(bytes, &query.question_wire) {
            return Err(AnswerReject::QuestionMismatch(
                "truncated answer's question differs".into(),
            ));
        }
    } else if h.qdcount != 0 {
        return Err(AnswerReject::QuestionMismatch(format!(
            "{} questions",
            h.qdcount
        )));
    }
    Ok(AnswerFacts {
        id: h.id,
        rcode: u16::from(h.rcode),
        truncated: true,
        decoded: false,
        name: query.name.clone(),
        cnames: Vec::new(),
        withheld_cnames: 0,
        addresses: Vec::new(),
        min_ttl: None,
        rrtypes: Vec::new(),
        ignored_records: usize::from(h.ancount),
    })
}

fn check_question(msg: &Message, h: &RawHeader, query: &QueryFacts) -> Result<(), AnswerReject> {
    match msg.queries.as_slice() {
        [] => {
            let rc = u16::from(msg.metadata.response_code);
            if rc != rcode::NOERROR || query.is_zone_transfer() {
                Ok(())
            } else {
                Err(AnswerReject::QuestionMismatch(
                    "NOERROR answer without a question".into(),
                ))
            }
        }
        [q] => {
            let name = policy_name(q.name());
            if name != query.name {
                return Err(AnswerReject::QuestionMismatch(format!(
                    "name {name} instead of {}",
                    query.name
                )));
            }
            if u16::from(q.query_type()) != query.qtype
                || u16::from(q.query_class()) != query.qclass
            {
                return Err(AnswerReject::QuestionMismatch(format!(
                    "type/class {}/{} instead of {}/{}",
                    u16::from(q.query_type()),
                    u16::from(q.query_class()),
                    query.qtype,
                    query.qclass
                )));
            }
            Ok(())
        }
        _ => Err(AnswerReject::QuestionMismatch(format!(
            "{} questions",
            h.qdcount
        ))),
    }
}

/// Follow the CNAME chain from the question name and collect the addresses of its
/// last name.
fn collect(msg: &Message, query: &QueryFacts, facts: &mut AnswerFacts) -> Result<(), AnswerReject> {
    let class = DNSClass::from(query.qclass);
    // The chain's names, the question's first. It holds at most
    // MAX_CNAME_CHAIN + 1 names: a linear search is cheaper than hashing, and
    // the records used are counted from it at the end (no per-record flags).
    let mut chain: Vec<Name> = match msg.queries.first() {
        Some(q) => vec![q.name().to_lowercase()],
        // No question (error or zone-transfer continuation): nothing to follow.
        None => {
            facts.ignored_records = msg.answers.len();
            return Ok(());
        }
    };
    let mut min_ttl: Option<u32> = None;
    let lower = |t: u32, m: Option<u32>| Some(m.map_or(t, |m| m.min(t)));
    while let Some(current) = chain.last() {
        let mut next: Option<(Name, u32)> = None;
        for r in &msg.answers {
            let RData::CNAME(target) = &r.data else {
                continue;
            };
            if r.dns_class != class || r.name != *current {
                continue;
            }
            let target = target.0.to_lowercase();
            match &next {
                Some((t, ttl)) if *t == target => {
                    // The same CNAME twice: harmless, keep the smaller TTL.
                    next = Some((target, (*ttl).min(r.ttl)));
                }
                Some(_) => return Err(AnswerReject::AmbiguousCname(policy_name(current))),
                None => next = Some((target, r.ttl)),
            }
        }
        let Some((target, ttl)) = next else { break };
        if chain.contains(&target) {
            return Err(AnswerReject::CnameLoop(policy_name(&target)));
        }
        if facts.cnames.len() >= MAX_CNAME_CHAIN {
            return Err(AnswerReject::CnameChainTooLong);
        }
        facts.cnames.push(policy_name(&target));
        min_ttl = lower(ttl, min_ttl);
        chain.push(target);
    }
    // The name the addresses belong to, and the owners of the CNAMEs followed.
    let Some((current, followed)) = chain.split_last() else {
        return Ok(());
    };
    let chain_ttl = min_ttl;
    // Only the address type asked for (both for ANY): an A record in a AAAA
    // answer is not what the client will use, and need not be allowed.
    let qtype = RecordType::from(query.qtype);
    let want_a = matches!(qtype, RecordType::A | RecordType::ANY);
    let want_aaaa = matches!(qtype, RecordType::AAAA | RecordType::ANY);
    let mut used = 0;
    for r in &msg.answers {
        if r.dns_class != class {
            continue;
        }
        // (The chain ended where no CNAME's owner is `current`: a CNAME is
        // used exactly when its owner is one of the names followed.)
        if matches!(r.data, RData::CNAME(_)) && followed.contains(&r.name) {
            used += 1;
            continue;
        }
        if r.name != *current {
            continue;
        }
        let ip = match &r.data {
            RData::A(a) if want_a => IpAddr::V4(a.0),
            RData::AAAA(a) if want_aaaa => IpAddr::V6(a.0),
            _ => continue,
        };
        used += 1;
        let ttl = chain_ttl.map_or(r.ttl, |c| c.min(r.ttl));
        min_ttl = lower(r.ttl, min_ttl);
        match facts.addresses.iter_mut().find(|a| a.ip == ip) {
            Some(seen) => seen.ttl = seen.ttl.min(ttl),
            None => facts.addresses.push(AnswerAddress { ip, ttl }),
        }
    }
    facts.min_ttl = min_ttl;
    facts.ignored_records = msg.answers.len().saturating_sub(used);
    Ok(())
}
