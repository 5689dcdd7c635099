//! HTTP/1.1 end to end: real curl and socat clients, a real nginx upstream, weir
//! steering with nftables TPROXY in a node namespace. For every denial, nginx's
//! access log proves nothing reached the upstream.

use std::time::Duration;

use weir_tests::{DEATHSTAR4, DEATHSTAR6, Scenario, text};

/// These tests cover the proxy behind the nftables steering; the eBPF datapath
/// has its own file (ebpf_datapath.rs).
const NFT: &[&str] = &["--steering", "nft"];

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}, {port: "81", protocol: TCP}, {port: "82", protocol: TCP}]
      rules:
        http:
        - method: POST
          path: /v1/request-landing
        - method: GET
          path: /v1/.*
"#;

fn landing(ip: &str) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]/v1/request-landing")
    } else {
        format!("http://{ip}/v1/request-landing")
    }
}

#[test]
fn allowed_and_denied_requests_share_one_keepalive_connection() {
    let Some(mut s) = Scenario::star_wars("keepalive") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, NFT);
    let out = s.curl(
        "tiefighter",
        &[
            "-w",
            "%{http_code} %{num_connects}\\n",
            "-X",
            "POST",
            &landing(DEATHSTAR4),
            "--next",
            "-s",
            "-w",
            "%{http_code} %{num_connects}\\n",
            "-X",
            "PUT",
            &format!("http://{DEATHSTAR4}/v1/exhaust-port"),
            "--next",
            "-s",
            "-w",
            "%{http_code} %{num_connects}\\n",
            "-X",
            "POST",
            &landing(DEATHSTAR4),
        ],
    );
    let body = text(&out);
    // Allowed (one new connection), denied (reused), allowed again (reused).
    assert_eq!(
        body,
        "Ship landed\n200 1\nAccess denied\n403 0\nShip landed\n200 0\n",
        "weir log:\n{}",
        s.weir_log_text()
    );
    let log = s.access_log();
    assert_eq!(
        log.len(),
        2,
        "only the two allowed requests reach nginx: {log:?}"
    );
    assert!(
        log.iter().all(|l| l.contains("POST /v1/request-landing")),
        "{log:?}"
    );
    assert!(!log.iter().any(|l| l.contains("exhaust-port")));
    // The proxy connects upstream from the client's own address: nginx logs the
    // tiefighter, not the node.
    assert!(log.iter().all(|l| l.starts_with("10.200.0.20 ")), "{log:?}");
    let flows = s.flows();
    let denied: Vec<_> = flows.iter().filter(|f| f["verdict"] == "DROPPED").collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["l7"]["http"]["code"], 403);
    assert_eq!(denied[0]["l7"]["http"]["method"], "PUT");
    assert_eq!(denied[0]["source"]["pod_name"], "tiefighter");
    assert_eq!(denied[0]["destination"]["pod_name"], "deathstar");
    assert_eq!(denied[0]["policy"], "no rule matched (ingress, HTTP)");
    let allowed = flows.iter().find(|f| f["verdict"] == "FORWARDED").unwrap();
    assert_eq!(
        allowed["policy"],
        "rule1 spec.ingress[0].toPorts[0].rules.http[0]"
    );
    assert_eq!(allowed["l7"]["http"]["code"], 200);
}

#[test]
fn ipv6_requests_are_enforced_too() {
    let Some(mut s) = Scenario::star_wars("ipv6") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, NFT);
    let ok = s.curl(
        "tiefighter",
        &["-w", " %{http_code}", "-X", "POST", &landing(DEATHSTAR6)],
    );
    assert_eq!(text(&ok), "Ship landed\n 200", "{}", s.weir_log_text());
    let denied = s.curl(
        "tiefighter",
        &[
            "-w",
            " %{http_code}",
            "-X",
            "PUT",
            &format!("http://[{DEATHSTAR6}]/v1/exhaust-port"),
        ],
    );
    assert_eq!(text(&denied), "Access denied\n 403");
    let xwing = s.curl(
        "xwing",
        &["-w", " %{http_code}", "-X", "POST", &landing(DEATHSTAR6)],
    );
    assert_eq!(text(&xwing), "Access denied\n 403");
    assert_eq!(s.access_log().len(), 1, "{:?}", s.access_log());
    assert!(s.flows().iter().any(|f| f["IP"]["ipVersion"] == "IPv6"));
}

#[test]
fn peers_denied_at_l3_l4_get_403_and_never_reach_the_upstream() {
    let Some(mut s) = Scenario::star_wars("l4deny") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, NFT);
    let out = s.curl(
        "xwing",
        &["-w", " %{http_code}", "-X", "POST", &landing(DEATHSTAR4)],
    );
    assert_eq!(text(&out), "Access denied\n 403");
    // A non-HTTP client on a denied port is simply closed.
    let raw = s.raw(
        "xwing",
        DEATHSTAR4,
        80,
        b"\x16\x03\x01hello",
        Duration::from_secs(3),
    );
    assert!(raw.is_empty(), "{raw:?}");
    assert!(s.access_log().is_empty(), "{:?}", s.access_log());
    let f = s.flows();
    assert!(f.iter().all(|f| f["verdict"] == "DROPPED"));
    assert!(
        f.iter()
            .any(|f| f["policy"] == "no rule matched (ingress, L3/L4)")
    );
}

#[test]
fn l4_allow_without_l7_rules_passes_everything_for_that_peer() {
    let policy = format!(
        "{POLICY}---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: tie-l4}}
spec:
  endpointSelector: {{matchLabels: {{class: deathstar}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{class: tiefighter}}}}]
    toPorts: [{{ports: [{{port: '80', protocol: TCP}}]}}]
"
    );
    let Some(mut s) = Scenario::star_wars("l4wins") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(&policy, NFT);
    let out = s.curl(
        "tiefighter",
        &[
            "-w",
            " %{http_code}",
            "-X",
            "PUT",
            &format!("http://{DEATHSTAR4}/v1/exhaust-port"),
        ],
    );
    assert_eq!(text(&out), "Panic: deathstar exploded\n 200");
    let f = s.flows();
    assert_eq!(f[0]["Type"], "L3_L4");
    assert_eq!(f[0]["policy"], "tie-l4 spec.ingress[0].toPorts[0]");
}

#[test]
fn upstream_refused_is_503_and_silent_upstream_is_504() {
    let Some(mut s) = Scenario::star_wars("upstream-errors") else {
        return;
    };
    s.start_deathstar(&[]);
    // Port 82 accepts but never answers.
    let mut silent = s.lab.workload("deathstar").ns.command("socat");
    silent.args(["TCP-LISTEN:82,fork,reuseaddr", "EXEC:sleep 30"]);
    s.lab.spawn("silent", silent).unwrap();
    s.lab
        .wait_for_tcp(DEATHSTAR4, 82, Duration::from_secs(5))
        .unwrap();
    s.start_weir(POLICY, &["--steering", "nft", "--upstream-timeout", "2s"]);
    let refused = s.curl(
        "tiefighter",
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{DEATHSTAR4}:81/v1/x"),
        ],
    );
    assert_eq!(text(&refused), "503");
    let started = std::time::Instant::now();
    let silent = s.curl(
        "tiefighter",
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{DEATHSTAR4}:82/v1/x"),
        ],
    );
    assert_eq!(text(&silent), "504");
    assert!(started.elapsed() < Duration::from_secs(8));
    let f = s.flows();
    assert!(
        f.iter()
            .any(|f| f["drop_reason_desc"] == "UPSTREAM_UNAVAILABLE")
    );
    assert!(
        f.iter()
            .any(|f| f["drop_reason_desc"] == "UPSTREAM_TIMEOUT")
    );
}

/// Each of these is refused with 400 and a closed connection, and nginx sees nothing.
#[test]
fn smuggling_and_confusion_shapes_are_rejected() {
    let Some(mut s) = Scenario::star_wars("smuggling") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, NFT);
    let h = format!("Host: {DEATHSTAR4}\r\n");
    let attempts: Vec<(&str, String)> = vec![
        (
            "CL+TE",
            format!(
                "POST /v1/request-landing HTTP/1.1\r\n{h}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nPUT /v1/exhaust-port HTTP/1.1\r\n{h}\r\n"
            ),
        ),
        (
            "two Content-Length",
            format!(
                "POST /v1/request-landing HTTP/1.1\r\n{h}Content-Length: 0\r\nContent-Length: 30\r\n\r\nPUT /v1/exhaust-port HTTP/1.1\r\n\r\n"
            ),
        ),
        (
            "TE not chunked",
            format!("POST /v1/request-landing HTTP/1.1\r\n{h}Transfer-Encoding: gzip\r\n\r\nxx"),
        ),
        (
            "two Host",
            format!("POST /v1/request-landing HTTP/1.1\r\n{h}Host: other\r\n\r\n"),
        ),
        (
            "absolute-form disagrees with Host",
            format!("POST http://evil.example/v1/request-landing HTTP/1.1\r\n{h}\r\n"),
        ),
        (
            "dot segments",
            format!("POST /v1/x/../request-landing HTTP/1.1\r\n{h}\r\n"),
        ),
        (
            "encoded dot segments",
            format!("GET /v1/%2e%2e/admin HTTP/1.1\r\n{h}\r\n"),
        ),
        (
            "double slash",
            format!("POST //v1/request-landing HTTP/1.1\r\n{h}\r\n"),
        ),
        (
            "encoded slash",
            format!("GET /v1/a%2fb HTTP/1.1\r\n{h}\r\n"),
        ),
        (
            "space before colon",
            format!("POST /v1/request-landing HTTP/1.1\r\n{h}Content-Length : 5\r\n\r\nhello"),
        ),
        (
            "obsolete line folding",
            format!("POST /v1/request-landing HTTP/1.1\r\n{h}X-A: 1\r\n folded\r\n\r\n"),
        ),
    ];
    for (what, req) in &attempts {
        let resp = s.raw(
            "tiefighter",
            DEATHSTAR4,
            80,
            req.as_bytes(),
            Duration::from_secs(3),
        );
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 400"), "{what}: {resp:?}");
        assert_eq!(
            resp.matches("HTTP/1.1").count(),
            1,
            "{what}: one response, then close: {resp:?}"
        );
    }
    assert!(
        s.access_log().is_empty(),
        "nothing may reach nginx: {:?}",
        s.access_log()
    );
}

#[test]
fn oversized_headers_get_431() {
    let Some(mut s) = Scenario::star_wars("bighead") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, &["--steering", "nft", "--max-header-bytes", "8192"]);
    let big = format!("X-Big: {}", "a".repeat(20_000));
    let out = s.curl(
        "tiefighter",
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &big,
            "-X",
            "POST",
            &landing(DEATHSTAR4),
        ],
    );
    assert_eq!(text(&out), "431");
    assert!(s.access_log().is_empty());
}

#[test]
fn request_and_response_bodies_stream_through() {
    let Some(mut s) = Scenario::star_wars("bodies") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, NFT);
    // 8 MB chunked upload to an allowed path.
    let file = s.path("upload.bin");
    std::fs::write(&file, vec![b'x'; 8 << 20]).unwrap();
    let out = s.curl(
        "tiefighter",
        &[
            "-w",
            " %{http_code}",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{}", file.display()),
            &landing(DEATHSTAR4),
        ],
    );
    assert_eq!(text(&out), "Ship landed\n 200", "{}", s.weir_log_text());
    // 32 MB download, byte-exact.
    let static_dir = s.path("nginx/static");
    std::fs::create_dir_all(&static_dir).unwrap();
    let blob: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(static_dir.join("blob"), &blob).unwrap();
    let dest = s.path("download.bin");
    let out = s.curl(
        "tiefighter",
        &[
            "-o",
            dest.to_str().unwrap(),
            "-w",
            "%{http_code}",
            &format!("http://{DEATHSTAR4}/v1/static/blob"),
        ],
    );
    assert_eq!(text(&out), "200");
    assert!(
        std::fs::read(&dest).unwrap() == blob,
        "downloaded body differs"
    );
    assert_eq!(s.access_log().len(), 2);
}

#[test]
fn weir_removes_its_steering_on_sigterm_and_sigint() {
    let Some(mut s) = Scenario::star_wars("cleanup") else {
        return;
    };
    s.start_deathstar(&[]);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        s.start_weir(POLICY, NFT);
        assert!(
            s.run_in_node(&["nft", "list", "tables"])
                .contains("inet weir")
        );
        assert!(s.run_in_node(&["ip", "rule", "show"]).contains("proto 119"));
        let status = s.weir().stop_with(signal, Duration::from_secs(10));
        assert!(
            status.is_some_and(|st| st.success()),
            "weir exit: {status:?}\n{}",
            s.weir_log_text()
        );
        assert!(!s.run_in_node(&["nft", "list", "tables"]).contains("weir"));
        assert!(!s.run_in_node(&["ip", "rule", "show"]).contains("proto 119"));
        assert!(
            !s.run_in_node(&["ip", "-6", "rule", "show"])
                .contains("proto 119")
        );
        assert!(
            s.run_in_node(&["ip", "route", "show", "table", "119"])
                .trim()
                .is_empty()
        );
        s.lab.processes.retain(|p| p.name != "weir");
        // With weir gone nothing is steered: the xwing reaches nginx directly.
        let out = s.curl(
            "xwing",
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{DEATHSTAR4}/"),
            ],
        );
        assert_eq!(text(&out), "200");
    }
}

#[test]
fn policy_reload_on_sighup_applies_to_the_next_request() {
    let Some(mut s) = Scenario::star_wars("reload") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, NFT);
    let put = |s: &Scenario| {
        text(&s.curl(
            "tiefighter",
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "PUT",
                &format!("http://{DEATHSTAR4}/v1/exhaust-port"),
            ],
        ))
    };
    assert_eq!(put(&s), "403");
    std::fs::write(
        s.path("policy.yaml"),
        POLICY
            .replace("method: POST\n", "method: POST|PUT\n")
            .replace("path: /v1/request-landing", "path: /v1/.*"),
    )
    .unwrap();
    let pid = s.weir().pid() as i32;
    assert!(weir_tests::lab::send_signal(pid, libc::SIGHUP));
    let ok = weir_tests::lab::wait_until(Duration::from_secs(5), || {
        s.weir_log_text().contains("policy reloaded")
    });
    assert!(ok.is_ok(), "{}", s.weir_log_text());
    assert_eq!(put(&s), "200");
    // A broken policy is refused and the last good one stays.
    std::fs::write(
        s.path("policy.yaml"),
        "apiVersion: cilium.io/v2\nkind: Bogus\n",
    )
    .unwrap();
    assert!(weir_tests::lab::send_signal(pid, libc::SIGHUP));
    let ok = weir_tests::lab::wait_until(Duration::from_secs(5), || {
        s.weir_log_text().contains("reload failed")
    });
    assert!(ok.is_ok(), "{}", s.weir_log_text());
    assert_eq!(put(&s), "200");
}
