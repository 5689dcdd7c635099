//! `rules.kafka`: loading (and what is refused, with file:line:col), Kafka verdicts
//! with the deciding rules, and Cilium's "L3/L4 allow wins".

use std::net::IpAddr;

use weir_policy::identity::IdentityAllocator;
use weir_policy::kafka_match::{KafkaDenial, KafkaRequest, KafkaTopics};
use weir_policy::{CompileError, CompiledPolicy, Protocol, parse_endpoints, parse_policies};

const ENDPOINTS: &str = "
endpoints:
  - {name: app, ips: [10.0.0.1], labels: {app: a}}
  - {name: broker, ips: [10.0.0.9], labels: {app: kafka}}
";

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toEndpoints:
    - matchLabels: {app: kafka}
    toPorts:
    - ports: [{port: '9092', protocol: TCP}]
      rules:
        kafka:
        - role: produce
          topic: orders
        - role: consume
          topic: orders
          clientID: reader
        - apiKey: metadata
          topic: audit
        - apiKey: ApiVersions
        - apiKey: fetch
          apiVersion: '12'
          topic: audit
";

fn compile(policy: &str) -> Result<CompiledPolicy, CompileError> {
    let p = parse_policies(policy, "p.yaml").expect("policy loads");
    let e = parse_endpoints(ENDPOINTS, "e.yaml").expect("endpoints load");
    CompiledPolicy::compile(&p, &e, &mut IdentityAllocator::default())
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn decide(
    cp: &CompiledPolicy,
    key: i16,
    v: i16,
    client: Option<&str>,
    topics: Option<&[&str]>,
) -> (bool, String) {
    let cv = cp.connection(ip("10.0.0.1"), ip("10.0.0.9"), Protocol::Tcp, 9092);
    assert!(cv.l4_allowed() && cv.needs_l7() && cv.needs_kafka());
    let names: Vec<String> = topics
        .unwrap_or(&[])
        .iter()
        .map(|s| s.to_string())
        .collect();
    let req = KafkaRequest {
        api_key: key,
        api_version: v,
        client_id: client,
        topics: match topics {
            Some(_) => KafkaTopics::Names(&names),
            None => KafkaTopics::Undecodable,
        },
    };
    let (verdict, why) = cv.kafka_verdict(cp, &req);
    let mut reason = verdict.reason_for("Kafka");
    if let Some(why) = why {
        reason = format!("{reason}: {why}");
    }
    (verdict.allowed, reason)
}

#[test]
fn kafka_rules_decide_requests_with_the_rules_that_matched() {
    let cp = compile(POLICY).expect("compiles");
    let r = |i: usize| format!("kafka spec.egress[0].toPorts[0].rules.kafka[{i}]");
    type Row<'a> = (
        i16,
        i16,
        Option<&'a str>,
        Option<&'a [&'a str]>,
        bool,
        String,
    );
    let rows: Vec<Row<'_>> = vec![
        (0, 9, Some("w"), Some(&["orders"]), true, r(0)),
        (0, 13, None, Some(&["orders"]), true, r(0)),
        (
            0,
            9,
            Some("w"),
            Some(&["audit"]),
            false,
            "no rule matched (egress, Kafka): topic `audit` is allowed by no rule".into(),
        ),
        (
            0,
            9,
            Some("w"),
            Some(&["orders", "audit"]),
            false,
            "no rule matched (egress, Kafka): topic `audit` is allowed by no rule".into(),
        ),
        // Metadata naming orders (role produce) and audit (apiKey metadata): two rules.
        (
            3,
            12,
            None,
            Some(&["orders", "audit"]),
            true,
            format!("{}; {}", r(0), r(2)),
        ),
        (1, 12, Some("reader"), Some(&["orders"]), true, r(1)),
        (
            1,
            12,
            Some("other"),
            Some(&["orders"]),
            false,
            "no rule matched (egress, Kafka): topic `orders` is allowed by no rule".into(),
        ),
        (1, 12, Some("other"), Some(&["audit"]), true, r(4)),
        (
            1,
            13,
            Some("other"),
            Some(&["audit"]),
            false,
            "no rule matched (egress, Kafka): no Kafka rule matches API key, version and client id"
                .into(),
        ),
        // ApiVersions names no topic: the first rule whose keys include it decides.
        (18, 3, None, Some(&[]), true, r(0)),
        // A modern consumer's heartbeat (KIP-848) is in role consume.
        (68, 0, Some("reader"), Some(&[]), true, r(1)),
        (12, 4, Some("reader"), Some(&[]), true, r(1)),
        (
            19,
            7,
            None,
            Some(&["orders"]),
            false,
            "no rule matched (egress, Kafka): no Kafka rule matches API key, version and client id"
                .into(),
        ),
        // Produce v2 (undecodable here): only rules without a topic could allow it.
        (
            0,
            2,
            None,
            None,
            false,
            "no rule matched (egress, Kafka): unsupported version for topic rule".into(),
        ),
        (18, 99, None, None, true, r(3)),
    ];
    for (key, v, client, topics, allowed, reason) in rows {
        assert_eq!(
            decide(&cp, key, v, client, topics),
            (allowed, reason),
            "key {key} v{v} {client:?} {topics:?}"
        );
    }
}

#[test]
fn an_l4_allow_for_the_same_peer_and_port_wins() {
    let policy = format!(
        "{POLICY}  - toEndpoints:\n    - matchLabels: {{app: kafka}}\n    toPorts:\n    - ports: [{{port: '9092', protocol: TCP}}]\n"
    );
    let cp = compile(&policy).expect("compiles");
    let cv = cp.connection(ip("10.0.0.1"), ip("10.0.0.9"), Protocol::Tcp, 9092);
    assert!(!cv.needs_l7());
}

#[test]
fn kafka_and_http_on_one_port_is_refused() {
    let policy = format!(
        "{POLICY}  - toEndpoints:\n    - matchLabels: {{app: kafka}}\n    toPorts:\n    - ports: [{{port: '9092', protocol: TCP}}]\n      rules:\n        http: [{{method: GET}}]\n"
    );
    let err = compile(&policy).expect_err("refused").to_string();
    assert!(
        err.contains("Kafka and HTTP rules on the same port"),
        "{err}"
    );
}

fn load_error(rules: &str) -> String {
    let policy = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: k}}\nspec:\n  endpointSelector: {{}}\n  egress:\n  - toPorts:\n    - ports: [{{port: '9092'}}]\n      rules:\n        kafka:\n{rules}"
    );
    match parse_policies(&policy, "p.yaml") {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_kafka_rules_are_load_errors_with_positions() {
    let rows = [
        (
            "        - {role: produce, apiKey: fetch}\n",
            "p.yaml:11:18: a kafka rule takes `role` or `apiKey`, not both",
        ),
        (
            "        - role: admin\n",
            "p.yaml:11:17: unknown Kafka role `admin`",
        ),
        (
            "        - apiKey: produces\n",
            "p.yaml:11:19: unknown Kafka apiKey `produces`",
        ),
        (
            "        - apiVersion: x\n",
            "p.yaml:11:23: Kafka apiVersion `x` is not a number",
        ),
        (
            "        - topic: 'a/b'\n",
            "p.yaml:11:18: Kafka topic `a/b` has characters outside",
        ),
        (
            "        - topic: ''\n",
            "p.yaml:11:18: Kafka topic `` is empty",
        ),
        (
            "        - topicz: a\n",
            "p.yaml:11:11: unknown field `topicz`",
        ),
    ];
    let mut bad = Vec::new();
    for (rules, want) in rows {
        let err = load_error(rules);
        if !err.contains(want) {
            bad.push(format!("{rules:?}: got {err:?}, want {want:?}"));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
    let long = format!("        - topic: {}\n", "t".repeat(250));
    assert!(load_error(&long).contains("longer than 249"));
    assert_eq!(
        load_error("        - {apiKey: '18', clientID: x, topic: a.b_c-1}\n"),
        ""
    );
    let _ = KafkaDenial::NoRule;
}
