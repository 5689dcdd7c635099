//! weir's eBPF datapath end to end: L3/L4 decided in the kernel (tc on each
//! endpoint's host veth), L7 flows steered to the proxy with bpf_sk_assign.

use std::time::Duration;

use weir_tests::{DEATHSTAR4, DEATHSTAR6, Scenario, text};

const L4_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l4}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts:
    - ports: [{port: "5300", endPort: 5399, protocol: UDP}]
"#;

const L7_POLICY: &str = r#"
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
"#;

/// Under L4_POLICY: the tiefighter reaches the deathstar's port 80 over IPv4 and
/// IPv6; the xwing's SYNs are dropped on both (no answer at all).
fn assert_l4_policy_holds(s: &Scenario) {
    for (from, want) in [("tiefighter", "200"), ("xwing", "000")] {
        for url in [
            format!("http://{DEATHSTAR4}/"),
            format!("http://[{DEATHSTAR6}]/"),
        ] {
            assert_eq!(s.status(from, "GET", &url), want, "{from} -> {url}");
        }
    }
}

#[test]
fn l3_l4_policy_is_enforced_in_the_kernel() {
    let Some(mut s) = Scenario::star_wars("ebpf-l4") else {
        return;
    };
    s.start_deathstar(&[8443]);
    // A UDP sink on the deathstar that records what arrives.
    let sink = s.path("udp.txt");
    let mut udp = s.lab.workload("deathstar").ns.command("socat");
    udp.args([
        "-u",
        "UDP-RECV:5353",
        &format!("OPEN:{},creat,append", sink.display()),
    ]);
    s.lab.spawn("udp-sink", udp).unwrap();
    s.start_weir(L4_POLICY, &["--steering", "ebpf"]);

    assert_eq!(
        s.status(
            "tiefighter",
            "PUT",
            &format!("http://{DEATHSTAR4}/v1/exhaust-port")
        ),
        "200"
    );
    assert_l4_policy_holds(&s);
    // Port 8443 is not allowed for anyone, though nginx answers there (the
    // node, allowed as `host`, gets its 200).
    let url_8443 = format!("http://{DEATHSTAR4}:8443/");
    let from_node = s.curl_from_node(&["-o", "/dev/null", "-w", "%{http_code}", &url_8443]);
    assert_eq!(text(&from_node), "200");
    assert_eq!(s.status("tiefighter", "GET", &url_8443), "000");
    let log = s.access_log();
    assert_eq!(
        log.len(),
        4,
        "the PUT, the two GETs, the node's probe: {log:?}"
    );
    assert!(
        log.iter()
            .filter(|l| !l.starts_with("169.254.1.1 "))
            .all(|l| l.starts_with("10.200.0.20") || l.starts_with("fd00:200::20")),
        "{log:?}"
    );

    for (from, msg) in [("tiefighter", "from-tiefighter"), ("xwing", "from-xwing")] {
        let out = s
            .lab
            .workload(from)
            .ns
            .command("socat")
            .args([
                "-u",
                &format!("EXEC:echo {msg}"),
                &format!("UDP-SENDTO:{DEATHSTAR4}:5353"),
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let got = weir_tests::lab::wait_until(Duration::from_secs(3), || {
        std::fs::read_to_string(&sink)
            .unwrap_or_default()
            .contains("from-tiefighter")
    });
    assert!(got.is_ok(), "allowed UDP datagram did not arrive");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !std::fs::read_to_string(&sink)
            .unwrap()
            .contains("from-xwing")
    );

    // Verdict events became flow records with identities and the drop reason.
    let flows = s.flows();
    let dropped: Vec<_> = flows.iter().filter(|f| f["verdict"] == "DROPPED").collect();
    assert!(
        dropped.iter().any(|f| f["source"]["pod_name"] == "xwing"
            && f["destination"]["pod_name"] == "deathstar"
            && f["policy"] == "no rule matched (ingress, L3/L4)"
            && f["drop_reason_desc"] == "POLICY_DENIED"),
        "{dropped:#?}"
    );
    assert!(
        dropped
            .iter()
            .any(|f| f["l4"]["UDP"]["destination_port"] == 5353)
    );
    // One record per dropped flow, not per retransmitted SYN (curl waited 3 s
    // for each, so the kernel sent the SYN two or three times).
    let mut xwing_flows: Vec<(String, u64)> = dropped
        .iter()
        .filter(|f| f["source"]["pod_name"] == "xwing" && f["l4"]["TCP"].is_object())
        .map(|f| {
            (
                f["IP"]["source"].as_str().unwrap_or("").to_string(),
                f["l4"]["TCP"]["source_port"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let records = xwing_flows.len();
    xwing_flows.sort();
    xwing_flows.dedup();
    assert_eq!(records, xwing_flows.len(), "{dropped:#?}");
    assert_eq!(records, 2, "the xwing's v4 and v6 attempts: {dropped:#?}");
    let allowed: Vec<_> = flows
        .iter()
        .filter(|f| f["verdict"] == "FORWARDED")
        .collect();
    assert!(
        allowed
            .iter()
            .any(|f| f["source"]["pod_name"] == "tiefighter"
                && f["policy"] == "l4 spec.ingress[0].toPorts[0]"),
        "{allowed:#?}"
    );
    // One event per new flow, not per packet: the 3 TCP flows, the node's probe
    // (as `host`) and 1 UDP flow.
    assert_eq!(allowed.len(), 5, "{allowed:#?}");
}

#[test]
fn l7_flows_reach_the_proxy_through_sk_assign() {
    let Some(mut s) = Scenario::star_wars("ebpf-l7") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(L7_POLICY, &["--steering", "ebpf"]);
    let landing = format!("http://{DEATHSTAR4}/v1/request-landing");
    assert_eq!(
        s.status("tiefighter", "POST", &landing),
        "200",
        "{}",
        s.weir_log_text()
    );
    assert_eq!(
        s.status(
            "tiefighter",
            "PUT",
            &format!("http://{DEATHSTAR4}/v1/exhaust-port")
        ),
        "403"
    );
    assert_eq!(
        s.status(
            "tiefighter",
            "POST",
            &format!("http://[{DEATHSTAR6}]/v1/request-landing")
        ),
        "200"
    );
    // Denied at L3/L4 in the kernel: the proxy never sees the xwing.
    assert_eq!(s.status("xwing", "POST", &landing), "000");
    let log = s.access_log();
    assert_eq!(log.len(), 2, "{log:?}");
    let flows = s.flows();
    assert!(
        flows
            .iter()
            .any(|f| f["Type"] == "L7" && f["l7"]["http"]["code"] == 403)
    );
    assert!(flows.iter().any(|f| f["Summary"] == "redirected to proxy"));
    assert!(
        !s.run_in_node(&["nft", "list", "tables"]).contains("weir"),
        "no nft steering in eBPF mode"
    );
}

#[test]
fn http2_streams_reach_the_server_from_the_client_through_sk_assign() {
    let Some(mut s) = Scenario::star_wars("ebpf-h2") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(L7_POLICY, &["--steering", "ebpf"]);
    // Six requests multiplexed on one HTTP/2 (h2c) connection, over IPv4 and IPv6.
    for ip in [DEATHSTAR4.to_string(), format!("[{DEATHSTAR6}]")] {
        let url = format!("http://{ip}/v1/request-landing");
        let mut args = vec![
            "--http2-prior-knowledge",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "6",
            "-X",
            "POST",
            "-w",
            "%{http_code} %{http_version}\\n",
        ];
        for _ in 0..6 {
            args.extend(["-o", "/dev/null", url.as_str()]);
        }
        let out = text(&s.curl("tiefighter", &args));
        assert_eq!(out, "200 2\n".repeat(6), "{}", s.weir_log_text());
    }
    let denied = text(&s.curl(
        "tiefighter",
        &[
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{DEATHSTAR4}/v1/exhaust-port"),
        ],
    ));
    assert_eq!(denied, "403");
    let log = s.access_log();
    assert_eq!(log.len(), 12, "only the allowed requests: {log:?}");
    // Every request left the proxy from the tiefighter's own address.
    assert!(
        log.iter()
            .all(|l| l.starts_with("10.200.0.20 ") || l.starts_with("fd00:200::20 ")),
        "{log:?}"
    );
    assert_eq!(
        log.iter()
            .filter(|l| l.starts_with("fd00:200::20 "))
            .count(),
        6
    );
}

/// HTTP rules on a port open to any protocol: TCP and UDP to it both go to the proxy.
const ANY_PROTOCOL_L7: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: any-l7}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "5353", protocol: ANY}]
      rules:
        http:
        - {method: GET, path: /}
"#;

#[test]
fn udp_flows_with_l7_rules_reach_the_proxys_udp_listener_through_sk_assign() {
    let Some(mut s) = Scenario::star_wars("ebpf-udp-l7") else {
        return;
    };
    let sink = s.path("udp.txt");
    let mut udp = s.lab.workload("deathstar").ns.command("socat");
    udp.args([
        "-u",
        "UDP4-RECV:5353",
        &format!("OPEN:{},creat,append", sink.display()),
    ]);
    s.lab.spawn("udp-sink", udp).unwrap();
    s.start_weir(ANY_PROTOCOL_L7, &["--steering", "ebpf"]);
    let out = s
        .lab
        .workload("tiefighter")
        .ns
        .command("socat")
        .args([
            "-u",
            "EXEC:echo datagram",
            &format!("UDP-SENDTO:{DEATHSTAR4}:5353,sourceport=40999"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(500));
    // The kernel handed the datagram to the proxy (not the server), and the proxy,
    // which has no way to apply HTTP rules to a datagram, refused it.
    assert_eq!(std::fs::read_to_string(&sink).unwrap_or_default(), "");
    let flows = s.flows();
    let refused = flows.iter().find(|f| {
        f["verdict"] == "DROPPED"
            && f["l4"]["UDP"]["destination_port"] == 5353
            && f["l4"]["UDP"]["source_port"] == 40999
    });
    let refused = refused.unwrap_or_else(|| panic!("{flows:#?}\n{}", s.weir_log_text()));
    assert_eq!(refused["source"]["pod_name"], "tiefighter");
    assert_eq!(
        refused["policy"],
        "the port has HTTP rules, which cannot apply to UDP"
    );
    assert_eq!(refused["destination"]["pod_name"], "deathstar");
    assert!(
        s.weir_log_text().contains("UDP flow denied"),
        "the proxy's UDP listener decided it"
    );
}

/// A rule without `toPorts` allows every protocol, ping included; one with only
/// TCP/80 does not.
const PING_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ping}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
  - fromEndpoints: [{matchLabels: {org: alliance}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#;

#[test]
fn icmp_echo_is_policed_like_any_other_flow() {
    let Some(mut s) = Scenario::star_wars("ebpf-icmp") else {
        return;
    };
    s.start_weir(PING_POLICY, &["--steering", "ebpf"]);
    let ping = |from: &str, dst: &str| s.ping(from, dst);
    assert!(ping("tiefighter", DEATHSTAR4), "{}", s.weir_log_text());
    assert!(ping("tiefighter", DEATHSTAR6));
    assert!(!ping("xwing", DEATHSTAR4), "TCP/80 only: no ping");
    assert!(!ping("xwing", DEATHSTAR6));
    // The deathstar's own pings out are not restricted (no egress policy), and
    // their replies come back as replies.
    assert!(ping("deathstar", "10.200.0.30"));
    assert!(ping("deathstar", "fd00:200::30"));
    std::thread::sleep(Duration::from_millis(100));
    let flows = s.flows();
    for (l4, request) in [("ICMPv4", 8), ("ICMPv6", 128)] {
        assert!(
            flows.iter().any(|f| f["verdict"] == "DROPPED"
                && f["source"]["pod_name"] == "xwing"
                && f["l4"][l4]["type"] == request),
            "{l4}: {flows:#?}"
        );
        assert!(
            flows.iter().any(|f| f["verdict"] == "FORWARDED"
                && f["source"]["pod_name"] == "tiefighter"
                && f["l4"][l4]["type"] == request
                && f["policy"] == "ping spec.ingress[0]"),
            "{l4}: {flows:#?}"
        );
    }
}

#[test]
fn stopping_weir_leaves_enforcement_and_cleanup_removes_exactly_weirs() {
    let Some(mut s) = Scenario::star_wars("ebpf-exit") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(L4_POLICY, &["--steering", "ebpf"]);
    let weir = weir_tests::weir_bin();
    let show = |s: &Scenario| s.run_in_node(&[weir.to_str().unwrap(), "datapath", "show"]);
    let attached = show(&s);
    // One veth per workload, both directions (program names are cut to 15 bytes).
    for iface in ["weirv0", "weirv1", "weirv2"] {
        assert!(
            attached.contains(&format!("{iface} ingress weir_from_endp")),
            "{attached}"
        );
        assert!(
            attached.contains(&format!("{iface} egress weir_to_endpoi")),
            "{attached}"
        );
    }
    // Cleanup refuses while weir runs, and changes nothing.
    let sock = s.path("weir.sock");
    let refused = s
        .lab
        .node
        .command(weir.to_str().unwrap())
        .args(["cleanup", "--bpf-root", s.bpf_root.to_str().unwrap()])
        .arg("--api-socket")
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("a weir is running"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(show(&s), attached);
    let st = s.weir().stop_with(libc::SIGTERM, Duration::from_secs(10));
    assert!(st.is_some_and(|st| st.success()), "{}", s.weir_log_text());
    assert!(
        s.weir_log_text()
            .contains("the eBPF datapath stays attached and pinned"),
        "{}",
        s.weir_log_text()
    );
    // Without weir the kernel still enforces L3/L4.
    assert_eq!(show(&s), attached);
    assert_eq!(
        s.status("tiefighter", "GET", &format!("http://{DEATHSTAR4}/")),
        "200"
    );
    assert_eq!(
        s.status("xwing", "GET", &format!("http://{DEATHSTAR4}/")),
        "000"
    );
    // Something of someone else's on the same interface must survive cleanup.
    s.run_in_node(&["nft", "add", "table", "inet", "someone_else"]);
    s.run_in_node(&["ip", "rule", "add", "fwmark", "0x42", "lookup", "42"]);
    let said = s.run_in_node(&[
        weir.to_str().unwrap(),
        "cleanup",
        "--bpf-root",
        s.bpf_root.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    // It says what it removed: the pins, the two ip rules (v4, v6) and routes.
    assert!(
        said.starts_with("removed ")
            && said.contains("pinned eBPF links and maps")
            && said.contains("2 ip rules"),
        "{said}"
    );
    let again = s.run_in_node(&[
        weir.to_str().unwrap(),
        "cleanup",
        "--bpf-root",
        s.bpf_root.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    assert_eq!(again.trim(), "nothing of weir's was installed here");
    assert!(show(&s).trim().is_empty(), "{}", show(&s));
    assert!(!s.bpf_root.exists(), "pins left behind");
    // The operators' own tools agree (bpftool 7.1 lists cls_bpf filters, not TCX).
    for iface in ["weirv0", "weirv1", "weirv2"] {
        for dir in ["ingress", "egress"] {
            let tc = s.run_in_node(&["tc", "filter", "show", "dev", iface, dir]);
            assert!(!tc.contains("weir"), "{tc}");
        }
    }
    let bpftool = s.run_in_node(&["bpftool", "net"]);
    assert!(!bpftool.contains("weir"), "{bpftool}");
    let rules = s.run_in_node(&["ip", "rule", "show"]);
    assert!(
        !rules.contains("proto 119") && rules.contains("lookup 42"),
        "{rules}"
    );
    let nft = s.run_in_node(&["nft", "list", "tables"]);
    assert!(
        nft.contains("someone_else") && !nft.contains("weir"),
        "{nft}"
    );
    // And with nothing of weir's left, the xwing gets through again.
    assert_eq!(
        s.status("xwing", "GET", &format!("http://{DEATHSTAR4}/")),
        "200"
    );
}

const CIDR_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: mixed}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromCIDRSet: [{cidr: 10.201.0.0/16, except: [10.201.1.0/24]}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts: [{ports: [{port: "8000", endPort: 8010, protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts: [{ports: [{port: "8005", protocol: TCP}]}]
"#;

#[test]
fn cidr_except_deny_and_port_ranges_in_the_kernel() {
    let Some(mut s) = Scenario::star_wars("ebpf-cidr") else {
        return;
    };
    // Two hosts that are not endpoints, so they are known only by address.
    s.lab
        .add_workload(
            "probein",
            "10.201.0.5".parse().unwrap(),
            "fd00:201::5".parse().unwrap(),
        )
        .unwrap();
    s.lab
        .add_workload(
            "probeout",
            "10.201.1.5".parse().unwrap(),
            "fd00:201:1::5".parse().unwrap(),
        )
        .unwrap();
    s.start_deathstar(&[8004, 8005, 8006, 8010, 8011]);
    s.start_weir(CIDR_POLICY, &["--steering", "ebpf"]);
    let get =
        |from: &str, port: u16| s.status(from, "GET", &format!("http://{DEATHSTAR4}:{port}/"));
    assert_eq!(get("probein", 80), "200", "inside the CIDR");
    assert_eq!(get("probeout", 80), "000", "inside the except");
    assert_eq!(
        get("probein", 8004),
        "000",
        "the CIDR rule is for port 80 only"
    );
    for (port, want) in [
        (8004, "200"),
        (8005, "000"),
        (8006, "200"),
        (8010, "200"),
        (8011, "000"),
        (80, "000"),
    ] {
        assert_eq!(get("tiefighter", port), want, "tiefighter to port {port}");
    }
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| f["verdict"] == "DROPPED"
            && f["l4"]["TCP"]["destination_port"] == 8005
            && f["policy"] == "denied by mixed spec.ingressDeny[0].toPorts[0]"),
        "deny drops name their rule: {flows:#?}"
    );
}

#[test]
fn the_clsact_fallback_enforces_survives_a_restart_and_cleans_up() {
    let Some(mut s) = Scenario::star_wars("ebpf-clsact") else {
        return;
    };
    s.start_deathstar(&[]);
    let args = ["--steering", "ebpf", "--tc-attach", "netlink"];
    s.start_weir(L4_POLICY, &args);
    let filters =
        |s: &Scenario, dir: &str| s.run_in_node(&["tc", "filter", "show", "dev", "weirv0", dir]);
    // cls_bpf filters on clsact (what kernels without TCX get), not TCX links.
    assert_eq!(
        filters(&s, "ingress").matches("weir_from_endpoint").count(),
        1
    );
    assert_eq!(filters(&s, "egress").matches("weir_to_endpoint").count(), 1);
    let shown = s.run_in_node(&[weir_tests::weir_bin().to_str().unwrap(), "datapath", "show"]);
    assert!(
        shown.contains("weirv2 ingress weir_from_endpoint"),
        "{shown}"
    );
    assert_l4_policy_holds(&s);
    // The filters outlive weir, and the next weir takes them over in place.
    let st = s.weir().stop_with(libc::SIGTERM, Duration::from_secs(10));
    assert!(st.is_some_and(|st| st.success()), "{}", s.weir_log_text());
    s.lab.processes.retain(|p| p.name != "weir");
    assert_l4_policy_holds(&s);
    s.start_weir(L4_POLICY, &args);
    assert_eq!(
        filters(&s, "ingress").matches("weir_from_endpoint").count(),
        1
    );
    assert_l4_policy_holds(&s);
    let bpftool = s.run_in_node(&["bpftool", "net"]);
    assert!(bpftool.contains("weir_from_endpoint"), "{bpftool}");
    s.lab.processes.retain(|p| p.name != "weir");
    s.run_in_node(&[
        weir_tests::weir_bin().to_str().unwrap(),
        "cleanup",
        "--bpf-root",
        s.bpf_root.to_str().unwrap(),
        "--api-socket",
        s.path("weir.sock").to_str().unwrap(),
    ]);
    for dir in ["ingress", "egress"] {
        assert!(!filters(&s, dir).contains("weir"), "{}", filters(&s, dir));
    }
    let bpftool = s.run_in_node(&["bpftool", "net"]);
    assert!(!bpftool.contains("weir"), "{bpftool}");
    assert_eq!(
        s.status("xwing", "GET", &format!("http://{DEATHSTAR4}/")),
        "200"
    );
}

#[test]
fn established_flows_continue_byte_exact_across_a_weir_restart() {
    let Some(mut s) = Scenario::star_wars("ebpf-restart") else {
        return;
    };
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bulk}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts: [{ports: [{port: "9000", endPort: 9001, protocol: TCP}]}]
"#;
    // A server that answers every connection, to probe with while weir is down.
    // It reads what the client sends: with a bare `echo`, socat's write of the
    // probe's bytes into the exited echo can fail (EPIPE) and end the
    // connection before the greeting is relayed (1 in 60 under load).
    let mut greeter = s.lab.workload("deathstar").ns.command("socat");
    greeter.args([
        "TCP-LISTEN:9001,fork,reuseaddr",
        "SYSTEM:'echo greetings; cat >/dev/null'",
    ]);
    s.lab.spawn("greeter", greeter).unwrap();
    // 240 MB at 20 MB/s: about 12 s on the wire.
    let src = s.path("bulk.bin");
    let dst = s.path("received.bin");
    let made = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("head -c 251658240 /dev/urandom > {}", src.display()),
        ])
        .status()
        .unwrap();
    assert!(made.success());
    let mut sink = s.lab.workload("deathstar").ns.command("socat");
    sink.args([
        "-u",
        "TCP-LISTEN:9000,reuseaddr",
        &format!("OPEN:{},creat,trunc", dst.display()),
    ]);
    s.lab.spawn("sink", sink).unwrap();
    s.lab
        .wait_for_tcp(DEATHSTAR4, 9000, Duration::from_secs(5))
        .ok();
    // wait_for_tcp's probe connection consumed the listener: start a fresh one.
    s.lab.processes.retain(|p| p.name != "sink");
    let mut sink = s.lab.workload("deathstar").ns.command("socat");
    sink.args([
        "-u",
        "TCP-LISTEN:9000,reuseaddr",
        &format!("OPEN:{},creat,trunc", dst.display()),
    ]);
    s.lab.spawn("sink", sink).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    s.start_weir(policy, &["--steering", "ebpf"]);
    let mut sender = s.lab.workload("tiefighter").ns.command("sh");
    sender.args([
        "-c",
        &format!(
            "pv -q -L 20m {} | socat -u - TCP:{DEATHSTAR4}:9000",
            src.display()
        ),
    ]);
    s.lab.spawn("sender", sender).unwrap();

    std::thread::sleep(Duration::from_secs(3));
    let st = s.weir().stop_with(libc::SIGTERM, Duration::from_secs(10));
    assert!(st.is_some_and(|st| st.success()), "{}", s.weir_log_text());
    s.lab.processes.retain(|p| p.name != "weir");
    // While weir is down the kernel still enforces: the tiefighter gets its
    // greeting, the xwing (same server, same probe) does not.
    let greeted = s.raw(
        "tiefighter",
        DEATHSTAR4,
        9001,
        b"hi",
        Duration::from_secs(2),
    );
    assert_eq!(greeted, b"greetings\n");
    let probe = s.raw(
        "xwing",
        DEATHSTAR4,
        9001,
        b"intruder",
        Duration::from_secs(2),
    );
    assert!(probe.is_empty());
    std::thread::sleep(Duration::from_secs(1));
    s.start_weir(policy, &["--steering", "ebpf"]);
    assert!(
        s.weir_log_text().contains("adopted pinned eBPF state"),
        "{}",
        s.weir_log_text()
    );

    let sender = s
        .lab
        .processes
        .iter_mut()
        .find(|p| p.name == "sender")
        .unwrap();
    let done = weir_tests::lab::wait_until(Duration::from_secs(40), || !sender.alive());
    assert!(done.is_ok(), "the transfer did not finish");
    let sink = s
        .lab
        .processes
        .iter_mut()
        .find(|p| p.name == "sink")
        .unwrap();
    assert!(weir_tests::lab::wait_until(Duration::from_secs(10), || !sink.alive()).is_ok());
    let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    // Exactly the sender's bytes: the xwing's probe never reached the sink.
    assert_eq!(a.len(), b.len(), "bytes received");
    assert!(a == b, "received bytes differ from the sent ones");
}

#[test]
fn endpoints_given_by_network_namespace_get_their_addresses_found() {
    let Some(mut s) = Scenario::star_wars("ebpf-netns") else {
        return;
    };
    s.start_deathstar(&[]);
    let ns = |w: &str| s.lab.workload(w).ns.name().to_string();
    let endpoints = format!(
        "endpoints:
  - {{name: deathstar, netns: {}, labels: {{org: empire, class: deathstar}}}}
  - {{name: tiefighter, netns: {}, labels: {{org: empire, class: tiefighter}}}}
  - {{name: xwing, netns: {}, labels: {{org: alliance, class: xwing}}}}
",
        ns("deathstar"),
        ns("tiefighter"),
        ns("xwing")
    );
    std::fs::write(s.path("endpoints.yaml"), endpoints).unwrap();
    s.start_weir(L4_POLICY, &["--steering", "ebpf"]);
    assert_l4_policy_holds(&s);
    let flows = s.flows();
    assert!(
        flows
            .iter()
            .any(|f| f["verdict"] == "DROPPED" && f["source"]["pod_name"] == "xwing")
    );
}

#[test]
fn protocols_policy_cannot_see_are_not_let_through_to_enforced_endpoints() {
    let Some(mut s) = Scenario::star_wars("ebpf-proto") else {
        return;
    };
    // Raw IP protocol 132 sinks on the deathstar (enforced) and the xwing (not).
    for (who, family) in [
        ("deathstar", "IP4-RECV:132"),
        ("deathstar", "IP6-RECV:132"),
        ("xwing", "IP4-RECV:132"),
    ] {
        let file = s.path(&format!("{who}-{}.bin", family.replace(':', "")));
        let mut sink = s.lab.workload(who).ns.command("socat");
        sink.args([
            "-u",
            family,
            &format!("OPEN:{},creat,append", file.display()),
        ]);
        s.lab.spawn("raw-sink", sink).unwrap();
    }
    s.start_weir(L4_POLICY, &["--steering", "ebpf"]);
    let send = |to: &str| {
        let out = s
            .lab
            .workload("tiefighter")
            .ns
            .command("socat")
            .args(["-u", "EXEC:echo raw-payload", to])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    send(&format!("IP4-SENDTO:{DEATHSTAR4}:132"));
    send(&format!("IP6-SENDTO:[{DEATHSTAR6}]:132"));
    send("IP4-SENDTO:10.200.0.30:132");
    let got = |name: &str| std::fs::read(s.path(name)).unwrap_or_default();
    let arrived = weir_tests::lab::wait_until(Duration::from_secs(3), || {
        got("xwing-IP4-RECV132.bin")
            .windows(11)
            .any(|w| w == b"raw-payload")
    });
    assert!(
        arrived.is_ok(),
        "unenforced endpoint must still get other protocols"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        got("deathstar-IP4-RECV132.bin").is_empty(),
        "IPv4 protocol 132 reached an enforced endpoint"
    );
    assert!(
        got("deathstar-IP6-RECV132.bin").is_empty(),
        "IPv6 protocol 132 reached an enforced endpoint"
    );
    let flows = s.flows();
    assert!(
        flows
            .iter()
            .any(|f| f["drop_reason_desc"] == "UNSUPPORTED_L4_PROTOCOL"),
        "{flows:#?}"
    );
}
