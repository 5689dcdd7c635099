//! Policies + endpoints → an immutable, indexed decision structure.
//!
//! For each endpoint and direction that some policy selects there is one table:
//! L4 entries indexed by (protocol, port), each naming the peer identities it
//! allows, and one `HttpMatcher` holding every HTTP rule of that table. Lookups
//! cost a hash probe plus the entries on that port, whatever the policy size.

mod table;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use http::HeaderMap;
use serde::Serialize;
use weir_parsers::http::RequestFacts;

use crate::dns_match::{DnsMatcher, DnsPatternError, DnsSelector};
use crate::endpoints::{Endpoint, Service};
use crate::http_match::{HttpCompileError, HttpMatcher};
use crate::identity::{
    IDENTITY_HEALTH, IDENTITY_HOST, IDENTITY_INIT, IDENTITY_KUBE_APISERVER, IDENTITY_REMOTE_NODE,
    IDENTITY_WORLD, IdentityAllocator, Labels,
};
use crate::kafka_match::{KafkaDenial, KafkaMatcher, KafkaRequest};

use crate::model::{
    Cidr, ClusterConfig, Entity, PeerRule, Policy, PortSpec, Protocol, Selector, ServiceRef,
};

/// One distinct `toFQDNs` selector of the compiled policies (an index into
/// [`CompiledPolicy::fqdn_selectors`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FqdnSelectorId(pub u32);

/// An address the DNS proxy learned from an allowed answer: the identity it
/// has while learned (labels `fqdn:<selector>` for every selector that selected
/// its name, plus the labels of the CIDR identity it would otherwise have).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedIdentity {
    pub identity: u32,
    /// Ascending, unique.
    pub selectors: Vec<FqdnSelectorId>,
    /// The identity the address has without the learning (world or a CIDR
    /// identity): rules that select that identity still select the address.
    pub base: u32,
}

#[derive(Debug, Default)]
struct Learned {
    by_ip: HashMap<IpAddr, u32>,
    identities: HashMap<u32, LearnedIdentity>,
}

/// A peer as rules see it: its identity, and what DNS learning added to it.
#[derive(Clone, Copy)]
struct PeerKey<'a> {
    identity: u32,
    fqdn: Option<&'a LearnedIdentity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// The rule that decided: policy name and the rule's place inside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleRef {
    pub policy: Arc<str>,
    /// e.g. `specs[0].ingress[1].toPorts[0].rules.http[2]`; shared, as every
    /// verdict (so every request's) carries its deciding rules.
    pub rule: Arc<str>,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.policy, self.rule)
    }
}

#[derive(Debug, Clone)]
pub struct CompiledEndpoint {
    pub endpoint: Endpoint,
    /// The labels its identity derives from (the user's plus the namespace).
    pub labels: Labels,
    pub identity: u32,
}

/// What policy is compiled against besides the endpoints: the services of the
/// endpoints file (for `toServices`) and the cluster around the node (for the
/// `cluster`, `remote-node` and `kube-apiserver` entities).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    pub services: Vec<Service>,
    pub cluster: ClusterConfig,
    /// The node's own addresses (the `host` identity); an API server address
    /// among them makes `kube-apiserver` select the host, as in Cilium.
    pub host_addresses: Vec<IpAddr>,
}

#[derive(Debug)]
enum PeerSet {
    Any,
    Identities(HashSet<u32>),
    /// `toFQDNs`: the identities of addresses learned for these selectors
    /// (ascending). Nothing until the DNS proxy learns an address.
    Fqdn(Vec<FqdnSelectorId>),
}

impl PeerSet {
    fn contains(&self, p: PeerKey<'_>) -> bool {
        match self {
            PeerSet::Any => true,
            PeerSet::Identities(s) => {
                s.contains(&p.identity) || p.fqdn.is_some_and(|f| s.contains(&f.base))
            }
            PeerSet::Fqdn(sels) => p
                .fqdn
                .is_some_and(|f| f.selectors.iter().any(|x| sels.binary_search(x).is_ok())),
        }
    }
}

#[derive(Debug)]
struct L4Entry {
    origin: RuleRef,
    peers: PeerSet,
    /// From `ingressDeny`/`egressDeny`: a match denies, whatever else allows.
    deny: bool,
    /// Index of this entry's first HTTP rule's ref, when it has HTTP rules.
    http_refs: Option<Vec<RuleRef>>,
    /// The refs of its DNS rules, when it has DNS rules.
    dns_refs: Option<Vec<RuleRef>>,
    /// The refs of its Kafka rules, when it has Kafka rules.
    kafka_refs: Option<Vec<RuleRef>>,
}

impl L4Entry {
    fn has_l7(&self) -> bool {
        self.http_refs.is_some() || self.dns_refs.is_some() || self.kafka_refs.is_some()
    }
}

#[derive(Debug)]
struct DirTable {
    entries: Vec<L4Entry>,
    exact: HashMap<(Protocol, u16), Vec<u32>>,
    ranges: Vec<(Protocol, u16, u16, u32)>,
    http: HttpMatcher,
    /// HTTP rule index → (owner entry, position in the owner's refs).
    http_owner: Vec<(u32, u32)>,
    dns: DnsMatcher,
    /// DNS rule index → (owner entry, position in the owner's refs).
    dns_owner: Vec<(u32, u32)>,
    kafka: KafkaMatcher,
    /// Kafka rule index → (owner entry, position in the owner's refs).
    kafka_owner: Vec<(u32, u32)>,
}

impl DirTable {
    fn matching_entries(&self, peer: PeerKey<'_>, proto: Protocol, port: u16) -> Vec<u32> {
        let mut out = self.entries_for(peer, proto, port);
        // An ICMP message of one type is also allowed by the rules that allow all
        // ICMP (no `toPorts`), as in the kernel, where both share one protocol.
        if matches!(proto, Protocol::Icmp4 | Protocol::Icmp6) {
            out.extend(self.entries_for(peer, Protocol::Icmp, port));
            out.sort_unstable();
            out.dedup();
        }
        out
    }

    fn entries_for(&self, peer: PeerKey<'_>, proto: Protocol, port: u16) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        if let Some(ids) = self.exact.get(&(proto, port)) {
            out.extend(
                ids.iter()
                    .copied()
                    .filter(|i| self.entries[*i as usize].peers.contains(peer)),
            );
        }
        for (p, lo, hi, id) in &self.ranges {
            if *p == proto
                && (*lo..=*hi).contains(&port)
                && self.entries[*id as usize].peers.contains(peer)
            {
                out.push(*id);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn decide(&self, peer: PeerKey<'_>, proto: Protocol, port: u16) -> DirDecision {
        let ids = self.matching_entries(peer, proto, port);
        if let Some(id) = ids.iter().find(|i| self.entries[**i as usize].deny) {
            return DirDecision::DeniedBy(self.entries[*id as usize].origin.clone());
        }
        let ids: Vec<u32> = ids
            .into_iter()
            .filter(|i| !self.entries[*i as usize].deny)
            .collect();
        let has_dns = |i: &&u32| self.entries[**i as usize].dns_refs.is_some();
        if let Some(id) = ids.iter().find(|i| !self.entries[**i as usize].has_l7()) {
            // An L3/L4 allow without L7 rules wins over L7 rules for the same
            // peer and port: everything passes. Over DNS rules it still passes
            // everything, but through the DNS proxy, as a match-all DNS rule
            // (Cilium adds one and keeps the redirect): a toFQDNs selector
            // learns only from answers the proxy sees, so an L3/L4 allow to
            // the resolver must not take DNS past it.
            if !ids.iter().any(|i| has_dns(&i)) {
                return DirDecision::AllowAll(self.entries[*id as usize].origin.clone());
            }
        }
        if ids.is_empty() {
            DirDecision::Denied
        } else if ids
            .iter()
            .any(|i| self.entries[*i as usize].dns_refs.is_some())
        {
            // HTTP, DNS and Kafka rules never share a port (refused at compile time).
            DirDecision::Dns(ids)
        } else if ids
            .iter()
            .any(|i| self.entries[*i as usize].kafka_refs.is_some())
        {
            DirDecision::Kafka(ids)
        } else {
            DirDecision::Http(ids)
        }
    }
}

/// What one direction's policy says about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirDecision {
    /// No policy selects the endpoint in this direction: default allow.
    NotSelected,
    /// Nothing allows it.
    Denied,
    /// A deny rule matches.
    DeniedBy(RuleRef),
    AllowAll(RuleRef),
    /// Allowed at L4; each request must match an HTTP rule of these entries.
    Http(Vec<u32>),
    /// Allowed at L4; each DNS query must match a DNS rule of these entries.
    Dns(Vec<u32>),
    /// Allowed at L4; each Kafka request must be allowed by Kafka rules of these entries.
    Kafka(Vec<u32>),
}

/// Who a peer is, for flow records and explanations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub ip: IpAddr,
    pub identity: u32,
    /// Index into the policy's endpoints; `None` for `world`.
    pub endpoint: Option<usize>,
}

/// The decision for one connection, from both ends' policies.
#[derive(Debug, Clone)]
pub struct ConnectionVerdict {
    pub src: PeerInfo,
    pub dst: PeerInfo,
    pub protocol: Protocol,
    pub port: u16,
    pub egress: DirDecision,
    pub ingress: DirDecision,
}

/// A decision with the rules that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The allowing rules (egress side first), or empty.
    pub rules: Vec<RuleRef>,
    /// When denied: the direction whose policy had no matching rule.
    pub denied_in: Option<Direction>,
    /// Whether the decision was taken on an L7 request (rather than at L3/L4).
    pub l7: bool,
}

impl Verdict {
    /// One line: the deciding rules, `no rule matched`, or `no policy selects ...`.
    pub fn reason(&self) -> String {
        self.reason_for("HTTP")
    }

    /// The rules, `; `-separated, written into one string (every flow record
    /// has a reason: no string per rule, no list to join).
    fn rules_joined(&self) -> String {
        let len: usize = self
            .rules
            .iter()
            .map(|r| r.policy.len() + 1 + r.rule.len() + 2)
            .sum();
        let mut out = String::with_capacity(len);
        for (i, r) in self.rules.iter().enumerate() {
            if i > 0 {
                out.push_str("; ");
            }
            // RuleRef's Display, without the formatter: one allocation, sized.
            out.push_str(&r.policy);
            out.push(' ');
            out.push_str(&r.rule);
        }
        out
    }

    /// [`Verdict::reason`], naming the L7 protocol `layer` for L7 denials.
    pub fn reason_for(&self, layer: &str) -> String {
        if self.allowed {
            if self.rules.is_empty() {
                "no policy selects these endpoints (default allow)".to_string()
            } else {
                self.rules_joined()
            }
        } else {
            let layer = if self.l7 { layer } else { "L3/L4" };
            if !self.rules.is_empty() {
                return format!("denied by {}", self.rules_joined());
            }
            match self.denied_in {
                Some(d) => format!("no rule matched ({d}, {layer})"),
                None => format!("no rule matched ({layer})"),
            }
        }
    }
}

impl ConnectionVerdict {
    /// Whether the connection passes L3/L4 at all.
    pub fn l4_allowed(&self) -> bool {
        let ok = |d: &DirDecision| !matches!(d, DirDecision::Denied | DirDecision::DeniedBy(_));
        ok(&self.egress) && ok(&self.ingress)
    }

    /// Whether requests must be inspected (some side has L7 rules).
    pub fn needs_l7(&self) -> bool {
        let l7 = |d: &DirDecision| {
            matches!(
                d,
                DirDecision::Http(_) | DirDecision::Dns(_) | DirDecision::Kafka(_)
            )
        };
        l7(&self.egress) || l7(&self.ingress)
    }

    /// Whether some side has DNS rules (queries must go through the DNS proxy).
    pub fn needs_dns(&self) -> bool {
        matches!(self.egress, DirDecision::Dns(_)) || matches!(self.ingress, DirDecision::Dns(_))
    }

    /// The DNS rules each query on this connection must match, for explanations.
    pub fn dns_rules(&self, policy: &CompiledPolicy) -> Vec<(Direction, RuleRef)> {
        self.l7_rules(
            policy,
            |d| match d {
                DirDecision::Dns(owners) => Some(owners),
                _ => None,
            },
            |e| e.dns_refs.as_ref(),
        )
    }

    /// The verdict for one DNS query for `name` on this connection: the lowest
    /// matching DNS rule of each side that has DNS rules decides; a side with
    /// HTTP rules denies (they never allow a DNS query).
    pub fn dns_verdict(&self, policy: &CompiledPolicy, name: &str) -> Verdict {
        let mut rules = Vec::new();
        for (dir, decision, table) in self.sides(policy) {
            let deny = |rules: Vec<RuleRef>, l7: bool| Verdict {
                allowed: false,
                rules,
                denied_in: Some(dir),
                l7,
            };
            match decision {
                DirDecision::DeniedBy(r) => return deny(vec![r.clone()], false),
                DirDecision::Denied => return deny(vec![], false),
                DirDecision::AllowAll(r) => rules.push(r.clone()),
                DirDecision::NotSelected => {}
                DirDecision::Http(_) | DirDecision::Kafka(_) => return deny(vec![], true),
                DirDecision::Dns(owners) => {
                    let matched = table.and_then(|t| {
                        let rule = t.dns.first_match(name, |i| {
                            t.dns_owner
                                .get(i as usize)
                                .is_some_and(|(o, _)| owners.binary_search(o).is_ok())
                        })?;
                        let (owner, pos) = *t.dns_owner.get(rule as usize)?;
                        t.entries[owner as usize]
                            .dns_refs
                            .as_ref()
                            .and_then(|refs| refs.get(pos as usize))
                            .cloned()
                    });
                    // An L3/L4 allow among the owners allows every name.
                    let hit = matched.or_else(|| {
                        table.and_then(|t| {
                            owners
                                .iter()
                                .map(|o| &t.entries[*o as usize])
                                .find(|e| !e.has_l7())
                                .map(|e| e.origin.clone())
                        })
                    });
                    match hit {
                        Some(r) => rules.push(r),
                        None => return deny(vec![], true),
                    }
                }
            }
        }
        Verdict {
            allowed: true,
            rules,
            denied_in: None,
            l7: true,
        }
    }

    /// The HTTP rules each request on this connection must match (one per side
    /// that has them), for explanations.
    pub fn http_rules(&self, policy: &CompiledPolicy) -> Vec<(Direction, RuleRef)> {
        self.l7_rules(
            policy,
            |d| match d {
                DirDecision::Http(owners) => Some(owners),
                _ => None,
            },
            |e| e.http_refs.as_ref(),
        )
    }

    /// The Kafka rules each request on this connection must match, for explanations.
    pub fn kafka_rules(&self, policy: &CompiledPolicy) -> Vec<(Direction, RuleRef)> {
        self.l7_rules(
            policy,
            |d| match d {
                DirDecision::Kafka(owners) => Some(owners),
                _ => None,
            },
            |e| e.kafka_refs.as_ref(),
        )
    }

    /// Whether some side has Kafka rules (requests must go through the Kafka handler).
    pub fn needs_kafka(&self) -> bool {
        matches!(self.egress, DirDecision::Kafka(_))
            || matches!(self.ingress, DirDecision::Kafka(_))
    }

    /// The verdict for one Kafka request on this connection, and when an L7 rule set
    /// denied it, why. A side with HTTP or DNS rules denies (they never allow Kafka).
    pub fn kafka_verdict(
        &self,
        policy: &CompiledPolicy,
        req: &KafkaRequest<'_>,
    ) -> (Verdict, Option<KafkaDenial>) {
        let mut rules = Vec::new();
        for (dir, decision, table) in self.sides(policy) {
            let deny = |rules: Vec<RuleRef>, l7: bool| Verdict {
                allowed: false,
                rules,
                denied_in: Some(dir),
                l7,
            };
            match decision {
                DirDecision::DeniedBy(r) => return (deny(vec![r.clone()], false), None),
                DirDecision::Denied => return (deny(vec![], false), None),
                DirDecision::AllowAll(r) => rules.push(r.clone()),
                DirDecision::NotSelected => {}
                DirDecision::Http(_) | DirDecision::Dns(_) => {
                    return (deny(vec![], true), Some(KafkaDenial::NoRule));
                }
                DirDecision::Kafka(owners) => {
                    let Some(t) = table else {
                        return (deny(vec![], true), Some(KafkaDenial::NoRule));
                    };
                    let hit = t.kafka.evaluate(req, |o| owners.binary_search(&o).is_ok());
                    match hit {
                        Ok(ids) => {
                            for i in ids {
                                let r = t.kafka_owner.get(i as usize).and_then(|(o, pos)| {
                                    t.entries[*o as usize]
                                        .kafka_refs
                                        .as_ref()
                                        .and_then(|refs| refs.get(*pos as usize))
                                });
                                if let Some(r) = r {
                                    rules.push(r.clone());
                                }
                            }
                        }
                        Err(why) => return (deny(vec![], true), Some(why)),
                    }
                }
            }
        }
        let v = Verdict {
            allowed: true,
            rules,
            denied_in: None,
            l7: true,
        };
        (v, None)
    }

    /// Each side of the connection: its direction, its decision and the rule table
    /// of the endpoint whose rules apply there (egress: the source's, ingress: the
    /// destination's), when that peer is a local endpoint with rules.
    fn sides<'a>(
        &'a self,
        policy: &'a CompiledPolicy,
    ) -> [(Direction, &'a DirDecision, Option<&'a DirTable>); 2] {
        let table = |ep: Option<usize>, tables: &'a [Option<DirTable>]| {
            ep.and_then(|i| tables.get(i)).and_then(Option::as_ref)
        };
        [
            (
                Direction::Egress,
                &self.egress,
                table(self.src.endpoint, &policy.egress),
            ),
            (
                Direction::Ingress,
                &self.ingress,
                table(self.dst.endpoint, &policy.ingress),
            ),
        ]
    }

    /// The L7 rules of one kind (`owners` picks the decision, `refs` the entry's
    /// rules of that kind) each side's requests must match.
    fn l7_rules(
        &self,
        policy: &CompiledPolicy,
        owners: impl Fn(&DirDecision) -> Option<&Vec<u32>>,
        refs: impl Fn(&L4Entry) -> Option<&Vec<RuleRef>>,
    ) -> Vec<(Direction, RuleRef)> {
        let mut out = Vec::new();
        for (dir, decision, table) in self.sides(policy) {
            let Some(owners) = owners(decision) else {
                continue;
            };
            let Some(table) = table else {
                continue;
            };
            for owner in owners {
                let rules = refs(&table.entries[*owner as usize]).into_iter().flatten();
                out.extend(rules.map(|r| (dir, r.clone())));
            }
        }
        out
    }

    /// The connection-level verdict (for L4-only flows, and for L4 denials).
    pub fn l4_verdict(&self) -> Verdict {
        let mut rules = Vec::new();
        for (dir, d) in [
            (Direction::Egress, &self.egress),
            (Direction::Ingress, &self.ingress),
        ] {
            match d {
                DirDecision::DeniedBy(r) => {
                    return Verdict {
                        allowed: false,
                        rules: vec![r.clone()],
                        denied_in: Some(dir),
                        l7: false,
                    };
                }
                DirDecision::Denied => {
                    return Verdict {
                        allowed: false,
                        rules: vec![],
                        denied_in: Some(dir),
                        l7: false,
                    };
                }
                DirDecision::AllowAll(r) => rules.push(r.clone()),
                DirDecision::NotSelected
                | DirDecision::Http(_)
                | DirDecision::Dns(_)
                | DirDecision::Kafka(_) => {}
            }
        }
        Verdict {
            allowed: true,
            rules,
            denied_in: None,
            l7: false,
        }
    }

    /// The verdict for one HTTP request on this connection.
    pub fn http_verdict(
        &self,
        policy: &CompiledPolicy,
        facts: &RequestFacts,
        headers: &HeaderMap,
    ) -> Verdict {
        self.http_decision(policy, facts, headers).0
    }

    /// Every header an HTTP rule of this connection's policies names (lower-case):
    /// the headers whose value the policy checks.
    pub fn http_header_names<'p>(&self, policy: &'p CompiledPolicy) -> Vec<&'p str> {
        let mut out: Vec<&str> = Vec::new();
        for (decision, ep, tables) in [
            (&self.egress, self.src.endpoint, &policy.egress),
            (&self.ingress, self.dst.endpoint, &policy.ingress),
        ] {
            if !matches!(decision, DirDecision::Http(_)) {
                continue;
            }
            if let Some(t) = ep.and_then(|i| tables.get(i)).and_then(Option::as_ref) {
                out.extend(t.http.header_names().iter().map(String::as_str));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The verdict for one HTTP request, with the `headerMatches` mismatches
    /// (and their actions) of every allowing rule when it is allowed.
    pub fn http_decision(
        &self,
        policy: &CompiledPolicy,
        facts: &RequestFacts,
        headers: &HeaderMap,
    ) -> (Verdict, Vec<crate::http_match::HeaderMismatch>) {
        let mut mismatches = Vec::new();
        let mut rules = Vec::new();
        for (dir, decision, table) in self.sides(policy) {
            match decision {
                DirDecision::DeniedBy(r) => {
                    let v = Verdict {
                        allowed: false,
                        rules: vec![r.clone()],
                        denied_in: Some(dir),
                        l7: false,
                    };
                    return (v, Vec::new());
                }
                DirDecision::Denied => {
                    let v = Verdict {
                        allowed: false,
                        rules: vec![],
                        denied_in: Some(dir),
                        l7: false,
                    };
                    return (v, Vec::new());
                }
                DirDecision::AllowAll(r) => rules.push(r.clone()),
                DirDecision::NotSelected => {}
                DirDecision::Dns(_) | DirDecision::Kafka(_) => {
                    // DNS and Kafka rules never allow HTTP requests.
                    let v = Verdict {
                        allowed: false,
                        rules: vec![],
                        denied_in: Some(dir),
                        l7: true,
                    };
                    return (v, Vec::new());
                }
                DirDecision::Http(owners) => {
                    let hit = table.and_then(|t| {
                        let m = t.http.evaluate(facts, headers, owners)?;
                        let (owner, pos) = t.http_owner[m.rule as usize];
                        let r = t.entries[owner as usize]
                            .http_refs
                            .as_ref()
                            .and_then(|refs| refs.get(pos as usize))
                            .cloned()?;
                        Some((r, m.mismatches))
                    });
                    match hit {
                        Some((r, m)) => {
                            rules.push(r);
                            mismatches.extend(m);
                        }
                        None => {
                            let v = Verdict {
                                allowed: false,
                                rules: vec![],
                                denied_in: Some(dir),
                                l7: true,
                            };
                            return (v, Vec::new());
                        }
                    }
                }
            }
        }
        let v = Verdict {
            allowed: true,
            rules,
            denied_in: None,
            l7: true,
        };
        (v, mismatches)
    }
}

/// One L3/L4 rule as the kernel datapath needs it: for this endpoint and
/// direction, these peers may use this protocol and port range; `l7` says the
/// flow must go through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4Rule {
    pub endpoint: usize,
    pub direction: Direction,
    /// `None`: every peer, `world` included.
    pub peers: Option<Vec<u32>>,
    pub protocol: Protocol,
    pub port_lo: u16,
    pub port_hi: u16,
    pub l7: bool,
    /// The L7 rules are DNS rules: for the peers and ports it shares with an
    /// L3/L4 allow, this redirect still wins (see `decide`).
    pub dns: bool,
    pub deny: bool,
    pub rule: RuleRef,
}

/// The compiled, immutable policy. Swapped whole (arc-swap) when anything changes.
#[derive(Debug)]
pub struct CompiledPolicy {
    endpoints: Vec<CompiledEndpoint>,
    by_ip: HashMap<IpAddr, usize>,
    /// Every prefix the policies mention, longest first, with its identity.
    cidrs: Vec<CidrIdentity>,
    ingress: Vec<Option<DirTable>>,
    egress: Vec<Option<DirTable>>,
    policy_count: usize,
    /// The node's own addresses: the `host` identity.
    host_ips: Vec<IpAddr>,
    /// Every distinct `toFQDNs` selector (canonical form), and their index.
    fqdn_selectors: Vec<DnsSelector>,
    fqdn_matcher: DnsMatcher,
    /// Addresses learned from DNS answers. The only mutable part: learning an
    /// address never recompiles the policy.
    learned: RwLock<Learned>,
}

/// A prefix mentioned by some policy, and the identity of addresses whose longest
/// mentioned prefix it is. Its labels carry every mentioned prefix containing it,
/// so overlapping CIDRs and `except`s resolve by identity alone.
#[derive(Debug, Clone)]
pub struct CidrIdentity {
    pub cidr: Cidr,
    pub identity: u32,
    pub containing: Vec<Cidr>,
    /// Which reserved range (if any) the prefix lies in.
    pub kind: CidrKind,
    /// A `--kube-apiserver` address: selected by `kube-apiserver` besides what
    /// its range says (an API server outside the cluster is also `world` and
    /// matched by CIDR rules; one on a remote node is also `remote-node`).
    pub kube_apiserver: bool,
}

/// Where a non-endpoint prefix lies. Reserved ranges take precedence over the
/// prefixes policies mention: an address inside `--cluster-cidr` is a pod of the
/// cluster (not `world`, and — as in Cilium — not selected by CIDR rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CidrKind {
    World,
    /// Inside a `--cluster-cidr` range.
    Cluster,
    /// Inside a `--remote-node-cidr` range.
    RemoteNode,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Http(#[from] HttpCompileError),
    #[error("compiling DNS rules: {0}")]
    Dns(#[from] DnsPatternError),
    /// Cilium refuses to merge conflicting L7 parsers on one port.
    #[error(
        "{first} and {second} put {what}: one port has one L7 protocol (Cilium refuses to merge conflicting L7 parsers)"
    )]
    L7Conflict {
        first: RuleRef,
        second: RuleRef,
        /// e.g. `DNS and HTTP rules on the same port (53/TCP)`.
        what: String,
    },
}

impl CompiledPolicy {
    pub fn compile(
        policies: &[Policy],
        endpoints: &[Endpoint],
        identities: &mut IdentityAllocator,
    ) -> Result<Self, CompileError> {
        Self::compile_in(policies, endpoints, &Environment::default(), identities)
    }

    /// Compiles with services and the cluster's ranges known.
    pub fn compile_in(
        policies: &[Policy],
        endpoints: &[Endpoint],
        env: &Environment,
        identities: &mut IdentityAllocator,
    ) -> Result<Self, CompileError> {
        let compiled_eps: Vec<CompiledEndpoint> = endpoints
            .iter()
            .map(|e| {
                let labels = e.identity_labels();
                CompiledEndpoint {
                    endpoint: e.clone(),
                    identity: identities.identity(&labels),
                    labels,
                }
            })
            .collect();
        let mut by_ip = HashMap::new();
        for (i, e) in compiled_eps.iter().enumerate() {
            for ip in &e.endpoint.ips {
                by_ip.insert(*ip, i);
            }
        }
        let cidrs = cidr_identities(policies, env, &by_ip, identities);
        let apiserver_on_host = env.cluster.kube_apiserver.iter().any(|a| {
            env.host_addresses
                .iter()
                .any(|h| canonical_ip(*h) == canonical_ip(*a))
                && !by_ip.contains_key(&canonical_ip(*a))
        });
        let fqdn_selectors = fqdn_selectors(policies);
        let fqdn_matcher = DnsMatcher::new(&fqdn_selectors)?;
        let universe = PeerUniverse {
            endpoints: &compiled_eps,
            by_ip: &by_ip,
            cidrs: &cidrs,
            services: &env.services,
            apiserver_on_host,
            fqdn_index: &fqdn_selectors
                .iter()
                .enumerate()
                .map(|(i, s)| (s.clone(), i as u32))
                .collect(),
        };
        let mut ingress = Vec::with_capacity(endpoints.len());
        let mut egress = Vec::with_capacity(endpoints.len());
        for subject in &compiled_eps {
            ingress.push(table::build_table(
                policies,
                &universe,
                subject,
                Direction::Ingress,
            )?);
            egress.push(table::build_table(
                policies,
                &universe,
                subject,
                Direction::Egress,
            )?);
        }
        Ok(CompiledPolicy {
            endpoints: compiled_eps,
            by_ip,
            cidrs,
            ingress,
            egress,
            policy_count: policies.len(),
            host_ips: Vec::new(),
            fqdn_selectors,
            fqdn_matcher,
            learned: RwLock::new(Learned::default()),
        }
        .with_host_addresses(env.host_addresses.iter().copied()))
    }

    /// Names the node's own addresses, which are the `host` identity (as in
    /// Cilium, whatever CIDR contains them) unless an endpoint has them.
    pub fn with_host_addresses(mut self, ips: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut ips: Vec<IpAddr> = ips.into_iter().map(canonical_ip).collect();
        ips.sort();
        ips.dedup();
        self.host_ips = ips;
        self
    }

    /// The node's own addresses, sorted.
    pub fn host_addresses(&self) -> &[IpAddr] {
        &self.host_ips
    }

    pub fn endpoints(&self) -> &[CompiledEndpoint] {
        &self.endpoints
    }

    /// Every L3/L4 rule, per endpoint and direction (for the kernel datapath).
    pub fn l4_rules(&self) -> Vec<L4Rule> {
        let learned = self.learned.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (dir, tables) in [
            (Direction::Ingress, &self.ingress),
            (Direction::Egress, &self.egress),
        ] {
            for (ep, table) in tables.iter().enumerate() {
                let Some(t) = table else { continue };
                let mut push = |proto: Protocol, lo: u16, hi: u16, id: u32| {
                    let e = &t.entries[id as usize];
                    let peers = match &e.peers {
                        PeerSet::Any => None,
                        PeerSet::Identities(s) => {
                            // A learned address's ipcache entry carries its
                            // learned identity, not its base: list every learned
                            // identity whose base the rule selects, as
                            // `PeerSet::contains` does in userspace (deny rules
                            // too, or a CIDR deny would stop denying it).
                            let mut v: Vec<u32> = s
                                .iter()
                                .copied()
                                .chain(
                                    learned
                                        .identities
                                        .values()
                                        .filter(|l| s.contains(&l.base))
                                        .map(|l| l.identity),
                                )
                                .collect();
                            v.sort_unstable();
                            v.dedup();
                            Some(v)
                        }
                        PeerSet::Fqdn(sels) => {
                            let mut v: Vec<u32> = learned
                                .identities
                                .values()
                                .filter(|l| {
                                    l.selectors.iter().any(|x| sels.binary_search(x).is_ok())
                                })
                                .map(|l| l.identity)
                                .collect();
                            v.sort_unstable();
                            Some(v)
                        }
                    };
                    out.push(L4Rule {
                        endpoint: ep,
                        direction: dir,
                        peers,
                        protocol: proto,
                        port_lo: lo,
                        port_hi: hi,
                        l7: e.has_l7(),
                        dns: e.dns_refs.is_some(),
                        deny: e.deny,
                        rule: e.origin.clone(),
                    });
                };
                let mut exact: Vec<_> = t.exact.iter().collect();
                exact.sort_by_key(|(k, _)| **k);
                for ((proto, port), ids) in exact {
                    for id in ids {
                        push(*proto, *port, *port, *id);
                    }
                }
                for (proto, lo, hi, id) in &t.ranges {
                    push(*proto, *lo, *hi, *id);
                }
            }
        }
        out
    }

    pub fn policy_count(&self) -> usize {
        self.policy_count
    }

    pub fn endpoint_by_ip(&self, ip: IpAddr) -> Option<&CompiledEndpoint> {
        self.by_ip
            .get(&canonical_ip(ip))
            .map(|i| &self.endpoints[*i])
    }

    pub fn endpoint_by_name(&self, name: &str) -> Option<&CompiledEndpoint> {
        self.endpoints.iter().find(|e| e.endpoint.name == name)
    }

    /// Whether any policy selects this endpoint in this direction.
    pub fn is_selected(&self, endpoint: usize, dir: Direction) -> bool {
        let tables = match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        };
        tables.get(endpoint).is_some_and(Option::is_some)
    }

    /// Who an address is: a local endpoint, or `world`.
    pub fn peer_info(&self, ip: IpAddr) -> PeerInfo {
        self.peer(ip)
    }

    /// The prefixes policies mention, with their identities (for the kernel's ipcache).
    pub fn cidr_identities(&self) -> &[CidrIdentity] {
        &self.cidrs
    }

    fn peer(&self, ip: IpAddr) -> PeerInfo {
        let ip = canonical_ip(ip);
        match self.by_ip.get(&ip) {
            Some(i) => PeerInfo {
                ip,
                identity: self.endpoints[*i].identity,
                endpoint: Some(*i),
            },
            None if self.host_ips.binary_search(&ip).is_ok() => PeerInfo {
                ip,
                identity: IDENTITY_HOST,
                endpoint: None,
            },
            None => PeerInfo {
                ip,
                identity: match self
                    .learned
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .by_ip
                    .get(&ip)
                {
                    Some(id) => *id,
                    None => self.base_identity(ip),
                },
                endpoint: None,
            },
        }
    }

    /// The identity of a non-endpoint, non-host address from the prefixes
    /// alone: its longest mentioned prefix's, or `world`.
    fn base_identity(&self, ip: IpAddr) -> u32 {
        // Longest mentioned prefix first (the list is sorted that way).
        self.cidrs
            .iter()
            .find(|c| c.cidr.contains(ip))
            .map_or(IDENTITY_WORLD, |c| c.identity)
    }

    /// Every distinct `toFQDNs` selector of the policies, indexed by
    /// [`FqdnSelectorId`] (names lower-cased with a trailing dot).
    pub fn fqdn_selectors(&self) -> &[DnsSelector] {
        &self.fqdn_selectors
    }

    /// The `toFQDNs` selectors that select `name` (what the DNS proxy learns
    /// an allowed answer's addresses for), ascending.
    pub fn fqdn_selectors_matching(&self, name: &str) -> Vec<FqdnSelectorId> {
        self.fqdn_matcher
            .matching(name)
            .into_iter()
            .map(FqdnSelectorId)
            .collect()
    }

    /// Records that `ip` answered a lookup of a name these selectors select:
    /// from now on the `toFQDNs` rules of those selectors allow it (with the
    /// selectors it was learned for before). Returns its identity (labels
    /// `fqdn:<selector>` plus those of its CIDR identity), or `None` when the
    /// address cannot be learned: a special address (loopback, link-local,
    /// multicast, ...), a local endpoint, the node, an address
    /// inside the cluster's ranges (toFQDNs, like CIDR rules, selects only
    /// addresses outside the cluster), or no known selector. No recompilation.
    pub fn learn_fqdn_ip(
        &self,
        ip: IpAddr,
        selectors: &[FqdnSelectorId],
        ids: &mut IdentityAllocator,
    ) -> Option<u32> {
        let ip = canonical_ip(ip);
        if special_address(ip)
            || self.by_ip.contains_key(&ip)
            || self.host_ips.binary_search(&ip).is_ok()
        {
            return None;
        }
        let prefix = self.cidrs.iter().find(|c| c.cidr.contains(ip));
        if prefix.is_some_and(|c| c.kind != CidrKind::World) {
            return None;
        }
        let mut learned = self.learned.write().unwrap_or_else(|e| e.into_inner());
        let mut sels: Vec<FqdnSelectorId> = selectors
            .iter()
            .copied()
            .filter(|s| (s.0 as usize) < self.fqdn_selectors.len())
            .collect();
        if let Some(prev) = learned
            .by_ip
            .get(&ip)
            .and_then(|id| learned.identities.get(id))
        {
            sels.extend(&prev.selectors);
        }
        sels.sort_unstable();
        sels.dedup();
        if sels.is_empty() {
            return None;
        }
        let mut labels: Labels = sels
            .iter()
            .map(|s| {
                (
                    format!("fqdn:{}", self.fqdn_selectors[s.0 as usize]),
                    String::new(),
                )
            })
            .collect();
        labels.insert("reserved:world".into(), String::new());
        for c in prefix.iter().flat_map(|c| c.containing.iter()) {
            labels.insert(format!("cidr:{c}"), String::new());
        }
        if prefix.is_some_and(|c| c.kube_apiserver) {
            labels.insert("reserved:kube-apiserver".into(), String::new());
        }
        let identity = ids.identity(&labels);
        let base = self.base_identity(ip);
        learned.by_ip.insert(ip, identity);
        learned.identities.insert(
            identity,
            LearnedIdentity {
                identity,
                selectors: sels,
                base,
            },
        );
        Some(identity)
    }

    /// Forgets a learned address (its TTL ran out): it has its CIDR identity
    /// again and `toFQDNs` rules no longer allow it. Whether it was learned.
    pub fn forget_fqdn_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        let mut learned = self.learned.write().unwrap_or_else(|e| e.into_inner());
        let Some(id) = learned.by_ip.remove(&ip) else {
            return false;
        };
        if !learned.by_ip.values().any(|v| *v == id) {
            learned.identities.remove(&id);
        }
        true
    }

    /// The identity `ip` has while learned, if it is.
    pub fn learned_fqdn_ip(&self, ip: IpAddr) -> Option<LearnedIdentity> {
        let ip = canonical_ip(ip);
        let learned = self.learned.read().unwrap_or_else(|e| e.into_inner());
        learned
            .by_ip
            .get(&ip)
            .and_then(|id| learned.identities.get(id))
            .cloned()
    }

    /// Every learned address with its identity, ascending by address.
    pub fn learned_fqdn_ips(&self) -> Vec<(IpAddr, LearnedIdentity)> {
        let learned = self.learned.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(IpAddr, LearnedIdentity)> = learned
            .by_ip
            .iter()
            .filter_map(|(ip, id)| learned.identities.get(id).map(|l| (*ip, l.clone())))
            .collect();
        out.sort_by_key(|(ip, _)| *ip);
        out
    }

    /// Decides a connection from `src` to `dst:port`.
    pub fn connection(
        &self,
        src: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> ConnectionVerdict {
        let src = self.peer(src);
        let dst = self.peer(dst);
        let learned = self.learned.read().unwrap_or_else(|e| e.into_inner());
        let key = |p: &PeerInfo| PeerKey {
            identity: p.identity,
            fqdn: learned.identities.get(&p.identity),
        };
        let side = |tables: &[Option<DirTable>], ep: Option<usize>, peer: PeerKey<'_>| match ep
            .and_then(|i| tables.get(i))
            .and_then(Option::as_ref)
        {
            None => DirDecision::NotSelected,
            Some(t) => t.decide(peer, protocol, port),
        };
        let egress = side(&self.egress, src.endpoint, key(&dst));
        let ingress = side(&self.ingress, dst.endpoint, key(&src));
        ConnectionVerdict {
            src,
            dst,
            protocol,
            port,
            egress,
            ingress,
        }
    }
}

/// What in `policies` selects nothing only because the environment lacks it: an
/// entity whose flag is not set, a `toServices` entry naming no known service.
/// Not errors (Cilium accepts both, and a service may be listed later), but an
/// operator should hear of them: one line each.
pub fn unresolved_references(policies: &[Policy], env: &Environment) -> Vec<String> {
    let mut out = Vec::new();
    let c = &env.cluster;
    for p in policies {
        let name = p.qualified_name();
        for rule in &p.rules {
            for dir in [Direction::Ingress, Direction::Egress] {
                for (list, _, field) in all_peer_rules(rule, dir) {
                    for (i, pr) in list.into_iter().flatten().enumerate() {
                        let at = format!("{name} {}.{field}[{i}]", rule.label);
                        for e in pr.entities.iter().flatten() {
                            let missing = match e {
                                Entity::KubeApiserver if c.kube_apiserver.is_empty() => {
                                    Some(("kube-apiserver", "--kube-apiserver"))
                                }
                                Entity::RemoteNode if c.remote_node_cidrs.is_empty() => {
                                    Some(("remote-node", "--remote-node-cidr"))
                                }
                                _ => None,
                            };
                            if let Some((entity, flag)) = missing {
                                out.push(format!(
                                    "{at}: entity `{entity}` selects no address: {flag} is not set"
                                ));
                            }
                        }
                        for r in pr.services.iter().flatten() {
                            let u = PeerUniverse {
                                endpoints: &[],
                                by_ip: &HashMap::new(),
                                cidrs: &[],
                                services: &env.services,
                                apiserver_on_host: false,
                                fqdn_index: &HashMap::new(),
                            };
                            if u.services_of(r).next().is_none() {
                                out.push(format!(
                                    "{at}: toServices {r} names no service of the endpoints file; it selects nothing"
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// `toFQDNs` rules whose names no DNS rule would let the DNS proxy see: the
/// proxy learns a name's addresses only from lookups it inspects, i.e. on an
/// egress port 53 with `rules.dns` that allow the name, for the same
/// endpoints. One line per such `toFQDNs` entry (a warning, not an error:
/// Cilium accepts such policies, which then allow nothing).
///
/// "The same endpoints" without an endpoints file: a DNS rule counts when its
/// `endpointSelector` asks for no more than the toFQDNs rule's (so it selects
/// at least those endpoints). A pattern counts as allowed when the DNS rules
/// match a name it selects (its stars replaced by a letter).
pub fn fqdn_rules_without_dns(policies: &[Policy]) -> Vec<String> {
    use crate::model::SelectorExpr;
    let covers = |wide: &Selector, narrow: &Selector| {
        wide.match_labels
            .iter()
            .all(|(k, v)| narrow.match_labels.get(k) == Some(v))
            && wide
                .match_expressions
                .iter()
                .all(|e: &SelectorExpr| narrow.match_expressions.contains(e))
    };
    // Every DNS rule on an egress port 53, with the subject it applies to.
    let mut dns: Vec<(&Selector, Vec<DnsSelector>)> = Vec::new();
    for p in policies {
        for rule in &p.rules {
            for pr in rule.egress.iter().flatten() {
                for tp in &pr.to_ports {
                    let on_53 = tp.ports.iter().any(|pp| pp.port == PortSpec::Number(53));
                    if let (true, Some(rules)) = (on_53, tp.dns.as_ref()) {
                        if rules.is_empty() {
                            continue;
                        }
                        dns.push((
                            &rule.subject,
                            rules.iter().map(|r| r.value.clone()).collect(),
                        ));
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    for p in policies {
        let name = p.qualified_name();
        for rule in &p.rules {
            for (i, pr) in rule.egress.iter().flatten().enumerate() {
                for (j, sel) in pr.fqdns.iter().flatten().enumerate() {
                    let example = match &sel.value {
                        DnsSelector::MatchName(n) => n.clone(),
                        DnsSelector::MatchPattern(pat) => {
                            pat.replace("**.", "x.").replace('*', "x")
                        }
                    };
                    let learned = dns.iter().any(|(subject, rules)| {
                        covers(subject, &rule.subject)
                            && DnsMatcher::new(rules.iter())
                                .is_ok_and(|m| m.first_match(&example, |_| true).is_some())
                    });
                    if !learned {
                        out.push(format!(
                            "{}: {name} {}.egress[{i}].toFQDNs[{j}] ({}): no egress DNS rule on port 53 for the same endpoints allows this name, so its addresses are never learned and the rule allows nothing",
                            p.file, rule.label, sel.value
                        ));
                    }
                }
            }
        }
    }
    out
}

/// IPv4-mapped IPv6 addresses (from a dual-stack socket) are the IPv4 address.
/// Addresses a DNS answer must never open through `toFQDNs`: they are not a
/// remote service's (loopback, unspecified, link-local such as the
/// 169.254.169.254 metadata service, multicast, broadcast), so an answer naming
/// one is either a mistake or an attempt to reach the node's own neighbourhood.
/// `ip` is canonical (a v4-mapped address is already v4).
fn special_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.octets()[0] == 0 // 0.0.0.0/8, "this network"
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_unicast_link_local()
                || v6.is_multicast()
        }
    }
}

pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

struct PeerUniverse<'a> {
    endpoints: &'a [CompiledEndpoint],
    by_ip: &'a HashMap<IpAddr, usize>,
    cidrs: &'a [CidrIdentity],
    services: &'a [Service],
    /// Some `--kube-apiserver` address is the node's own (so `host`).
    apiserver_on_host: bool,
    /// The distinct `toFQDNs` selectors (canonical) → their id.
    fqdn_index: &'a HashMap<DnsSelector, u32>,
}

impl PeerUniverse<'_> {
    /// The services a `toServices` entry names.
    fn services_of<'s>(&'s self, r: &'s ServiceRef) -> impl Iterator<Item = &'s Service> + 's {
        self.services.iter().filter(move |s| match r {
            ServiceRef::Named { name, namespace } => {
                &s.name == name && namespace.as_ref().is_none_or(|ns| &s.namespace == ns)
            }
            ServiceRef::Selected {
                selector,
                namespace,
            } => {
                namespace.as_ref().is_none_or(|ns| &s.namespace == ns)
                    && selector.matches(&s.labels)
            }
        })
    }

    /// A service's backends as identities: the endpoints its selector matches in
    /// its namespace, or the identities of its listed addresses.
    fn service_backends(&self, s: &Service, out: &mut HashSet<u32>) {
        match &s.selector {
            Some(sel) => out.extend(
                self.endpoints
                    .iter()
                    .filter(|e| e.endpoint.namespace == s.namespace && sel.matches(&e.labels))
                    .map(|e| e.identity),
            ),
            None => {
                for ip in &s.backends {
                    let ip = canonical_ip(*ip);
                    match self.by_ip.get(&ip) {
                        Some(i) => {
                            out.insert(self.endpoints[*i].identity);
                        }
                        None => {
                            let host = host_prefix(ip);
                            out.extend(
                                self.cidrs
                                    .iter()
                                    .filter(|c| c.cidr == host)
                                    .map(|c| c.identity),
                            );
                        }
                    }
                }
            }
        }
    }
}

fn host_prefix(ip: IpAddr) -> Cidr {
    Cidr {
        addr: ip,
        len: if ip.is_ipv4() { 32 } else { 128 },
    }
}

fn all_peer_rules(
    rule: &crate::model::Rule,
    dir: Direction,
) -> [(Option<&Vec<PeerRule>>, bool, &'static str); 2] {
    match dir {
        Direction::Ingress => [
            (rule.ingress.as_ref(), false, "ingress"),
            (rule.ingress_deny.as_ref(), true, "ingressDeny"),
        ],
        Direction::Egress => [
            (rule.egress.as_ref(), false, "egress"),
            (rule.egress_deny.as_ref(), true, "egressDeny"),
        ],
    }
}

fn cidr_identities(
    policies: &[Policy],
    env: &Environment,
    by_ip: &HashMap<IpAddr, usize>,
    ids: &mut IdentityAllocator,
) -> Vec<CidrIdentity> {
    // Prefixes policies mention (with `except`s), and the addresses of
    // selector-less services that `toServices` may name.
    let mut mentioned: Vec<Cidr> = Vec::new();
    for p in policies {
        for rule in &p.rules {
            for dir in [Direction::Ingress, Direction::Egress] {
                for (list, _, _) in all_peer_rules(rule, dir) {
                    for pr in list.into_iter().flatten() {
                        for c in pr.cidrs.iter().flatten() {
                            mentioned.push(c.cidr);
                            mentioned.extend(&c.except);
                        }
                    }
                }
            }
        }
    }
    for s in env.services.iter().filter(|s| s.selector.is_none()) {
        mentioned.extend(
            s.backends
                .iter()
                .map(|ip| canonical_ip(*ip))
                .filter(|ip| !by_ip.contains_key(ip))
                .map(host_prefix),
        );
    }
    let c = &env.cluster;
    let reserved: Vec<(Cidr, CidrKind)> = c
        .cluster_cidrs
        .iter()
        .map(|p| (*p, CidrKind::Cluster))
        .chain(
            c.remote_node_cidrs
                .iter()
                .map(|p| (*p, CidrKind::RemoteNode)),
        )
        .collect();
    let apiservers: Vec<Cidr> = c
        .kube_apiserver
        .iter()
        .map(|ip| host_prefix(canonical_ip(*ip)))
        .collect();
    let mut prefixes: Vec<Cidr> = mentioned
        .iter()
        .copied()
        .chain(reserved.iter().map(|(p, _)| *p))
        .chain(apiservers.iter().copied())
        .collect();
    prefixes.sort();
    prefixes.dedup();
    mentioned.sort();
    mentioned.dedup();
    let mut out: Vec<CidrIdentity> = prefixes
        .iter()
        .map(|p| {
            let containing: Vec<Cidr> = mentioned.iter().copied().filter(|q| q.covers(p)).collect();
            let kind = reserved
                .iter()
                .filter(|(q, _)| q.covers(p))
                .map(|(_, k)| *k)
                .max()
                .unwrap_or(CidrKind::World);
            let mut labels: Labels = containing
                .iter()
                .map(|q| (format!("cidr:{q}"), String::new()))
                .collect();
            let kube_apiserver = apiservers.contains(p);
            let reserved_label = match kind {
                CidrKind::World => "reserved:world",
                CidrKind::Cluster => "reserved:cluster",
                CidrKind::RemoteNode => "reserved:remote-node",
            };
            labels.insert(reserved_label.into(), String::new());
            if kube_apiserver {
                labels.insert("reserved:kube-apiserver".into(), String::new());
            }
            // Cilium's reserved identities where only the reserved labels apply;
            // prefixes that policies also name get identities of their own.
            let identity = match kind {
                _ if kube_apiserver && containing.is_empty() => IDENTITY_KUBE_APISERVER,
                CidrKind::RemoteNode if containing.is_empty() => IDENTITY_REMOTE_NODE,
                _ => ids.identity(&labels),
            };
            CidrIdentity {
                cidr: *p,
                identity,
                containing,
                kind,
                kube_apiserver,
            }
        })
        .collect();
    out.sort_by(|a, b| b.cidr.len.cmp(&a.cidr.len).then(a.cidr.cmp(&b.cidr)));
    out
}

/// Every distinct `toFQDNs` selector of the policies, canonical, in order of
/// first appearance.
fn fqdn_selectors(policies: &[Policy]) -> Vec<DnsSelector> {
    let mut out: Vec<DnsSelector> = Vec::new();
    let mut seen = HashSet::new();
    for p in policies {
        for rule in &p.rules {
            for pr in rule.egress.iter().flatten() {
                for s in pr.fqdns.iter().flatten() {
                    let c = s.value.canonical();
                    if seen.insert(c.clone()) {
                        out.push(c);
                    }
                }
            }
        }
    }
    out
}

fn peer_set(pr: &PeerRule, u: &PeerUniverse<'_>) -> PeerSet {
    if let Some(fqdns) = &pr.fqdns {
        // Decoding refuses toFQDNs beside other L3 fields (as Cilium does).
        let mut ids: Vec<FqdnSelectorId> = fqdns
            .iter()
            .filter_map(|s| {
                let c = s.value.canonical();
                u.fqdn_index.get(&c).map(|i| FqdnSelectorId(*i))
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        return PeerSet::Fqdn(ids);
    }
    if pr.peers.is_none() && pr.cidrs.is_none() && pr.entities.is_none() && pr.services.is_none() {
        return PeerSet::Any;
    }
    let entities = pr.entities.as_deref().unwrap_or(&[]);
    if entities.contains(&Entity::All) {
        return PeerSet::Any;
    }
    let mut ids = HashSet::new();
    if let Some(sels) = &pr.peers {
        ids.extend(
            u.endpoints
                .iter()
                .filter(|e| sels.iter().any(|s| s.matches(&e.labels)))
                .map(|e| e.identity),
        );
    }
    // CIDR rules select addresses outside the cluster only (as in Cilium: not
    // pods, not nodes, not the API server).
    for c in pr.cidrs.iter().flatten() {
        ids.extend(
            u.cidrs
                .iter()
                .filter(|ci| {
                    ci.kind == CidrKind::World
                        && ci.containing.contains(&c.cidr)
                        && !c.except.iter().any(|e| ci.containing.contains(e))
                })
                .map(|ci| ci.identity),
        );
    }
    for r in pr.services.iter().flatten() {
        for s in u.services_of(r) {
            u.service_backends(s, &mut ids);
        }
    }
    let of_kind = |k: CidrKind| {
        u.cidrs
            .iter()
            .filter(move |c| c.kind == k)
            .map(|c| c.identity)
    };
    for e in entities {
        match e {
            Entity::World => {
                ids.insert(IDENTITY_WORLD);
                ids.extend(of_kind(CidrKind::World));
            }
            Entity::Host => {
                ids.insert(IDENTITY_HOST);
            }
            Entity::Cluster => {
                // Cilium: host, remote-node, init, health, unmanaged and every
                // pod of the cluster; for weir every local endpoint and the
                // --cluster-cidr ranges (unmanaged is never assigned).
                ids.extend(u.endpoints.iter().map(|e| e.identity));
                ids.extend([
                    IDENTITY_HOST,
                    IDENTITY_REMOTE_NODE,
                    IDENTITY_HEALTH,
                    IDENTITY_INIT,
                ]);
                ids.extend(of_kind(CidrKind::Cluster));
                ids.extend(of_kind(CidrKind::RemoteNode));
            }
            Entity::RemoteNode => {
                ids.insert(IDENTITY_REMOTE_NODE);
                ids.extend(of_kind(CidrKind::RemoteNode));
            }
            Entity::Health => {
                ids.insert(IDENTITY_HEALTH);
            }
            Entity::Init => {
                ids.insert(IDENTITY_INIT);
            }
            Entity::KubeApiserver => {
                ids.insert(IDENTITY_KUBE_APISERVER);
                ids.extend(
                    u.cidrs
                        .iter()
                        .filter(|c| c.kube_apiserver)
                        .map(|c| c.identity),
                );
                if u.apiserver_on_host {
                    ids.insert(IDENTITY_HOST);
                }
            }
            Entity::All | Entity::None => {}
        }
    }
    PeerSet::Identities(ids)
}

/// One port has one L7 protocol: HTTP, DNS and Kafka rules on the same protocol
/// and port (whatever peers they name) are refused, as Cilium refuses to merge
/// conflicting L7 parsers.
fn check_l7_conflicts(
    entries: &[L4Entry],
    exact: &HashMap<(Protocol, u16), Vec<u32>>,
    ranges: &[(Protocol, u16, u16, u32)],
) -> Result<(), CompileError> {
    let kind = |e: &L4Entry| {
        if e.dns_refs.is_some() {
            Some("DNS")
        } else if e.kafka_refs.is_some() {
            Some("Kafka")
        } else if e.http_refs.is_some() {
            Some("HTTP")
        } else {
            None
        }
    };
    if !entries
        .iter()
        .any(|e| e.dns_refs.is_some() || e.kafka_refs.is_some())
    {
        return Ok(());
    }
    // DNS and Kafka rules sit on exact ports only (decoding refuses port 0 and endPort).
    let mut keys: Vec<&(Protocol, u16)> = exact.keys().collect();
    keys.sort();
    for key in keys {
        let ids: Vec<u32> = exact[key]
            .iter()
            .copied()
            .chain(
                ranges
                    .iter()
                    .filter(|(p, lo, hi, _)| *p == key.0 && (*lo..=*hi).contains(&key.1))
                    .map(|r| r.3),
            )
            .collect();
        let mut first: Option<(u32, &str)> = None;
        for i in ids {
            let Some(k) = kind(&entries[i as usize]) else {
                continue;
            };
            match first {
                None => first = Some((i, k)),
                Some((f, fk)) if fk != k => {
                    return Err(CompileError::L7Conflict {
                        first: entries[f as usize].origin.clone(),
                        second: entries[i as usize].origin.clone(),
                        what: format!("{fk} and {k} rules on the same port ({}/{})", key.1, key.0),
                    });
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// Named ports resolve against the endpoint that owns the port: the subject for
/// ingress, the selected peers for egress.
fn resolve_port(
    spec: &PortSpec,
    subject: &CompiledEndpoint,
    endpoints: &[CompiledEndpoint],
    peers: &Option<Vec<Selector>>,
    dir: Direction,
) -> Vec<u16> {
    match spec {
        PortSpec::Number(n) => vec![*n],
        PortSpec::Named(name) => match dir {
            Direction::Ingress => subject
                .endpoint
                .ports
                .get(name)
                .copied()
                .into_iter()
                .collect(),
            Direction::Egress => {
                let mut ports: Vec<u16> = endpoints
                    .iter()
                    .filter(|e| {
                        peers
                            .as_ref()
                            .is_none_or(|s| s.iter().any(|s| s.matches(&e.labels)))
                    })
                    .filter_map(|e| e.endpoint.ports.get(name).copied())
                    .collect();
                ports.sort_unstable();
                ports.dedup();
                ports
            }
        },
    }
}
