//! `weir policy apply|get|delete|list` against a running weir: an applied
//! policy is enforced at once, listed beside the --policy file's, survives a
//! restart, and goes with `delete`; a name that both the API and a --policy
//! file define is refused (apply and SIGHUP alike) with the file's
//! FILE:LINE:COL while the running policy stays in force.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use weir_tests::{DEATHSTAR4, Scenario, lab, text};

/// The file policy: the empire reaches the deathstar on port 80.
const FILE_POLICY: &str = r#"
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

/// Applied through the API: the alliance may too.
const API_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: alliance
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: alliance}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#;

fn policy(s: &Scenario, args: &[&str]) -> Output {
    s.lab
        .node
        .command(weir_tests::weir_bin().to_str().unwrap())
        .arg("policy")
        .args(args)
        .arg("--api-socket")
        .arg(s.path("weir.sock"))
        .output()
        .expect("run weir policy")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "weir policy failed: {}", stderr(&o));
    text(&o)
}

fn xwing(s: &Scenario) -> String {
    s.status("xwing", "GET", &format!("http://{DEATHSTAR4}/"))
}

#[test]
fn policies_applied_through_the_api_are_enforced_kept_and_never_shadow_a_file() {
    let Some(mut s) = Scenario::star_wars("policy_api") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(FILE_POLICY, &["--steering", "ebpf"]);
    assert_ne!(xwing(&s), "200", "the file policy keeps the alliance out");

    let api_file = s.path("alliance.yaml");
    std::fs::write(&api_file, API_POLICY).unwrap();
    let applied = ok(policy(&s, &["apply", "-f", api_file.to_str().unwrap()]));
    assert!(applied.contains("applied policy alliance"), "{applied}");
    assert!(applied.contains("policy revision 2"), "{applied}");
    assert_eq!(xwing(&s), "200", "enforced at once");

    let listed = ok(policy(&s, &["list"]));
    let file = s.path("policy.yaml").display().to_string();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("rule1 ") && l.contains(&format!("{file}:"))),
        "{listed}"
    );
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("alliance ") && l.contains(" api ")),
        "{listed}"
    );
    let got: Value = serde_json::from_str(&ok(policy(&s, &["get", "alliance", "-o", "json"])))
        .expect("get -o json");
    assert_eq!(got[0]["policy"]["metadata"]["name"], "alliance");
    assert_eq!(got[0]["source"], "api");
    let yaml = ok(policy(&s, &["get", "alliance"]));
    assert!(yaml.contains(API_POLICY), "{yaml}");
    let missing = policy(&s, &["get", "nope"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("no policy named `nope`"),
        "{}",
        stderr(&missing)
    );

    // A name the file has: refused with the file's position; nothing changes.
    let clash = s.path("clash.yaml");
    std::fs::write(
        &clash,
        FILE_POLICY.replace("org: empire}}]", "org: alliance}}]"),
    )
    .unwrap();
    let refused = policy(&s, &["apply", "-f", clash.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains(&format!("{file}:4:")),
        "{}",
        stderr(&refused)
    );
    assert!(
        stderr(&refused).contains("applied through the API"),
        "{}",
        stderr(&refused)
    );
    // A broken document: INVALID_ARGUMENT with its own FILE:LINE:COL.
    let broken = s.path("broken.yaml");
    std::fs::write(&broken, API_POLICY.replace("ingress:", "ingres:")).unwrap();
    let bad = policy(&s, &["apply", "-f", broken.to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains(&format!("{}:7:", broken.display())),
        "{}",
        stderr(&bad)
    );
    assert_eq!(xwing(&s), "200", "the running policy is kept");

    // The same clash brought in by SIGHUP: refused, shown by status.
    std::fs::write(
        s.path("policy.yaml"),
        format!("{FILE_POLICY}---\n{API_POLICY}"),
    )
    .unwrap();
    let before = s.weir_log_text().matches("reload failed").count();
    lab::send_signal(s.weir().pid() as i32, libc::SIGHUP);
    let refused = lab::wait_until(Duration::from_secs(10), || {
        s.weir_log_text().matches("reload failed").count() > before
    });
    assert!(refused.is_ok(), "{}", s.weir_log_text());
    let st = s
        .lab
        .node
        .command(weir_tests::weir_bin().to_str().unwrap())
        .args(["status", "-o", "json", "--api-socket"])
        .arg(s.path("weir.sock"))
        .output()
        .unwrap();
    let st: Value = serde_json::from_str(&text(&st)).expect("status json");
    let err = st["policy"]["last_reload"]["errors"][0]
        .as_str()
        .unwrap_or_default();
    assert!(err.starts_with(&format!("{file}:")), "{st:#}");
    assert!(err.contains("applied through the API"), "{err}");
    assert_eq!(xwing(&s), "200");

    // Kept across a restart.
    let stopped = s.weir().stop_with(libc::SIGTERM, Duration::from_secs(10));
    assert!(
        stopped.is_some_and(|st| st.success()),
        "{}",
        s.weir_log_text()
    );
    s.lab.processes.retain(|p| p.name != "weir");
    s.start_weir(FILE_POLICY, &["--steering", "ebpf"]);
    assert_eq!(xwing(&s), "200", "the applied policy survives a restart");

    // Deleted: the alliance is out again, and a file policy cannot be deleted.
    let file_del = policy(&s, &["delete", "rule1"]);
    assert!(!file_del.status.success());
    assert!(
        stderr(&file_del).contains("remove it there"),
        "{}",
        stderr(&file_del)
    );
    let deleted = ok(policy(&s, &["delete", "alliance"]));
    assert!(deleted.contains("deleted policy alliance"), "{deleted}");
    assert_ne!(xwing(&s), "200");
    let listed = ok(policy(&s, &["list"]));
    assert!(!listed.contains("alliance"), "{listed}");
}
