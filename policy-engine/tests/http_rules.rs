//! HTTP rules as Cilium reads them: the three `headers` forms, `headerMatches`
//! with and without `mismatch`, and several field lines of one header matched as
//! Envoy does (joined with `,`). Table tests: policy text in, verdict and header
//! actions out.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use weir_parsers::http::RequestFacts;
use weir_policy::http_match::HeaderMismatch;
use weir_policy::identity::IdentityAllocator;
use weir_policy::model::MismatchAction;
use weir_policy::{CompiledPolicy, Protocol, parse_endpoints, parse_policies};

const ENDPOINTS: &str = "
endpoints:
  - {name: deathstar, ips: [10.200.0.10], labels: {class: deathstar}}
  - {name: tiefighter, ips: [10.200.0.20], labels: {class: tiefighter}}
";

/// A policy whose one ingress port has these `rules.http` entries (YAML flow items).
fn policy(http: &[&str]) -> String {
    let mut p = String::from(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: hdr}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules:
        http:
",
    );
    for h in http {
        p.push_str(&format!("        - {h}\n"));
    }
    p
}

fn errors(yaml: &str) -> Vec<String> {
    match parse_policies(yaml, "p.yaml") {
        Ok(_) => vec![],
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

fn compile(yaml: &str) -> CompiledPolicy {
    let p = parse_policies(yaml, "p.yaml").unwrap_or_else(|e| panic!("{e:?}"));
    let e = parse_endpoints(ENDPOINTS, "e.yaml").unwrap();
    CompiledPolicy::compile(&p, &e, &mut IdentityAllocator::default()).unwrap()
}

/// Request header lines.
type Lines<'a> = &'a [(&'a str, &'a str)];

fn headers(list: Lines<'_>) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in list {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

/// (allowed, deciding rule, mismatches) for `GET /` with these headers.
fn decide(cp: &CompiledPolicy, hdrs: &[(&str, &str)]) -> (bool, String, Vec<HeaderMismatch>) {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let c = cp.connection(ip("10.200.0.20"), ip("10.200.0.10"), Protocol::Tcp, 80);
    assert!(c.needs_l7());
    let facts = RequestFacts {
        method: "GET".into(),
        path: "/".into(),
        host: Some("deathstar".into()),
    };
    let (v, m) = c.http_decision(cp, &facts, &headers(hdrs));
    (v.allowed, v.reason(), m)
}

#[test]
fn the_three_headers_forms_mean_what_cilium_means() {
    // (entry, request headers, allowed)
    let table: &[(&str, Lines<'_>, bool)] = &[
        // "Name: value": exact value after the first space, colon trimmed.
        ("X-Has-Force: true", &[("x-has-force", "true")], true),
        ("X-Has-Force: true", &[("x-has-force", "True")], false),
        ("X-Has-Force: true", &[("x-has-force", "true1")], false),
        ("X-Has-Force: true", &[], false),
        // "Name value": the same rule.
        ("X-Has-Force true", &[("x-has-force", "true")], true),
        ("X-Has-Force true", &[("x-has-force", "false")], false),
        // "Name": presence, any value (even empty).
        ("X-Has-Force", &[("x-has-force", "anything")], true),
        ("X-Has-Force", &[("x-has-force", "")], true),
        ("X-Has-Force", &[("x-other", "true")], false),
        // Names are case-insensitive; the value is everything after the first space.
        ("x-HAS-force: a b:c", &[("x-has-force", "a b:c")], true),
        // Several field lines are one value joined with `,` (Envoy), never "any one".
        (
            "X-Team: blue",
            &[("x-team", "red"), ("x-team", "blue")],
            false,
        ),
        (
            "X-Team: blue",
            &[("x-team", "blue"), ("x-team", "blue")],
            false,
        ),
        (
            "X-Team: red,blue",
            &[("x-team", "red"), ("x-team", "blue")],
            true,
        ),
        ("X-Team: blue", &[("x-team", "blue")], true),
        ("X-Team", &[("x-team", "red"), ("x-team", "blue")], true),
    ];
    for (entry, hdrs, want) in table {
        let cp = compile(&policy(&[&format!("{{headers: [{entry:?}]}}")]));
        let (allowed, reason, m) = decide(&cp, hdrs);
        assert_eq!(allowed, *want, "{entry:?} with {hdrs:?}: {reason}");
        assert!(m.is_empty());
        if allowed {
            assert_eq!(reason, "hdr spec.ingress[0].toPorts[0].rules.http[0]");
        }
    }
}

#[test]
fn header_entries_cilium_could_never_match_are_refused_with_their_position() {
    let table: &[(&str, &str)] = &[
        (
            "X-Has-Force:true",
            "p.yaml:11:22: header entry `X-Has-Force:true`: `X-Has-Force:true` is not a header name (Cilium splits an entry at the first space: write `Name: value`, `Name value` or `Name`)",
        ),
        (
            "X-A:  two-spaces",
            "p.yaml:11:22: value \" two-spaces\" for header `x-a` has surrounding whitespace and could never match",
        ),
        (
            ":authority x",
            "p.yaml:11:22: `:authority`: pseudo-headers cannot be matched as headers (use `method`, `path` or `host`)",
        ),
        ("X(A) v", "p.yaml:11:22: `X(A)` is not a valid header name"),
    ];
    for (entry, want) in table {
        let e = errors(&policy(&[&format!("{{headers: [{entry:?}]}}")]));
        assert_eq!(e, vec![want.to_string()], "{entry:?}");
    }
}

#[test]
fn header_matches_without_mismatch_deny_like_headers() {
    let cp = compile(&policy(&[
        "{headerMatches: [{name: X-Token, value: s3cret}, {name: X-Present}]}",
    ]));
    assert!(!decide(&cp, &[("x-token", "s3cret")]).0);
    assert!(!decide(&cp, &[("x-token", "other"), ("x-present", "1")]).0);
    assert!(decide(&cp, &[("x-token", "s3cret"), ("x-present", "")]).0);
    // `mismatch: ""` is the same as none (Cilium's default).
    let cp = compile(&policy(&[
        "{headerMatches: [{name: X-Token, value: s3cret, mismatch: ''}]}",
    ]));
    assert!(!decide(&cp, &[("x-token", "other")]).0);
}

#[test]
fn mismatch_actions_allow_and_say_what_to_do() {
    let m = |key: &str, required: Option<&str>, found: Option<&str>, action| HeaderMismatch {
        key: key.into(),
        required: required.map(Into::into),
        found: found.map(Into::into),
        action,
    };
    use MismatchAction::*;
    // (action, request headers, expected mismatches)
    let table: &[(&str, Lines<'_>, Vec<HeaderMismatch>)] = &[
        ("LOG", &[("x-team", "blue")], vec![]),
        (
            "LOG",
            &[("x-team", "red")],
            vec![m("x-team", Some("blue"), Some("red"), Log)],
        ),
        ("LOG", &[], vec![m("x-team", Some("blue"), None, Log)]),
        (
            "ADD",
            &[("x-team", "red")],
            vec![m("x-team", Some("blue"), Some("red"), Add)],
        ),
        ("ADD", &[], vec![m("x-team", Some("blue"), None, Add)]),
        (
            "REPLACE",
            &[("x-team", "red"), ("x-team", "green")],
            vec![m("x-team", Some("blue"), Some("red,green"), Replace)],
        ),
        (
            "REPLACE",
            &[],
            vec![m("x-team", Some("blue"), None, Replace)],
        ),
        (
            "DELETE",
            &[("x-team", "red")],
            vec![m("x-team", Some("blue"), Some("red"), Delete)],
        ),
        // Nothing to delete when the header is absent (Envoy's behaviour).
        ("DELETE", &[], vec![]),
        ("DELETE", &[("x-team", "blue")], vec![]),
    ];
    for (action, hdrs, want) in table {
        let cp = compile(&policy(&[&format!(
            "{{path: /, headerMatches: [{{name: X-Team, value: blue, mismatch: {action}}}]}}"
        )]));
        let (allowed, _, got) = decide(&cp, hdrs);
        assert!(allowed, "a mismatch action never denies: {action} {hdrs:?}");
        assert_eq!(&got, want, "{action} {hdrs:?}");
    }
}

#[test]
fn every_matching_rule_runs_its_actions_and_the_first_decides() {
    let cp = compile(&policy(&[
        "{path: /other}",
        "{headers: ['X-Role: admin'], headerMatches: [{name: X-A, value: '1', mismatch: ADD}]}",
        "{headerMatches: [{name: X-B, value: '2', mismatch: REPLACE}]}",
        "{path: /, headerMatches: [{name: X-C, mismatch: LOG}]}",
    ]));
    let (allowed, reason, got) = decide(&cp, &[("x-role", "admin"), ("x-c", "")]);
    assert!(allowed);
    assert_eq!(reason, "hdr spec.ingress[0].toPorts[0].rules.http[1]");
    let keys: Vec<_> = got.iter().map(|m| (m.key.as_str(), m.action)).collect();
    assert_eq!(
        keys,
        vec![
            ("x-a", MismatchAction::Add),
            ("x-b", MismatchAction::Replace)
        ]
    );
    // Without X-Role rule 1 does not match, so its ADD does not run.
    let (allowed, reason, got) = decide(&cp, &[]);
    assert!(allowed);
    assert_eq!(reason, "hdr spec.ingress[0].toPorts[0].rules.http[2]");
    let keys: Vec<_> = got.iter().map(|m| (m.key.as_str(), m.action)).collect();
    assert_eq!(
        keys,
        vec![
            ("x-b", MismatchAction::Replace),
            ("x-c", MismatchAction::Log)
        ]
    );
}

#[test]
fn header_match_mistakes_are_refused_with_their_position() {
    let table: &[(&str, &str)] = &[
        (
            "{name: X-Token, secret: {namespace: default, name: tok}}",
            "p.yaml:11:52: headerMatches `secret` is not supported: weir has no Kubernetes secret store (put the value in `value`)",
        ),
        (
            "{name: X-Token, value: a, mismatch: IGNORE}",
            "p.yaml:11:64: unknown mismatch action `IGNORE` (expected LOG, ADD, DELETE or REPLACE)",
        ),
        (
            "{value: a}",
            "p.yaml:11:28: headerMatches entry needs `name`",
        ),
        (
            "{name: Host, value: a, mismatch: REPLACE}",
            "p.yaml:11:28: mismatch action REPLACE may not change `host` (it frames or routes the request)",
        ),
        (
            "{name: Content-Length, value: '0', mismatch: ADD}",
            "p.yaml:11:28: mismatch action ADD may not change `content-length` (it frames or routes the request)",
        ),
        (
            "{name: X-A, valeu: a}",
            "p.yaml:11:40: unknown field `valeu` in headerMatches entry",
        ),
    ];
    for (entry, want) in table {
        let e = errors(&policy(&[&format!("{{headerMatches: [{entry}]}}")]));
        assert_eq!(e, vec![want.to_string()], "{entry}");
    }
    // LOG changes nothing, so it may watch any header.
    assert!(
        errors(&policy(&[
            "{headerMatches: [{name: Host, value: a, mismatch: LOG}]}"
        ]))
        .is_empty()
    );
}

#[test]
fn checked_header_names_cover_headers_and_header_matches() {
    let cp = compile(&policy(&[
        "{headers: ['X-Team: blue', 'X-Present']}",
        "{headerMatches: [{name: X-Added, value: a, mismatch: ADD}]}",
    ]));
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let c = cp.connection(ip("10.200.0.20"), ip("10.200.0.10"), Protocol::Tcp, 80);
    assert_eq!(
        c.http_header_names(&cp),
        vec!["x-added", "x-present", "x-team"]
    );
}
