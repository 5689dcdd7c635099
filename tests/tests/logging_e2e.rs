//! What an operator's log tools expect of weir: the flow log reopened on SIGHUP
//! (logrotate without `copytruncate`), and weir's own log in the format asked
//! for, without colour codes when stderr is no terminal.

use std::time::Duration;

use weir_tests::{DEATHSTAR4, Scenario, lab};

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

/// The flow records in `path` for HTTP requests, as (method, code).
fn http_records(path: &std::path::Path) -> Vec<(String, u64)> {
    weir_tests::settled_lines(path)
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|f| {
            let h = &f["l7"]["http"];
            Some((h["method"].as_str()?.to_string(), h["code"].as_u64()?))
        })
        .collect()
}

#[test]
fn flow_log_is_reopened_on_sighup() {
    let Some(mut s) = Scenario::star_wars("logrotate") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, &["--steering", "nft"]);
    let landing = format!("http://{DEATHSTAR4}/v1/request-landing");
    let exhaust = format!("http://{DEATHSTAR4}/v1/exhaust-port");
    assert_eq!(s.status("tiefighter", "POST", &landing), "200");
    let written = lab::wait_until(Duration::from_secs(5), || {
        http_records(&s.flow_log).len() == 1
    });
    assert!(written.is_ok(), "{:?}", http_records(&s.flow_log));

    // logrotate: rename, then SIGHUP.
    let rotated = s.path("flows.jsonl.1");
    std::fs::rename(&s.flow_log, &rotated).unwrap();
    s.reload(POLICY);
    let reopened = lab::wait_until(Duration::from_secs(5), || {
        s.weir_log_text().contains("flow log reopened")
    });
    assert!(reopened.is_ok(), "{}", s.weir_log_text());
    assert_eq!(s.status("tiefighter", "PUT", &exhaust), "403");
    let moved = lab::wait_until(Duration::from_secs(5), || {
        http_records(&s.flow_log).len() == 1
    });
    assert!(moved.is_ok(), "{:?}", http_records(&s.flow_log));
    assert_eq!(http_records(&s.flow_log), [("PUT".to_string(), 403)]);
    assert_eq!(http_records(&rotated), [("POST".to_string(), 200)]);
    // weir's stderr is a file here: plain text, no colour codes.
    let log = s.weir_log_text();
    assert!(log.contains(" INFO "), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in a file:\n{log}");
}

/// `--log-format json`: one JSON object per line; `--log-level` wins over
/// WEIR_LOG (the harness sets `WEIR_LOG=debug`).
#[test]
fn log_format_json_and_log_level() {
    let Some(mut s) = Scenario::star_wars("logjson") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(
        POLICY,
        &[
            "--steering",
            "nft",
            "--log-format",
            "json",
            "--log-level",
            "info",
        ],
    );
    let exhaust = format!("http://{DEATHSTAR4}/v1/exhaust-port");
    assert_eq!(s.status("tiefighter", "PUT", &exhaust), "403");
    let denied = lab::wait_until(Duration::from_secs(5), || {
        s.weir_log_text().contains("request denied")
    });
    assert!(denied.is_ok(), "{}", s.weir_log_text());
    let log = s.weir_log_text();
    assert!(!log.contains('\x1b'), "colour codes in a file:\n{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("`{l}`: {e}")))
        .collect();
    assert!(lines.iter().any(|l| l["fields"]["message"] == "weir ready"));
    let denied = lines
        .iter()
        .find(|l| l["fields"]["message"] == "request denied")
        .expect("the denial is logged");
    assert_eq!(denied["level"], "INFO");
    assert_eq!(denied["fields"]["method"], "PUT");
    for l in &lines {
        assert!(
            ["INFO", "WARN", "ERROR"].contains(&l["level"].as_str().unwrap_or("")),
            "below --log-level info: {l}"
        );
    }
}

/// weir's stderr is a pipe whose reader never reads (a stalled log
/// collector): the proxy goes on serving, allowed and denied alike, while its
/// log lines (400 KiB of denials, far beyond the pipe's 64 KiB)
/// can no longer be written. Its workers never write the log themselves.
#[test]
fn a_stalled_stderr_does_not_stop_the_proxy() {
    let Some(mut s) = Scenario::star_wars("logstall") else {
        return;
    };
    s.start_deathstar(&[]);
    // The reader opens the FIFO and sleeps; weir's stderr is the FIFO. Both
    // stay in weir's process group, so the lab stops the reader with weir.
    let fifo = s.path("stderr.fifo");
    let fifo = fifo.to_str().expect("utf-8 path");
    let script = format!(r#"mkfifo {fifo} && {{ sleep 3600 < {fifo} & exec "$@" 2> {fifo}; }}"#);
    s.start_weir_wrapped(POLICY, &["--steering", "nft"], &["sh", "-c", &script, "sh"]);
    let landing = format!("http://{DEATHSTAR4}/v1/request-landing");
    // Each denial is logged with its path: 4 KiB a line.
    let exhaust = format!("http://{DEATHSTAR4}/v1/exhaust-port/{}", "x".repeat(4096));
    for i in 0..100 {
        assert_eq!(
            s.status("tiefighter", "POST", &landing),
            "200",
            "request {i}"
        );
        assert_eq!(
            s.status("tiefighter", "PUT", &exhaust),
            "403",
            "request {i}"
        );
    }
    // The stall was real: weir's log writer waits in the kernel for the pipe.
    let pid = s.weir().pid();
    let writer_waits_in = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("weir's threads")
        .filter_map(Result::ok)
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "weir-log")
        })
        .and_then(|t| std::fs::read_to_string(t.path().join("wchan")).ok());
    // (`anon_pipe_write` on kernels since 6.15.)
    assert!(
        writer_waits_in
            .as_deref()
            .is_some_and(|w| w.ends_with("pipe_write")),
        "{writer_waits_in:?}"
    );
    assert!(s.weir().alive());
}
