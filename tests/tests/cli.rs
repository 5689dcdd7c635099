//! The CLI contract other tests and users rely on: `weir policy validate`,
//! `weir policy explain`, `--version` and `completions` (no root needed).

use std::path::Path;
use std::process::Command;

use weir_tests::{ENDPOINTS, ScratchDir, weir_cli};

const SW: &str = "apiVersion: cilium.io/v2
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

fn out(o: &std::process::Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn validate_accepts_files_and_directories() {
    let d = ScratchDir::new("validate-ok");
    std::fs::write(d.0.join("a.yaml"), SW).unwrap();
    std::fs::write(d.0.join("b.yml"), SW.replace("rule1", "rule2")).unwrap();
    std::fs::write(d.0.join("notes.txt"), "not a policy").unwrap();
    let (code, stdout, _) = out(&weir_cli(&["policy", "validate", d.0.to_str().unwrap()]));
    assert_eq!(code, 0);
    assert_eq!(stdout, "2 policies valid\n");
}

#[test]
fn validate_prints_one_line_per_error_with_position() {
    let d = ScratchDir::new("validate-bad");
    let bad = d.0.join("bad.yaml");
    std::fs::write(
        &bad,
        SW.replace("/v1/request-landing", "/v1/(oops")
            .replace("port: '80'", "port: '99999'")
            + "  egress:\n  - toRequires: [{}]\n",
    )
    .unwrap();
    let (code, stdout, stderr) = out(&weir_cli(&[
        "policy",
        "validate",
        bad.to_str().unwrap(),
        d.0.join("missing.yaml").to_str().unwrap(),
    ]));
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    let f = bad.display();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!("{f}:9:22: port 99999 is out of range (0-65535)"),
            format!("{f}:12:32: invalid path regex `/v1/(oops`: error: unclosed group"),
            format!("{f}:14:5: field `toRequires` in egress rule is not supported by weir yet"),
            format!(
                "{}:1:1: cannot read: No such file or directory (os error 2)",
                d.0.join("missing.yaml").display()
            ),
        ]
    );
}

/// `weir policy explain --policy P --endpoints E --from FROM --to TO --port PORT`
/// and `extra`: its exit code, stdout and stderr.
fn explain_files(
    p: &Path,
    e: &Path,
    (from, to, port): (&str, &str, &str),
    extra: &[&str],
) -> (i32, String, String) {
    let mut a = vec![
        "policy",
        "explain",
        "--policy",
        p.to_str().unwrap(),
        "--endpoints",
        e.to_str().unwrap(),
        "--from",
        from,
        "--to",
        to,
        "--port",
        port,
    ];
    a.extend_from_slice(extra);
    out(&weir_cli(&a))
}

fn explain(d: &ScratchDir, args: &[&str]) -> (i32, String, String) {
    let p = d.0.join("p.yaml");
    let e = d.0.join("e.yaml");
    std::fs::write(&p, SW).unwrap();
    std::fs::write(&e, ENDPOINTS).unwrap();
    let mut all = vec!["policy", "explain", "--policy", p.to_str().unwrap()];
    if !args.contains(&"--endpoints") {
        all.extend_from_slice(&["--endpoints", e.to_str().unwrap()]);
    }
    all.extend_from_slice(args);
    out(&weir_cli(&all))
}

#[test]
fn explain_names_the_deciding_rule() {
    let d = ScratchDir::new("explain");
    let base = ["--from", "tiefighter", "--to", "deathstar", "--port", "80"];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        explain(&d, &a)
    };
    assert_eq!(
        with(&[
            "--http",
            "POST /v1/request-landing",
            "--header",
            "X-Has-Force: yes"
        ]),
        (
            0,
            "ALLOWED\nrule1 spec.ingress[0].toPorts[0].rules.http[0]\n".into(),
            String::new()
        )
    );
    assert_eq!(
        with(&["--http", "POST /v1/request-landing"]),
        (
            1,
            "DENIED\nno rule matched (ingress, HTTP)\n".into(),
            String::new()
        )
    );
    assert_eq!(
        with(&[
            "--http",
            "POST /v1/x/../request-landing",
            "--header",
            "X-Has-Force: 1"
        ])
        .1,
        "DENIED\nthe proxy answers 400 before policy: path: path \"/v1/x/../request-landing\" is not in normal form (normalised: \"/v1/request-landing\")\n"
    );
    let (code, stdout, _) = explain(
        &d,
        &["--from", "xwing", "--to", "deathstar", "--port", "80"],
    );
    assert_eq!(code, 1);
    assert_eq!(
        stdout,
        "DENIED\nno rule matched (ingress, L3/L4)\n(denied at L3/L4: the peer may not reach this port at all)\n"
    );
    // Nothing selects the xwing: default allow, and the explanation says so.
    let (_, stdout, _) = explain(
        &d,
        &["--from", "deathstar", "--to", "xwing", "--port", "22"],
    );
    assert_eq!(
        stdout,
        "ALLOWED\nno policy selects these endpoints (default allow)\n"
    );
    // An unknown IP is `world`.
    let (_, stdout, _) = explain(
        &d,
        &["--from", "192.0.2.1", "--to", "deathstar", "--port", "80"],
    );
    assert!(stdout.starts_with("DENIED\n"));
    // Ping: only a rule without toPorts could allow it.
    let (_, stdout, _) = explain(
        &d,
        &[
            "--from",
            "tiefighter",
            "--to",
            "deathstar",
            "--proto",
            "ICMP",
            "--port",
            "0",
        ],
    );
    assert!(
        stdout.starts_with("DENIED\nno rule matched (ingress, L3/L4)"),
        "{stdout}"
    );
}

#[test]
fn explain_allows_an_upgrade_only_by_a_rule_naming_it() {
    let d = ScratchDir::new("explain-upgrade");
    let p = d.0.join("p.yaml");
    let e = d.0.join("e.yaml");
    let rules = "- {method: GET, path: /public/.*}\n        \
                 - {method: GET, path: /ws, headers: ['Upgrade: websocket']}";
    std::fs::write(
        &p,
        SW.replace(
            "- {method: POST, path: /v1/request-landing, headers: ['X-Has-Force']}",
            rules,
        ),
    )
    .unwrap();
    std::fs::write(&e, ENDPOINTS).unwrap();
    let ask = |req: &str, upgrade: Option<&str>| {
        let mut a = vec!["--http", req];
        let up = upgrade.map(|u| format!("Upgrade: {u}"));
        if let Some(u) = &up {
            a.extend_from_slice(&["--header", "Connection: Upgrade", "--header", u]);
        }
        explain_files(&p, &e, ("tiefighter", "deathstar", "80"), &a).1
    };
    let rule = |i: u32| format!("ALLOWED\nrule1 spec.ingress[0].toPorts[0].rules.http[{i}]\n");
    let denied = "DENIED\nno rule matched (ingress, HTTP)\n";
    assert_eq!(ask("GET /public/x", None), rule(0));
    // The GET rule names no `Upgrade`: it opens no tunnel.
    assert_eq!(ask("GET /public/x", Some("websocket")), denied);
    assert_eq!(ask("GET /ws", Some("websocket")), rule(1));
    assert_eq!(ask("GET /ws", Some("chat")), denied);
    assert_eq!(ask("GET /ws", None), denied);
    // h2c is no switch: its `Upgrade` line goes before the check.
    assert_eq!(ask("GET /public/x", Some("h2c-14")), rule(0));
}

#[test]
fn explain_on_an_l7_port_lists_the_http_rules_and_knows_named_ports() {
    let d = ScratchDir::new("explain-l7");
    let e = d.0.join("named.yaml");
    std::fs::write(
        &e,
        ENDPOINTS.replace(
            "labels: {org: empire, class: deathstar}",
            "labels: {org: empire, class: deathstar}\n    ports: {http: 80}",
        ),
    )
    .unwrap();
    let e = e.to_str().unwrap();
    let run = |port: &str, extra: &[&str]| {
        let mut a = vec![
            "--endpoints",
            e,
            "--from",
            "tiefighter",
            "--to",
            "deathstar",
            "--port",
            port,
        ];
        a.extend_from_slice(extra);
        explain(&d, &a)
    };
    // A policy selects the deathstar: not "default allow", but L3/L4 allowed
    // with the HTTP rules every request must match.
    let expected = "ALLOWED\nL3/L4 allowed; HTTP rules apply (each request must match one of them; decide one with --http):\n  ingress: rule1 spec.ingress[0].toPorts[0].rules.http[0]: method POST, path /v1/request-landing, header x-has-force present\n";
    assert_eq!(run("80", &[]), (0, expected.into(), String::new()));
    // The named port is the deathstar's port 80.
    assert_eq!(run("http", &[]), (0, expected.into(), String::new()));
    let (code, _, stderr) = run("grpc", &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("endpoint `deathstar` has no port named `grpc` (its named ports: http)"),
        "{stderr}"
    );
    // JSON: the same facts, and the exit status still says the verdict.
    let (code, stdout, _) = run(
        "http",
        &["-o", "json", "--http", "POST /v1/request-landing"],
    );
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["verdict"], "DENIED");
    assert_eq!(v["layer"], "HTTP");
    assert_eq!(v["denied_in"], "ingress");
    assert_eq!(v["port"], 80);
    assert_eq!(v["source"]["endpoint"], "tiefighter");
    assert_eq!(v["destination"]["endpoint"], "deathstar");
    let (code, stdout, _) = run("80", &["-o", "json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["verdict"], "ALLOWED");
    assert_eq!(
        v["http_rules"][0]["rule"],
        "spec.ingress[0].toPorts[0].rules.http[0]"
    );
    assert_eq!(v["http_rules"][0]["matches"][0], "method POST");
}

#[test]
fn explain_bad_arguments_exit_2() {
    let d = ScratchDir::new("explain-bad");
    let (code, _, stderr) = explain(
        &d,
        &["--from", "nobody", "--to", "deathstar", "--port", "80"],
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("no endpoint named `nobody`"), "{stderr}");
    assert_eq!(
        explain(
            &d,
            &["--from", "xwing", "--to", "deathstar", "--port", "http"]
        )
        .0,
        2
    );
    assert_eq!(
        explain(
            &d,
            &[
                "--from",
                "xwing",
                "--to",
                "deathstar",
                "--port",
                "80",
                "--http",
                "POST"
            ]
        )
        .0,
        2
    );
    assert_eq!(
        explain(
            &d,
            &[
                "--from",
                "xwing",
                "--to",
                "deathstar",
                "--port",
                "80",
                "--proto",
                "SCTP"
            ]
        )
        .0,
        2
    );
}

#[test]
fn allow_localhost_policy_is_refused_where_the_host_cannot_be_policed() {
    let d = ScratchDir::new("localhost-nft");
    std::fs::write(d.0.join("p.yaml"), "").unwrap();
    let (code, _, stderr) = out(&weir_cli(&[
        "run",
        "--policy",
        d.0.join("p.yaml").to_str().unwrap(),
        "--steering",
        "nft",
        "--allow-localhost",
        "policy",
        "--state-dir",
        d.0.join("state").to_str().unwrap(),
    ]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("needs the eBPF datapath"), "{stderr}");
}

#[path = "../../policy-engine/tests/cilium_table/mod.rs"]
mod cilium_table;

/// Every row of Cilium's semantics table (namespaces, entities,
/// enableDefaultDeny, toServices), decided by `weir policy explain` with the
/// cluster flags `weir run` takes: the CLI shows the decision the engine makes.
#[test]
fn explain_shows_every_row_of_the_cilium_table() {
    let d = ScratchDir::new("explain-cilium");
    let e = d.0.join("e.yaml");
    std::fs::write(&e, cilium_table::ENDPOINTS).unwrap();
    let mut failures = Vec::new();
    for (i, row) in cilium_table::ROWS.iter().enumerate() {
        let p = d.0.join(format!("p{i}.yaml"));
        std::fs::write(&p, row.policy).unwrap();
        let port = row.port.to_string();
        let (code, stdout, stderr) = explain_files(
            &p,
            &e,
            (row.from, row.to, &port),
            cilium_table::CLUSTER_ARGS,
        );
        let want = format!(
            "{}\n{}\n",
            if row.allowed { "ALLOWED" } else { "DENIED" },
            row.reason
        );
        // Exit 0 ALLOWED, 1 DENIED.
        if code != i32::from(!row.allowed) || !stdout.starts_with(&want) {
            failures.push(format!(
                "{} ({} -> {}:{}): exit {code}, got {stdout:?} {stderr:?}, want {want:?}",
                row.what, row.from, row.to, row.port
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What weir refuses of what Cilium accepts: explain exits 2 (could not decide;
/// validate and run fail too) with the field and its `file:line:col`.
#[test]
fn explain_refuses_what_the_cilium_table_refuses() {
    let d = ScratchDir::new("explain-refusals");
    let e = d.0.join("e.yaml");
    std::fs::write(&e, cilium_table::ENDPOINTS).unwrap();
    let p = d.0.join("p.yaml");
    for r in cilium_table::REFUSALS {
        std::fs::write(&p, r.policy).unwrap();
        let (code, stdout, stderr) =
            explain_files(&p, &e, ("prod-frontend", "prod-api", "80"), &[]);
        assert_eq!(code, 2, "{}: {stdout}", r.what);
        let want = r.error.replacen("p.yaml", p.to_str().unwrap(), 1);
        assert_eq!(stderr.trim_end(), want, "{}", r.what);
    }
}

const DNS_POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn}
spec:
  endpointSelector: {matchLabels: {class: xwing}}
  egress:
  - toEndpoints: [{matchLabels: {k8s-app: kube-dns}}]
    toPorts:
    - ports: [{port: '53', protocol: ANY}]
      rules:
        dns:
        - matchName: api.github.com
        - matchPattern: '*.example.com'
  - toFQDNs: [{matchPattern: '*.example.com'}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
";

const DNS_ENDPOINTS: &str = "endpoints:
  - {name: xwing, ips: [10.200.0.30], labels: {org: alliance, class: xwing}}
  - {name: kube-dns, ips: [10.200.0.53], labels: {k8s-app: kube-dns}}
";

#[test]
fn explain_dns_decides_a_query_and_names_the_rule() {
    let d = ScratchDir::new("explain-dns");
    let p = d.0.join("p.yaml");
    let e = d.0.join("e.yaml");
    std::fs::write(&p, DNS_POLICY).unwrap();
    std::fs::write(&e, DNS_ENDPOINTS).unwrap();
    let run = |extra: &[&str]| explain_files(&p, &e, ("xwing", "kube-dns", "53"), extra);
    for proto in ["UDP", "TCP"] {
        let (code, stdout, _) = run(&["--proto", proto, "--dns", "API.GitHub.com"]);
        assert_eq!(
            (code, stdout.as_str()),
            (0, "ALLOWED\nfqdn spec.egress[0].toPorts[0].rules.dns[0]\n"),
            "{proto}"
        );
        let (code, stdout, _) = run(&["--proto", proto, "--dns", "www.example.com."]);
        assert_eq!(
            (code, stdout.as_str()),
            (0, "ALLOWED\nfqdn spec.egress[0].toPorts[0].rules.dns[1]\n")
        );
        let (code, stdout, _) = run(&["--proto", proto, "--dns", "a.b.example.com"]);
        assert_eq!(
            (code, stdout.as_str()),
            (1, "DENIED\nno rule matched (egress, DNS)\n")
        );
    }
    // Without a query: the DNS rules each query must match.
    let (code, stdout, _) = run(&["--proto", "UDP"]);
    assert_eq!(code, 0);
    assert_eq!(
        stdout,
        "ALLOWED\nL3/L4 allowed; DNS rules apply (each query must match one of them; decide one with --dns):
  egress: fqdn spec.egress[0].toPorts[0].rules.dns[0]: matchName: api.github.com
  egress: fqdn spec.egress[0].toPorts[0].rules.dns[1]: matchPattern: *.example.com
"
    );
    // JSON.
    let (code, stdout, _) = run(&["--proto", "UDP", "--dns", "nope.org", "-o", "json"]);
    assert_eq!(code, 1);
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["verdict"], "DENIED");
    assert_eq!(j["layer"], "DNS");
    assert_eq!(j["dns_query"], "nope.org.");
    assert_eq!(j["denied_in"], "egress");
    // toFQDNs: nothing learned offline, so denied (fail closed), with a note.
    let (code, stdout, stderr) = explain_files(&p, &e, ("xwing", "93.184.216.34", "443"), &[]);
    assert_eq!(code, 1);
    assert!(stdout.starts_with("DENIED\n"), "{stdout}");
    assert!(stderr.contains("toFQDNs rules allow only addresses the DNS proxy has learned"));
    // --dns with --http is a usage error.
    let (code, _, _) = run(&["--dns", "a.com", "--http", "GET /"]);
    assert_eq!(code, 2);
}

const KAFKA_POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: empire-hq}}]
    toPorts:
    - ports: [{port: '9092', protocol: TCP}]
      rules:
        kafka:
        - role: produce
          topic: deathstar-plans
        - apiKey: metadata
          topic: empire-announce
        - apiKey: '19'
          clientID: admin
";

const KAFKA_ENDPOINTS: &str = "endpoints:
  - {name: kafka, ips: [10.200.0.90], labels: {app: kafka}}
  - {name: empire-hq, ips: [10.200.0.91], labels: {app: empire-hq}}
";

#[test]
fn explain_kafka_decides_a_request_and_names_the_rules() {
    let d = ScratchDir::new("explain-kafka");
    let p = d.0.join("p.yaml");
    let e = d.0.join("e.yaml");
    std::fs::write(&p, KAFKA_POLICY).unwrap();
    std::fs::write(&e, KAFKA_ENDPOINTS).unwrap();
    let run = |extra: &[&str]| explain_files(&p, &e, ("empire-hq", "kafka", "9092"), extra);
    let r = |i: usize| format!("kafka spec.ingress[0].toPorts[0].rules.kafka[{i}]");
    let rows: Vec<(&str, i32, String)> = vec![
        ("produce:9:hq:deathstar-plans", 0, format!("ALLOWED\n{}\n", r(0))),
        ("0:13::deathstar-plans", 0, format!("ALLOWED\n{}\n", r(0))),
        (
            "produce:9:hq:empire-announce",
            1,
            "DENIED\nno rule matched (ingress, Kafka): topic `empire-announce` is allowed by no rule\n".into(),
        ),
        // Metadata naming two topics, each allowed by another rule.
        (
            "metadata:12::deathstar-plans,empire-announce",
            0,
            format!("ALLOWED\n{}; {}\n", r(0), r(1)),
        ),
        ("metadata:12::", 0, format!("ALLOWED\n{}\n", r(0))),
        ("apiversions:3:hq:", 0, format!("ALLOWED\n{}\n", r(0))),
        ("createtopics:7:admin:anything", 0, format!("ALLOWED\n{}\n", r(2))),
        (
            "createtopics:7:hq:anything",
            1,
            "DENIED\nno rule matched (ingress, Kafka): no Kafka rule matches API key, version and client id\n".into(),
        ),
    ];
    for (req, code, want) in rows {
        let (c, stdout, stderr) = run(&["--kafka", req]);
        assert_eq!(
            (c, stdout.as_str()),
            (code, want.as_str()),
            "{req}: {stderr}"
        );
    }
    // Without a request: the rules each request must be allowed by.
    let (code, stdout, _) = run(&[]);
    assert_eq!(code, 0);
    assert_eq!(
        stdout,
        "ALLOWED\nL3/L4 allowed; Kafka rules apply (each request must match one of them; decide one with --kafka):
  ingress: kafka spec.ingress[0].toPorts[0].rules.kafka[0]: apiKey produce|metadata|apiversions|initproducerid, topic deathstar-plans
  ingress: kafka spec.ingress[0].toPorts[0].rules.kafka[1]: apiKey metadata, topic empire-announce
  ingress: kafka spec.ingress[0].toPorts[0].rules.kafka[2]: apiKey createtopics, clientID admin
"
    );
    let (code, stdout, _) = run(&["--kafka", "fetch:12:c:x", "-o", "json"]);
    assert_eq!(code, 1);
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["verdict"], "DENIED");
    assert_eq!(j["layer"], "Kafka");
    assert_eq!(j["kafka_request"], "fetch:12:c:x");
    // Usage errors.
    for bad in ["produce", "nosuchapi:1::", "produce:x::t"] {
        let (code, _, stderr) = run(&["--kafka", bad]);
        assert_eq!(code, 2, "{bad}: {stderr}");
    }
    let (code, _, _) = run(&["--kafka", "produce:9::t", "--dns", "a.com"]);
    assert_eq!(code, 2);
}

#[test]
fn validate_warns_when_no_dns_rule_lets_fqdn_names_be_learned() {
    let d = ScratchDir::new("validate-fqdn");
    let ok = d.0.join("ok.yaml");
    std::fs::write(&ok, DNS_POLICY).unwrap();
    let (code, stdout, stderr) = out(&weir_cli(&["policy", "validate", ok.to_str().unwrap()]));
    assert_eq!(
        (code, stdout.as_str(), stderr.as_str()),
        (0, "1 policies valid\n", "")
    );

    // The DNS rules do not allow the toFQDNs name: a warning, exit status 0.
    let other_name = d.0.join("name.yaml");
    std::fs::write(
        &other_name,
        DNS_POLICY.replace(
            "matchPattern: '*.example.com'}]",
            "matchName: api.other.io}]",
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = out(&weir_cli(&[
        "policy",
        "validate",
        other_name.to_str().unwrap(),
    ]));
    assert_eq!((code, stdout.as_str()), (0, "1 policies valid\n"));
    assert_eq!(
        stderr,
        format!(
            "warning: {}: fqdn spec.egress[1].toFQDNs[0] (matchName: api.other.io): no egress DNS rule on port 53 for the same endpoints allows this name, so its addresses are never learned and the rule allows nothing\n",
            other_name.display()
        )
    );

    // No DNS rule at all (a plain L4 allow on 53 is not inspected).
    let no_dns = d.0.join("nodns.yaml");
    std::fs::write(
        &no_dns,
        DNS_POLICY.replace(
            "      rules:\n        dns:\n        - matchName: api.github.com\n        - matchPattern: '*.example.com'\n",
            "",
        ),
    )
    .unwrap();
    let (code, _, stderr) = out(&weir_cli(&["policy", "validate", no_dns.to_str().unwrap()]));
    assert_eq!(code, 0);
    assert!(
        stderr.starts_with("warning: ") && stderr.contains("toFQDNs[0]"),
        "{stderr}"
    );
}

#[test]
fn version_carries_the_crate_version_and_completions_know_the_commands() {
    let (code, stdout, _) = out(&weir_cli(&["--version"]));
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with(&format!("weir {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    // `weir 0.1.0 (git 0123456789ab, built 2026-11-22)`: the revision and
    // the build date (a checkout always has a revision).
    let rev = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(weir_tests::repo_root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = stdout
        .split("built ")
        .nth(1)
        .and_then(|d| d.strip_suffix(")\n"))
        .unwrap_or("");
    assert!(
        date.len() == 10 && date.as_bytes()[4] == b'-' && date.starts_with("20"),
        "{stdout}"
    );
    if !rev.is_empty() {
        assert!(stdout.contains(&format!("(git {rev}, built ")), "{stdout}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let (code, script, err) = out(&weir_cli(&["completions", shell]));
        assert_eq!(code, 0, "{err}");
        for word in ["status", "observe", "apply", "api-allow-uid"] {
            assert!(script.contains(word), "{shell}: `{word}` missing");
        }
    }
}

/// `weir man` renders: groff reads it without a warning, and `man -l` shows
/// the sections and the flags; `--dir` writes a page per command.
#[test]
fn man_page_renders() {
    let (code, page, err) = out(&weir_cli(&["man"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        page.starts_with(".ie") || page.contains("\n.TH weir 1"),
        "{page}"
    );
    let dir = ScratchDir::new("man");
    let file = dir.0.join("weir.1");
    std::fs::write(&file, &page).unwrap();
    let tool = |name: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if tool("groff") {
        let g = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(g.status.success());
        assert_eq!(String::from_utf8_lossy(&g.stderr), "", "groff warnings");
    }
    if tool("man") {
        let m = Command::new("man")
            .arg("-l")
            .arg(&file)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&m.stdout);
        assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
        for want in [
            "NAME",
            "weir - Node-local L7-aware network policy proxy",
            "SYNOPSIS",
            "--log-format",
            "WEIR_LOG",
            "SIGHUP",
        ] {
            assert!(shown.contains(want), "`{want}` missing:\n{shown}");
        }
    } else {
        // No man here: the roff text itself has the sections.
        for want in [".SH NAME", ".SH SYNOPSIS", "log\\-format"] {
            assert!(page.contains(want), "`{want}` missing");
        }
    }
    let pages = dir.0.join("pages");
    let (code, _, err) = out(&weir_cli(&["man", "--dir", pages.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    for name in [
        "weir.1",
        "weir-run.1",
        "weir-observe.1",
        "weir-policy-apply.1",
    ] {
        let p = std::fs::read_to_string(pages.join(name)).unwrap_or_default();
        assert!(p.contains(".SH NAME"), "{name}");
    }
}
