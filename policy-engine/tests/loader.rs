//! Policy loading: Cilium documentation shapes load; every unsupported or malformed
//! construct fails with the right `file:line:column`.

use weir_policy::parse_policies;

fn errors(yaml: &str) -> Vec<String> {
    match parse_policies(yaml, "p.yaml") {
        Ok(_) => vec![],
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn cilium_docs_shapes_load() {
    // The star-wars demo policy from Cilium's getting-started guide.
    let sw = r#"
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "rule1"
spec:
  description: "L7 policy to restrict access to specific HTTP call"
  endpointSelector:
    matchLabels:
      org: empire
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: empire
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      rules:
        http:
        - method: "POST"
          path: "/v1/request-landing"
"#;
    let p = parse_policies(sw, "sw.yaml").unwrap();
    assert_eq!(p[0].name, "rule1");
    assert_eq!(
        p[0].rules[0].ingress.as_ref().unwrap()[0].to_ports[0]
            .http
            .as_ref()
            .unwrap()
            .len(),
        1
    );

    // Several documents, specs lists, clusterwide kind, expressions, headers, host, ranges.
    let multi = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: cw
specs:
  - endpointSelector:
      matchExpressions:
        - {key: k8s:app, operator: In, values: [web, api]}
        - {key: tier, operator: NotIn, values: [db]}
        - {key: team, operator: Exists}
        - {key: legacy, operator: DoesNotExist}
    egress:
      - toEndpoints: [{}]
        toPorts:
          - ports: [{port: 8000, endPort: 8080, protocol: TCP}, {port: http}]
            rules:
              http:
                - method: GET
                  path: "/public/.*"
                  host: "api\\.example\\.com"
                  headers: ["X-Token: abc", "X-Present"]
  - endpointSelector: {matchLabels: {app: db}}
    ingress: [{}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: other, namespace: prod, labels: {a: b}, uid: x}
spec:
  endpointSelector: {}
  ingress:
    - toPorts: [{ports: [{port: "53", protocol: UDP}]}]
"#;
    let p = parse_policies(multi, "m.yaml").unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].rules.len(), 2);
    assert_eq!(p[1].qualified_name(), "prod/other");
}

#[test]
fn host_policies_are_refused_not_matched_against_endpoints() {
    let e = errors(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: x}\nspec:\n  nodeSelector: {}\n  ingress: [{}]\n",
    );
    assert!(
        e.iter()
            .any(|l| l
                .starts_with("p.yaml:5:17: field `nodeSelector` (a host policy) is not supported")),
        "{e:?}"
    );
}

#[test]
fn unsupported_fields_name_field_and_position() {
    let e = errors(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector: {}\n  egress:\n    - toRequires:\n        - matchLabels: {a: b}\n",
    );
    assert_eq!(
        e,
        vec!["p.yaml:7:7: field `toRequires` in egress rule is not supported by weir yet"]
    );
    let e = errors(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector: {}\n  ingress:\n    - toPorts:\n        - ports: [{port: '9092'}]\n          rules:\n            l7proto: envoy.filters.network.redis_proxy\n",
    );
    assert_eq!(
        e,
        vec!["p.yaml:10:13: field `l7proto` in rules is not supported by weir yet"]
    );
}

#[test]
fn typos_are_unknown_fields() {
    let e = errors(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelecter: {}\n",
    );
    assert!(
        e.contains(&"p.yaml:5:3: unknown field `endpointSelecter` in spec".to_string()),
        "{e:?}"
    );
    assert!(
        e.contains(&"p.yaml:5:3: rule needs `endpointSelector` or `nodeSelector`".to_string()),
        "{e:?}"
    );
}

#[test]
fn semantic_errors_point_at_their_value() {
    let e = errors(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: x}
spec:
  endpointSelector: {}
  ingress:
    - toPorts:
        - ports:
            - port: "70000"
            - port: 80
              endPort: 70
            - port: "Not_A_Name"
            - port: 1
              protocol: ICMP
          rules:
            http:
              - path: "/v1/(unclosed"
              - method: "*GET"
"#,
    );
    assert_eq!(
        e,
        vec![
            "p.yaml:9:21: port 70000 is out of range (0-65535)",
            "p.yaml:11:24: endPort 70 is lower than port 80",
            "p.yaml:12:21: port `Not_A_Name` is neither a number (0-65535) nor a port name",
            "p.yaml:14:25: unknown protocol `ICMP` (expected TCP, UDP or ANY)",
            "p.yaml:17:23: invalid path regex `/v1/(unclosed`: error: unclosed group",
            "p.yaml:18:25: invalid method regex `*GET`: error: repetition operator missing expression",
        ]
    );
}

#[test]
fn header_level_errors() {
    assert_eq!(
        errors("a: [1\n"),
        vec!["p.yaml:2:1: while parsing a flow sequence, expected ',' or ']'"]
    );
    let e = errors(
        "apiVersion: cilium.io/v1\nkind: NetworkPolicy\nmetadata: {}\nspec: {endpointSelector: {}}\n",
    );
    assert_eq!(
        e,
        vec![
            "p.yaml:1:13: unsupported apiVersion `cilium.io/v1` (expected `cilium.io/v2`)",
            "p.yaml:2:7: unsupported kind `NetworkPolicy` (expected CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy)",
            "p.yaml:3:11: missing field `metadata.name`",
        ]
    );
    let e = errors(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector:\n    matchExpressions:\n      - {key: a, operator: Like, values: [b]}\n      - {key: a, operator: In}\n",
    );
    assert_eq!(
        e,
        vec![
            "p.yaml:7:28: unknown operator `Like` (expected In, NotIn, Exists or DoesNotExist)",
            "p.yaml:8:9: operator In needs a non-empty `values` list",
        ]
    );
}

#[test]
fn duplicate_names_are_errors() {
    let doc = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}}\n";
    let e = errors(&format!("{doc}---\n{doc}"));
    assert_eq!(e, vec!["p.yaml:8:18: duplicate policy name `x`"]);
}

#[test]
fn icmps_rules_load_and_their_mistakes_point_at_them() {
    let head = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector: {}\n  ingress:\n";
    let ok = format!(
        "{head}    - icmps:\n        - fields: [{{type: 8, family: IPv4}}, {{type: EchoRequest, family: IPv6}}]\n"
    );
    assert!(errors(&ok).is_empty(), "{:?}", errors(&ok));
    let with_ports = format!(
        "{head}    - toPorts: [{{ports: [{{port: '80'}}]}}]\n      icmps:\n        - fields: [{{type: 8}}]\n"
    );
    assert_eq!(
        errors(&with_ports),
        [
            "p.yaml:9:20: `icmps` may only be present without `toPorts` (as in Cilium): define a separate rule for the ports"
        ]
    );
    let bad = format!(
        "{head}    - icmps:\n        - fields: [{{type: Ping}}, {{type: 8, family: IPv5}}, {{family: IPv6}}]\n"
    );
    assert_eq!(
        errors(&bad),
        [
            "p.yaml:8:27: `Ping` is not an ICMP type of this family (a number 0-255 or a name such as EchoRequest)",
            "p.yaml:8:52: unknown ICMP family `IPv5` (IPv4 or IPv6)",
            "p.yaml:8:59: icmps field needs `type`",
        ]
    );
}
