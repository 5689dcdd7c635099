//! Verdict semantics, matching Cilium's: default deny once selected, L3/L4 allow wins
//! over L7 rules for the same peer and port, AND within a rule, OR across rules.

use std::net::IpAddr;

use http::HeaderMap;
use proptest::prelude::*;
use weir_parsers::http::RequestFacts;
use weir_policy::identity::IdentityAllocator;
use weir_policy::{CompiledPolicy, Protocol, parse_endpoints, parse_policies};

const ENDPOINTS: &str = "
endpoints:
  - {name: deathstar, ips: [10.200.0.10, 'fd00:200::10'], labels: {org: empire, class: deathstar}, ports: {web: 80}}
  - {name: tiefighter, ips: [10.200.0.20], labels: {org: empire, class: tiefighter}}
  - {name: xwing, ips: [10.200.0.30], labels: {org: alliance, class: xwing}}
";

const SW: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: web, protocol: TCP}]
      rules:
        http:
        - {method: POST, path: /v1/request-landing}
"#;

fn compile(policy: &str) -> CompiledPolicy {
    let p = parse_policies(policy, "p.yaml").unwrap();
    let e = parse_endpoints(ENDPOINTS, "e.yaml").unwrap();
    CompiledPolicy::compile(&p, &e, &mut IdentityAllocator::default()).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn req(
    cp: &CompiledPolicy,
    from: &str,
    to: &str,
    port: u16,
    method: &str,
    path: &str,
) -> (bool, String) {
    let c = cp.connection(ip(from), ip(to), Protocol::Tcp, port);
    let facts = RequestFacts {
        method: method.into(),
        path: path.into(),
        host: None,
    };
    let v = if c.needs_l7() {
        c.http_verdict(cp, &facts, &HeaderMap::new())
    } else {
        c.l4_verdict()
    };
    (v.allowed, v.reason())
}

#[test]
fn star_wars() {
    let cp = compile(SW);
    assert_eq!(
        req(
            &cp,
            "10.200.0.20",
            "10.200.0.10",
            80,
            "POST",
            "/v1/request-landing"
        ),
        (
            true,
            "rule1 spec.ingress[0].toPorts[0].rules.http[0]".to_string()
        )
    );
    assert!(
        req(
            &cp,
            "10.200.0.20",
            "fd00:200::10",
            80,
            "POST",
            "/v1/request-landing"
        )
        .0
    );
    assert_eq!(
        req(
            &cp,
            "10.200.0.20",
            "10.200.0.10",
            80,
            "PUT",
            "/v1/exhaust-port"
        ),
        (false, "no rule matched (ingress, HTTP)".to_string())
    );
    // The xwing is not allowed at L3/L4 at all.
    let c = cp.connection(ip("10.200.0.30"), ip("10.200.0.10"), Protocol::Tcp, 80);
    assert!(!c.l4_allowed());
    // Other ports of the selected endpoint are default-deny; unselected endpoints are open.
    assert!(
        !cp.connection(ip("10.200.0.20"), ip("10.200.0.10"), Protocol::Tcp, 443)
            .l4_allowed()
    );
    let open = cp.connection(ip("10.200.0.10"), ip("10.200.0.30"), Protocol::Tcp, 22);
    assert!(open.l4_allowed() && !open.needs_l7());
    // IPv4-mapped IPv6 source (dual-stack socket) is the IPv4 endpoint.
    assert!(
        cp.connection(
            ip("::ffff:10.200.0.20"),
            ip("10.200.0.10"),
            Protocol::Tcp,
            80
        )
        .l4_allowed()
    );
    // UDP is not TCP.
    assert!(
        !cp.connection(ip("10.200.0.20"), ip("10.200.0.10"), Protocol::Udp, 80)
            .l4_allowed()
    );
}

#[test]
fn l4_allow_wins_over_l7_for_same_peer_and_port() {
    let cp = compile(&format!(
        "{SW}---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: l4-only}}
spec:
  endpointSelector: {{matchLabels: {{class: deathstar}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{class: tiefighter}}}}]
    toPorts: [{{ports: [{{port: '80'}}]}}]
"
    ));
    assert_eq!(
        req(
            &cp,
            "10.200.0.20",
            "10.200.0.10",
            80,
            "PUT",
            "/v1/exhaust-port"
        ),
        (true, "l4-only spec.ingress[0].toPorts[0]".to_string())
    );
}

#[test]
fn egress_and_ingress_both_apply() {
    let cp = compile(&format!(
        "{SW}---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: tie-egress}}
spec:
  endpointSelector: {{matchLabels: {{class: tiefighter}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{class: deathstar}}}}]
    toPorts:
    - ports: [{{port: '80'}}]
      rules: {{http: [{{path: '/v1/.*'}}]}}
"
    ));
    let (ok, why) = req(
        &cp,
        "10.200.0.20",
        "10.200.0.10",
        80,
        "POST",
        "/v1/request-landing",
    );
    assert!(ok);
    assert_eq!(
        why,
        "tie-egress spec.egress[0].toPorts[0].rules.http[0]; rule1 spec.ingress[0].toPorts[0].rules.http[0]"
    );
    // Egress allows /v1/* but ingress only request-landing.
    assert_eq!(
        req(&cp, "10.200.0.20", "10.200.0.10", 80, "POST", "/v1/other").1,
        "no rule matched (ingress, HTTP)"
    );
    // The tiefighter may no longer talk to the xwing (egress default deny).
    assert!(
        !cp.connection(ip("10.200.0.20"), ip("10.200.0.30"), Protocol::Tcp, 80)
            .l4_allowed()
    );
}

#[test]
fn deny_all_idiom_and_port_ranges() {
    let cp = compile(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: lockdown}
specs:
  - endpointSelector: {matchLabels: {class: xwing}}
    ingress: [{}]
  - endpointSelector: {matchLabels: {class: deathstar}}
    ingress:
      - toPorts: [{ports: [{port: 8000, endPort: 8010, protocol: TCP}]}]
",
    );
    assert!(
        !cp.connection(ip("10.200.0.10"), ip("10.200.0.30"), Protocol::Tcp, 80)
            .l4_allowed()
    );
    for (port, ok) in [
        (7999, false),
        (8000, true),
        (8005, true),
        (8010, true),
        (8011, false),
    ] {
        let c = cp.connection(ip("192.0.2.1"), ip("10.200.0.10"), Protocol::Tcp, port);
        assert_eq!(c.l4_allowed(), ok, "port {port}");
    }
}

fn labels_strategy() -> impl Strategy<Value = std::collections::BTreeMap<String, String>> {
    proptest::collection::btree_map("[a-c]", "[x-z]", 0..3)
}

proptest! {
    /// matchExpressions agree with their plain-language meaning.
    #[test]
    fn selector_expressions(labels in labels_strategy(), key in "[a-c]", vals in proptest::collection::vec("[x-z]", 1..3)) {
        use weir_policy::model::{Selector, SelectorExpr, SelectorOp};
        let sel = |op| Selector { match_labels: Default::default(), match_expressions: vec![SelectorExpr { key: key.clone(), op, values: vals.clone() }] };
        let have = labels.get(&key);
        prop_assert_eq!(sel(SelectorOp::In).matches(&labels), have.is_some_and(|v| vals.contains(v)));
        prop_assert_eq!(sel(SelectorOp::NotIn).matches(&labels), !have.is_some_and(|v| vals.contains(v)));
        prop_assert_eq!(sel(SelectorOp::Exists).matches(&labels), have.is_some());
        prop_assert_eq!(sel(SelectorOp::DoesNotExist).matches(&labels), have.is_none());
        prop_assert!(Selector::default().matches(&labels));
    }

    /// matchLabels is a subset test.
    #[test]
    fn match_labels_subset(labels in labels_strategy(), want in labels_strategy()) {
        let sel = weir_policy::model::Selector { match_labels: want.clone(), match_expressions: vec![] };
        prop_assert_eq!(sel.matches(&labels), want.iter().all(|(k, v)| labels.get(k) == Some(v)));
    }
}

#[test]
fn cidr_sets_with_except_and_overlaps() {
    let cp = compile(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cidr}
specs:
  - endpointSelector: {matchLabels: {class: deathstar}}
    ingress:
      - fromCIDRSet: [{cidr: 192.0.2.0/24, except: [192.0.2.128/25]}]
        toPorts: [{ports: [{port: '80', protocol: TCP}]}]
      - fromCIDR: [192.0.2.200/32]
        toPorts: [{ports: [{port: '81', protocol: TCP}]}]
      - fromCIDR: ['2001:db8::/32']
        toPorts: [{ports: [{port: '80', protocol: TCP}]}]
  - endpointSelector: {matchLabels: {class: tiefighter}}
    egress:
      - toEntities: [world]
        toPorts: [{ports: [{port: '443', protocol: TCP}]}]
      - toCIDR: [198.51.100.0/24]
",
    );
    let allowed = |from: &str, to: &str, port| {
        cp.connection(ip(from), ip(to), Protocol::Tcp, port)
            .l4_allowed()
    };
    assert!(allowed("192.0.2.10", "10.200.0.10", 80));
    assert!(
        !allowed("192.0.2.130", "10.200.0.10", 80),
        "inside the except"
    );
    // 192.0.2.200 is in the except for port 80, but its own /32 allows port 81:
    // overlapping prefixes keep every rule that contains the address.
    assert!(!allowed("192.0.2.200", "10.200.0.10", 80));
    assert!(allowed("192.0.2.200", "10.200.0.10", 81));
    assert!(!allowed("203.0.113.1", "10.200.0.10", 80));
    assert!(allowed("2001:db8::1", "10.200.0.10", 80));
    // toEntities world: any address outside the node's endpoints, CIDR ones too.
    assert!(allowed("10.200.0.20", "203.0.113.9", 443));
    assert!(allowed("10.200.0.20", "198.51.100.7", 443));
    assert!(
        allowed("10.200.0.20", "198.51.100.7", 22),
        "toCIDR without ports allows all ports"
    );
    assert!(!allowed("10.200.0.20", "203.0.113.9", 22));
    assert!(
        !allowed("10.200.0.20", "10.200.0.30", 443),
        "an endpoint is not world"
    );
}

#[test]
fn deny_wins_over_any_allow() {
    let cp = compile(&format!(
        "{SW}---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: no-tie}}
spec:
  endpointSelector: {{matchLabels: {{class: deathstar}}}}
  ingressDeny:
  - fromEndpoints: [{{matchLabels: {{class: tiefighter}}}}]
    toPorts: [{{ports: [{{port: '80', protocol: TCP}}]}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: allow-all}}
spec:
  endpointSelector: {{matchLabels: {{class: deathstar}}}}
  ingress:
  - fromEntities: [all]
"
    ));
    let c = cp.connection(ip("10.200.0.20"), ip("10.200.0.10"), Protocol::Tcp, 80);
    assert!(!c.l4_allowed());
    assert_eq!(
        c.l4_verdict().reason(),
        "denied by no-tie spec.ingressDeny[0].toPorts[0]"
    );
    // Other peers and ports are still allowed by `fromEntities: [all]`.
    assert!(
        cp.connection(ip("10.200.0.30"), ip("10.200.0.10"), Protocol::Tcp, 80)
            .l4_allowed()
    );
    assert!(
        cp.connection(ip("10.200.0.20"), ip("10.200.0.10"), Protocol::Tcp, 81)
            .l4_allowed()
    );
}

#[test]
fn cidr_and_deny_errors_are_positioned() {
    let e = parse_policies(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: x}
spec:
  endpointSelector: {}
  egress:
  - toCIDR: [10.0.0.1/8, 300.0.0.0/8]
    toCIDRSet: [{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}]
    toEntities: [unmanaged, moon]
  egressDeny:
  - toPorts: [{ports: [{port: '80'}], rules: {http: [{path: /}]}}]
",
        "p.yaml",
    )
    .unwrap_err();
    let lines: Vec<String> = e.0.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        vec![
            "p.yaml:7:14: `10.0.0.1/8` has host bits set (did you mean 10.0.0.0/8?)",
            "p.yaml:7:26: `300.0.0.0/8` is not a CIDR prefix",
            "p.yaml:8:45: except 11.0.0.0/16 is not inside 10.0.0.0/8",
            "p.yaml:9:18: entity `unmanaged` is not supported by weir: weir cannot tell a pod it does not manage from any other address (such peers are `world`, or `cluster` inside --cluster-cidr)",
            "p.yaml:9:29: unknown entity `moon`",
            "p.yaml:11:15: egressDeny rules cannot have L7 `rules`; deny is L3/L4 only",
        ]
    );
}

/// Cilium enables a direction only for rules with entries there
/// (`len(r.Ingress) > 0`): `ingress:` left empty or `[]` selects nothing, while
/// `[{}]` selects the endpoint (default deny) and allows nothing.
#[test]
fn empty_rule_lists_do_not_enable_default_deny() {
    let policy = |ingress: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{matchLabels: {{class: deathstar}}}}\n  ingress:{ingress}\n"
        )
    };
    for (ingress, allowed) in [("", true), (" []", true), (" [{}]", false)] {
        let cp = compile(&policy(ingress));
        let c = cp.connection(ip("10.200.0.30"), ip("10.200.0.10"), Protocol::Tcp, 80);
        assert_eq!(c.l4_allowed(), allowed, "ingress:{ingress}");
        let deathstar = cp
            .endpoints()
            .iter()
            .position(|e| e.endpoint.name == "deathstar")
            .unwrap();
        assert_eq!(
            cp.is_selected(deathstar, weir_policy::Direction::Ingress),
            !allowed,
            "ingress:{ingress}"
        );
    }
}

/// An ICMP type is allowed by `icmps` rules for it and by rules that allow all
/// ICMP (no `toPorts`), as in the kernel.
#[test]
fn icmp_types_are_allowed_by_icmps_and_by_rules_without_ports() {
    let policy = |rule: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{matchLabels: {{class: deathstar}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{class: xwing}}}}]\n{rule}\n"
        )
    };
    let echo = |cp: &CompiledPolicy| {
        cp.connection(ip("10.200.0.30"), ip("10.200.0.10"), Protocol::Icmp4, 8)
            .l4_allowed()
    };
    assert!(echo(&compile(&policy(
        "    icmps: [{fields: [{type: 8}]}]"
    ))));
    assert!(!echo(&compile(&policy(
        "    icmps: [{fields: [{type: 0}]}]"
    ))));
    assert!(echo(&compile(&policy(""))));
    assert!(!echo(&compile(&policy(
        "    toPorts: [{ports: [{port: '80', protocol: TCP}]}]"
    ))));
}
