//! UDP through the proxy's transparent UDP listener (steered by the nftables
//! fallback, which sends every UDP flow of an enforced endpoint to the proxy):
//! allowed flows reach a real server from the client's own address and the
//! replies come back from the address the client asked; denied flows never reach
//! the server.

use std::time::Duration;

use weir_tests::{DEATHSTAR4, DEATHSTAR6, Scenario, text};

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: udp}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts:
    - ports: [{port: "5300", endPort: 5399, protocol: UDP}]
"#;

/// Sends `msg` from `from` to `dst:port` over a connected UDP socket (which only
/// accepts replies from exactly that address) and returns what came back.
fn ask(s: &Scenario, from: &str, dst: &str, port: u16, msg: &str) -> String {
    let target = if dst.contains(':') {
        format!("UDP6:[{dst}]:{port}")
    } else {
        format!("UDP4:{dst}:{port}")
    };
    let out = s
        .lab
        .workload(from)
        .ns
        .command("sh")
        .args(["-c", &format!("echo {msg} | socat -T 2 - {target}")])
        .output()
        .expect("run socat");
    text(&out)
}

#[test]
fn udp_flows_through_the_proxy_keep_both_addresses_and_obey_policy() {
    let Some(mut s) = Scenario::star_wars("udp-proxy") else {
        return;
    };
    // An echo server that answers with the address it saw the datagram come from,
    // and records every datagram that reached it.
    let seen = s.path("seen.txt");
    for (name, listen) in [
        ("udp4", "UDP4-RECVFROM:5353,fork"),
        ("udp6", "UDP6-RECVFROM:5353,fork,ipv6only=1"),
    ] {
        let mut echo = s.lab.workload("deathstar").ns.command("socat");
        echo.args([
            listen,
            &format!(
                "SYSTEM:'read line; echo \"$line\" >> {}; echo \"$line from $SOCAT_PEERADDR\"'",
                seen.display()
            ),
        ]);
        s.lab.spawn(name, echo).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    s.start_weir(POLICY, &["--steering", "nft"]);

    assert_eq!(
        ask(&s, "tiefighter", DEATHSTAR4, 5353, "hello4").trim(),
        "hello4 from 10.200.0.20"
    );
    assert_eq!(
        ask(&s, "tiefighter", DEATHSTAR6, 5353, "hello6").trim(),
        "hello6 from [fd00:0200:0000:0000:0000:0000:0000:0020]",
        "{}",
        s.weir_log_text()
    );
    // A second datagram of the same flow goes through the open session.
    let twice = s
        .lab
        .workload("tiefighter")
        .ns
        .command("sh")
        .args([
            "-c",
            &format!(
                "(echo one; sleep 0.3; echo two) | socat -T 2 - UDP4:{DEATHSTAR4}:5353,sourceport=40123"
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(
        text(&twice),
        "one from 10.200.0.20\ntwo from 10.200.0.20\n",
        "{}",
        s.weir_log_text()
    );
    // Not allowed: the xwing, and the tiefighter outside the port range.
    assert_eq!(ask(&s, "xwing", DEATHSTAR4, 5353, "xwing4"), "");
    assert_eq!(ask(&s, "xwing", DEATHSTAR6, 5353, "xwing6"), "");
    let mut other = s.lab.workload("deathstar").ns.command("socat");
    other.args([
        "UDP4-RECVFROM:5400,fork",
        &format!("SYSTEM:'cat >> {}; echo reached'", seen.display()),
    ]);
    s.lab.spawn("udp5400", other).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ask(&s, "tiefighter", DEATHSTAR4, 5400, "port5400"), "");

    let reached = std::fs::read_to_string(&seen).unwrap_or_default();
    assert_eq!(
        reached.lines().collect::<Vec<_>>(),
        ["hello4", "hello6", "one", "two"],
        "only allowed datagrams reach the server"
    );
    let flows = s.flows();
    let udp = |f: &serde_json::Value| f["l4"]["UDP"].is_object();
    assert!(
        flows.iter().any(|f| udp(f)
            && f["verdict"] == "FORWARDED"
            && f["source"]["pod_name"] == "tiefighter"
            && f["destination"]["pod_name"] == "deathstar"
            && f["l4"]["UDP"]["destination_port"] == 5353),
        "{flows:#?}"
    );
    let dropped: Vec<_> = flows
        .iter()
        .filter(|f| udp(f) && f["verdict"] == "DROPPED")
        .collect();
    assert!(
        dropped.iter().any(|f| f["source"]["pod_name"] == "xwing"),
        "{flows:#?}"
    );
    assert!(
        dropped
            .iter()
            .any(|f| f["source"]["pod_name"] == "tiefighter"
                && f["l4"]["UDP"]["destination_port"] == 5400),
        "{flows:#?}"
    );
}

#[test]
fn new_udp_flows_beyond_the_session_cap_wait_for_a_free_session() {
    let Some(mut s) = Scenario::star_wars("udp-cap") else {
        return;
    };
    let mut echo = s.lab.workload("deathstar").ns.command("socat");
    echo.args([
        "UDP4-RECVFROM:5353,fork",
        "SYSTEM:'read line; echo \"$line\"'",
    ]);
    s.lab.spawn("echo", echo).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.start_weir(
        POLICY,
        &[
            "--steering",
            "nft",
            "--udp-max-sessions",
            "2",
            "--udp-idle-timeout",
            "1s",
        ],
    );
    // Two chatty flows hold both sessions.
    for port in [41001, 41002] {
        let mut chatty = s.lab.workload("tiefighter").ns.command("sh");
        chatty.args([
            "-c",
            &format!(
                "while true; do echo keep; sleep 0.2; done | socat - UDP4:{DEATHSTAR4}:5353,sourceport={port} >/dev/null"
            ),
        ]);
        s.lab.spawn(&format!("chatty{port}"), chatty).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ask(&s, "tiefighter", DEATHSTAR4, 5353, "third"), "");
    assert!(
        s.weir_log_text().contains("too many UDP sessions"),
        "{}",
        s.weir_log_text()
    );
    // Once they stop and their sessions time out, a new flow gets through.
    s.lab.processes.retain(|p| !p.name.starts_with("chatty"));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        ask(&s, "tiefighter", DEATHSTAR4, 5353, "fourth").trim(),
        "fourth"
    );
}
