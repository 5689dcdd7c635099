//! `weir observe` end to end: real curl requests through weir (one allowed, one
//! denied by an HTTP rule) show up in the ring (`--last`), live for a follower
//! started before them, and the filters select exactly the records they name.

use std::collections::HashSet;
use std::process::Output;
use std::time::{Duration, Instant};

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
      rules:
        http:
        - method: POST
          path: /v1/request-landing
"#;

fn observe(s: &Scenario, args: &[&str]) -> Output {
    s.lab
        .node
        .command(weir_tests::weir_bin().to_str().unwrap())
        .arg("observe")
        .arg("--api-socket")
        .arg(s.path("weir.sock"))
        .args(args)
        .output()
        .expect("run weir observe")
}

/// `-o json` output: every line must parse.
fn json_lines(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "weir observe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("`{l}`: {e}")))
        .collect()
}

fn is_http(f: &Value, method: &str) -> bool {
    f["l7"]["http"]["method"] == method
}

#[test]
fn observe_shows_recent_and_live_flows_and_filters_them() {
    let Some(mut s) = Scenario::star_wars("observe") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, &["--steering", "nft"]);

    // A follower, subscribed (weir logs the call) before any request.
    let follow_out = s.path("follow.jsonl");
    let mut cmd = s.lab.node.command(weir_tests::weir_bin().to_str().unwrap());
    cmd.arg("observe")
        .arg("--api-socket")
        .arg(s.path("weir.sock"))
        .args(["--follow", "-o", "json", "--type", "http"])
        .stdout(std::fs::File::create(&follow_out).unwrap())
        // It ends with an error when weir stops at the end of the test.
        .stderr(std::fs::File::create(s.path("follow.err")).unwrap());
    s.lab
        .spawn("observe-follow", cmd)
        .expect("start weir observe");
    lab::wait_until(Duration::from_secs(10), || {
        s.weir_log_text().contains("API: observe flows")
    })
    .unwrap_or_else(|_| panic!("the follower never asked:\n{}", s.weir_log_text()));

    let landing = format!("http://{DEATHSTAR4}/v1/request-landing");
    let allowed = s.status("tiefighter", "POST", &landing);
    assert_eq!(allowed, "200", "{}", s.weir_log_text());
    let denied = s.status(
        "tiefighter",
        "PUT",
        &format!("http://{DEATHSTAR4}/v1/exhaust-port"),
    );
    assert_eq!(denied, "403");
    let answered = Instant::now();

    // The follower sees both, live, and the denied one soon after its answer.
    let followed = || -> Vec<Value> {
        std::fs::read_to_string(&follow_out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let seen = lab::wait_until(Duration::from_secs(5), || {
        followed().iter().any(|f| is_http(f, "PUT"))
    });
    let delay = answered.elapsed();
    assert!(seen.is_ok(), "the follower saw: {:?}", followed());
    eprintln!("the follower saw the denied request {delay:?} after curl returned");
    assert!(delay < Duration::from_secs(1), "{delay:?}");
    let live = followed();
    assert!(live.iter().any(|f| is_http(f, "POST")), "{live:?}");
    assert!(live.iter().all(|f| f["l7"]["http"].is_object()), "{live:?}");

    // The ring: the last 10, as JSON with Hubble's field names, each exactly as
    // the flow log has it.
    let recent = observe(&s, &["--last", "10", "-o", "json"]);
    let recent_lines: Vec<String> = text(&recent).lines().map(str::to_string).collect();
    let recent = json_lines(&recent);
    assert!(!recent.is_empty() && recent.len() <= 10, "{recent:?}");
    let put = recent
        .iter()
        .find(|f| is_http(f, "PUT"))
        .expect("the denied request");
    assert_eq!(put["verdict"], "DROPPED");
    assert_eq!(put["l7"]["http"]["code"], 403);
    assert_eq!(put["l7"]["type"], "REQUEST");
    assert_eq!(put["source"]["pod_name"], "tiefighter");
    assert_eq!(put["destination"]["pod_name"], "deathstar");
    assert_eq!(put["IP"]["destination"], DEATHSTAR4);
    assert_eq!(put["l4"]["TCP"]["destination_port"], 80);
    assert_eq!(put["Type"], "L7");
    assert_eq!(put["policy"], "no rule matched (ingress, HTTP)");
    assert!(put["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    let post = recent
        .iter()
        .find(|f| is_http(f, "POST"))
        .expect("the allowed request");
    assert_eq!(post["verdict"], "FORWARDED");
    assert_eq!(
        post["policy"],
        "rule1 spec.ingress[0].toPorts[0].rules.http[0]"
    );
    let logged: HashSet<String> = s.flows().iter().map(|f| f.to_string()).collect();
    for l in &recent_lines {
        let v: Value = serde_json::from_str(l).unwrap();
        assert!(logged.contains(&v.to_string()), "not in the flow log: {l}");
    }

    // Filters select exactly what they say, against everything in the ring.
    let all = json_lines(&observe(&s, &["--last", "100000", "-o", "json"]));
    assert!(all.len() >= 2);
    let keep = |pred: &dyn Fn(&Value) -> bool| -> Vec<Value> {
        all.iter().filter(|f| pred(f)).cloned().collect()
    };
    let dropped = json_lines(&observe(
        &s,
        &["--last", "100000", "-o", "json", "--verdict", "DROPPED"],
    ));
    assert_eq!(dropped, keep(&|f| f["verdict"] == "DROPPED"));
    assert!(dropped.iter().any(|f| is_http(f, "PUT")));
    assert!(!dropped.iter().any(|f| is_http(f, "POST")));
    let http = json_lines(&observe(
        &s,
        &["--last", "100000", "-o", "json", "--type", "http"],
    ));
    assert_eq!(http, keep(&|f| f["l7"]["http"].is_object()));
    assert_eq!(http.len(), 2, "{http:?}");
    let to_80_from_tie = json_lines(&observe(
        &s,
        &[
            "--last",
            "100000",
            "-o",
            "json",
            "--from",
            "class=tiefighter",
            "--port",
            "80",
            "--verdict",
            "FORWARDED",
        ],
    ));
    assert_eq!(
        to_80_from_tie,
        keep(&|f| f["source"]["pod_name"] == "tiefighter"
            && f["verdict"] == "FORWARDED"
            && (f["l4"]["TCP"]["destination_port"] == 80 || f["l4"]["TCP"]["source_port"] == 80))
    );
    assert!(to_80_from_tie.iter().any(|f| is_http(f, "POST")));

    // The compact form, as `hubble observe` reads.
    let compact = observe(
        &s,
        &["--last", "1", "--type", "http", "--verdict", "DROPPED"],
    );
    let line = text(&compact);
    assert!(
        line.contains("default/tiefighter:")
            && line.contains("-> default/deathstar:80 (ID:")
            && line.contains("http-request DROPPED (HTTP/1.1 PUT ")
            && line.contains("[no rule matched (ingress, HTTP)]"),
        "{line}"
    );
    eprintln!("weir observe:\n{}", text(&observe(&s, &[])));

    // The table: a header, one row per HTTP record, columns aligned.
    let table = observe(&s, &["--last", "100000", "--type", "http", "-o", "table"]);
    assert!(table.status.success());
    let table = text(&table);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 1 + http.len(), "{table}");
    assert!(rows[0].starts_with("TIMESTAMP "), "{table}");
    let col = rows[0].find("VERDICT").unwrap();
    assert!(
        rows[1..].iter().all(|r| r[col..].starts_with("FORWARDED ")
            || r[col..].starts_with("DROPPED ")
            || r[col..].starts_with("ERROR ")),
        "{table}"
    );
    assert!(
        rows.iter()
            .any(|r| r.contains("http-request") && r.contains("POLICY_DENIED")),
        "{table}"
    );
    eprintln!("weir observe -o table:\n{table}");
    // No Kafka records exist yet: the filter is accepted and selects none.
    let kafka = observe(&s, &["--last", "100000", "--type", "kafka", "-o", "json"]);
    assert!(json_lines(&kafka).is_empty());

    // /metrics counts what the bus carried, exactly; /healthz answers.
    let metrics = text(&s.curl_from_node(&["http://127.0.0.1:9965/metrics"]));
    let value = |series: &str| -> Option<u64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    let count = |verdict: &str, kind: &str, proto: &str| {
        keep(&|f| {
            f["verdict"] == verdict
                && f["Type"] == kind
                && match proto {
                    "HTTP" => f["l7"]["http"].is_object(),
                    "DNS" => f["l7"]["dns"].is_object(),
                    l4 => f["l7"].is_null() && f["l4"][l4].is_object(),
                }
        })
        .len() as u64
    };
    for (verdict, kind, proto) in [
        ("FORWARDED", "L7", "HTTP"),
        ("DROPPED", "L7", "HTTP"),
        ("FORWARDED", "L3_L4", "TCP"),
        ("DROPPED", "L3_L4", "TCP"),
    ] {
        let want = count(verdict, kind, proto);
        let series = format!(
            "weir_flows_processed_total{{verdict=\"{verdict}\",type=\"{kind}\",protocol=\"{proto}\"}}"
        );
        assert_eq!(value(&series).unwrap_or(0), want, "{series}\n{metrics}");
    }
    assert_eq!(
        value("weir_drop_total{reason=\"POLICY_DENIED\"}"),
        Some(keep(&|f| f["drop_reason_desc"] == "POLICY_DENIED").len() as u64),
        "{metrics}"
    );
    assert_eq!(
        text(&s.curl_from_node(&["http://127.0.0.1:9965/healthz"])),
        "ok\n"
    );
    // A bad filter is refused, not ignored.
    let bad = observe(&s, &["--since", "yesterday"]);
    assert!(!bad.status.success());
    // The issue's bound: a denied request shows within 100 ms. Measured five
    // times (polling the follower's output every 5 ms); the median must be
    // under it — one slow sample on a loaded CI machine is not a failure.
    let mut delays = Vec::new();
    for i in 0..5 {
        let path = format!("/v1/exhaust-port?try={i}");
        let denied = s.status("tiefighter", "PUT", &format!("http://{DEATHSTAR4}{path}"));
        assert_eq!(denied, "403");
        let answered = Instant::now();
        let shown = |f: &Value| {
            is_http(f, "PUT")
                && f["l7"]["http"]["url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with(&path))
        };
        while !followed().iter().any(shown) {
            assert!(
                answered.elapsed() < Duration::from_secs(5),
                "{path} never shown"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        delays.push(answered.elapsed());
    }
    delays.sort();
    eprintln!("denied requests shown after {delays:?}");
    assert!(
        delays[2] < Duration::from_millis(100),
        "median {:?} (all: {delays:?})",
        delays[2]
    );
}

/// `--flow-log-max-size`/`--flow-log-max-files`: the flow log rotates at record
/// boundaries, keeps the files it is told to, and loses no record while they fit.
/// `--flow-log none`: no flow log at all, yet `weir observe` shows the
/// requests from the ring, rendered when read, with the same fields.
#[test]
fn without_a_flow_log_observe_still_shows_every_record() {
    let Some(mut s) = Scenario::star_wars("observe-nolog") else {
        return;
    };
    s.start_deathstar(&[]);
    s.flow_log = "none".into();
    s.start_weir(POLICY, &["--steering", "nft"]);
    let landing = format!("http://{DEATHSTAR4}/v1/request-landing");
    assert_eq!(s.status("tiefighter", "POST", &landing), "200");
    let exhaust = format!("http://{DEATHSTAR4}/v1/exhaust-port");
    assert_eq!(s.status("tiefighter", "PUT", &exhaust), "403");
    let mut recent = Vec::new();
    let both = lab::wait_until(Duration::from_secs(5), || {
        recent = json_lines(&observe(
            &s,
            &["--last", "10", "-o", "json", "--type", "http"],
        ));
        recent.iter().any(|f| is_http(f, "POST")) && recent.iter().any(|f| is_http(f, "PUT"))
    });
    assert!(
        both.is_ok(),
        "observe never showed both requests: {recent:?}\n{}",
        s.weir_log_text()
    );
    let put = recent.iter().find(|f| is_http(f, "PUT")).unwrap();
    assert_eq!(put["verdict"], "DROPPED", "{put}");
    assert_eq!(put["l7"]["http"]["url"], exhaust, "{put}");
    assert!(
        put["source"]["labels"].to_string().contains("tiefighter"),
        "{put}"
    );
    let post = recent.iter().find(|f| is_http(f, "POST")).unwrap();
    assert_eq!(post["verdict"], "FORWARDED", "{post}");
    // Nothing was written anywhere: no file named "none" beside weir.
    assert!(!s.path("none").exists() && !std::path::Path::new("none").exists());
}

#[test]
fn the_flow_log_rotates_by_size() {
    let Some(mut s) = Scenario::star_wars("flowlog-rotate") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(
        POLICY,
        &[
            "--steering",
            "nft",
            "--flow-log-max-size",
            "2K",
            "--flow-log-max-files",
            "5",
        ],
    );
    let landing = format!("http://{DEATHSTAR4}/v1/request-landing");
    for _ in 0..4 {
        assert_eq!(s.status("tiefighter", "POST", &landing), "200");
        assert_eq!(
            s.status("tiefighter", "PUT", &format!("http://{DEATHSTAR4}/x")),
            "403"
        );
    }
    // Every record is written once it is in the ring.
    let ok = lab::wait_until(Duration::from_secs(5), || {
        json_lines(&observe(
            &s,
            &["--last", "100", "-o", "json", "--type", "http"],
        ))
        .len()
            == 8
    });
    assert!(ok.is_ok());
    std::thread::sleep(Duration::from_millis(200));
    let mut files = vec![s.flow_log.clone()];
    files.extend((1..=6).map(|n| s.path(&format!("flows.jsonl.{n}"))));
    let mut http = 0;
    let mut rotated = 0;
    for (i, f) in files.iter().enumerate() {
        let Ok(body) = std::fs::read_to_string(f) else {
            continue;
        };
        assert!(i <= 5, "{} is beyond --flow-log-max-files", f.display());
        rotated += usize::from(i > 0);
        let lines: Vec<&str> = body.lines().collect();
        assert!(
            body.len() <= 2048 || lines.len() == 1,
            "{} has {} bytes",
            f.display(),
            body.len()
        );
        assert!(body.is_empty() || body.ends_with('\n'), "a split record");
        for l in lines {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("`{l}`: {e}"));
            http += usize::from(v["l7"]["http"].is_object());
        }
    }
    assert!(rotated >= 2, "8 records of ~1 KiB rotate a 2 KiB log");
    assert_eq!(http, 8, "no record lost across rotations");
}

/// The kernel's L3/L4 verdicts (eBPF datapath) reach the bus too.
#[test]
fn kernel_drops_show_up_in_observe() {
    let Some(mut s) = Scenario::star_wars("observe-l34") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, &["--steering", "ebpf"]);
    assert!(
        !s.ping("xwing", DEATHSTAR4),
        "the policy admits only the empire"
    );
    let query = [
        "--last",
        "100",
        "-o",
        "json",
        "--type",
        "l3-l4",
        "--verdict",
        "DROPPED",
        "--from",
        "xwing",
        "--to",
        "class=deathstar",
    ];
    let found = lab::wait_until(Duration::from_secs(5), || {
        json_lines(&observe(&s, &query))
            .iter()
            .any(|f| f["l4"]["ICMPv4"].is_object())
    });
    let got = json_lines(&observe(&s, &query));
    assert!(found.is_ok(), "{got:?}\n{}", s.weir_log_text());
    for f in &got {
        assert_eq!(f["Type"], "L3_L4");
        assert_eq!(f["verdict"], "DROPPED");
        assert_eq!(f["source"]["pod_name"], "xwing");
        assert_eq!(f["destination"]["pod_name"], "deathstar");
    }
    let metrics = text(&s.curl_from_node(&["http://127.0.0.1:9965/metrics"]));
    assert!(
        metrics.contains(
            "weir_flows_processed_total{verdict=\"DROPPED\",type=\"L3_L4\",protocol=\"ICMPv4\"}"
        ),
        "{metrics}"
    );
}
