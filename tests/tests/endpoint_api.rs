//! `weir endpoint add|list|remove` against a running weir, over its API socket:
//! a workload registered by its namespace gets its labels' identity in the kernel
//! at once, keeps it across a restart, and loses it when removed.

use std::process::Output;
use std::time::Duration;

use weir_tests::{DEATHSTAR4, DEATHSTAR6, Scenario, text};

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

const WITHOUT_XWING: &str = "endpoints:
  - name: deathstar
    ips: [10.200.0.10, fd00:200::10]
    labels: {org: empire, class: deathstar}
  - name: tiefighter
    ips: [10.200.0.20, fd00:200::20]
    labels: {org: empire, class: tiefighter}
";

fn code(s: &Scenario, url: &str) -> String {
    text(&s.curl(
        "xwing",
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "3",
            url,
        ],
    ))
}

fn endpoint(s: &Scenario, args: &[&str]) -> Output {
    let sock = s.path("weir.sock");
    s.lab
        .node
        .command(weir_tests::weir_bin().to_str().unwrap())
        .arg("endpoint")
        .args(args)
        .arg("--api-socket")
        .arg(sock)
        .output()
        .expect("run weir endpoint")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn endpoints_registered_over_the_api_are_enforced_and_survive_a_restart() {
    let Some(mut s) = Scenario::star_wars("endpoint-api") else {
        return;
    };
    std::fs::write(s.path("endpoints.yaml"), WITHOUT_XWING).unwrap();
    s.start_deathstar(&[]);
    s.start_weir(ALLIANCE_ONLY, &["--steering", "ebpf"]);
    let v4 = format!("http://{DEATHSTAR4}/");
    let v6 = format!("http://[{DEATHSTAR6}]/");
    // Unknown to weir, the xwing is `world`: not allowed in.
    assert_eq!(code(&s, &v4), "000");
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
            "org=alliance,class=xwing",
        ],
    );
    assert!(added.status.success(), "{}", stderr(&added));
    assert!(
        text(&added).starts_with("added endpoint xwing"),
        "{}",
        text(&added)
    );
    // Both of its addresses were found in the namespace and carry its identity.
    assert_eq!(code(&s, &v4), "200");
    assert_eq!(code(&s, &v6), "200");

    let listed = endpoint(&s, &["list", "--json"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let eps: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    let names: Vec<&str> = eps.iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(names, ["deathstar", "tiefighter", "xwing"]);
    let x = &eps[2];
    assert_eq!(x["source"], "api");
    assert_eq!(x["labels"]["class"], "xwing");
    assert_eq!(x["ips"], serde_json::json!(["10.200.0.30", "fd00:200::30"]));
    assert_eq!(x["interfaces"], serde_json::json!(["weirv2"]));
    assert_eq!(eps[0]["source"], "file");
    let table = text(&endpoint(&s, &["list"]));
    assert!(table.lines().next().unwrap().starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("xwing") && l.contains("org=alliance")),
        "{table}"
    );
    // The kernel's flow record knows who it was.
    let flows = s.flows();
    assert!(
        flows
            .iter()
            .any(|f| f["verdict"] == "FORWARDED" && f["source"]["pod_name"] == "xwing"),
        "{flows:?}"
    );

    // Refusals are clear and change nothing.
    let again = endpoint(&s, &["add", "--netns", &xwing_ns, "--name", "xwing"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    let taken = endpoint(&s, &["add", "--netns", &xwing_ns, "--name", "xwing2"]);
    assert!(!taken.status.success());
    assert!(
        stderr(&taken).contains("10.200.0.30") && stderr(&taken).contains("`xwing`"),
        "{}",
        stderr(&taken)
    );
    let missing = endpoint(&s, &["add", "--netns", "no-such-namespace-here"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("no-such-namespace-here"),
        "{}",
        stderr(&missing)
    );
    let from_file = endpoint(&s, &["remove", "tiefighter"]);
    assert!(
        stderr(&from_file).contains("endpoints file"),
        "{}",
        stderr(&from_file)
    );
    let bad_label = endpoint(&s, &["add", "--netns", &xwing_ns, "--labels", "novalue"]);
    assert!(!bad_label.status.success());
    assert!(
        stderr(&bad_label).contains("key=value"),
        "{}",
        stderr(&bad_label)
    );
    assert_eq!(code(&s, &v4), "200");

    // A restarted weir still knows the xwing.
    let st = s.weir().stop_with(libc::SIGTERM, Duration::from_secs(10));
    assert!(st.is_some_and(|st| st.success()), "{}", s.weir_log_text());
    assert!(
        !s.path("weir.sock").exists(),
        "the API socket is removed on exit"
    );
    let down = endpoint(&s, &["list"]);
    assert!(!down.status.success());
    assert!(
        stderr(&down).contains("cannot reach weir's API"),
        "{}",
        stderr(&down)
    );
    s.lab.processes.retain(|p| p.name != "weir");
    s.start_weir(ALLIANCE_ONLY, &["--steering", "ebpf"]);
    let listed = text(&endpoint(&s, &["list"]));
    assert!(listed.lines().any(|l| l.starts_with("xwing")), "{listed}");
    assert_eq!(code(&s, &v4), "200");

    // Removed: back to `world`, and weir lets go of its interface.
    let removed = endpoint(&s, &["remove", "xwing"]);
    assert!(removed.status.success(), "{}", stderr(&removed));
    assert_eq!(code(&s, &v4), "000");
    assert_eq!(code(&s, &v6), "000");
    let shown = s.run_in_node(&[weir_tests::weir_bin().to_str().unwrap(), "datapath", "show"]);
    // Its veth is now one of the node's other devices: the netdev programs
    // replace the endpoint ones (TCX names are cut to 15 bytes).
    assert!(!shown.contains("weirv2 ingress weir_from_endpo"), "{shown}");
    assert!(shown.contains("weirv2 ingress weir_from_netde"), "{shown}");
    assert!(shown.contains("weirv0 ingress weir_from_endpo"), "{shown}");
    let listed = text(&endpoint(&s, &["list"]));
    assert!(!listed.lines().any(|l| l.starts_with("xwing")), "{listed}");
}

#[test]
fn endpoints_registered_over_the_api_are_enforced_by_the_nft_fallback_too() {
    let Some(mut s) = Scenario::star_wars("endpoint-api-nft") else {
        return;
    };
    std::fs::write(s.path("endpoints.yaml"), WITHOUT_XWING).unwrap();
    s.start_deathstar(&[]);
    s.start_weir(ALLIANCE_ONLY, &["--steering", "nft"]);
    let v4 = format!("http://{DEATHSTAR4}/");
    // The proxy enforces L3/L4 in this mode: an HTTP client it refuses gets 403.
    assert_eq!(code(&s, &v4), "403");
    let xwing_ns = s.lab.workload("xwing").ns.name().to_string();
    let added = endpoint(
        &s,
        &["add", "--netns", &xwing_ns, "--labels", "org=alliance"],
    );
    assert!(added.status.success(), "{}", stderr(&added));
    assert_eq!(code(&s, &v4), "200");
    assert_eq!(code(&s, &format!("http://[{DEATHSTAR6}]/")), "200");
    let listed = text(&endpoint(&s, &["list"]));
    let name = xwing_ns.as_str();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(name) && l.contains(" api ")),
        "the name defaults to the namespace's: {listed}"
    );
    assert!(endpoint(&s, &["remove", name]).status.success());
    assert_eq!(code(&s, &v4), "403");
}
