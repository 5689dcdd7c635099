//! Compiled policy → the kernel's policy entries.
//!
//! For every (endpoint, direction, protocol, remote identity) the rules become
//! disjoint port intervals, each with the winning verdict (deny beats an L3/L4
//! allow, which beats an L7 redirect — Cilium's "L3/L4 allow wins" rule — except
//! a redirect for DNS rules, which beats the allow: the proxy then passes every
//! query, and learns the answers for toFQDNs), and each
//! interval becomes a handful of port prefixes for the LPM trie. Rules for "any
//! peer" are stored under identity 0 and also folded into every specific
//! identity's intervals, so the kernel's first hit is always the whole answer.

use std::collections::{BTreeMap, BTreeSet};

use weir_policy::{CompiledPolicy, Direction, Protocol};

use super::rule_ids::RuleIds;

/// Precedence order: a later variant wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Redirect,
    Allow,
    /// To the proxy, for DNS rules: over an L3/L4 allow too.
    RedirectDns,
    Deny,
}

impl Verdict {
    /// `enum weir_verdict` in weir_redirect.h.
    pub fn kernel_value(self) -> u32 {
        match self {
            Verdict::Deny => super::maps::kernel_enum::WEIR_DROP,
            Verdict::Allow => super::maps::kernel_enum::WEIR_ALLOW,
            Verdict::Redirect | Verdict::RedirectDns => super::maps::kernel_enum::WEIR_REDIRECT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub lo: u16,
    pub hi: u16,
    pub verdict: Verdict,
    pub rule_id: u32,
}

/// Disjoint, merged intervals from possibly overlapping `(lo, hi, verdict, rule)`.
pub fn intervals(rules: &[(u16, u16, Verdict, u32)]) -> Vec<Interval> {
    // Sweep over boundaries; per verdict the set of active rule ids (the lowest
    // id is the one reported).
    let mut events: Vec<(u32, bool, usize)> = Vec::with_capacity(rules.len() * 2);
    for (i, (lo, hi, _, _)) in rules.iter().enumerate() {
        events.push((u32::from(*lo), true, i));
        events.push((u32::from(*hi) + 1, false, i));
    }
    events.sort_unstable_by_key(|e| (e.0, e.1));
    let mut active: [BTreeSet<(u32, usize)>; 4] = Default::default();
    let mut out: Vec<Interval> = Vec::new();
    let mut idx = 0;
    while idx < events.len() {
        let at = events[idx].0;
        while idx < events.len() && events[idx].0 == at {
            let (_, start, r) = events[idx];
            let (_, _, v, id) = rules[r];
            if start {
                active[v as usize].insert((id, r));
            } else {
                active[v as usize].remove(&(id, r));
            }
            idx += 1;
        }
        let next = events.get(idx).map(|e| e.0);
        let Some(next) = next else { break };
        if at > u32::from(u16::MAX) {
            break;
        }
        let winner = [
            Verdict::Deny,
            Verdict::RedirectDns,
            Verdict::Allow,
            Verdict::Redirect,
        ]
        .into_iter()
        .find_map(|v| active[v as usize].first().map(|(id, _)| (v, *id)));
        if let Some((verdict, rule_id)) = winner {
            let (lo, hi) = (at as u16, (next - 1).min(u32::from(u16::MAX)) as u16);
            match out.last_mut() {
                Some(last)
                    if last.verdict == verdict
                        && last.rule_id == rule_id
                        && u32::from(last.hi) + 1 == u32::from(lo) =>
                {
                    last.hi = hi
                }
                _ => out.push(Interval {
                    lo,
                    hi,
                    verdict,
                    rule_id,
                }),
            }
        }
    }
    out
}

/// The fewest `(value, prefix bits)` port prefixes that cover exactly `lo..=hi`.
pub fn range_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    let mut out = Vec::new();
    while lo <= hi {
        let mut k = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while k > 0 && lo + (1 << k) - 1 > hi {
            k -= 1;
        }
        out.push((lo as u16, (16 - k) as u8));
        lo += 1 << k;
    }
    out
}

/// One entry of the kernel policy map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyEntry {
    pub endpoint_id: u32,
    pub direction: u8,
    pub protocol: u8,
    pub identity: u32,
    pub port: u16,
    pub port_bits: u8,
    pub verdict: Verdict,
    pub rule_id: u32,
}

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// All kernel policy entries; their `rule_id`s come from `rule_ids`. `ids` are
/// the endpoints' kernel ids, by position (see `sync::endpoint_ids`).
pub fn policy_entries(
    policy: &CompiledPolicy,
    ids: &[u32],
    rule_ids: &mut RuleIds,
) -> Vec<PolicyEntry> {
    /// (endpoint, direction, protocol) → (peers, port_lo, port_hi, verdict, rule id)
    type Group = (usize, u8, u8);
    type GroupRule = (Option<Vec<u32>>, u16, u16, Verdict, u32);
    let mut groups: BTreeMap<Group, Vec<GroupRule>> = BTreeMap::new();
    for r in policy.l4_rules() {
        let dir = match r.direction {
            Direction::Ingress => DIR_INGRESS,
            Direction::Egress => DIR_EGRESS,
        };
        let protos: &[u8] = match r.protocol {
            Protocol::Tcp => &[IPPROTO_TCP],
            Protocol::Udp => &[IPPROTO_UDP],
            // The echo identifier rides in the port fields; one rule, both families.
            Protocol::Icmp => &[IPPROTO_ICMP, IPPROTO_ICMPV6],
            // `icmps` rules: the ICMP type is the port.
            Protocol::Icmp4 => &[IPPROTO_ICMP],
            Protocol::Icmp6 => &[IPPROTO_ICMPV6],
            Protocol::Any => continue, // expanded to TCP and UDP by the compiler
        };
        let id = rule_ids.id(&r.rule);
        let verdict = if r.deny {
            Verdict::Deny
        } else if r.dns {
            Verdict::RedirectDns
        } else if r.l7 {
            Verdict::Redirect
        } else {
            Verdict::Allow
        };
        for proto in protos {
            groups.entry((r.endpoint, dir, *proto)).or_default().push((
                r.peers.clone(),
                r.port_lo,
                r.port_hi,
                verdict,
                id,
            ));
        }
    }
    let mut out = Vec::new();
    for ((ep, dir, proto), rules) in groups {
        let wildcard: Vec<_> = rules
            .iter()
            .filter(|r| r.0.is_none())
            .map(|r| (r.1, r.2, r.3, r.4))
            .collect();
        let mut identities: BTreeSet<u32> = BTreeSet::new();
        for r in &rules {
            if let Some(ids) = &r.0 {
                identities.extend(ids);
            }
        }
        let mut emit = |identity: u32, set: &[(u16, u16, Verdict, u32)]| {
            for iv in intervals(set) {
                for (port, port_bits) in range_prefixes(iv.lo, iv.hi) {
                    out.push(PolicyEntry {
                        endpoint_id: ids[ep],
                        direction: dir,
                        protocol: proto,
                        identity,
                        port,
                        port_bits,
                        verdict: iv.verdict,
                        rule_id: iv.rule_id,
                    });
                }
            }
        };
        if !wildcard.is_empty() {
            emit(0, &wildcard);
        }
        for id in identities {
            let mut set = wildcard.clone();
            set.extend(
                rules
                    .iter()
                    .filter(|r| {
                        r.0.as_ref()
                            .is_some_and(|ids| ids.binary_search(&id).is_ok())
                    })
                    .map(|r| (r.1, r.2, r.3, r.4)),
            );
            emit(id, &set);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefixes_of_ranges() {
        assert_eq!(range_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(range_prefixes(0, u16::MAX), vec![(0, 0)]);
        assert_eq!(range_prefixes(8000, 8003), vec![(8000, 14)]);
        assert_eq!(range_prefixes(8000, 8004), vec![(8000, 14), (8004, 16)]);
    }

    #[test]
    fn allow_beats_redirect_and_deny_beats_both() {
        let iv = intervals(&[
            (8000, 8010, Verdict::Redirect, 0),
            (8005, 8020, Verdict::Allow, 1),
            (8008, 8008, Verdict::Deny, 2),
        ]);
        assert_eq!(
            iv,
            vec![
                Interval {
                    lo: 8000,
                    hi: 8004,
                    verdict: Verdict::Redirect,
                    rule_id: 0
                },
                Interval {
                    lo: 8005,
                    hi: 8007,
                    verdict: Verdict::Allow,
                    rule_id: 1
                },
                Interval {
                    lo: 8008,
                    hi: 8008,
                    verdict: Verdict::Deny,
                    rule_id: 2
                },
                Interval {
                    lo: 8009,
                    hi: 8020,
                    verdict: Verdict::Allow,
                    rule_id: 1
                },
            ]
        );
        assert_eq!(
            intervals(&[(0, u16::MAX, Verdict::Allow, 3)]),
            vec![Interval {
                lo: 0,
                hi: u16::MAX,
                verdict: Verdict::Allow,
                rule_id: 3
            }]
        );
    }

    fn lpm_lookup(entries: &[(u16, u8, Verdict)], port: u16) -> Option<Verdict> {
        entries
            .iter()
            .filter(|(v, bits, _)| {
                let mask = if *bits == 0 {
                    0
                } else {
                    u16::MAX << (16 - bits)
                };
                port & mask == *v & mask
            })
            .max_by_key(|e| e.1)
            .map(|e| e.2)
    }

    proptest! {
        /// Longest-prefix lookups over the emitted prefixes give, for every port,
        /// exactly the highest-precedence verdict among the rules covering it.
        #[test]
        fn lpm_over_prefixes_is_exact(
            rules in proptest::collection::vec((0u16..200, 0u16..60, 0usize..4), 1..8),
            probe in 0u16..300,
        ) {
            let verdicts = [Verdict::Redirect, Verdict::Allow, Verdict::RedirectDns, Verdict::Deny];
            let rules: Vec<(u16, u16, Verdict, u32)> = rules
                .iter()
                .enumerate()
                .map(|(i, (lo, len, v))| (*lo, lo.saturating_add(*len), verdicts[*v], i as u32))
                .collect();
            let mut entries = Vec::new();
            for iv in intervals(&rules) {
                for (p, bits) in range_prefixes(iv.lo, iv.hi) {
                    entries.push((p, bits, iv.verdict));
                }
            }
            let want = rules.iter().filter(|r| r.0 <= probe && probe <= r.1).map(|r| r.2).max();
            prop_assert_eq!(lpm_lookup(&entries, probe), want);
        }

        #[test]
        fn prefixes_cover_exactly(lo in 0u16..=u16::MAX, len in 0u16..2000) {
            let hi = lo.saturating_add(len);
            let ps = range_prefixes(lo, hi);
            let covered: u64 = ps.iter().map(|(_, b)| 1u64 << (16 - b)).sum();
            prop_assert_eq!(covered, u64::from(hi - lo) + 1);
            for (p, b) in ps {
                let size = 1u32 << (16 - b);
                prop_assert!(u32::from(p) % size == 0);
                prop_assert!(u32::from(p) >= u32::from(lo) && u32::from(p) + size - 1 <= u32::from(hi));
            }
        }
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;
    use weir_policy::identity::IdentityAllocator;

    fn compile(policy: &str, endpoints: &str) -> CompiledPolicy {
        let p = weir_policy::parse_policies(policy, "p.yaml").unwrap();
        let e = weir_policy::parse_endpoints(endpoints, "e.yaml").unwrap();
        CompiledPolicy::compile(&p, &e, &mut IdentityAllocator::default()).unwrap()
    }

    #[test]
    fn deny_inside_an_allowed_range() {
        let cp = compile(
            "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: mixed}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts: [{ports: [{port: '8000', endPort: 8010, protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts: [{ports: [{port: '8005', protocol: TCP}]}]
",
            "endpoints:\n  - {name: d, ips: [10.0.0.1], labels: {class: deathstar}}\n  - {name: t, ips: [10.0.0.2], labels: {class: tiefighter}}\n",
        );
        let entries = policy_entries(
            &cp,
            &super::super::sync::endpoint_ids(&cp),
            &mut RuleIds::default(),
        );
        let tcp: Vec<(u16, u8, Verdict)> = entries
            .iter()
            .filter(|e| e.protocol == IPPROTO_TCP)
            .map(|e| (e.port, e.port_bits, e.verdict))
            .collect();
        assert!(tcp.contains(&(8005, 16, Verdict::Deny)), "{tcp:?}");
        assert!(tcp.contains(&(8004, 16, Verdict::Allow)), "{tcp:?}");
    }

    /// An L3/L4 allow beats an HTTP redirect on the same port (the connection
    /// is not proxied), but not a DNS redirect: DNS still goes to the proxy,
    /// which passes every query and learns the answers for toFQDNs.
    #[test]
    fn a_dns_redirect_beats_an_l3_l4_allow_and_an_http_redirect_does_not() {
        let cp = compile(
            "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: overlap}
spec:
  endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
  - toEndpoints: [{matchLabels: {class: deathstar}}]
    toPorts:
    - ports: [{port: '53', protocol: UDP}]
      rules: {dns: [{matchName: api.example.com}]}
    - ports: [{port: '80', protocol: TCP}]
      rules: {http: [{method: GET}]}
  - toEndpoints: [{matchLabels: {class: deathstar}}]
    toPorts: [{ports: [{port: '53', protocol: UDP}, {port: '80', protocol: TCP}]}]
",
            "endpoints:\n  - {name: d, ips: [10.0.0.1], labels: {class: deathstar}}\n  - {name: t, ips: [10.0.0.2], labels: {class: tiefighter}}\n",
        );
        let deathstar = cp.endpoints()[0].identity;
        let entries = policy_entries(
            &cp,
            &super::super::sync::endpoint_ids(&cp),
            &mut RuleIds::default(),
        );
        let verdict = |proto: u8, port: u16| -> Vec<Verdict> {
            entries
                .iter()
                .filter(|e| e.protocol == proto && e.identity == deathstar && e.port == port)
                .map(|e| e.verdict)
                .collect()
        };
        assert_eq!(verdict(IPPROTO_UDP, 53), [Verdict::RedirectDns]);
        assert_eq!(
            Verdict::RedirectDns.kernel_value(),
            super::super::maps::kernel_enum::WEIR_REDIRECT
        );
        assert_eq!(verdict(IPPROTO_TCP, 80), [Verdict::Allow]);
    }

    #[test]
    fn only_rules_without_ports_allow_icmp_echo() {
        let cp = compile(
            "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ping}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
  - fromEndpoints: [{matchLabels: {class: xwing}}]
    toPorts: [{ports: [{port: '0', protocol: ANY}]}]
  ingressDeny:
  - fromEntities: [world]
",
            "endpoints:\n  - {name: d, ips: [10.0.0.1], labels: {class: deathstar}}\n  - {name: t, ips: [10.0.0.2], labels: {class: tiefighter}}\n  - {name: x, ips: [10.0.0.3], labels: {class: xwing}}\n",
        );
        let tie = cp.endpoints()[1].identity;
        let xwing = cp.endpoints()[2].identity;
        let entries = policy_entries(
            &cp,
            &super::super::sync::endpoint_ids(&cp),
            &mut RuleIds::default(),
        );
        let icmp = |proto: u8, id: u32| -> Vec<Verdict> {
            entries
                .iter()
                .filter(|e| e.protocol == proto && e.identity == id)
                .map(|e| e.verdict)
                .collect()
        };
        for proto in [IPPROTO_ICMP, IPPROTO_ICMPV6] {
            assert_eq!(icmp(proto, tie), [Verdict::Allow], "L3-only rule");
            assert!(
                icmp(proto, xwing).is_empty(),
                "ports ANY is TCP/UDP, not ICMP"
            );
            assert_eq!(
                icmp(proto, 2),
                [Verdict::Deny],
                "deny without ports denies ICMP"
            );
        }
    }

    /// A learned address is its learned identity in the ipcache: a CIDR deny
    /// that contains it must have a deny entry for that identity, or the
    /// toFQDNs allow would win in the kernel.
    #[test]
    fn a_cidr_deny_covers_a_learned_address_inside_it() {
        let cp = compile(
            "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toFQDNs: [{matchName: api.example.com}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  egressDeny:
  - toCIDR: [192.0.2.0/24]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
",
            "endpoints:\n  - {name: client, ips: [10.0.0.1], labels: {app: client}}\n",
        );
        let addr: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let learned = cp
            .learn_fqdn_ip(
                addr,
                &cp.fqdn_selectors_matching("api.example.com."),
                &mut IdentityAllocator::default(),
            )
            .unwrap();
        let ids = super::super::sync::endpoint_ids(&cp);
        let entries = policy_entries(&cp, &ids, &mut RuleIds::default());
        let of_learned: Vec<(u16, Verdict)> = entries
            .iter()
            .filter(|e| e.identity == learned && e.protocol == IPPROTO_TCP)
            .map(|e| (e.port, e.verdict))
            .collect();
        assert_eq!(of_learned, [(443, Verdict::Deny)]);
        // And the ipcache maps the address to exactly that identity.
        let ifaces: std::collections::HashMap<std::net::IpAddr, super::super::links::Link> = [(
            "10.0.0.1".parse().unwrap(),
            super::super::links::Link {
                name: "veth-client".into(),
                index: 7,
                kind: Some("veth".into()),
                peer_index: None,
                peer_in_other_netns: true,
            },
        )]
        .into();
        let d = super::super::sync::Desired::new(&cp, &entries, &ids, &ifaces).unwrap();
        assert_eq!(d.ipcache[&super::super::sync::host_key(addr)], learned);
    }
}
