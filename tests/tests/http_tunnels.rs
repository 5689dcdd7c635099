//! WebSocket upgrades and CONNECT over HTTP/1.1, through weir, with real peers
//! nobody here wrote: the `websockets` library (PyPI) as server and client,
//! curl's upgrade handshake, tinyproxy as the forward proxy behind a CONNECT
//! and nginx as the tunnel's far end; IPv4 and IPv6. Every denial is shown
//! beside the same probe succeeding under a policy that allows it, and the
//! servers' logs prove a denied request never reached them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use weir_tests::{DEATHSTAR4, DEATHSTAR6, Scenario, repo_root, settled_lines, text};

const NFT: &[&str] = &["--steering", "nft"];
const WS_PORT: u16 = 8765;
const PROXY_PORT: u16 = 8888;

/// The deathstar's ports: 80 (nginx) and 8765 (the WebSocket server) with
/// HTTP rules `ws`, 8888 (tinyproxy) with HTTP rules `proxy`.
fn policy(ws: &str, proxy: &str) -> String {
    format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: tunnels}}
spec:
  endpointSelector: {{matchLabels: {{org: empire, class: deathstar}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{org: empire}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}, {{port: "{WS_PORT}", protocol: TCP}}]
      rules:
        http:
{ws}
    - ports: [{{port: "{PROXY_PORT}", protocol: TCP}}]
      rules:
        http:
{proxy}
"#
    )
}

/// The WebSocket paths, only as upgrades (policy sees the `Upgrade` line), and
/// plain GETs under /v1/ (which open no tunnel: no `Upgrade` condition).
const WS_ECHO: &str = "        - method: GET\n          path: /(echo|refuse|v1/a)\n          headers: ['Upgrade: websocket']\n        - method: GET\n          path: /v1/.*\n";
/// The same paths for GET without a condition on `Upgrade`: no tunnel.
const WS_GET_ONLY: &str = "        - method: GET\n          path: /(echo|refuse)\n";
/// For the misbehaving server: upgrades and GETs under /public/, nothing else.
const PUBLIC: &str = "        - method: GET\n          path: /public/.*\n          headers: ['Upgrade: websocket']\n        - method: GET\n          path: /public/.*\n";
const WS_OTHER: &str = "        - method: GET\n          path: /other\n        - method: GET\n          path: /v1/.*\n";
/// CONNECT to the deathstar's own nginx (tinyproxy reaches it locally).
const CONNECT_80: &str =
    "        - method: CONNECT\n          path: '(10\\.200\\.0\\.10|\\[fd00:200::10\\]):80'\n";
/// A rule without `method`: every GET, but no CONNECT.
const ANY_PATH: &str = "        - path: '.*'\n";

fn python() -> PathBuf {
    repo_root().join(".venv/bin/python")
}

fn script(name: &str) -> String {
    repo_root()
        .join("tests/scripts")
        .join(name)
        .display()
        .to_string()
}

fn run_in(s: &Scenario, from: &str, argv: &[&str]) -> Output {
    s.lab
        .workload(from)
        .ns
        .command(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {argv:?}: {e}"))
}

fn host(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

/// The `websockets` echo server on the deathstar; its log names every
/// handshake that reached it.
fn start_ws_server(s: &mut Scenario) -> PathBuf {
    assert!(
        python().exists(),
        "{} is missing: make deps installs websockets into .venv",
        python().display()
    );
    let log = s.path("ws-server.log");
    std::fs::write(&log, "").unwrap();
    let py = python();
    let mut cmd = s.lab.workload("deathstar").ns.command(py.to_str().unwrap());
    cmd.arg(script("ws_echo_server.py"))
        .arg(WS_PORT.to_string())
        .arg(&log)
        .stderr(std::fs::File::create(s.path("ws-server.err")).unwrap());
    s.lab.spawn("ws-server", cmd).expect("start ws server");
    s.lab
        .wait_for_tcp(DEATHSTAR4, WS_PORT, Duration::from_secs(20))
        .expect("ws server listening");
    log
}

fn ws_client(s: &Scenario, url: &str, args: &[&str]) -> serde_json::Value {
    let py = python();
    let client = script("ws_client.py");
    let mut argv = vec![py.to_str().unwrap(), client.as_str(), url];
    argv.extend_from_slice(args);
    let out = run_in(s, "tiefighter", &argv);
    serde_json::from_str(text(&out).lines().last().unwrap_or("")).unwrap_or_else(|_| {
        panic!(
            "{url}: {}\n{}\n{}",
            text(&out),
            String::from_utf8_lossy(&out.stderr),
            s.weir_log_text()
        )
    })
}

fn handshakes(log: &Path) -> Vec<String> {
    settled_lines(log)
        .into_iter()
        .filter(|l| l.starts_with("handshake"))
        .collect()
}

#[test]
fn websocket_upgrades_are_decided_like_requests_and_then_tunnelled() {
    let Some(mut s) = Scenario::star_wars("ws-tunnel") else {
        return;
    };
    s.start_deathstar(&[]);
    let log = start_ws_server(&mut s);
    s.start_weir(&policy(WS_ECHO, CONNECT_80), NFT);
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        let base = format!("ws://{}:{WS_PORT}", host(ip));
        // Allowed: 101, then echoes of up to 20 kB round-trip through the tunnel.
        let got = ws_client(&s, &format!("{base}/echo"), &["echo", "20"]);
        assert_eq!(got["status"], 101, "{got}\n{}", s.weir_log_text());
        assert_eq!(got["echoed"], 20, "{got}");
        let before = handshakes(&log).len();
        // The same handshake on a path no rule allows: weir's 403, and the
        // server never saw it.
        let got = ws_client(&s, &format!("{base}/secret"), &["echo", "1"]);
        assert_eq!(got["status"], 403, "{got}");
        assert_eq!(got["body"], "Access denied\n", "{got}");
        assert_eq!(handshakes(&log).len(), before, "{:?}", handshakes(&log));
        // Allowed, but the server declines (404, no 101): relayed as is.
        let got = ws_client(&s, &format!("{base}/refuse"), &["echo", "1"]);
        assert_eq!(got["status"], 404, "{got}");
        assert_eq!(got["body"], "no websocket here\n", "{got}");
    }
    let hs = handshakes(&log);
    assert_eq!(hs.len(), 4, "{hs:?}");
    assert!(hs.iter().all(|l| !l.contains("/secret")), "{hs:?}");
    // The server sees the real client (the tunnel leaves from its address).
    assert!(hs[0].ends_with("from 10.200.0.20"), "{hs:?}");
    assert!(hs[2].ends_with("from fd00:200::20"), "{hs:?}");

    // Records: the request (101), and the tunnel's end with bytes each way.
    let flows = s.flows();
    let ends: Vec<_> = flows
        .iter()
        .filter(|f| {
            f["Summary"]
                .as_str()
                .is_some_and(|t| t.starts_with("upgrade (websocket) tunnel closed"))
        })
        .collect();
    assert_eq!(ends.len(), 2, "{flows:#?}");
    assert_eq!(ends[0]["verdict"], "FORWARDED");
    // A connection record: the request has its own (metrics count one each).
    assert_eq!(ends[0]["Type"], "L3_L4", "{:#?}", ends[0]);
    let summary = ends[0]["Summary"].as_str().unwrap();
    assert!(
        summary.ends_with("(GET http://10.200.0.10:8765/echo => 101)"),
        "{summary}"
    );
    let bytes: Vec<u64> = summary
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    // One request each in the metrics, whatever the tunnel did after.
    let metrics = text(&s.curl_from_node(&["http://127.0.0.1:9965/metrics"]));
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"weir_http_requests_total{method="GET",code="101"} 2"#),
        "{metrics}"
    );
    // 20 messages of up to 19 kB each way (plus framing and masking).
    assert!(
        bytes.len() == 2 && bytes.iter().all(|b| *b > 190_000),
        "{summary}"
    );
    assert!(
        flows.iter().any(|f| f["verdict"] == "DROPPED"
            && f["l7"]["http"]["code"] == 403
            && f["l7"]["http"]["url"]
                .as_str()
                .is_some_and(|u| u.ends_with("/secret"))),
        "{flows:#?}"
    );
}

#[test]
fn a_refused_upgrade_leaves_the_connection_http_and_h2c_is_ignored() {
    let Some(mut s) = Scenario::star_wars("ws-refused") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(&policy(WS_ECHO, CONNECT_80), NFT);
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        // nginx serves files and ignores `Upgrade`: two answers, one connection.
        let url = format!("http://{}/v1/a", host(ip));
        let out = s.curl(
            "tiefighter",
            &[
                "-H",
                "Connection: Upgrade",
                "-H",
                "Upgrade: websocket",
                "-o",
                "/dev/null",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{num_connects}\n",
                &url,
                &url,
            ],
        );
        assert_eq!(text(&out), "200 1\n200 0\n", "{}", s.weir_log_text());
        // `Upgrade: h2c` is ignored: answered in HTTP/1.1.
        let out = s.curl(
            "tiefighter",
            &[
                "--http2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                &url,
            ],
        );
        assert_eq!(text(&out), "1.1 200", "{}", s.weir_log_text());
    }
    let log = s.access_log();
    assert_eq!(log.len(), 6, "{log:?}");
}

#[test]
fn a_reload_that_revokes_the_request_closes_its_tunnel() {
    let Some(mut s) = Scenario::star_wars("ws-reload") else {
        return;
    };
    let log = start_ws_server(&mut s);
    s.start_weir(&policy(WS_ECHO, CONNECT_80), NFT);
    let py = python();
    let mut child = s
        .lab
        .workload("tiefighter")
        .ns
        .command(py.to_str().unwrap())
        .arg(script("ws_client.py"))
        .arg(format!("ws://{DEATHSTAR4}:{WS_PORT}/echo"))
        .arg("hold")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start ws client");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(first, "ready", "{first}\n{}", s.weir_log_text());
    // The tunnel is still the client connection it was (its slot, the drain).
    assert_eq!(open_http_connections(&s), "1");
    // A reload that keeps the rule leaves the tunnel alone.
    s.reload(&policy(WS_ECHO, CONNECT_80));
    std::thread::sleep(Duration::from_millis(500));
    let signalled = Instant::now();
    s.reload(&policy(WS_OTHER, CONNECT_80));
    let last = lines.next().and_then(Result::ok).unwrap_or_default();
    let _ = child.wait();
    let got: serde_json::Value = serde_json::from_str(&last).unwrap_or_else(|_| panic!("{last}"));
    assert!(
        got["closed_after"].is_number(),
        "{got}\n{}",
        s.weir_log_text()
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "{:?} {got}",
        signalled.elapsed()
    );
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| f["verdict"] == "DROPPED"
            && f["drop_reason_desc"] == "POLICY_DENIED"
            && f["Summary"]
                .as_str()
                .is_some_and(|t| t.contains("tunnel closed: the new policy no longer allows it"))),
        "{flows:#?}"
    );
    assert_eq!(handshakes(&log).len(), 1);
    assert_eq!(open_http_connections(&s), "0");
}

/// `weir_proxy_connections_open{protocol="http"}` from weir's /metrics.
fn open_http_connections(s: &Scenario) -> String {
    let out = text(&s.curl_from_node(&["http://127.0.0.1:9965/metrics"]));
    out.lines()
        .find_map(|l| l.strip_prefix("weir_proxy_connections_open{protocol=\"http\"} "))
        .unwrap_or_else(|| panic!("{out}"))
        .to_string()
}

#[test]
fn a_silent_tunnel_closes_after_the_tcp_idle_timeout() {
    let Some(mut s) = Scenario::star_wars("ws-idle") else {
        return;
    };
    start_ws_server(&mut s);
    // The HTTP idle timeout does not apply to a tunnel: it is a splice now.
    s.start_weir(
        &policy(WS_ECHO, CONNECT_80),
        &[
            "--steering",
            "nft",
            "--tcp-idle-timeout",
            "2s",
            "--idle-timeout",
            "1s",
        ],
    );
    let got = ws_client(
        &s,
        &format!("ws://[{DEATHSTAR6}]:{WS_PORT}/echo"),
        &["quiet"],
    );
    assert_eq!(got["first"], "first", "{got}");
    let after = got["closed_after"]
        .as_f64()
        .unwrap_or_else(|| panic!("{got}"));
    assert!((1.8..4.0).contains(&after), "{got}");
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| f["Summary"]
            .as_str()
            .is_some_and(|t| t.starts_with("upgrade (websocket) tunnel closed: idle for 2s"))),
        "{flows:#?}"
    );
}

/// tinyproxy on the deathstar, a forward proxy allowing CONNECT to port 80; its
/// log (stderr) names every request it received.
fn start_tinyproxy(s: &mut Scenario) -> PathBuf {
    let conf = s.path("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "Port {PROXY_PORT}\nTimeout 30\nLogLevel Info\nMaxClients 20\nConnectPort 80\nDisableViaHeader Yes\n"
        ),
    )
    .unwrap();
    let log = s.path("tinyproxy.log");
    let mut cmd = s.lab.workload("deathstar").ns.command("tinyproxy");
    let out = std::fs::File::create(&log).unwrap();
    cmd.args(["-d", "-c", conf.to_str().unwrap()])
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    s.lab.spawn("tinyproxy", cmd).expect("start tinyproxy");
    s.lab
        .wait_for_tcp(DEATHSTAR4, PROXY_PORT, Duration::from_secs(10))
        .expect("tinyproxy listening");
    log
}

fn proxy_requests(log: &Path) -> Vec<String> {
    settled_lines(log)
        .into_iter()
        .filter(|l| l.contains("Request (file descriptor"))
        .collect()
}

#[test]
fn connect_is_tunnelled_only_when_a_rule_names_it() {
    let Some(mut s) = Scenario::star_wars("connect-tunnel") else {
        return;
    };
    s.start_deathstar(&[]);
    let log = start_tinyproxy(&mut s);
    s.start_weir(&policy(WS_ECHO, CONNECT_80), NFT);
    let probe = |s: &Scenario, proxy: &str, target: &str| -> String {
        let out = s.curl(
            "tiefighter",
            &[
                "-S",
                "-p",
                "-x",
                &format!("http://{}:{PROXY_PORT}", host(proxy)),
                "-w",
                " %{http_connect} %{http_code}",
                &format!("http://{}/v1/through", host(target)),
            ],
        );
        if !out.status.success() {
            eprintln!("curl: {}", String::from_utf8_lossy(&out.stderr));
        }
        text(&out)
    };
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        // Allowed: curl's CONNECT gets tinyproxy's 200, then its GET reaches
        // the deathstar's nginx through the tunnel (tinyproxy connects to it
        // locally, so it is nginx's only client from the deathstar's address).
        let out = probe(&s, ip, ip);
        assert_eq!(
            out,
            "Deathstar API\n 200 200",
            "{}\n{}",
            s.weir_log_text(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let reqs = proxy_requests(&log);
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert!(reqs[0].contains("CONNECT 10.200.0.10:80"), "{reqs:?}");
    assert!(reqs[1].contains("CONNECT [fd00:200::10]:80"), "{reqs:?}");
    let far = s.access_log();
    assert_eq!(far.len(), 2, "{far:?}");
    assert!(far[0].starts_with("10.200.0.10 "), "{far:?}");
    assert!(far[1].starts_with("fd00:200::10 "), "{far:?}");
    assert!(
        far.iter()
            .all(|l| l.contains("\"GET /v1/through HTTP/1.1\" 200")),
        "{far:?}"
    );

    // A rule without `method` allows any GET but not CONNECT: the same probes
    // get weir's 403 and neither proxy nor far end sees a thing.
    s.reload(&policy(WS_ECHO, ANY_PATH));
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        let out = probe(&s, ip, ip);
        // curl's `%{http_connect}`: the proxy's (here weir's) answer to CONNECT.
        assert!(
            out.trim_start().starts_with("403 "),
            "{out}\n{}",
            s.weir_log_text()
        );
    }
    assert_eq!(proxy_requests(&log).len(), 2, "{:?}", proxy_requests(&log));
    assert_eq!(s.access_log().len(), 2, "{:?}", s.access_log());
    // ...while a plain proxied GET (absolute-form) still passes that rule.
    let out = s.curl(
        "tiefighter",
        &[
            "-x",
            &format!("http://{DEATHSTAR4}:{PROXY_PORT}"),
            "-w",
            " %{http_code}",
            &format!("http://{DEATHSTAR4}/v1/plain"),
        ],
    );
    assert_eq!(text(&out), "Deathstar API\n 200", "{}", s.weir_log_text());

    let flows = s.flows();
    let connects: Vec<_> = flows
        .iter()
        .filter(|f| f["l7"]["http"]["method"] == "CONNECT")
        .collect();
    assert!(
        connects.iter().any(|f| f["verdict"] == "FORWARDED"
            && f["l7"]["http"]["url"] == "10.200.0.10:80"
            && f["l7"]["http"]["code"] == 200),
        "{connects:#?}"
    );
    assert!(
        flows.iter().any(|f| f["Summary"].as_str().is_some_and(|t| {
            t.starts_with("CONNECT tunnel closed") && t.ends_with("(CONNECT 10.200.0.10:80 => 200)")
        })),
        "{flows:#?}"
    );
    assert!(
        connects
            .iter()
            .any(|f| f["verdict"] == "DROPPED" && f["l7"]["http"]["code"] == 403),
        "{connects:#?}"
    );
}

#[test]
fn an_upgrade_needs_a_rule_that_names_the_upgrade_header() {
    let Some(mut s) = Scenario::star_wars("ws-needs-rule") else {
        return;
    };
    let log = start_ws_server(&mut s);
    s.start_weir(&policy(WS_ECHO, CONNECT_80), NFT);
    let url = format!("ws://{DEATHSTAR4}:{WS_PORT}/echo");
    // A rule with `headers: ['Upgrade: websocket']` opens the tunnel...
    let got = ws_client(&s, &url, &["echo", "2"]);
    assert_eq!(got["status"], 101, "{got}\n{}", s.weir_log_text());
    assert_eq!(got["echoed"], 2, "{got}");
    assert_eq!(handshakes(&log).len(), 1);
    // ...a rule allowing the same GET without naming `Upgrade` does not: the
    // same handshake gets weir's 403 and never reaches the server.
    s.reload(&policy(WS_GET_ONLY, CONNECT_80));
    let got = ws_client(&s, &url, &["echo", "2"]);
    assert_eq!(got["status"], 403, "{got}\n{}", s.weir_log_text());
    assert_eq!(handshakes(&log).len(), 1, "{:?}", handshakes(&log));
    // The plain GET that rule is for still passes (the server's own 426).
    let out = s.curl(
        "tiefighter",
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{DEATHSTAR4}:{WS_PORT}/echo"),
        ],
    );
    assert_eq!(text(&out), "426", "{}", s.weir_log_text());
}

/// The misbehaving server (`bad_101_server.py`) on the WebSocket port; its log
/// has every request line it read.
fn start_bad_server(s: &mut Scenario) -> PathBuf {
    let log = s.path("bad-server.log");
    std::fs::write(&log, "").unwrap();
    let py = python();
    let mut cmd = s.lab.workload("deathstar").ns.command(py.to_str().unwrap());
    cmd.arg(script("bad_101_server.py"))
        .arg(WS_PORT.to_string())
        .arg(&log)
        .stderr(std::fs::File::create(s.path("bad-server.err")).unwrap());
    s.lab.spawn("bad-server", cmd).expect("start bad server");
    s.lab
        .wait_for_tcp(DEATHSTAR4, WS_PORT, Duration::from_secs(20))
        .expect("bad server listening");
    log
}

#[test]
fn a_101_that_does_not_answer_the_handshake_is_not_a_tunnel() {
    let Some(mut s) = Scenario::star_wars("ws-bad-101") else {
        return;
    };
    let log = start_bad_server(&mut s);
    s.start_weir(&policy(PUBLIC, CONNECT_80), NFT);
    let probe_as = |s: &Scenario, upgrade: &str, next: &str, how: &str| -> serde_json::Value {
        let py = python();
        let client = script("upgrade_then_get.py");
        let port = WS_PORT.to_string();
        let argv = [
            py.to_str().unwrap(),
            client.as_str(),
            DEATHSTAR4,
            port.as_str(),
            upgrade,
            next,
            how,
        ];
        let out = run_in(s, "tiefighter", &argv);
        serde_json::from_str(text(&out).trim()).unwrap_or_else(|_| {
            panic!(
                "{}\n{}\n{}",
                text(&out),
                String::from_utf8_lossy(&out.stderr),
                s.weir_log_text()
            )
        })
    };
    let probe = |s: &Scenario, upgrade: &str, next: &str| probe_as(s, upgrade, next, "switch");
    let requests = || -> Vec<String> { settled_lines(&log) };
    // A valid switch (the right Accept) tunnels: what follows on the connection
    // is the client's and the server's business, and reaches the server.
    let got = probe(&s, "/public/ws", "/in-the-tunnel");
    assert_eq!(got["upgrade"], 101, "{got}\n{}", s.weir_log_text());
    assert_eq!(got["next"], 200, "{got}");
    assert_eq!(got["next_body"], "ok /in-the-tunnel\n", "{got}");
    assert!(
        requests()
            .iter()
            .any(|l| l == "request GET /in-the-tunnel HTTP/1.1"),
        "{:?}",
        requests()
    );
    // Outside a tunnel, /admin is weir's to refuse.
    let got = probe(&s, "/public/other", "/admin");
    assert_eq!(
        (&got["upgrade"], &got["next"]),
        (&200.into(), &403.into()),
        "{got}"
    );
    // A 101 without the handshake's answer (a status echoed from the URL, or a
    // wrong Accept): the client gets weir's 502, the connection stays HTTP, and
    // the /admin after it is decided (403) and never reaches the server.
    for path in ["/public/status?code=101", "/public/wrong-accept"] {
        let got = probe(&s, path, "/admin");
        assert_eq!(got["upgrade"], 502, "{path}: {got}\n{}", s.weir_log_text());
        assert_eq!(got["next"], 403, "{path}: {got}");
        assert!(
            requests()
                .iter()
                .any(|l| l.contains(&format!("GET {path} "))),
            "{:?}",
            requests()
        );
    }
    // A 101 to a request that asked for no switch at all is no switch either.
    let got = probe_as(&s, "/public/status?code=101", "/admin", "plain");
    assert_eq!(got["upgrade"], 502, "{got}\n{}", s.weir_log_text());
    assert_eq!(got["next"], 403, "{got}");
    assert!(
        requests().iter().all(|l| !l.contains("/admin")),
        "{:?}",
        requests()
    );
    let flows = s.flows();
    for path in ["/public/status?code=101", "/public/wrong-accept"] {
        assert!(
            flows.iter().any(|f| f["l7"]["http"]["code"] == 502
                && f["l7"]["http"]["url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with(path))),
            "{path}: {flows:#?}"
        );
    }
    assert!(
        s.weir_log_text().contains("did not switch as asked"),
        "{}",
        s.weir_log_text()
    );
}
