//! `/metrics` end to end, read with a real Prometheus text-format parser (the
//! Python `prometheus_client` one from PyPI, in the repo's `.venv`): real curl
//! requests and real UDP datagrams through weir on the eBPF datapath move the
//! counters by exactly what the test sent.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use weir_tests::{DEATHSTAR4, Scenario, lab, repo_root, text};

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: POST, path: /v1/request-landing}
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts:
    - ports: [{port: "5300", protocol: UDP}]
"#;

/// Samples by `name{label="value",...}` (labels sorted), as the parser read them.
type Samples = BTreeMap<String, f64>;

/// Parses a scrape with `prometheus_client.parser.text_string_to_metric_families`
/// (and checks the OpenMetrics parser accepts it too: `/metrics` says it is
/// OpenMetrics). A scrape either parser refuses fails the test.
fn parse(scrape: &str) -> Samples {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: `make deps` creates it and installs prometheus-client",
        python.display()
    );
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
text = sys.stdin.read()
list(om(text))
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        print(json.dumps(["%s{%s}" % (s.name, labels), s.value]))
"#;
    let mut child = Command::new(python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the scrape: {}\n{scrape}",
        String::from_utf8_lossy(&out.stderr)
    );
    text(&out)
        .lines()
        .map(|l| serde_json::from_str::<(String, f64)>(l).unwrap())
        .collect()
}

fn scrape(s: &Scenario) -> Samples {
    parse(&s.run_in_node(&["curl", "-sf", "http://127.0.0.1:9965/metrics"]))
}

fn get(m: &Samples, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

/// Waits until every `(sample, delta)` has moved by its delta since `before`
/// (records reach the counters in batches), then checks that nothing moved
/// further: the deltas are exact, not lower bounds.
fn assert_deltas(s: &Scenario, before: &Samples, want: &[(&str, f64)]) -> Samples {
    let moved = |m: &Samples| want.iter().all(|(k, d)| get(m, k) - get(before, k) >= *d);
    let _ = lab::wait_until(Duration::from_secs(5), || moved(&scrape(s)));
    // Anything late would show within the flow writer's and drain's batches.
    std::thread::sleep(Duration::from_millis(300));
    let after = scrape(s);
    for (k, d) in want {
        assert_eq!(
            get(&after, k) - get(before, k),
            *d,
            "{k}: before {}, after {}",
            get(before, k),
            get(&after, k)
        );
    }
    after
}

#[test]
fn metrics_move_by_exactly_the_traffic_sent() {
    let Some(mut s) = Scenario::star_wars("metrics") else {
        return;
    };
    s.start_deathstar(&[]);
    // A UDP sink on the deathstar that records what arrives.
    let sink = s.path("udp-sink");
    let mut cmd = s.lab.workload("deathstar").ns.command("socat");
    cmd.args(["-u", "UDP-RECV:5300"])
        .arg(format!("OPEN:{},creat,append", sink.display()));
    s.lab.spawn("udp-sink", cmd).expect("start the UDP sink");
    s.start_weir(POLICY, &["--steering", "ebpf"]);

    let landing = format!("http://{DEATHSTAR4}/v1/request-landing");
    let exhaust = format!("http://{DEATHSTAR4}/v1/exhaust-port");
    let before = scrape(&s);
    // The L7 rule allows POST /v1/request-landing and denies the PUT (the
    // same peer, port and connection kind: only the request differs).
    const ALLOWED: usize = 5;
    const DENIED: usize = 3;
    for _ in 0..ALLOWED {
        assert_eq!(s.status("tiefighter", "POST", &landing), "200");
    }
    for _ in 0..DENIED {
        assert_eq!(s.status("tiefighter", "PUT", &exhaust), "403");
    }
    let (a, d) = (ALLOWED as f64, DENIED as f64);
    let after_http = assert_deltas(
        &s,
        &before,
        &[
            (r#"weir_http_requests_total{code="200",method="POST"}"#, a),
            (r#"weir_http_requests_total{code="403",method="PUT"}"#, d),
            (
                r#"weir_flows_processed_total{protocol="HTTP",type="L7",verdict="FORWARDED"}"#,
                a,
            ),
            (
                r#"weir_flows_processed_total{protocol="HTTP",type="L7",verdict="DROPPED"}"#,
                d,
            ),
            (r#"weir_drop_total{reason="POLICY_DENIED"}"#, d),
            ("weir_http_request_duration_seconds_count{}", a + d),
            ("weir_http_added_duration_seconds_count{}", a + d),
            ("weir_http_upstream_duration_seconds_count{}", a),
            (r#"weir_proxy_connections_total{protocol="http"}"#, a + d),
        ],
    );
    // Each curl closed its connection.
    let closed = lab::wait_until(Duration::from_secs(5), || {
        get(
            &scrape(&s),
            r#"weir_proxy_connections_open{protocol="http"}"#,
        ) == 0.0
    });
    assert!(closed.is_ok(), "{:?}", scrape(&s));
    // The upstream's time is part of the whole.
    assert!(
        get(&after_http, "weir_http_upstream_duration_seconds_sum{}")
            <= get(&after_http, "weir_http_request_duration_seconds_sum{}")
    );

    // Datagrams from a new source port each: the kernel decides (and counts)
    // each as a new flow. The tiefighter's arrive; the xwing's, otherwise the
    // same, are dropped in the kernel, one count and one flow record each.
    const DATAGRAMS: usize = 4;
    let send = |from: &str, i: usize| {
        let ok = s
            .lab
            .workload(from)
            .ns
            .command("bash")
            .args([
                "-c",
                &format!("echo {from}-{i} | socat -u - UDP:{DEATHSTAR4}:5300"),
            ])
            .status()
            .expect("run socat")
            .success();
        assert!(ok, "socat from {from}");
    };
    for i in 0..DATAGRAMS {
        send("tiefighter", i);
    }
    let arrived = lab::wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&sink).is_ok_and(|t| t.lines().count() == DATAGRAMS)
    });
    assert!(arrived.is_ok(), "the allowed datagrams did not all arrive");
    let before_udp = scrape(&s);
    for i in 0..DATAGRAMS {
        send("xwing", i);
    }
    let k = DATAGRAMS as f64;
    let after = assert_deltas(
        &s,
        &before_udp,
        &[
            (r#"weir_kernel_packets_total{kind="dropped"}"#, k),
            (
                r#"weir_flows_processed_total{protocol="UDP",type="L3_L4",verdict="DROPPED"}"#,
                k,
            ),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        std::fs::read_to_string(&sink).unwrap().lines().count(),
        DATAGRAMS,
        "a denied datagram arrived"
    );
    assert_eq!(
        get(&after, r#"weir_kernel_packets_total{kind="events_lost"}"#),
        0.0
    );
    assert!(get(&after, r#"weir_kernel_bytes_total{kind="dropped"}"#) > 0.0);

    // The records carry Hubble's traffic_direction and is_reply: every record
    // here is about the deathstar's ingress policy; a RESPONSE is a reply.
    let flows = s.flows();
    let pick = |what: &dyn Fn(&serde_json::Value) -> bool| -> Vec<&serde_json::Value> {
        flows.iter().filter(|f| what(f)).collect()
    };
    let responses = pick(&|f| f["l7"]["type"] == "RESPONSE" && f["l7"]["http"]["method"] == "POST");
    let denied = pick(&|f| f["l7"]["type"] == "REQUEST" && f["l7"]["http"]["method"] == "PUT");
    let kernel_drops =
        pick(&|f| f["Type"] == "L3_L4" && f["verdict"] == "DROPPED" && f["l4"]["UDP"].is_object());
    assert_eq!(
        (responses.len(), denied.len(), kernel_drops.len()),
        (ALLOWED, DENIED, DATAGRAMS)
    );
    for f in &responses {
        assert_eq!(
            (&f["traffic_direction"], &f["is_reply"]),
            (&"INGRESS".into(), &true.into()),
            "{f}"
        );
    }
    for f in denied.iter().chain(&kernel_drops) {
        assert_eq!(
            (&f["traffic_direction"], &f["is_reply"]),
            (&"INGRESS".into(), &false.into()),
            "{f}"
        );
    }

    // A reload counts, by result.
    let reloads = r#"weir_policy_reloads_total{result="success"}"#;
    let before_reload = scrape(&s);
    s.reload(POLICY);
    assert_deltas(&s, &before_reload, &[(reloads, 1.0)]);
}
