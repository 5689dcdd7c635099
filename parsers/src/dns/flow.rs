//! Hubble-style DNS flow facts: the `l7.dns` object of a flow record, with the
//! field names of Hubble's `flow.DNS` message (cilium `api/v1/flow/flow.proto`:
//! `query`, `ips`, `ttl`, `cnames`, `observation_source`, `rcode`, `qtypes`,
//! `rrtypes`). Empty fields are left out, as Hubble's JSON output does.

use std::borrow::Cow;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{AnswerFacts, QueryFacts, rr_type_name};

/// Cilium's value for records observed by the DNS proxy.
pub const OBSERVATION_SOURCE_PROXY: &str = "proxy";

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// One DNS query or answer, as a flow record's `l7.dns`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsFlow {
    /// The question name, lower-cased with a trailing dot.
    #[serde(default)]
    pub query: String,
    /// Addresses learned from the answer (A/AAAA of the name or its chain):
    /// kept as addresses and written as text only in the record's JSON (a
    /// string per address cost an allocation and `Display` per answer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    /// The answer's smallest TTL.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ttl: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cnames: Vec<String>,
    /// Always [`OBSERVATION_SOURCE_PROXY`] from weir: borrowed, not a string
    /// per record.
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub observation_source: Cow<'static, str>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rcode: u32,
    /// Type names (`A`, `AAAA`; `TYPE65534` for one without a name): borrowed
    /// for the named ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qtypes: Vec<Cow<'static, str>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rrtypes: Vec<Cow<'static, str>>,
}

impl DnsFlow {
    /// The record for a query (a REQUEST flow).
    pub fn from_query(q: &QueryFacts) -> Self {
        Self {
            query: q.name.clone(),
            observation_source: Cow::Borrowed(OBSERVATION_SOURCE_PROXY),
            qtypes: vec![q.qtype_name()],
            ..Self::default()
        }
    }

    /// The record for an answer weir synthesised or forwarded (a RESPONSE flow)
    /// with only an rcode: REFUSED/NXDOMAIN for denials, FORMERR, SERVFAIL.
    pub fn from_rcode(q: &QueryFacts, rcode: u16) -> Self {
        Self {
            rcode: u32::from(rcode),
            ..Self::from_query(q)
        }
    }

    /// The record for an upstream answer (a RESPONSE flow).
    pub fn from_answer(q: &QueryFacts, a: &AnswerFacts) -> Self {
        Self {
            ips: a.addresses.iter().map(|x| x.ip).collect(),
            ttl: a.min_ttl.unwrap_or(0),
            cnames: a.cnames.clone(),
            rcode: u32::from(a.rcode),
            rrtypes: a.rrtypes.iter().map(|t| rr_type_name(*t)).collect(),
            ..Self::from_query(q)
        }
    }
}
