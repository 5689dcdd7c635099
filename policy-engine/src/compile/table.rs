//! One endpoint's rule table in one direction: which rules select it, and the
//! L4 entries (with their L7 rules) those rules add.

use std::collections::HashMap;
use std::sync::Arc;

use super::{
    CompileError, CompiledEndpoint, DirTable, Direction, L4Entry, PeerSet, PeerUniverse, RuleRef,
    all_peer_rules, check_l7_conflicts, peer_set, resolve_port,
};
use crate::dns_match::{DnsMatcher, DnsSelector};
use crate::http_match::{HttpMatcher, HttpRuleSpec};
use crate::kafka_match::{KafkaMatcher, KafkaRuleSpec};
use crate::model::{PeerRule, Policy, PortRule, Protocol, Rule};

/// The protocols a rule without `toPorts` allows: all of them, ICMP echo included.
const EVERY_PROTOCOL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp];

/// `None` when no rule selects `subject` in `dir`.
pub(super) fn build_table(
    policies: &[Policy],
    universe: &PeerUniverse<'_>,
    subject: &CompiledEndpoint,
    dir: Direction,
) -> Result<Option<DirTable>, CompileError> {
    let scope = Scope {
        universe,
        subject,
        dir,
    };
    let mut selection = Selection::default();
    let mut table = TableBuilder::default();
    for policy in policies {
        let policy_name: Arc<str> = Arc::from(policy.qualified_name());
        for rule in &policy.rules {
            for (peer_rules, deny, field) in all_peer_rules(rule, dir) {
                // Cilium enables a direction for rules with at least one entry
                // there (`len(r.Ingress) > 0`): `ingress:` left empty or `[]`
                // selects nothing, while `[{}]` selects and allows nothing.
                let Some(peer_rules) = peer_rules.filter(|p| !p.is_empty()) else {
                    continue;
                };
                if !rule.subject.matches(&subject.labels) {
                    continue;
                }
                selection.select(rule, dir, &policy_name);
                for (pi, pr) in peer_rules.iter().enumerate() {
                    let place = Place {
                        policy: &policy_name,
                        rule: format!("{}.{field}[{pi}]", rule.label),
                        deny,
                    };
                    table.add_peer_rule(pr, &place, &scope);
                }
            }
        }
    }
    if !selection.selected {
        return Ok(None);
    }
    if let Some(origin) = selection.allow_all_origin() {
        // What Cilium inserts for an endpoint that only default-allow rules
        // select: `{from,to}Entities: [all]` on every port and protocol.
        table.add_every_protocol(origin, PeerSet::Any, false);
    }
    table.finish().map(Some)
}

/// Whether rules select the endpoint in this direction, and whether it is
/// default-deny there.
#[derive(Default)]
struct Selection {
    selected: bool,
    /// Cilium: the endpoint is default-deny in this direction when any rule
    /// selecting it there enables it (the default); otherwise everything is
    /// allowed but what deny rules deny, and the rules' allows still apply (L7).
    default_deny: bool,
    /// The first rule that turned default deny off, to name as the deciding rule.
    default_allow_origin: Option<RuleRef>,
}

impl Selection {
    fn select(&mut self, rule: &Rule, dir: Direction, policy: &Arc<str>) {
        self.selected = true;
        let (default_deny, field) = match dir {
            Direction::Ingress => (rule.default_deny.ingress, "ingress"),
            Direction::Egress => (rule.default_deny.egress, "egress"),
        };
        if default_deny.unwrap_or(true) {
            self.default_deny = true;
        } else if self.default_allow_origin.is_none() {
            self.default_allow_origin = Some(RuleRef {
                policy: policy.clone(),
                rule: format!("{}.enableDefaultDeny.{field}", rule.label).into(),
            });
        }
    }

    /// The rule to name for "everything allowed" when no selecting rule asked
    /// for default deny.
    fn allow_all_origin(self) -> Option<RuleRef> {
        if self.default_deny {
            None
        } else {
            self.default_allow_origin
        }
    }
}

/// Where a peer rule sits: its policy, its path (`specs[0].ingress[1]`), and
/// whether it came from a deny list.
struct Place<'a> {
    policy: &'a Arc<str>,
    rule: String,
    deny: bool,
}

impl Place<'_> {
    fn rule_ref(&self, suffix: std::fmt::Arguments<'_>) -> RuleRef {
        RuleRef {
            policy: self.policy.clone(),
            rule: format!("{}{suffix}", self.rule).into(),
        }
    }
}

/// What a table is built for: the endpoint, the direction, and the peers
/// rules can name.
struct Scope<'a> {
    universe: &'a PeerUniverse<'a>,
    subject: &'a CompiledEndpoint,
    dir: Direction,
}

/// A [`DirTable`] under construction: an entry's id is its index in `entries`.
#[derive(Default)]
struct TableBuilder {
    entries: Vec<L4Entry>,
    exact: HashMap<(Protocol, u16), Vec<u32>>,
    ranges: Vec<(Protocol, u16, u16, u32)>,
    http_specs: Vec<HttpRuleSpec>,
    http_owner: Vec<(u32, u32)>,
    dns_specs: Vec<DnsSelector>,
    dns_owner: Vec<(u32, u32)>,
    kafka_specs: Vec<KafkaRuleSpec>,
    kafka_owner: Vec<(u32, u32)>,
}

impl TableBuilder {
    fn next_id(&self) -> u32 {
        self.entries.len() as u32
    }

    fn add_peer_rule(&mut self, pr: &PeerRule, place: &Place<'_>, scope: &Scope<'_>) {
        if !pr.icmps.is_empty() {
            self.add_icmps(pr, place, scope.universe);
        } else if pr.to_ports.is_empty() {
            let no_l3 = pr.peers.is_none()
                && pr.cidrs.is_none()
                && pr.entities.is_none()
                && pr.services.is_none()
                && pr.fqdns.is_none();
            // `{}`: selects the endpoint (default deny) but allows nothing.
            if !no_l3 {
                let origin = place.rule_ref(format_args!(""));
                self.add_every_protocol(origin, peer_set(pr, scope.universe), place.deny);
            }
        } else {
            for (ti, tp) in pr.to_ports.iter().enumerate() {
                let origin = place.rule_ref(format_args!(".toPorts[{ti}]"));
                self.add_port_rule(pr, tp, origin, place.deny, scope);
            }
        }
    }

    /// `icmps`: these types (the "port") of ICMP or ICMPv6 only; one entry per
    /// `icmps` item, for the deciding rule's name.
    fn add_icmps(&mut self, pr: &PeerRule, place: &Place<'_>, universe: &PeerUniverse<'_>) {
        let mut ids: Vec<(usize, u32)> = Vec::new();
        for t in &pr.icmps {
            let id = match ids.iter().find(|(e, _)| *e == t.entry) {
                Some((_, id)) => *id,
                None => {
                    let id = self.next_id();
                    self.entries.push(L4Entry {
                        origin: place.rule_ref(format_args!(".icmps[{}]", t.entry)),
                        peers: peer_set(pr, universe),
                        deny: place.deny,
                        http_refs: None,
                        dns_refs: None,
                        kafka_refs: None,
                    });
                    ids.push((t.entry, id));
                    id
                }
            };
            self.exact
                .entry((t.family, u16::from(t.icmp_type)))
                .or_default()
                .push(id);
        }
    }

    /// An entry on every port of every protocol (no `toPorts`).
    fn add_every_protocol(&mut self, origin: RuleRef, peers: PeerSet, deny: bool) {
        let id = self.next_id();
        self.entries.push(L4Entry {
            origin,
            peers,
            deny,
            http_refs: None,
            dns_refs: None,
            kafka_refs: None,
        });
        for proto in EVERY_PROTOCOL {
            self.ranges.push((proto, 0, u16::MAX, id));
        }
    }

    /// One `toPorts` item: an entry with its L7 rules, on each of its ports.
    fn add_port_rule(
        &mut self,
        pr: &PeerRule,
        tp: &PortRule,
        origin: RuleRef,
        deny: bool,
        scope: &Scope<'_>,
    ) {
        let id = self.next_id();
        let http_refs = self.add_http_rules(id, tp, &origin);
        let dns_refs = self.add_dns_rules(id, tp, &origin);
        let kafka_refs = self.add_kafka_rules(id, tp, &origin);
        self.entries.push(L4Entry {
            origin,
            peers: peer_set(pr, scope.universe),
            deny,
            http_refs,
            dns_refs,
            kafka_refs,
        });
        for pp in &tp.ports {
            let protos: &[Protocol] = match pp.protocol {
                Protocol::Any => &[Protocol::Tcp, Protocol::Udp],
                Protocol::Tcp => &[Protocol::Tcp],
                Protocol::Udp => &[Protocol::Udp],
                Protocol::Icmp => &[Protocol::Icmp],
                Protocol::Icmp4 => &[Protocol::Icmp4],
                Protocol::Icmp6 => &[Protocol::Icmp6],
            };
            let ports = resolve_port(
                &pp.port,
                scope.subject,
                scope.universe.endpoints,
                &pr.peers,
                scope.dir,
            );
            for port in ports {
                for proto in protos {
                    match (port, pp.end_port) {
                        (0, _) => self.ranges.push((*proto, 0, u16::MAX, id)),
                        (p, Some(end)) if end > p => self.ranges.push((*proto, p, end, id)),
                        (p, _) => self.exact.entry((*proto, p)).or_default().push(id),
                    }
                }
            }
        }
    }

    /// `rules.http` of entry `owner`; `None` when it has none (all HTTP passes).
    fn add_http_rules(
        &mut self,
        owner: u32,
        tp: &PortRule,
        origin: &RuleRef,
    ) -> Option<Vec<RuleRef>> {
        let rules = tp.http.as_ref().filter(|h| !h.is_empty())?;
        for (hi, h) in rules.iter().enumerate() {
            self.http_owner.push((owner, hi as u32));
            self.http_specs.push(HttpRuleSpec {
                owner,
                method: h.method.as_ref().map(|m| m.value.clone()),
                path: h.path.as_ref().map(|m| m.value.clone()),
                host: h.host.as_ref().map(|m| m.value.clone()),
                headers: h.headers.iter().map(|l| l.value.clone()).collect(),
            });
        }
        Some(l7_refs(origin, "http", rules.len()))
    }

    /// `rules.dns` of entry `owner`; `None` when it has none (every query passes).
    fn add_dns_rules(
        &mut self,
        owner: u32,
        tp: &PortRule,
        origin: &RuleRef,
    ) -> Option<Vec<RuleRef>> {
        let rules = tp.dns.as_ref().filter(|d| !d.is_empty())?;
        for (di, r) in rules.iter().enumerate() {
            self.dns_owner.push((owner, di as u32));
            self.dns_specs.push(r.value.clone());
        }
        Some(l7_refs(origin, "dns", rules.len()))
    }

    /// `rules.kafka` of entry `owner`; `None` when it has none (every request passes).
    fn add_kafka_rules(
        &mut self,
        owner: u32,
        tp: &PortRule,
        origin: &RuleRef,
    ) -> Option<Vec<RuleRef>> {
        let rules = tp.kafka.as_ref().filter(|k| !k.is_empty())?;
        for (ki, k) in rules.iter().enumerate() {
            self.kafka_owner.push((owner, ki as u32));
            self.kafka_specs.push(KafkaRuleSpec {
                owner,
                api_keys: k.api_keys.clone(),
                api_version: k.api_version,
                client_id: k.client_id.clone(),
                topic: k.topic.clone(),
            });
        }
        Some(l7_refs(origin, "kafka", rules.len()))
    }

    fn finish(self) -> Result<DirTable, CompileError> {
        check_l7_conflicts(&self.entries, &self.exact, &self.ranges)?;
        Ok(DirTable {
            entries: self.entries,
            exact: self.exact,
            ranges: self.ranges,
            http: HttpMatcher::new(self.http_specs)?,
            http_owner: self.http_owner,
            dns: DnsMatcher::new(&self.dns_specs)?,
            dns_owner: self.dns_owner,
            kafka: KafkaMatcher::new(self.kafka_specs),
            kafka_owner: self.kafka_owner,
        })
    }
}

/// The refs of a port rule's `n` L7 rules of one kind: `<origin>.rules.<kind>[i]`.
fn l7_refs(origin: &RuleRef, kind: &str, n: usize) -> Vec<RuleRef> {
    (0..n)
        .map(|i| RuleRef {
            policy: origin.policy.clone(),
            rule: format!("{}.rules.{kind}[{i}]", origin.rule).into(),
        })
        .collect()
}
