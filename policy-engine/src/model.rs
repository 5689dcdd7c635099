//! The policy model: what weir understands of CiliumNetworkPolicy, with the source
//! position of every value that can later turn out to be wrong.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

pub use crate::dns_match::DnsSelector;
use crate::yaml::Pos;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    Namespaced,
    Clusterwide,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub kind: PolicyKind,
    pub name: String,
    pub namespace: Option<String>,
    pub file: String,
    pub rules: Vec<Rule>,
    /// Where `metadata.name` (or, without one, the document) starts.
    pub pos: Pos,
}

impl Policy {
    /// `namespace/name` for namespaced policies, `name` for clusterwide ones.
    pub fn qualified_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// One entry of `spec`/`specs`.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Where the rule sits in its policy: `spec` or `specs[N]`.
    pub label: String,
    pub subject: Selector,
    pub ingress: Option<Vec<PeerRule>>,
    pub egress: Option<Vec<PeerRule>>,
    /// `ingressDeny` / `egressDeny`: L3/L4 only; a match denies whatever allows it.
    pub ingress_deny: Option<Vec<PeerRule>>,
    pub egress_deny: Option<Vec<PeerRule>>,
    /// `enableDefaultDeny`: `None` for a direction means Cilium's default (true
    /// when the rule has rules in that direction).
    pub default_deny: DefaultDeny,
    pub pos: Pos,
}

/// `enableDefaultDeny: {ingress, egress}` of one rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DefaultDeny {
    pub ingress: Option<bool>,
    pub egress: Option<bool>,
}

/// An IP prefix in canonical form (host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.len)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.len)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// Whether every address of `other` is in `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    /// `10.0.0.0/8`, `fd00::/64`, or a bare address (a /32 or /128). Host bits must
    /// be zero: `10.0.0.1/8` is ambiguous and refused.
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not a CIDR prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0-{max}"))?,
            None => max,
        };
        let c = Cidr { addr, len };
        let canonical = match addr {
            IpAddr::V4(a) => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        if canonical != addr {
            return Err(format!(
                "`{s}` has host bits set (did you mean {canonical}/{len}?)"
            ));
        }
        Ok(c)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrRule {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
}

/// Cilium's reserved entities that weir knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    /// Everything outside the cluster (CIDR identities included; not the
    /// `--cluster-cidr` and `--remote-node-cidr` ranges).
    World,
    /// The node itself.
    Host,
    /// Every peer.
    All,
    /// Every local endpoint, the host, remote nodes, health and init endpoints,
    /// and the `--cluster-cidr` ranges.
    Cluster,
    /// The `--remote-node-cidr` ranges.
    RemoteNode,
    /// Cilium's health endpoints: weir runs none, so this selects no peer.
    Health,
    /// Endpoints whose identity is not resolved yet: every weir endpoint has its
    /// labels from the start, so this selects no peer.
    Init,
    /// The `--kube-apiserver` addresses.
    KubeApiserver,
    /// Nothing (Cilium's `none`).
    None,
}

/// One `toServices` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceRef {
    /// `k8sService: {serviceName, namespace}`; no namespace matches the name
    /// in every namespace (as in Cilium).
    Named {
        name: String,
        namespace: Option<String>,
    },
    /// `k8sServiceSelector: {selector, namespace}`: services whose labels match.
    Selected {
        selector: Selector,
        namespace: Option<String>,
    },
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceRef::Named { name, namespace } => match namespace {
                Some(ns) => write!(f, "k8sService {ns}/{name}"),
                None => write!(f, "k8sService {name} (any namespace)"),
            },
            ServiceRef::Selected {
                selector,
                namespace,
            } => {
                let labels: Vec<String> = selector
                    .match_labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .chain(
                        selector
                            .match_expressions
                            .iter()
                            .map(|e| format!("{} {:?} {:?}", e.key, e.op, e.values)),
                    )
                    .collect();
                write!(f, "k8sServiceSelector {{{}}}", labels.join(","))?;
                match namespace {
                    Some(ns) => write!(f, " in {ns}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The cluster around the node, from `weir run` flags: what `cluster`,
/// `remote-node` and `kube-apiserver` stand for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Pod ranges of the whole cluster (`--cluster-cidr`): their addresses that
    /// are not local endpoints are pods of other nodes, in `cluster`, not `world`.
    pub cluster_cidrs: Vec<Cidr>,
    /// The other nodes' addresses (`--remote-node-cidr`): `remote-node`.
    pub remote_node_cidrs: Vec<Cidr>,
    /// The API server's addresses (`--kube-apiserver`): `kube-apiserver`.
    pub kube_apiserver: Vec<IpAddr>,
}

/// An ingress or egress rule: which peers, on which ports, with which L7 rules.
/// With no L3 field at all (`*Endpoints`, `*CIDR`, `*CIDRSet`, `*Entities`)
/// every peer matches; with several, a peer matching any of them does.
#[derive(Debug, Clone)]
pub struct PeerRule {
    pub peers: Option<Vec<Selector>>,
    pub cidrs: Option<Vec<CidrRule>>,
    pub entities: Option<Vec<Entity>>,
    /// `toServices`: the backends of these services (egress only).
    pub services: Option<Vec<ServiceRef>>,
    /// `toFQDNs` (egress only, never with another L3 field): the addresses the
    /// DNS proxy learns for names these selectors select.
    pub fqdns: Option<Vec<Located<DnsSelector>>>,
    /// Empty: all ports.
    pub to_ports: Vec<PortRule>,
    /// Cilium's `icmps`: the ICMP types (per family) this rule allows; only in a
    /// rule without `toPorts`.
    pub icmps: Vec<IcmpType>,
    pub pos: Pos,
}

/// One `icmps[].fields[]` entry: an ICMP type of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpType {
    /// [`Protocol::Icmp4`] or [`Protocol::Icmp6`].
    pub family: Protocol,
    pub icmp_type: u8,
    /// Index of the `icmps` entry, for the rule's name.
    pub entry: usize,
    pub pos: Pos,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Any,
    /// ICMP and ICMPv6, any type: what a rule without `toPorts` (which allows
    /// every protocol) allows; never a `toPorts` protocol.
    Icmp,
    /// ICMP (v4) by type, from `icmps` rules (the type is the "port").
    Icmp4,
    /// ICMPv6 by type, from `icmps` rules.
    Icmp6,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Any => "ANY",
            Protocol::Icmp => "ICMP",
            Protocol::Icmp4 => "ICMPv4",
            Protocol::Icmp6 => "ICMPv6",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// 0 means every port.
    Number(u16),
    Named(String),
}

#[derive(Debug, Clone)]
pub struct PortProtocol {
    pub port: PortSpec,
    pub end_port: Option<u16>,
    pub protocol: Protocol,
    pub pos: Pos,
}

#[derive(Debug, Clone)]
pub struct PortRule {
    pub ports: Vec<PortProtocol>,
    /// `None` or an empty list: all HTTP (and all L7) traffic on these ports passes.
    pub http: Option<Vec<HttpRule>>,
    /// `rules.dns`: `None` or empty: every query passes.
    pub dns: Option<Vec<Located<DnsSelector>>>,
    /// `rules.kafka`: `None` or empty: every request passes.
    pub kafka: Option<Vec<KafkaRule>>,
    pub pos: Pos,
}

/// One `rules.kafka` entry (Cilium's `PortRuleKafka`). `role` and `apiKey` never
/// come together (a load error).
#[derive(Debug, Clone)]
pub struct KafkaRule {
    /// From `role` or `apiKey`: ascending; `None` is every API key.
    pub api_keys: Option<Vec<i16>>,
    pub api_version: Option<i16>,
    pub client_id: Option<String>,
    pub topic: Option<String>,
    pub pos: Pos,
}

#[derive(Debug, Clone)]
pub struct Located<T> {
    pub value: T,
    pub pos: Pos,
}

/// Cilium's `headerMatches[].mismatch`: what a rule does when the header does
/// not have the required value. The rule still allows the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MismatchAction {
    /// Allow and record the mismatch.
    Log,
    /// Add the required value as one more field line (existing ones stay).
    Add,
    /// Remove the header when it is present with another value.
    Delete,
    /// Set the header to the required value (added when absent).
    Replace,
}

impl fmt::Display for MismatchAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MismatchAction::Log => "LOG",
            MismatchAction::Add => "ADD",
            MismatchAction::Delete => "DELETE",
            MismatchAction::Replace => "REPLACE",
        })
    }
}

/// One header condition of an HTTP rule, from `headers` or `headerMatches`.
/// Several field lines of the header are matched as one value joined with `,`
/// (as Envoy does for Cilium).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRule {
    /// Lower-case.
    pub name: String,
    /// `None`: the header must be present, any value.
    pub value: Option<String>,
    /// `None`: a mismatch denies (every `headers` entry, and `headerMatches`
    /// without `mismatch`).
    pub mismatch: Option<MismatchAction>,
}

#[derive(Debug, Clone)]
pub struct HttpRule {
    pub method: Option<Located<String>>,
    pub path: Option<Located<String>>,
    pub host: Option<Located<String>>,
    /// `headers` entries, then `headerMatches` entries, in policy order.
    pub headers: Vec<Located<HeaderRule>>,
    pub pos: Pos,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectorOp {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorExpr {
    pub key: String,
    pub op: SelectorOp,
    pub values: Vec<String>,
}

/// A Kubernetes label selector. Empty selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<SelectorExpr>,
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let have = labels.get(&e.key);
                match e.op {
                    SelectorOp::In => have.is_some_and(|v| e.values.contains(v)),
                    SelectorOp::NotIn => have.is_none_or(|v| !e.values.contains(v)),
                    SelectorOp::Exists => have.is_some(),
                    SelectorOp::DoesNotExist => have.is_none(),
                }
            })
    }
}

/// Cilium label keys may carry a source prefix (`k8s:app`, `any:app`); endpoints
/// here have one label source, so the prefix is dropped.
pub fn strip_label_source(key: &str) -> &str {
    for prefix in ["k8s:", "any:", "container:"] {
        if let Some(rest) = key.strip_prefix(prefix) {
            return rest;
        }
    }
    key
}
