//! The responses weir writes itself. They are built byte by byte from the query's
//! own bytes rather than re-encoded, so the client gets back exactly the question
//! it sent (0x20 mixed case included, which resolvers' spoofing checks compare).
//!
//! Header choices: QR=1, opcode, RD and CD copied from the query, AA=0, TC=0,
//! AD=0. RA is set when RD was: weir answers in place of a recursive resolver,
//! and `dig` warns "recursion requested but not available" on RA=0.
//! An OPT record is added when the query had a valid one (RFC 6891 §6.1.1: a
//! responder MUST include OPT if the request had one): version 0, payload
//! [`EDNS_UDP_PAYLOAD`], DO copied, no options. Options are not echoed: a COOKIE
//! echoed without a server cookie, or an NSID, would claim things weir did not do.

use std::str::FromStr;

use super::{
    HEADER_LEN, OPCODE_QUERY, QueryFacts, RawHeader, decode_message, first_question_span, rcode,
};

/// The UDP payload size weir advertises in its own OPT records (the DNS flag
/// day 2020 value).
pub const EDNS_UDP_PAYLOAD: u16 = 1232;

/// The rcode for a query that policy denied (`--dns-deny-rcode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenyRcode {
    #[default]
    Refused,
    NxDomain,
}

impl DenyRcode {
    pub fn rcode(self) -> u16 {
        match self {
            Self::Refused => rcode::REFUSED,
            Self::NxDomain => rcode::NXDOMAIN,
        }
    }
}

impl FromStr for DenyRcode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "refused" => Ok(Self::Refused),
            "nxdomain" => Ok(Self::NxDomain),
            other => Err(format!(
                "unknown DNS deny rcode {other:?} (expected refused or nxdomain)"
            )),
        }
    }
}

/// The answer to a denied query: same ID and question, rcode REFUSED (or
/// NXDOMAIN), OPT when the query had one. `None` only when `query` has no
/// readable header. For queries whose question cannot be copied (opcode
/// rejections with odd sections), the answer carries the header alone.
pub fn refused(query: &[u8], rcode: DenyRcode) -> Option<Vec<u8>> {
    error_response(query, rcode.rcode(), true)
}

/// SERVFAIL for a query whose upstream timed out or answered unusably.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    error_response(query, rcode::SERVFAIL, true)
}

/// SERVFAIL for a query that [`super::inspect_query`] accepted, built from its
/// facts alone (the same bytes as [`servfail`] on the query): the proxy keeps
/// only the facts of an outstanding query, not the query (up to 64 KiB over
/// TCP with EDNS padding or additional records).
pub fn servfail_for(query: &QueryFacts) -> Vec<u8> {
    write_response(
        Head::of(query, false),
        rcode::SERVFAIL,
        &query.question_wire,
        query.edns.map(|e| e.dnssec_ok),
    )
}

/// What the client gets in place of a truncated answer that did not decode
/// ([`super::AnswerFacts::decoded`]): TC set, the answer's rcode, the query's
/// question and OPT, no records — a stub resolver then retries over TCP, where
/// weir reads (and learns) the whole answer.
pub fn truncated_for(query: &QueryFacts, rc: u16) -> Vec<u8> {
    write_response(
        Head::of(query, true),
        rc,
        &query.question_wire,
        query.edns.map(|e| e.dnssec_ok),
    )
}

/// FORMERR for a query weir could not decode: the header alone (ID, opcode, RD,
/// CD copied), no question and no OPT, as unbound does. `None` when fewer than
/// 12 bytes arrived (nothing to answer to: drop).
pub fn formerr(query: &[u8]) -> Option<Vec<u8>> {
    error_response(query, rcode::FORMERR, false)
}

fn error_response(query: &[u8], rc: u16, with_question: bool) -> Option<Vec<u8>> {
    let h = RawHeader::read(query)?;
    // Copy the question and OPT only from a query that decodes completely: a
    // response must never carry bytes weir did not understand.
    let mut question: &[u8] = &[];
    let mut opt: Option<bool> = None; // Some(dnssec_ok) when the query had OPT
    if with_question
        && h.qdcount == 1
        && !h.qr
        && let (Ok(span), Ok(msg)) = (first_question_span(query), decode_message(query, &h))
    {
        question = query.get(span).unwrap_or(&[]);
        opt = msg.edns.as_ref().map(|e| e.flags().dnssec_ok);
    }
    let head = Head {
        id: h.id,
        opcode: h.opcode,
        rd: h.rd,
        cd: h.cd,
        tc: false,
    };
    Some(write_response(head, rc, question, opt))
}

/// The query header bits a response copies, and whether it is truncated.
struct Head {
    id: u16,
    opcode: u8,
    rd: bool,
    cd: bool,
    tc: bool,
}

impl Head {
    fn of(query: &QueryFacts, tc: bool) -> Head {
        Head {
            id: query.id,
            opcode: query.opcode,
            rd: query.recursion_desired,
            cd: query.checking_disabled,
            tc,
        }
    }
}

/// A response: `question` (empty for none) and an OPT record when `opt` is
/// `Some(dnssec_ok)`.
fn write_response(h: Head, rc: u16, question: &[u8], opt: Option<bool>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + question.len() + 11);
    out.extend_from_slice(&h.id.to_be_bytes());
    let ra = h.rd && h.opcode == OPCODE_QUERY;
    let b2 = 0x80 | ((h.opcode & 0x0f) << 3) | (u8::from(h.tc) << 1) | u8::from(h.rd);
    let b3 = (if ra { 0x80 } else { 0 }) | (if h.cd { 0x10 } else { 0 }) | (rc & 0x0f) as u8;
    out.push(b2);
    out.push(b3);
    let qd: u16 = if question.is_empty() { 0 } else { 1 };
    let ar: u16 = u16::from(opt.is_some());
    for count in [qd, 0, 0, ar] {
        out.extend_from_slice(&count.to_be_bytes());
    }
    out.extend_from_slice(question);
    if let Some(dnssec_ok) = opt {
        out.push(0); // root owner
        out.extend_from_slice(&41u16.to_be_bytes()); // OPT
        out.extend_from_slice(&EDNS_UDP_PAYLOAD.to_be_bytes());
        // extended rcode (upper 8 bits of a 12-bit rcode), version 0, DO, Z
        out.push(((rc >> 4) & 0xff) as u8);
        out.push(0);
        out.push(if dnssec_ok { 0x80 } else { 0 });
        out.push(0);
        out.extend_from_slice(&0u16.to_be_bytes()); // RDLEN
    }
    out
}
