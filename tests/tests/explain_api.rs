//! `weir policy explain` without `--policy` asks the running weir
//! (`Policy.Explain`): the answer is the offline one's, word for word, it
//! follows the policy in force (a change applied through the API shows at
//! once), and it agrees with what real curl requests get.

use std::process::Output;

use serde_json::Value;
use weir_tests::{DEATHSTAR4, Scenario, text};

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules:
        http:
        - {method: POST, path: /v1/request-landing, headers: ['X-Has-Force']}
";

/// Applied through the API later: the xwing may ask for the API root.
const XWING: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xwing-visits}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: alliance}}]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules:
        http:
        - {method: GET, path: /}
";

fn weir(s: &Scenario, args: &[&str]) -> Output {
    s.lab
        .node
        .command(weir_tests::weir_bin().to_str().unwrap())
        .args(args)
        .output()
        .expect("run weir")
}

/// `weir policy explain ARGS` against the running weir: (exit code, stdout).
fn explain(s: &Scenario, args: &[&str]) -> (i32, String) {
    let sock = s.path("weir.sock");
    let mut all = vec!["policy", "explain", "--api-socket", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    let o = weir(s, &all);
    (o.status.code().unwrap_or(-1), text(&o))
}

/// The same question answered offline from the files weir runs with.
fn explain_offline(s: &Scenario, args: &[&str]) -> (i32, String) {
    let (p, e) = (s.path("policy.yaml"), s.path("endpoints.yaml"));
    let mut all = vec![
        "policy",
        "explain",
        "--policy",
        p.to_str().unwrap(),
        "--endpoints",
        e.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let o = weir(s, &all);
    (o.status.code().unwrap_or(-1), text(&o))
}

#[test]
fn explain_over_the_api_answers_for_the_running_policy_as_curl_finds() {
    let Some(mut s) = Scenario::star_wars("explain_api") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, &["--steering", "ebpf"]);
    let landing = format!("http://{DEATHSTAR4}/v1/request-landing");
    let root = format!("http://{DEATHSTAR4}/");
    let to = ["--to", "deathstar", "--port", "80"];
    let q = |from: &'static str, extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = vec!["--from", from];
        v.extend_from_slice(&to);
        v.extend_from_slice(extra);
        v
    };

    // Allowed HTTP: explain says so with the deciding rule; curl gets 200.
    let allowed = q(
        "tiefighter",
        &[
            "--http",
            "POST /v1/request-landing",
            "--header",
            "X-Has-Force: yes",
        ],
    );
    assert_eq!(
        explain(&s, &allowed),
        (
            0,
            "ALLOWED\nrule1 spec.ingress[0].toPorts[0].rules.http[0]\n".into()
        )
    );
    assert_eq!(explain(&s, &allowed), explain_offline(&s, &allowed));
    let code = text(&s.curl(
        "tiefighter",
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            "X-Has-Force: yes",
            &landing,
        ],
    ));
    assert_eq!(code, "200");

    // Denied HTTP: the same request without the header; curl gets 403.
    let denied = q("tiefighter", &["--http", "POST /v1/request-landing"]);
    assert_eq!(
        explain(&s, &denied),
        (1, "DENIED\nno rule matched (ingress, HTTP)\n".into())
    );
    assert_eq!(explain(&s, &denied), explain_offline(&s, &denied));
    assert_eq!(s.status("tiefighter", "POST", &landing), "403");

    // L3/L4: the xwing may not reach port 80 at all; its SYN is dropped in
    // the kernel (curl: 000).
    let l4 = q("xwing", &[]);
    let l4_text = "DENIED\nno rule matched (ingress, L3/L4)\n(denied at L3/L4: the peer may not reach this port at all)\n";
    assert_eq!(explain(&s, &l4), (1, l4_text.into()));
    assert_eq!(explain(&s, &l4), explain_offline(&s, &l4));
    assert_eq!(s.status("xwing", "GET", &root), "000");

    // JSON: the same facts as offline.
    let json = |o: (i32, String)| -> Value {
        serde_json::from_str(&o.1).unwrap_or_else(|e| panic!("{e}: {}", o.1))
    };
    let mut dj = denied.clone();
    dj.extend_from_slice(&["-o", "json"]);
    let (api, off) = (json(explain(&s, &dj)), json(explain_offline(&s, &dj)));
    assert_eq!(api["verdict"], "DENIED");
    assert_eq!(api["layer"], "HTTP");
    assert_eq!(api, off);

    // The running policy changes (through the API): explain follows at once,
    // while the offline answer from the file alone does not know it.
    std::fs::write(s.path("xwing.yaml"), XWING).unwrap();
    let sock = s.path("weir.sock");
    let applied = weir(
        &s,
        &[
            "policy",
            "apply",
            "-f",
            s.path("xwing.yaml").to_str().unwrap(),
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    assert!(applied.status.success(), "{applied:?}");
    let visit = q("xwing", &["--http", "GET /"]);
    assert_eq!(
        explain(&s, &visit),
        (
            0,
            "ALLOWED\nxwing-visits spec.ingress[0].toPorts[0].rules.http[0]\n".into()
        )
    );
    assert_eq!(explain_offline(&s, &visit).0, 1, "the file alone denies it");
    assert_eq!(s.status("xwing", "GET", &root), "200");
    let other = q("xwing", &["--http", "GET /v1/request-landing"]);
    assert_eq!(explain(&s, &other).0, 1);
    assert_eq!(s.status("xwing", "GET", &landing), "403");

    // A question that cannot be decided: exit 2 with the reason.
    let o = weir(
        &s,
        &[
            "policy",
            "explain",
            "--api-socket",
            sock.to_str().unwrap(),
            "--from",
            "probe-droid",
            "--to",
            "deathstar",
            "--port",
            "80",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no endpoint named `probe-droid`"),
        "{o:?}"
    );
}
