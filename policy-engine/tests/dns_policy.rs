//! `rules.dns` and `toFQDNs`: loading (and what is refused, with positions),
//! DNS verdicts with the deciding rule, Cilium's "L3/L4 allow wins", and
//! toFQDNs peers that allow nothing until an address is learned.

use std::net::IpAddr;

use weir_policy::identity::IdentityAllocator;
use weir_policy::{
    CompileError, CompiledPolicy, FqdnSelectorId, Protocol, parse_endpoints, parse_policies,
};

const ENDPOINTS: &str = "
endpoints:
  - {name: app, ips: [10.0.0.1], labels: {app: a}}
  - {name: other, ips: [10.0.0.2], labels: {app: b}}
  - {name: dns, namespace: kube-system, ips: [10.0.0.53], labels: {k8s-app: kube-dns}}
";

const APP: &str = "10.0.0.1";
const OTHER: &str = "10.0.0.2";
const DNS: &str = "10.0.0.53";

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toEndpoints:
    - matchLabels: {'k8s:io.kubernetes.pod.namespace': kube-system, k8s-app: kube-dns}
    toPorts:
    - ports: [{port: '53', protocol: ANY}]
      rules:
        dns:
        - matchName: api.github.com
        - matchPattern: '*.example.com'
        - matchPattern: '**.corp.internal'
  - toFQDNs:
    - matchName: API.github.com
    - matchPattern: '*.example.com'
    toPorts:
    - ports: [{port: '443', protocol: TCP}]
  - toFQDNs:
    - matchPattern: '**.corp.internal'
";

fn compile(policy: &str) -> Result<CompiledPolicy, CompileError> {
    let p = parse_policies(policy, "p.yaml").expect("policy loads");
    let e = parse_endpoints(ENDPOINTS, "e.yaml").expect("endpoints load");
    CompiledPolicy::compile(&p, &e, &mut IdentityAllocator::default())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn dns(cp: &CompiledPolicy, proto: Protocol, name: &str) -> (bool, String) {
    let cv = cp.connection(ip(APP), ip(DNS), proto, 53);
    assert!(cv.l4_allowed());
    assert!(cv.needs_l7() && cv.needs_dns());
    let v = cv.dns_verdict(cp, name);
    (v.allowed, v.reason_for("DNS"))
}

#[test]
fn dns_rules_decide_queries_with_the_rule_that_matched() {
    let cp = compile(POLICY).unwrap();
    let rows: &[(&str, bool, &str)] = &[
        (
            "api.github.com",
            true,
            "dns spec.egress[0].toPorts[0].rules.dns[0]",
        ),
        (
            "API.GITHUB.COM.",
            true,
            "dns spec.egress[0].toPorts[0].rules.dns[0]",
        ),
        (
            "www.example.com",
            true,
            "dns spec.egress[0].toPorts[0].rules.dns[1]",
        ),
        (
            "a.b.corp.internal",
            true,
            "dns spec.egress[0].toPorts[0].rules.dns[2]",
        ),
        ("example.com", false, "no rule matched (egress, DNS)"),
        ("a.b.example.com", false, "no rule matched (egress, DNS)"),
        ("corp.internal", false, "no rule matched (egress, DNS)"),
        ("github.com", false, "no rule matched (egress, DNS)"),
    ];
    for proto in [Protocol::Udp, Protocol::Tcp] {
        for (name, allowed, reason) in rows {
            assert_eq!(
                dns(&cp, proto, name),
                (*allowed, reason.to_string()),
                "{proto} {name}"
            );
        }
    }
    // Another peer on port 53 is not allowed at all.
    let cv = cp.connection(ip(APP), ip(OTHER), Protocol::Udp, 53);
    assert!(!cv.l4_allowed());
    // An HTTP request on a DNS-rule port never passes.
    let cv = cp.connection(ip(APP), ip(DNS), Protocol::Tcp, 53);
    let facts = weir_parsers::http::RequestFacts {
        method: "GET".into(),
        path: "/".into(),
        host: None,
    };
    assert!(
        !cv.http_verdict(&cp, &facts, &http::HeaderMap::new())
            .allowed
    );
}

#[test]
fn match_all_dns_rule_allows_every_valid_name() {
    let p = POLICY.replace("matchName: api.github.com\n", "matchPattern: '*'\n");
    let cp = compile(&p).unwrap();
    for name in ["anything.at.all", "x", "."] {
        assert!(dns(&cp, Protocol::Udp, name).0, "{name}");
    }
    // Cilium's match-all regex: labels of [-a-zA-Z0-9_] only.
    assert!(!dns(&cp, Protocol::Udp, "bad name.com").0);
}

/// Cilium's "L3/L4 allow wins" over DNS rules: every query passes — but
/// still through the DNS proxy, as if the allow were a match-all DNS rule
/// (Cilium adds one for the L3/L4 selector and keeps the redirect), so that
/// toFQDNs selectors learn from the answers. Before, the allow took DNS past
/// the proxy and a toFQDNs selector never learned an address.
#[test]
fn l3_l4_allow_wins_over_dns_rules_but_dns_stays_in_the_proxy() {
    let p = format!(
        "{POLICY}  - toEndpoints: [{{matchLabels: {{'k8s:io.kubernetes.pod.namespace': kube-system}}}}]
    toPorts: [{{ports: [{{port: '53', protocol: UDP}}]}}]
"
    );
    let cp = compile(&p).unwrap();
    // Every name passes over UDP, the ones no DNS rule names by the L3/L4 allow...
    assert_eq!(
        dns(&cp, Protocol::Udp, "anything.at.all"),
        (true, "dns spec.egress[3].toPorts[0]".into())
    );
    // ...the others by their DNS rule.
    assert_eq!(
        dns(&cp, Protocol::Udp, "api.github.com"),
        (true, "dns spec.egress[0].toPorts[0].rules.dns[0]".into())
    );
    // TCP/53 has only the DNS rules.
    assert!(!dns(&cp, Protocol::Tcp, "anything.at.all").0);
    // Without DNS rules on the port, the L3/L4 allow passes it unproxied.
    let plain = p.replace("      rules:\n        dns:\n        - matchName: api.github.com\n        - matchPattern: '*.example.com'\n        - matchPattern: '**.corp.internal'\n", "");
    assert_ne!(plain, p);
    let cp = compile(&plain).unwrap();
    let cv = cp.connection(ip(APP), ip(DNS), Protocol::Udp, 53);
    assert!(cv.l4_allowed() && !cv.needs_l7());
}

#[test]
fn to_fqdns_allows_nothing_until_an_address_is_learned() {
    let cp = compile(POLICY).unwrap();
    let sels = cp.fqdn_selectors();
    assert_eq!(sels.len(), 3, "{sels:?}");
    assert_eq!(sels[0].to_string(), "matchName: api.github.com.");
    assert_eq!(
        cp.fqdn_selectors_matching("Api.GitHub.com"),
        vec![FqdnSelectorId(0)]
    );
    assert_eq!(
        cp.fqdn_selectors_matching("x.example.com."),
        vec![FqdnSelectorId(1)]
    );
    assert_eq!(
        cp.fqdn_selectors_matching("a.b.corp.internal"),
        vec![FqdnSelectorId(2)]
    );
    assert!(cp.fqdn_selectors_matching("example.com").is_empty());

    let gh = ip("140.82.112.3");
    let corp = ip("203.0.113.9");
    // Fail closed: nothing learned, nothing allowed.
    assert!(!cp.connection(ip(APP), gh, Protocol::Tcp, 443).l4_allowed());
    assert!(!cp.connection(ip(APP), corp, Protocol::Tcp, 22).l4_allowed());

    let mut ids = IdentityAllocator::default();
    let id = cp
        .learn_fqdn_ip(gh, &cp.fqdn_selectors_matching("api.github.com"), &mut ids)
        .expect("a world address is learned");
    let cv = cp.connection(ip(APP), gh, Protocol::Tcp, 443);
    assert!(cv.l4_allowed());
    assert_eq!(cv.dst.identity, id);
    assert_eq!(cv.l4_verdict().reason(), "dns spec.egress[1].toPorts[0]");
    // Only on the rule's port, and only for the subject endpoint.
    assert!(!cp.connection(ip(APP), gh, Protocol::Tcp, 80).l4_allowed());
    assert!(cp.connection(ip(OTHER), gh, Protocol::Tcp, 80).l4_allowed());
    // A selector of the other rule does not open this one's ports, and vice versa.
    assert!(!cp.connection(ip(APP), gh, Protocol::Tcp, 22).l4_allowed());
    cp.learn_fqdn_ip(
        corp,
        &cp.fqdn_selectors_matching("a.corp.internal"),
        &mut ids,
    )
    .unwrap();
    assert!(cp.connection(ip(APP), corp, Protocol::Tcp, 22).l4_allowed());
    assert!(
        cp.connection(ip(APP), corp, Protocol::Udp, 5000)
            .l4_allowed()
    );
    // The kernel's view: the learned identity in the toFQDNs rules' peers.
    let rules = cp.l4_rules();
    let r = rules
        .iter()
        .find(|r| &*r.rule.rule == "spec.egress[1].toPorts[0]")
        .unwrap();
    assert_eq!(r.peers.as_deref(), Some(&[id][..]));
    // Forgetting (TTL expiry) closes it again.
    assert!(cp.forget_fqdn_ip(gh));
    assert!(!cp.connection(ip(APP), gh, Protocol::Tcp, 443).l4_allowed());
    // Endpoints and unknown selectors are never learned.
    assert_eq!(
        cp.learn_fqdn_ip(ip(OTHER), &[FqdnSelectorId(0)], &mut ids),
        None
    );
    assert_eq!(cp.learn_fqdn_ip(gh, &[FqdnSelectorId(99)], &mut ids), None);
}

#[test]
fn learned_address_keeps_its_cidr_allows() {
    let p = format!(
        "{POLICY}  - toCIDR: [140.82.112.0/20]
    toPorts: [{{ports: [{{port: '22', protocol: TCP}}]}}]
"
    );
    let cp = compile(&p).unwrap();
    let gh = ip("140.82.112.3");
    assert!(cp.connection(ip(APP), gh, Protocol::Tcp, 22).l4_allowed());
    cp.learn_fqdn_ip(gh, &[FqdnSelectorId(0)], &mut IdentityAllocator::default())
        .unwrap();
    assert!(cp.connection(ip(APP), gh, Protocol::Tcp, 22).l4_allowed());
    assert!(cp.connection(ip(APP), gh, Protocol::Tcp, 443).l4_allowed());
}

#[test]
fn dns_and_http_rules_on_one_port_are_refused() {
    let p = format!(
        "{POLICY}  - toEndpoints: [{{}}]
    toPorts:
    - ports: [{{port: '53', protocol: TCP}}]
      rules: {{http: [{{method: GET}}]}}
"
    );
    let err = compile(&p).unwrap_err().to_string();
    assert!(
        err.contains("dns spec.egress[0].toPorts[0] and dns spec.egress[3].toPorts[0]")
            && err.contains("53/TCP"),
        "{err}"
    );
}

/// Every refusal names the field with its position.
#[test]
fn refusals_name_the_field_and_position() {
    let rows: &[(&str, &str)] = &[
        (
            "  egress:\n  - toPorts:\n    - ports: [{port: '53'}]\n      rules: {dns: [{matchName: x.com}], http: [{}]}\n",
            "p.yaml:9:20: `dns` and `http` rules in one toPorts entry",
        ),
        (
            "  ingress:\n  - toPorts:\n    - ports: [{port: '53'}]\n      rules: {dns: [{matchName: x.com}]}\n",
            "p.yaml:9:21: `dns` rules are not allowed on ingress",
        ),
        (
            "  egressDeny:\n  - toFQDNs: [{matchName: x.com}]\n",
            "p.yaml:7:14: field `toFQDNs` is not allowed in egressDeny",
        ),
        (
            "  egress:\n  - toFQDNs: [{matchPattern: 'a+b.com'}]\n",
            "p.yaml:7:30: `matchPattern` value `a+b.com` has invalid characters",
        ),
        (
            "  egress:\n  - toFQDNs: [{matchName: '*.com'}]\n",
            "p.yaml:7:27: `matchName` value `*.com` has invalid characters",
        ),
        (
            "  egress:\n  - toFQDNs: [{matchName: a.com, matchPattern: '*.com'}]\n",
            "p.yaml:7:48: a toFQDNs entry takes either `matchName` or `matchPattern`",
        ),
        (
            "  egress:\n  - toFQDNs: [{matchName: a.com}]\n    toCIDR: [10.0.0.0/8]\n",
            "p.yaml:7:5: combining `toFQDNs` and `toCIDR/toCIDRSet`",
        ),
        (
            "  egress:\n  - toPorts:\n    - ports: [{port: '0'}]\n      rules: {dns: [{matchPattern: '*'}]}\n",
            "p.yaml:8:15: L7 `dns` rules cannot be used with port 0",
        ),
        (
            "  egress:\n  - toPorts:\n    - ports: [{port: '53', endPort: 54}]\n      rules: {dns: [{matchPattern: '*'}]}\n",
            "p.yaml:8:15: `dns` rules do not apply to port ranges",
        ),
        (
            "  egress:\n  - toPorts:\n    - ports: [{port: '53'}]\n      rules: {dns: [{}]}\n",
            "p.yaml:9:21: dns rule needs `matchName` or `matchPattern`",
        ),
    ];
    for (body, want) in rows {
        let text = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: x}}\nspec:\n  endpointSelector: {{}}\n{body}"
        );
        let errs = parse_policies(&text, "p.yaml").expect_err(want).to_string();
        assert!(errs.contains(want), "want {want:?}\ngot {errs}");
    }
}

/// The kernel sees a learned address only by its learned identity: every rule
/// that selects its base (CIDR allow and deny alike) must list that identity.
#[test]
fn kernel_rules_list_learned_identities_under_their_base() {
    let p = format!(
        "{POLICY}  - toCIDR: [140.82.112.0/20]
    toPorts: [{{ports: [{{port: '22', protocol: TCP}}]}}]
  egressDeny:
  - toCIDR: [140.82.112.0/24]
    toPorts: [{{ports: [{{port: '443', protocol: TCP}}]}}]
"
    );
    let cp = compile(&p).unwrap();
    let gh = ip("140.82.112.3");
    let id = cp
        .learn_fqdn_ip(gh, &[FqdnSelectorId(0)], &mut IdentityAllocator::default())
        .unwrap();
    // Userspace: the deny wins over the toFQDNs allow on 443.
    assert!(!cp.connection(ip(APP), gh, Protocol::Tcp, 443).l4_allowed());
    let rules = cp.l4_rules();
    let peers = |name: &str, deny: bool| {
        rules
            .iter()
            .find(|r| &*r.rule.rule == name && r.deny == deny)
            .unwrap_or_else(|| panic!("{name}: {rules:#?}"))
            .peers
            .clone()
            .unwrap()
    };
    let deny = peers("spec.egressDeny[0].toPorts[0]", true);
    assert!(
        deny.contains(&id),
        "the deny lists the learned identity: {deny:?}"
    );
    let allow = peers("spec.egress[3].toPorts[0]", false);
    assert!(allow.contains(&id), "the CIDR allow lists it: {allow:?}");
    // Forgotten: only the CIDR identities again.
    cp.forget_fqdn_ip(gh);
    let rules = cp.l4_rules();
    assert!(
        rules
            .iter()
            .all(|r| !r.peers.as_ref().is_some_and(|p| p.contains(&id)))
    );
}

/// Loopback, unspecified, link-local (the metadata service included),
/// multicast and broadcast addresses are never learned, v4-mapped or not.
#[test]
fn special_addresses_are_never_learned() {
    let cp = compile(POLICY).unwrap();
    let mut ids = IdentityAllocator::default();
    for a in [
        "127.0.0.1",
        "127.1.2.3",
        "0.0.0.0",
        "0.1.2.3",
        "169.254.169.254",
        "169.254.0.1",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "febf::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:0.0.0.0",
        "::ffff:224.0.0.1",
        "::ffff:255.255.255.255",
    ] {
        assert_eq!(
            cp.learn_fqdn_ip(ip(a), &[FqdnSelectorId(0)], &mut ids),
            None,
            "{a}"
        );
    }
    assert!(cp.learned_fqdn_ips().is_empty());
    // Neighbours of those ranges are ordinary addresses.
    for a in ["169.255.0.1", "223.255.255.255", "fec0::1", "2001:db8::1"] {
        assert!(
            cp.learn_fqdn_ip(ip(a), &[FqdnSelectorId(0)], &mut ids)
                .is_some(),
            "{a}"
        );
    }
}
