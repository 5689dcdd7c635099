//! `contrib/weir.service`: systemd accepts it (`systemd-analyze verify`), and
//! weir enforces on the eBPF datapath with exactly the capabilities the unit
//! leaves it (the bounding set, applied with `setpriv`), not full root.

use std::process::Command;

use weir_tests::{DEATHSTAR4, Scenario, ScratchDir, repo_root, text, weir_bin};

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
"#;

fn unit() -> String {
    std::fs::read_to_string(repo_root().join("contrib/weir.service")).expect("contrib/weir.service")
}

/// The unit's `CapabilityBoundingSet=` as setpriv spells it (`net_admin`, ...).
fn unit_capabilities() -> Vec<String> {
    let unit = unit();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds the capabilities");
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_unit_file_verifies() {
    let unit = unit();
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(!unit.contains("AmbientCapabilities"), "root's uid, bounded");
    if !have("systemd-analyze") {
        eprintln!("*** systemd-analyze missing: only the text was checked");
        return;
    }
    // verify checks that ExecStart's binary exists (point it at this build)
    // and that the Documentation= page does (the page `weir man` writes).
    let dir = ScratchDir::new("unit");
    let man1 = dir.0.join("man/man1");
    let made = Command::new(weir_bin())
        .args(["man", "--dir"])
        .arg(&man1)
        .status()
        .unwrap();
    assert!(made.success());
    let path = dir.0.join("weir.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/weir", weir_bin().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("MANPATH", dir.0.join("man"))
        .output()
        .expect("run systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    // Outside a booted systemd (a container, CI) verify still parses the unit
    // and reports what is wrong with it; only lines naming our file count.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("weir.service")).collect();
    assert!(ours.is_empty(), "systemd-analyze verify:\n{err}");
}

#[test]
fn weir_enforces_with_only_the_units_capabilities() {
    let Some(mut s) = Scenario::star_wars("caps") else {
        return;
    };
    let caps = match std::env::var("WEIR_TEST_CAPS") {
        Ok(c) => c.split(',').map(str::to_string).collect(),
        Err(_) => unit_capabilities(),
    };
    let bounding = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    s.start_deathstar(&[]);
    s.start_weir_wrapped(
        POLICY,
        &["--steering", "ebpf"],
        &["setpriv", "--bounding-set", &bounding, "--inh-caps", "-all"],
    );
    // It really runs with that set, nothing more.
    let pid = s.weir().pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let bit = |name: &str| match name {
        "net_admin" => 12,
        "net_raw" => 13,
        "sys_admin" => 21,
        "perfmon" => 38,
        "bpf" => 39,
        "dac_override" => 1,
        other => panic!("unknown capability {other}"),
    };
    let want: u64 = caps.iter().map(|c| 1u64 << bit(c)).sum();
    assert_eq!(eff, want, "CapEff of weir");

    let landing = format!("http://{DEATHSTAR4}/v1/request-landing");
    let exhaust = format!("http://{DEATHSTAR4}/v1/exhaust-port");
    assert_eq!(s.status("tiefighter", "POST", &landing), "200");
    assert_eq!(s.status("tiefighter", "PUT", &exhaust), "403");
    // Dropped in the kernel: the xwing's SYN is never answered.
    assert_eq!(s.status("xwing", "POST", &landing), "000");
    let st = s
        .lab
        .node
        .command(weir_bin().to_str().unwrap())
        .arg("status")
        .arg("--api-socket")
        .arg(s.path("weir.sock"))
        .output()
        .unwrap();
    let st = text(&st);
    assert!(st.contains("eBPF datapath"), "{st}");
    assert!(
        st.contains("weir_from_endpo"),
        "attached programs listed:\n{st}"
    );
    let log = s.weir_log_text();
    assert!(!log.contains("ERROR"), "{log}");
}
