//! HTTP rules as Cilium reads them, and the request policy checked is the request
//! nginx gets: real curl (HTTP/1.1 and HTTP/2 prior knowledge), nghttp and raw
//! sockets against nginx, whose access log records the request line and every
//! header the rules check. Every denial is next to the same probe allowed.

use std::time::Duration;

use weir_tests::{DEATHSTAR4, DEATHSTAR6, Scenario, text};

const NFT: &[&str] = &["--steering", "nft"];

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: hdr}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {path: /v1/colon, headers: ['X-Has-Force: true']}
        - {path: /v1/space, headers: ['X-Has-Force true']}
        - {path: /v1/presence, headers: ['X-Has-Force']}
        - {path: /v1/team, headers: ['X-Team: blue']}
        - {path: /v1/teams, headers: ['X-Team: red,blue']}
        - {path: /v1/plain}
        - {path: /v1/hosted, host: 'svc\.example'}
        - {path: '/v1/caf%C3%A9'}
        - {path: /v1/add, headerMatches: [{name: X-Added, value: 'yes', mismatch: ADD}]}
        - {path: /v1/replace, headerMatches: [{name: X-Replaced, value: good, mismatch: REPLACE}]}
        - {path: /v1/delete, headerMatches: [{name: X-Deleted, value: good, mismatch: DELETE}]}
        - {path: /v1/log, headerMatches: [{name: X-Logged, value: good, mismatch: LOG}]}
        - {path: /v1/strict, headerMatches: [{name: X-Token, value: s3cret}]}
"#;

/// nginx logs the request line and every header the rules check (`-` when absent),
/// and `X-Free`, which no rule names.
fn log_checked_headers(conf: String) -> String {
    let format = "  log_format checked '$remote_addr \"$request\" host=\"$http_host\" \
force=\"$http_x_has_force\" team=\"$http_x_team\" added=\"$http_x_added\" \
replaced=\"$http_x_replaced\" deleted=\"$http_x_deleted\" logged=\"$http_x_logged\" \
token=\"$http_x_token\" free=\"$http_x_free\"';\n";
    let conf = conf.replacen("  access_log ", &format!("{format}  access_log "), 1);
    conf.replacen("access.log;", "access.log checked;", 1)
}

fn start(name: &str) -> Option<Scenario> {
    let mut s = Scenario::star_wars(name)?;
    s.start_deathstar_with(&[], log_checked_headers);
    s.start_weir(POLICY, NFT);
    Some(s)
}

fn base(ip: &str) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]")
    } else {
        format!("http://{ip}")
    }
}

/// curl from the tiefighter: the status and the access-log line the request
/// added (`None`: nothing reached nginx).
fn probe(s: &Scenario, h2: bool, ip: &str, path: &str, hdrs: &[&str]) -> (String, Option<String>) {
    let before = s.access_log().len();
    let url = format!("{}{path}", base(ip));
    let mut args: Vec<&str> = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    if h2 {
        args.push("--http2-prior-knowledge");
    }
    for h in hdrs {
        args.extend(["-H", h]);
    }
    args.push(&url);
    let code = text(&s.curl("tiefighter", &args));
    let log = s.access_log();
    assert!(log.len() <= before + 1, "{log:?}");
    (code, log.get(before).cloned())
}

/// Asserts an allowed probe (200, nginx logged `want` pieces) or a denied one
/// (`code`, nothing reached nginx).
fn expect(s: &Scenario, h2: bool, ip: &str, path: &str, hdrs: &[&str], code: &str, want: &[&str]) {
    let (got, line) = probe(s, h2, ip, path, hdrs);
    let what = format!("{} {ip} {path} {hdrs:?}", if h2 { "h2" } else { "h1" });
    assert_eq!(got, code, "{what}: line {line:?}\n{}", s.weir_log_text());
    if code == "200" {
        let line = line.unwrap_or_else(|| panic!("{what}: nothing reached nginx"));
        assert!(
            line.contains(&format!("\"GET {path} HTTP/1.1\"")),
            "{what}: {line}"
        );
        for w in want {
            assert!(line.contains(w), "{what}: {w} not in {line}");
        }
    } else {
        assert_eq!(line, None, "{what}: a refused request reached nginx");
    }
}

#[test]
fn header_rules_in_each_cilium_form_h1_h2_v4_v6() {
    let Some(s) = start("hdr-forms") else {
        return;
    };
    for h2 in [false, true] {
        for ip in [DEATHSTAR4, DEATHSTAR6] {
            let e = |path, hdrs: &[&str], code, want: &[&str]| {
                expect(&s, h2, ip, path, hdrs, code, want)
            };
            // "Name: value"
            e(
                "/v1/colon",
                &["X-Has-Force: true"],
                "200",
                &["force=\"true\""],
            );
            e("/v1/colon", &["X-Has-Force: false"], "403", &[]);
            e("/v1/colon", &[], "403", &[]);
            // "Name value": the same rule (weir used to refuse this form).
            e(
                "/v1/space",
                &["X-Has-Force: true"],
                "200",
                &["force=\"true\""],
            );
            e("/v1/space", &["X-Has-Force: nope"], "403", &[]);
            // "Name": presence.
            e(
                "/v1/presence",
                &["X-Has-Force: anything"],
                "200",
                &["force=\"anything\""],
            );
            e("/v1/presence", &[], "403", &[]);
            // headerMatches without a mismatch action denies like headers.
            e(
                "/v1/strict",
                &["X-Token: s3cret"],
                "200",
                &["token=\"s3cret\""],
            );
            e("/v1/strict", &["X-Token: guess"], "403", &[]);
        }
    }
}

#[test]
fn what_policy_checked_is_what_nginx_gets() {
    let Some(s) = start("hdr-checked") else {
        return;
    };
    for h2 in [false, true] {
        for ip in [DEATHSTAR4, DEATHSTAR6] {
            let e = |path, hdrs: &[&str], code, want: &[&str]| {
                expect(&s, h2, ip, path, hdrs, code, want)
            };
            // Two X-Team lines (red, blue) no longer pass `X-Team: blue` with nginx
            // reading `red`: they are one value, `red,blue`.
            e("/v1/team", &["X-Team: blue"], "200", &["team=\"blue\""]);
            e("/v1/team", &["X-Team: red", "X-Team: blue"], "403", &[]);
            // A rule for the joined value passes it, and nginx gets that one value
            // (nginx 1.22 would log only `red` for two lines).
            e(
                "/v1/teams",
                &["X-Team: red", "X-Team: blue"],
                "200",
                &["team=\"red,blue\""],
            );
            // Host rules match the host without its port.
            e(
                "/v1/hosted",
                &["Host: svc.example:8080"],
                "200",
                &["host=\"svc.example:8080\""],
            );
            e("/v1/hosted", &["Host: evil.example:8080"], "403", &[]);
            // Lower-case escapes are the upper-case ones; nginx gets the spelling
            // policy matched.
            let (code, line) = probe(&s, h2, ip, "/v1/caf%c3%a9", &[]);
            assert_eq!(code, "200", "{}", s.weir_log_text());
            assert!(
                line.as_deref()
                    .is_some_and(|l| l.contains("\"GET /v1/caf%C3%A9 HTTP/1.1\"")),
                "{line:?}"
            );
            e("/v1/caf%C3%A9", &[], "200", &[]);
        }
    }
    // HTTP/1 only (HTTP/2 has no Connection header): Connection cannot remove
    // what policy checked.
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        let e = |path, hdrs: &[&str], code, want: &[&str]| {
            expect(&s, false, ip, path, hdrs, code, want)
        };
        e(
            "/v1/team",
            &["X-Team: blue", "Connection: X-Team"],
            "200",
            &["team=\"blue\""],
        );
        let host = if ip.contains(':') {
            format!("host=\"[{ip}]\"")
        } else {
            format!("host=\"{ip}\"")
        };
        e("/v1/plain", &["Connection: Host"], "200", &[&host]);
        // A header no rule names is still a connection header when listed.
        e(
            "/v1/plain",
            &["X-Free: x", "Connection: X-Free"],
            "200",
            &["free=\"-\""],
        );
        e("/v1/plain", &["X-Free: x"], "200", &["free=\"x\""]);
        // A header a rule names (even one only logged) is never a connection header.
        e(
            "/v1/plain",
            &["X-Logged: x", "Connection: X-Logged"],
            "200",
            &["logged=\"x\""],
        );
    }
}

#[test]
fn header_match_mismatch_actions_edit_what_nginx_gets() {
    let Some(s) = start("hdr-actions") else {
        return;
    };
    for h2 in [false, true] {
        for ip in [DEATHSTAR4, DEATHSTAR6] {
            let e = |path, hdrs: &[&str], code, want: &[&str]| {
                expect(&s, h2, ip, path, hdrs, code, want)
            };
            e("/v1/add", &[], "200", &["added=\"yes\""]);
            e("/v1/add", &["X-Added: yes"], "200", &["added=\"yes\""]);
            e(
                "/v1/replace",
                &["X-Replaced: evil"],
                "200",
                &["replaced=\"good\""],
            );
            e("/v1/replace", &[], "200", &["replaced=\"good\""]);
            e(
                "/v1/delete",
                &["X-Deleted: evil"],
                "200",
                &["deleted=\"-\""],
            );
            e(
                "/v1/delete",
                &["X-Deleted: good"],
                "200",
                &["deleted=\"good\""],
            );
            e("/v1/log", &["X-Logged: odd"], "200", &["logged=\"odd\""]);
        }
    }
    // The flows say which header mismatched and what weir did.
    let flows = s.flows();
    let mismatches = |path: &str| -> Vec<serde_json::Value> {
        flows
            .iter()
            .filter(|f| {
                f["l7"]["http"]["url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with(path))
            })
            .map(|f| f["l7"]["http"]["header_mismatches"].clone())
            .collect()
    };
    let add = mismatches("/v1/add");
    assert_eq!(add.len(), 8, "{add:?}");
    assert!(
        add.contains(&serde_json::json!([{"key": "x-added", "required": "yes", "action": "ADD"}]))
    );
    // A header with the required value is no mismatch.
    assert!(add.contains(&serde_json::Value::Null));
    let replace = mismatches("/v1/replace");
    assert!(replace.contains(&serde_json::json!(
        [{"key": "x-replaced", "required": "good", "found": "evil", "action": "REPLACE"}]
    )));
    let delete = mismatches("/v1/delete");
    assert!(delete.contains(&serde_json::json!(
        [{"key": "x-deleted", "required": "good", "found": "evil", "action": "DELETE"}]
    )));
    let log = mismatches("/v1/log");
    assert!(log.iter().all(|m| *m
        == serde_json::json!(
            [{"key": "x-logged", "required": "good", "found": "odd", "action": "LOG"}]
        )));
    assert!(
        flows
            .iter()
            .filter(|f| f["l7"]["http"]["header_mismatches"].is_array())
            .all(|f| f["verdict"] == "FORWARDED")
    );
}

/// Sends a raw request from the tiefighter; the response text.
fn raw(s: &Scenario, ip: &str, req: &str) -> String {
    String::from_utf8_lossy(&s.raw("tiefighter", ip, 80, req.as_bytes(), Duration::from_secs(2)))
        .into_owned()
}

/// nghttp (HTTP/2 prior knowledge) with an `:authority` of our choosing: the status.
fn nghttp_status(s: &Scenario, ip: &str, authority: &str, path: &str) -> String {
    let url = format!("{}{path}", base(ip));
    let out = s
        .lab
        .workload("tiefighter")
        .ns
        .command("nghttp")
        .args([
            "-v",
            "-t",
            "5",
            "-H",
            &format!(":authority: {authority}"),
            &url,
        ])
        .output()
        .expect("run nghttp");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    out.lines()
        .find_map(|l| l.split_once(":status: ").map(|(_, c)| c.trim().to_string()))
        .unwrap_or_else(|| format!("no status in {out}"))
}

#[test]
fn authority_userinfo_http10_and_dot_parameters() {
    let Some(s) = start("hdr-authority") else {
        return;
    };
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        // HTTP/2 `:authority` with userinfo: policy would have matched the host
        // after `@` while nginx got `Host: evil.example@svc.example`.
        let before = s.access_log().len();
        assert_eq!(nghttp_status(&s, ip, "svc.example", "/v1/hosted"), "200");
        let log = s.access_log();
        assert_eq!(log.len(), before + 1);
        assert!(log[before].contains("host=\"svc.example\""), "{log:?}");
        assert_eq!(
            nghttp_status(&s, ip, "evil.example@svc.example", "/v1/hosted"),
            "400"
        );
        assert_eq!(s.access_log().len(), before + 1, "{:?}", s.access_log());
        // The same on HTTP/1.1 in absolute form.
        let host = "Host: svc.example\r\n";
        let ok = raw(
            &s,
            ip,
            &format!(
                "GET http://svc.example/v1/hosted HTTP/1.1\r\n{host}Connection: close\r\n\r\n"
            ),
        );
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        let bad = raw(
            &s,
            ip,
            &format!(
                "GET http://evil.example@svc.example/v1/hosted HTTP/1.1\r\n{host}Connection: close\r\n\r\n"
            ),
        );
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        assert_eq!(s.access_log().len(), before + 2, "{:?}", s.access_log());

        // HTTP/1.0 without Host is forwarded as HTTP/1.0 (nginx answered 400 to the
        // HTTP/1.1-without-Host weir used to send).
        let r = raw(&s, ip, "GET /v1/plain HTTP/1.0\r\n\r\n");
        assert!(r.contains(" 200 ") && r.contains("Deathstar API"), "{r}");
        let log = s.access_log();
        assert!(
            log.last()
                .is_some_and(|l| l.contains("\"GET /v1/plain HTTP/1.0\" host=\"-\"")),
            "{log:?}"
        );
        // Two on one kept-alive HTTP/1.0 connection.
        let r = raw(
            &s,
            ip,
            "GET /v1/plain HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /v1/plain HTTP/1.0\r\n\r\n",
        );
        assert_eq!(r.matches("Deathstar API").count(), 2, "{r}");
        let log = s.access_log();
        assert!(
            log.iter()
                .rev()
                .take(2)
                .all(|l| l.contains("\"GET /v1/plain HTTP/1.0\" host=\"-\"")),
            "{log:?}"
        );
        let r = raw(
            &s,
            ip,
            "GET /v1/plain HTTP/1.0\r\nHost: svc.example\r\n\r\n",
        );
        assert!(r.contains(" 200 "), "{r}");
        assert!(
            s.access_log()
                .last()
                .is_some_and(|l| l.contains("\"GET /v1/plain HTTP/1.0\" host=\"svc.example\"")),
        );

        // `..;` and `.;` segments are refused like other dot segments; the plain
        // path passes on the same connection shape.
        let n = s.access_log().len();
        let h = "Host: deathstar\r\nConnection: close\r\n\r\n";
        let ok = raw(&s, ip, &format!("GET /v1/plain HTTP/1.1\r\n{h}"));
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        for p in [
            "/v1/x/..;/plain",
            "/v1/.;/plain",
            "/v1/x/..;jsessionid=1/plain",
            "/v1/x/%2e%2e;/plain",
        ] {
            let r = raw(&s, ip, &format!("GET {p} HTTP/1.1\r\n{h}"));
            assert!(r.starts_with("HTTP/1.1 400"), "{p}: {r}");
        }
        assert_eq!(s.access_log().len(), n + 1, "{:?}", s.access_log());
    }
    // weir's own 400 (not a stream reset by the HTTP/2 layer), with the reason.
    let flows = s.flows();
    let userinfo = flows
        .iter()
        .filter(|f| {
            f["drop_reason_desc"]
                .as_str()
                .is_some_and(|d| d.contains("has userinfo"))
        })
        .count();
    assert_eq!(userinfo, 4, "two per address family (HTTP/2 and HTTP/1.1)");
}

/// `weir policy explain` decides as the proxy does (connection headers removed
/// first, field lines joined) and says what a `mismatch` action would do. No root.
/// Sends `req` raw and returns (status line, the access-log line it added).
fn raw_probe(s: &Scenario, ip: &str, req: &str) -> (String, Option<String>) {
    let before = s.access_log().len();
    let resp = raw(s, ip, req);
    let log = s.access_log();
    let status = resp.lines().next().unwrap_or("").to_string();
    (status, log.get(before).cloned())
}

/// Three ways a request could have reached nginx in another shape than policy
/// checked (found by reading the proxy as an attacker would): each is shown
/// allowed in its honest form first.
#[test]
fn targets_and_header_aliases_cannot_change_what_nginx_gets() {
    let Some(s) = start("hdr-targets") else {
        return;
    };
    let ip = DEATHSTAR4;
    // Absolute-form without Host: policy checks the target's host, and nginx
    // must get that host (before, it got no Host and picked its default server).
    let (st, line) = raw_probe(&s, ip, "GET http://svc.example/v1/hosted HTTP/1.0\r\n\r\n");
    assert!(st.contains(" 200 "), "{st}");
    let line = line.expect("allowed absolute-form request reached nginx");
    assert!(
        line.contains("\"GET /v1/hosted HTTP/1.0\"") && line.contains("host=\"svc.example\""),
        "{line}"
    );
    let (st, line) = raw_probe(
        &s,
        ip,
        "GET http://other.example/v1/hosted HTTP/1.0\r\n\r\n",
    );
    assert!(st.contains(" 403 "), "{st}");
    assert_eq!(line, None);
    // Authority-form is CONNECT's alone: 400, for OPTIONS (whose `*` policy would
    // have checked while nginx got `/`) and GET alike.
    for req in [
        "OPTIONS deathstar:80 HTTP/1.1\r\nHost: deathstar:80\r\nConnection: close\r\n\r\n",
        "GET svc.example:80 HTTP/1.0\r\n\r\n",
    ] {
        let (st, line) = raw_probe(&s, ip, req);
        assert!(st.contains(" 400 "), "{req:?}: {st}");
        assert_eq!(line, None, "{req:?}");
    }
    // `X_Team` may be read as `X-Team` by a server (nginx with
    // underscores_in_headers): next to a checked X-Team it is refused.
    let team = "GET /v1/team HTTP/1.1\r\nHost: d\r\nX-Team: blue\r\nConnection: close\r\n\r\n";
    let (st, line) = raw_probe(&s, ip, team);
    assert!(st.contains(" 200 "), "{st}");
    assert!(line.is_some_and(|l| l.contains("team=\"blue\"")));
    let aliased = team.replace("X-Team: blue\r\n", "X_Team: red\r\nX-Team: blue\r\n");
    let (st, line) = raw_probe(&s, ip, &aliased);
    assert!(st.contains(" 400 "), "{st}");
    assert_eq!(line, None);
    // An underscore in a header no rule names is nobody's business.
    let free = team.replace("X-Team: blue\r\n", "X_Free: 1\r\nX-Team: blue\r\n");
    let (st, _) = raw_probe(&s, ip, &free);
    assert!(st.contains(" 200 "), "{st}");
}

#[test]
fn explain_shows_joined_values_and_header_actions() {
    let d = weir_tests::ScratchDir::new("explain-hdr");
    let (p, e) = (d.0.join("p.yaml"), d.0.join("e.yaml"));
    std::fs::write(&p, POLICY).unwrap();
    std::fs::write(&e, weir_tests::ENDPOINTS).unwrap();
    let run = |http: &str, hdrs: &[&str]| {
        let mut a = vec![
            "policy",
            "explain",
            "--policy",
            p.to_str().unwrap(),
            "--endpoints",
            e.to_str().unwrap(),
            "--from",
            "tiefighter",
            "--to",
            "deathstar",
            "--port",
            "80",
            "--http",
            http,
        ];
        for h in hdrs {
            a.extend(["--header", h]);
        }
        text(&weir_tests::weir_cli(&a))
    };
    assert_eq!(
        run("GET /v1/team", &["X-Team: blue"]),
        "ALLOWED\nhdr spec.ingress[0].toPorts[0].rules.http[3]\n"
    );
    assert_eq!(
        run("GET /v1/team", &["X-Team: red", "X-Team: blue"]),
        "DENIED\nno rule matched (ingress, HTTP)\n"
    );
    assert_eq!(
        run("GET /v1/teams", &["X-Team: red", "X-Team: blue"]),
        "ALLOWED\nhdr spec.ingress[0].toPorts[0].rules.http[4]\n"
    );
    assert_eq!(
        run("GET /v1/team", &["X-Team: blue", "Connection: X-Team"]),
        "ALLOWED\nhdr spec.ingress[0].toPorts[0].rules.http[3]\n"
    );
    assert_eq!(
        run("GET /v1/replace", &["X-Replaced: evil"]),
        "ALLOWED\nhdr spec.ingress[0].toPorts[0].rules.http[9]\nheaderMatches REPLACE: x-replaced replaced (required \"good\", found \"evil\")\n"
    );
    assert_eq!(
        run("GET /v1/add", &[]),
        "ALLOWED\nhdr spec.ingress[0].toPorts[0].rules.http[8]\nheaderMatches ADD: x-added added (required \"yes\", found nothing)\n"
    );
}
