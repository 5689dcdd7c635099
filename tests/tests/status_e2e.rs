//! `weir status` against a running weir: the steering mode, each endpoint's
//! interface with the programs the kernel really has there (checked against
//! `bpftool net` for cls_bpf filters, which this bpftool lists and TCX links it
//! does not; `nft list table` on the fallback), `/readyz`, and after a broken
//! SIGHUP reload the error with its file:line:col while the old policy stays
//! in force.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use weir_tests::{DEATHSTAR4, Scenario, lab, text};

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
"#;

/// A policy file whose fourth line does not parse.
const BROKEN: &str =
    "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: rule1}\nspec: [\n";

fn status(s: &Scenario, args: &[&str]) -> Output {
    s.lab
        .node
        .command(weir_tests::weir_bin().to_str().unwrap())
        .arg("status")
        .arg("--api-socket")
        .arg(s.path("weir.sock"))
        .args(args)
        .output()
        .expect("run weir status")
}

fn status_json(s: &Scenario) -> Value {
    let out = status(s, &["-o", "json"]);
    assert!(
        out.status.success(),
        "weir status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text(&out)).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

fn status_text(s: &Scenario) -> String {
    let out = status(s, &[]);
    assert!(
        out.status.success(),
        "weir status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text(&out)
}

/// Breaks the policy file and sends SIGHUP; waits until weir has refused it.
fn broken_reload(s: &mut Scenario) {
    let before = s.weir_log_text().matches("reload failed").count();
    std::fs::write(s.path("policy.yaml"), BROKEN).unwrap();
    let pid = s.weir().pid() as i32;
    lab::send_signal(pid, libc::SIGHUP);
    let ok = lab::wait_until(Duration::from_secs(10), || {
        s.weir_log_text().matches("reload failed").count() > before
    });
    assert!(
        ok.is_ok(),
        "the broken reload was not refused:\n{}",
        s.weir_log_text()
    );
}

/// The last reload failed with a `FILE:4:COL:` error, and nothing changed.
fn assert_refused_reload(s: &Scenario, revision_before: &Value) {
    let v = status_json(s);
    let last = &v["policy"]["last_reload"];
    assert_eq!(last["ok"], false, "{v:#}");
    let file = s.path("policy.yaml").display().to_string();
    let first = last["errors"][0].as_str().unwrap_or_default();
    let at = first
        .strip_prefix(&format!("{file}:"))
        .unwrap_or_else(|| panic!("`{first}` names {file}"));
    let mut parts = at.splitn(3, ':');
    let (line, col) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    assert!(
        line.parse::<u32>().is_ok() && col.parse::<u32>().is_ok(),
        "`{first}` is FILE:LINE:COL: message"
    );
    assert_eq!(&v["policy"]["revision"], revision_before, "no new policy");
    assert_eq!(v["policy"]["failed_reloads"], 1);
    let t = status_text(s);
    assert!(t.contains("Last reload:     FAILED"), "{t}");
    assert!(t.contains(&format!("  {first}")), "{t}");
    // The old policy stays in force: empire in, alliance out.
    let url = format!("http://{DEATHSTAR4}/");
    assert_eq!(s.status("tiefighter", "GET", &url), "200");
    // Dropped in the kernel (000), or refused by the proxy on the nft fallback.
    assert_ne!(s.status("xwing", "GET", &url), "200");
}

#[test]
fn status_on_the_ebpf_datapath_shows_what_is_attached_and_a_refused_reload() {
    let Some(mut s) = Scenario::star_wars("status_ebpf") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, &["--steering", "ebpf"]);
    let url = format!("http://{DEATHSTAR4}/");
    assert_eq!(s.status("tiefighter", "GET", &url), "200");
    assert_eq!(s.status("xwing", "GET", &url), "000");

    // Enforcing, so ready.
    let readyz = s.run_in_node(&[
        "curl",
        "-s",
        "-w",
        " %{http_code}",
        "http://127.0.0.1:9965/readyz",
    ]);
    assert_eq!(readyz, "ready\n 200");

    let v = status_json(&s);
    assert_eq!(v["steering"], "ebpf");
    assert!(
        v["version"]
            .as_str()
            .is_some_and(|x| x.starts_with(env!("CARGO_PKG_VERSION"))),
        "{v:#}"
    );
    assert_eq!(v["policy"]["revision"], 1);
    assert_eq!(v["policy"]["endpoints"], 3);
    assert!(v["policy"]["last_reload"].is_null());
    let ipcache = v["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "weir_ipcache"))
        .unwrap_or_else(|| panic!("no ipcache in {v:#}"));
    assert!(ipcache["entries"].as_u64().is_some_and(|n| n > 0), "{v:#}");
    assert_eq!(ipcache["max_entries"], 65536);
    let endpoints = v["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "weir_endpoints"))
        .unwrap_or_else(|| panic!("no endpoints map in {v:#}"));
    assert_eq!(
        endpoints["entries"], 6,
        "three endpoints, two addresses each"
    );
    assert!(
        v["listeners"].as_array().is_some_and(|l| l
            .iter()
            .any(|l| l["protocol"] == "TCP" && l["port"] == 15001)),
        "{v:#}"
    );

    let text = status_text(&s);
    assert!(text.contains("Steering:        eBPF datapath"), "{text}");
    assert_endpoint_interfaces(&s, &v, false);

    let metrics = |s: &Scenario| s.run_in_node(&["curl", "-s", "http://127.0.0.1:9965/metrics"]);
    // Map fill is brought up to date each second.
    let filled = lab::wait_until(Duration::from_secs(5), || {
        metrics(&s).contains("weir_bpf_map_entries{")
    });
    assert!(filled.is_ok(), "{}", metrics(&s));
    let before = metrics(&s);
    assert!(before.contains("\nweir_policy_revision 1\n"), "{before}");
    assert!(
        before.contains("\nweir_policy_last_reload_success 1\n"),
        "{before}"
    );
    assert!(
        before.contains("\nweir_bpf_map_entries{map=\"weir_endpoints\"} 6\n"),
        "{before}"
    );
    assert!(
        before.contains("\nweir_bpf_map_capacity{map=\"weir_ipcache\"} 65536\n"),
        "{before}"
    );

    broken_reload(&mut s);
    assert_refused_reload(&s, &Value::from(1));
    let after = metrics(&s);
    assert!(after.contains("\nweir_policy_revision 1\n"), "{after}");
    assert!(
        after.contains("\nweir_policy_last_reload_success 0\n"),
        "{after}"
    );
    assert!(
        after.contains("\nweir_policy_reloads_total{result=\"failure\"} 1\n"),
        "{after}"
    );
}

#[test]
fn status_on_the_nft_fallback_shows_the_table_and_a_refused_reload() {
    let Some(mut s) = Scenario::star_wars("status_nft") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, &["--steering", "nft"]);
    let v = status_json(&s);
    assert_eq!(v["steering"], "nft");
    assert!(v["maps"].as_array().is_some_and(Vec::is_empty), "{v:#}");
    // The rules nft lists in weir's table.
    let listed = s.run_in_node(&["nft", "-j", "list", "table", "inet", "weir"]);
    let table: Value = serde_json::from_str(&listed).expect("nft -j");
    let rules = table["nftables"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|o| o.get("rule").is_some()).count());
    assert!(rules > 0, "{listed}");
    assert_eq!(v["nft_rules"], rules, "{v:#}");
    let t = status_text(&s);
    assert!(
        t.contains(&format!("nftables TPROXY (table inet weir, {rules} rules)")),
        "{t}"
    );
    broken_reload(&mut s);
    assert_refused_reload(&s, &Value::from(1));
}

/// Every endpoint's host interface is listed with weir's two programs; with
/// `bpftool`, `bpftool net` (which lists cls_bpf filters, not TCX links in
/// the bpftool this machine has) must agree program for program.
fn assert_endpoint_interfaces(s: &Scenario, v: &Value, bpftool: bool) {
    let tc: Vec<Value> = if bpftool {
        let net: Value = serde_json::from_str(&s.run_in_node(&["bpftool", "-j", "net", "show"]))
            .expect("bpftool -j net show");
        net.as_array()
            .into_iter()
            .flatten()
            .flat_map(|o| o["tc"].as_array().cloned().unwrap_or_default())
            .collect()
    } else {
        Vec::new()
    };
    let text = status_text(s);
    for w in ["deathstar", "tiefighter", "xwing"] {
        let iface = s.lab.workload(w).host_if.clone();
        let shown = v["interfaces"]
            .as_array()
            .and_then(|i| i.iter().find(|i| i["name"] == iface.as_str()))
            .unwrap_or_else(|| panic!("{iface} missing from {v:#}"));
        assert_eq!(shown["role"], "endpoint", "{shown}");
        let progs = shown["programs"].as_array().cloned().unwrap_or_default();
        let has = |dir: &str, name: &str| {
            progs.iter().any(|p| {
                p["direction"] == dir && p["name"].as_str().is_some_and(|n| name.starts_with(n))
            })
        };
        assert!(has("ingress", "weir_from_endpoint"), "{shown}");
        assert!(has("egress", "weir_to_endpoint"), "{shown}");
        if bpftool {
            let kernel: Vec<&Value> = tc
                .iter()
                .filter(|t| t["devname"] == iface.as_str())
                .collect();
            assert_eq!(
                kernel.len(),
                progs.len(),
                "{iface}: bpftool {tc:?} vs {shown}"
            );
            for k in kernel {
                let name = k["name"].as_str().unwrap_or_default();
                let dir = if k["kind"].as_str().unwrap_or_default().contains("ingress") {
                    "ingress"
                } else {
                    "egress"
                };
                assert!(
                    has(dir, name),
                    "{iface}: bpftool has {k} but status {shown}"
                );
            }
        }
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{iface} "))
                    && l.contains("endpoint")
                    && l.contains("ingress weir_from_endpo")),
            "{text}"
        );
    }
}

#[test]
fn status_with_cls_bpf_filters_agrees_with_bpftool() {
    let Some(mut s) = Scenario::star_wars("status_netlink") else {
        return;
    };
    s.start_weir(POLICY, &["--steering", "ebpf", "--tc-attach", "netlink"]);
    let v = status_json(&s);
    assert_eq!(v["steering"], "ebpf");
    assert_endpoint_interfaces(&s, &v, true);
}
