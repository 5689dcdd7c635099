//! weir attaches its endpoint programs only to an endpoint's own interface: the
//! host side of a veth pair leading into a workload's namespace (into the
//! endpoint's own, when the endpoints file names it), or an interface the
//! endpoints file names. An address routed anywhere else is refused with the
//! reason, and a workload cannot move weir by adding addresses in its namespace.

use std::process::Output;
use std::time::Duration;

use weir_tests::{DEATHSTAR4, ENDPOINTS, Scenario, lab, text, weir_bin};

const ALLIANCE_ONLY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: alliance-only}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: alliance}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#;

/// A device of the node that is nobody's veth (a bridge, as docker0 or cni0 are),
/// standing in for the uplink.
const UPLINK: &str = "weiruplink";

fn add_uplink(s: &Scenario) {
    for argv in [
        &["ip", "link", "add", UPLINK, "type", "bridge"][..],
        &["ip", "link", "set", UPLINK, "up"],
        &["ip", "addr", "add", "10.77.0.1/24", "dev", UPLINK],
    ] {
        s.run_in_node(argv);
    }
}

/// `weir run` that is expected to refuse to start (20 s at most, should it not).
fn weir_run_refused(s: &Scenario, endpoints: &str) -> String {
    std::fs::write(s.path("policy.yaml"), ALLIANCE_ONLY).unwrap();
    std::fs::write(s.path("endpoints.yaml"), endpoints).unwrap();
    let out = s
        .lab
        .node
        .command("timeout")
        .arg("20")
        .arg(weir_bin())
        .arg("run")
        .arg("--policy")
        .arg(s.path("policy.yaml"))
        .arg("--endpoints")
        .arg(s.path("endpoints.yaml"))
        .arg("--state-dir")
        .arg(&s.state_dir)
        .arg("--bpf-root")
        .arg(&s.bpf_root)
        .args(["--steering", "ebpf"])
        .args(["--api-socket", s.path("refused.sock").to_str().unwrap()])
        .output()
        .unwrap();
    let code = out.status.code();
    assert!(
        code != Some(0) && code != Some(124),
        "weir should have refused to start (exit {code:?}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn datapath_show(s: &Scenario) -> String {
    s.run_in_node(&[weir_bin().to_str().unwrap(), "datapath", "show"])
}

fn endpoint(s: &Scenario, args: &[&str]) -> Output {
    s.lab
        .node
        .command(weir_bin().to_str().unwrap())
        .arg("endpoint")
        .args(args)
        .arg("--api-socket")
        .arg(s.path("weir.sock"))
        .output()
        .expect("run weir endpoint")
}

fn xwing_code(s: &Scenario) -> String {
    s.status("xwing", "GET", &format!("http://{DEATHSTAR4}/"))
}

#[test]
fn endpoint_addresses_that_do_not_lead_to_their_workload_are_refused() {
    let Some(mut s) = Scenario::star_wars("ep-iface") else {
        return;
    };
    add_uplink(&s);
    let xwing_ns = s.lab.workload("xwing").ns.name().to_string();

    // An address behind the uplink: before this check, weir attached its endpoint
    // programs to the uplink (and left them pinned there).
    let rogue =
        format!("{ENDPOINTS}  - name: rogue\n    ips: [10.77.0.5]\n    labels: {{class: rogue}}\n");
    let err = weir_run_refused(&s, &rogue);
    assert!(
        err.contains("rogue") && err.contains("10.77.0.5") && err.contains(UPLINK),
        "{err}"
    );
    assert!(err.contains("a bridge device"), "{err}");
    assert!(!datapath_show(&s).contains(UPLINK), "{}", datapath_show(&s));

    // An endpoint that names its namespace, with an address whose veth leads
    // into another workload's namespace (the deathstar's).
    let wrong_ns = ENDPOINTS.replace(
        "    labels: {org: alliance, class: xwing}\n",
        &format!("    labels: {{org: alliance, class: xwing}}\n  - name: impostor\n    netns: {xwing_ns}\n    ips: [10.200.0.11]\n    labels: {{class: impostor}}\n"),
    );
    s.run_in_node(&["ip", "route", "add", "10.200.0.11/32", "dev", "weirv0"]);
    let err = weir_run_refused(&s, &wrong_ns);
    assert!(
        err.contains("impostor")
            && err.contains(&format!("not in the endpoint's netns {xwing_ns}")),
        "{err}"
    );

    // The same workloads without the strays start, and the uplink is one of the
    // node's devices (netdev programs), not an endpoint's.
    std::fs::write(s.path("endpoints.yaml"), ENDPOINTS).unwrap();
    s.start_deathstar(&[]);
    s.start_weir(ALLIANCE_ONLY, &["--steering", "ebpf"]);
    assert_eq!(xwing_code(&s), "200");
    assert_eq!(
        s.status("tiefighter", "GET", &format!("http://{DEATHSTAR4}/")),
        "000"
    );
    let shown = datapath_show(&s);
    assert!(
        shown.contains(&format!("{UPLINK} ingress weir_from_netde")),
        "{shown}"
    );
    assert!(
        !shown.contains(&format!("{UPLINK} ingress weir_from_endpo")),
        "{shown}"
    );

    // A reload that brings the stray back is refused and changes nothing.
    std::fs::write(s.path("endpoints.yaml"), &rogue).unwrap();
    let pid = s.weir().pid() as i32;
    lab::send_signal(pid, libc::SIGHUP);
    lab::wait_until(Duration::from_secs(10), || {
        s.weir_log_text().contains("reload failed")
    })
    .unwrap_or_else(|_| panic!("no refusal:\n{}", s.weir_log_text()));
    let log = s.weir_log_text();
    assert!(log.contains("10.77.0.5") && log.contains(UPLINK), "{log}");
    let shown = datapath_show(&s);
    assert!(
        !shown.contains(&format!("{UPLINK} ingress weir_from_endpo")),
        "{shown}"
    );
    assert_eq!(xwing_code(&s), "200");

    // Named explicitly, the operator's choice is honoured.
    let named = rogue.replace(
        "ips: [10.77.0.5]",
        &format!("ips: [10.77.0.5]\n    interface: {UPLINK}"),
    );
    s.reload_endpoints(&named);
    let shown = datapath_show(&s);
    assert!(
        shown.contains(&format!("{UPLINK} ingress weir_from_endpo")),
        "{shown}"
    );
    assert_eq!(xwing_code(&s), "200");
}

#[test]
fn a_workload_cannot_move_its_endpoint_by_adding_addresses() {
    let Some(mut s) = Scenario::star_wars("ep-iface-api") else {
        return;
    };
    add_uplink(&s);
    let without_xwing: String = ENDPOINTS
        .split("  - name: xwing")
        .next()
        .unwrap()
        .to_string();
    std::fs::write(s.path("endpoints.yaml"), &without_xwing).unwrap();
    s.start_deathstar(&[]);
    s.start_weir(ALLIANCE_ONLY, &["--steering", "ebpf"]);
    let xwing_ns = s.lab.workload("xwing").ns.name().to_string();
    let added = endpoint(
        &s,
        &[
            "add",
            "--netns",
            &xwing_ns,
            "--name",
            "xwing",
            "--labels",
            "org=alliance",
        ],
    );
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    assert_eq!(xwing_code(&s), "200");
    let ips = |s: &Scenario| -> serde_json::Value {
        let listed = endpoint(s, &["list", "--json"]);
        let eps: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
        eps.into_iter().find(|e| e["name"] == "xwing").unwrap()["ips"].clone()
    };
    let registered = serde_json::json!(["10.200.0.30", "fd00:200::30"]);
    assert_eq!(ips(&s), registered);

    // The workload claims an address that the node routes to its uplink.
    s.lab
        .workload("xwing")
        .ns
        .run(&["ip", "addr", "add", "10.77.0.9/32", "dev", "lo"])
        .unwrap();
    // A reload re-reads files, not the namespace: nothing moves.
    s.reload(ALLIANCE_ONLY);
    assert_eq!(ips(&s), registered);
    assert!(!datapath_show(&s).contains(&format!("{UPLINK} ingress weir_from_endpo")));
    assert_eq!(xwing_code(&s), "200");

    // An explicit refresh reads the namespace, and refuses what it found.
    let refreshed = endpoint(&s, &["refresh", "xwing"]);
    assert!(!refreshed.status.success());
    let err = String::from_utf8_lossy(&refreshed.stderr);
    assert!(err.contains("10.77.0.9") && err.contains(UPLINK), "{err}");
    assert_eq!(ips(&s), registered);
    assert!(!datapath_show(&s).contains(&format!("{UPLINK} ingress weir_from_endpo")));
    assert_eq!(xwing_code(&s), "200");

    // Without the stray address a refresh goes through.
    s.lab
        .workload("xwing")
        .ns
        .run(&["ip", "addr", "del", "10.77.0.9/32", "dev", "lo"])
        .unwrap();
    let refreshed = endpoint(&s, &["refresh", "xwing"]);
    assert!(
        refreshed.status.success(),
        "{}",
        String::from_utf8_lossy(&refreshed.stderr)
    );
    assert!(
        text(&refreshed).contains("10.200.0.30"),
        "{}",
        text(&refreshed)
    );
    assert_eq!(xwing_code(&s), "200");
}
