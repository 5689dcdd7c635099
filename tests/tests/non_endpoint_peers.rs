//! Peers that are not local endpoints — the world, CIDR peers, the node itself —
//! on the eBPF datapath: L7 rules apply to them in both directions, the host is
//! decided as `host`, and an egress-only policy is enforced in the kernel. The
//! `world` namespace sits behind its own node device (`weirx1`), which weir finds
//! by itself (`--devices` is not given).

use std::time::Duration;

use weir_tests::{DEATHSTAR4, DEATHSTAR6, Scenario, text};

const WORLD4: &str = "10.201.1.1";
const WORLD6: &str = "fd00:201:1::1";

/// The deathstar admits the world's subnet on port 80, but only `GET /public/…`.
const INGRESS_L7_FROM_CIDR: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: public-api}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromCIDR: [10.201.1.0/24, "fd00:201:1::/64"]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public/.*"}
"#;

/// The tiefighter may reach the world's subnet on port 80, but only `GET /public/…`.
const EGRESS_L7_TO_CIDR: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: external-api}
spec:
  endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
  - toCIDR: [10.201.1.0/24, "fd00:201:1::/64"]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public/.*"}
"#;

/// What curl sees of an L3/L4 denial: the kernel drops the SYN (no answer), the
/// nft fallback's proxy answers HTTP with 403.
fn l4_denied(steering: &str) -> &'static str {
    if steering == "nft" { "403" } else { "000" }
}

fn star_wars_and_world(test: &str) -> Option<Scenario> {
    let mut s = Scenario::star_wars(test)?;
    s.lab.add_outside("world", 1).expect("add the world");
    Some(s)
}

#[test]
fn l7_rules_apply_to_a_world_client_of_an_endpoint() {
    world_client_of_an_endpoint("ebpf");
}

#[test]
fn l7_rules_apply_to_a_world_client_of_an_endpoint_through_nft() {
    world_client_of_an_endpoint("nft");
}

fn world_client_of_an_endpoint(steering: &str) {
    let Some(mut s) = star_wars_and_world(&format!("world-ingress-l7-{steering}")) else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(INGRESS_L7_FROM_CIDR, &["--steering", steering]);
    for base in [
        format!("http://{DEATHSTAR4}"),
        format!("http://[{DEATHSTAR6}]"),
    ] {
        assert_eq!(
            s.status("world", "GET", &format!("{base}/public/x")),
            "200",
            "{base}: {}",
            s.weir_log_text()
        );
        assert_eq!(s.status("world", "PUT", &format!("{base}/admin")), "403");
        assert_eq!(s.status("world", "GET", &format!("{base}/admin")), "403");
    }
    // The xwing (an endpoint, not in the CIDR) is not admitted at all.
    assert_eq!(
        s.status("xwing", "GET", &format!("http://{DEATHSTAR4}/public/x")),
        l4_denied(steering)
    );
    let log = s.access_log();
    assert_eq!(log.len(), 2, "only the two allowed GETs: {log:?}");
    assert!(log.iter().all(|l| l.contains("GET /public/x")), "{log:?}");
    // The server sees the world client's own address (transparent upstream).
    assert!(
        log[0].starts_with(WORLD4) && log[1].starts_with(WORLD6),
        "{log:?}"
    );
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| f["verdict"] == "DROPPED"
            && f["l7"]["http"]["method"] == "PUT"
            && f["source"]["labels"][0]
                .as_str()
                .is_some_and(|l| l.starts_with("reserved:world"))
            && f["destination"]["pod_name"] == "deathstar"),
        "{flows:#?}"
    );
}

#[test]
fn l7_rules_apply_to_an_endpoints_requests_to_a_world_server() {
    endpoint_to_a_world_server("ebpf");
}

#[test]
fn l7_rules_apply_to_an_endpoints_requests_to_a_world_server_through_nft() {
    endpoint_to_a_world_server("nft");
}

fn endpoint_to_a_world_server(steering: &str) {
    let Some(mut s) = star_wars_and_world(&format!("world-egress-l7-{steering}")) else {
        return;
    };
    s.start_nginx_in("world");
    s.start_weir(EGRESS_L7_TO_CIDR, &["--steering", steering]);
    for base in [format!("http://{WORLD4}"), format!("http://[{WORLD6}]")] {
        assert_eq!(
            s.status("tiefighter", "GET", &format!("{base}/public/x")),
            "200",
            "{base}: {}",
            s.weir_log_text()
        );
        assert_eq!(
            s.status("tiefighter", "POST", &format!("{base}/public/x")),
            "403"
        );
        // Egress-enforced: nothing else leaves the tiefighter.
        assert_eq!(
            s.status("tiefighter", "GET", &format!("http://{DEATHSTAR4}/")),
            l4_denied(steering)
        );
    }
    let log = s.access_log_of("world");
    assert_eq!(log.len(), 2, "only the two allowed GETs: {log:?}");
    assert!(
        log[0].starts_with("10.200.0.20 ") && log[1].starts_with("fd00:200::20 "),
        "the world server sees the tiefighter itself: {log:?}"
    );
    assert!(log.iter().all(|l| l.contains("GET /public/x")), "{log:?}");
}

/// Under `always` (the default) the node reaches a policed endpoint whatever the
/// policy; under `policy` only `fromEntities: [host]` lets it in.
#[test]
fn the_host_is_allowed_always_or_decided_by_policy() {
    const ONLY_EMPIRE: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: only-empire}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#;
    let with_host = format!("{ONLY_EMPIRE}  - fromEntities: [host]\n");
    let node_status = |s: &Scenario, url: &str| {
        text(&s.curl_from_node(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "3",
            url,
        ]))
    };
    let urls = [
        format!("http://{DEATHSTAR4}/"),
        format!("http://[{DEATHSTAR6}]/"),
    ];
    {
        let Some(mut s) = Scenario::star_wars("host-always") else {
            return;
        };
        s.start_deathstar(&[]);
        s.start_weir(ONLY_EMPIRE, &["--steering", "ebpf"]);
        for url in &urls {
            assert_eq!(node_status(&s, url), "200", "{url}");
            assert_eq!(s.status("xwing", "GET", url), "000", "{url}");
        }
    }
    let Some(mut s) = Scenario::star_wars("host-policy") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(
        &with_host,
        &["--steering", "ebpf", "--allow-localhost", "policy"],
    );
    for url in &urls {
        assert_eq!(node_status(&s, url), "200", "fromEntities host: {url}");
    }
    s.reload(ONLY_EMPIRE);
    for url in &urls {
        assert_eq!(node_status(&s, url), "000", "no rule for the host: {url}");
    }
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| f["verdict"] == "DROPPED"
            && f["source"]["identity"] == 1
            && f["source"]["labels"][0] == "reserved:host"
            && f["destination"]["pod_name"] == "deathstar"),
        "{flows:#?}"
    );
}

/// An egress-only policy, decided in the kernel: the tiefighter reaches the world
/// server while a rule allows it, and not once the rule is gone.
#[test]
fn an_egress_only_policy_is_enforced_in_the_kernel() {
    const TO_WORLD_AND_DEATHSTAR: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: egress-only}
spec:
  endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
  - toEndpoints: [{matchLabels: {class: deathstar}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
  - toCIDR: [10.201.1.0/24, "fd00:201:1::/64"]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#;
    let only_deathstar = TO_WORLD_AND_DEATHSTAR
        .split("  - toCIDR")
        .next()
        .unwrap()
        .to_string();
    let Some(mut s) = star_wars_and_world("egress-only") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_nginx_in("world");
    s.start_weir(TO_WORLD_AND_DEATHSTAR, &["--steering", "ebpf"]);
    let world = [format!("http://{WORLD4}/"), format!("http://[{WORLD6}]/")];
    for url in &world {
        assert_eq!(s.status("tiefighter", "GET", url), "200", "{url}");
    }
    s.reload(&only_deathstar);
    for url in &world {
        assert_eq!(s.status("tiefighter", "GET", url), "000", "{url}");
    }
    assert_eq!(
        s.status("tiefighter", "GET", &format!("http://{DEATHSTAR4}/")),
        "200"
    );
    // The world is not policed for ingress: it still reaches the deathstar.
    assert_eq!(
        s.status("world", "GET", &format!("http://{DEATHSTAR4}/")),
        "200"
    );
    assert_eq!(s.access_log_of("world").len(), 2);
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| f["verdict"] == "DROPPED"
            && f["source"]["pod_name"] == "tiefighter"
            && f["IP"]["destination"] == WORLD4
            && f["policy"] == "no rule matched (egress, L3/L4)"),
        "{flows:#?}"
    );
}

/// A world client streaming from an endpoint: once the rule that allowed it is
/// removed, the endpoint's packets to it (replies on the client's flow) stop at
/// once, and so do the client's.
#[test]
fn removing_a_rule_stops_established_world_flows_in_both_directions() {
    const STREAM: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: stream}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromCIDR: [10.201.1.0/24]
    toPorts:
    - ports: [{port: "7000", protocol: TCP}]
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#;
    let without_world = STREAM.replace("10.201.1.0/24", "10.99.0.0/24");
    let Some(mut s) = star_wars_and_world("revoke-stream") else {
        return;
    };
    // A server that sends a line every 50 ms for as long as the client is there
    // (the loop ends when a write fails, instead of logging the error forever).
    let mut server = s.lab.workload("deathstar").ns.command("socat");
    server.args([
        "TCP-LISTEN:7000,reuseaddr,fork",
        "SYSTEM:'while echo tick; do sleep 0.05; done'",
    ]);
    s.lab.spawn("ticker", server).unwrap();
    s.lab
        .wait_for_tcp(DEATHSTAR4, 7000, Duration::from_secs(5))
        .unwrap();
    s.start_weir(STREAM, &["--steering", "ebpf"]);
    let received = s.path("ticks.txt");
    let mut client = s.lab.workload("world").ns.command("socat");
    client.args([
        "-u",
        &format!("TCP:{DEATHSTAR4}:7000"),
        &format!("OPEN:{},creat,append", received.display()),
    ]);
    s.lab.spawn("ticks", client).unwrap();
    let ticks = || {
        std::fs::read_to_string(&received)
            .unwrap_or_default()
            .matches("tick")
            .count()
    };
    let flowing = weir_tests::lab::wait_until(Duration::from_secs(5), || ticks() >= 10);
    assert!(flowing.is_ok(), "the stream never flowed: {}", ticks());
    s.reload(&without_world);
    // Let packets in flight settle, then nothing more may arrive.
    std::thread::sleep(Duration::from_millis(300));
    let at_revoke = ticks();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        ticks(),
        at_revoke,
        "ticks kept arriving after the rule went"
    );
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| f["verdict"] == "DROPPED"
            && f["l4"]["TCP"]["source_port"] == 7000
            && f["source"]["pod_name"] == "deathstar"),
        "the deathstar's replies are dropped, with a record: {flows:#?}"
    );
}
