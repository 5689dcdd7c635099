//! HTTP/2 end to end and gRPC: real clients (curl, nghttp, h2load, grpcio) and
//! real servers (nginx with a cleartext HTTP/2 listener, a grpcio server) in
//! network namespaces, IPv4 and IPv6. The upstreams' logs prove that denied
//! streams never reached them and that one upstream HTTP/2 connection carried
//! a client's allowed streams.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use weir_tests::{
    DEATHSTAR4, DEATHSTAR6, ENDPOINTS, RSS_GROWTH_BOUND_KIB, Scenario, ScratchDir, lab, repo_root,
    rss_kib, settled_lines, text, weir_cli,
};

const NFT: &[&str] = &["--steering", "nft"];

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: h2}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}, {port: "8080", protocol: TCP}, {port: "8082", protocol: TCP}, {port: "8083", protocol: TCP}, {port: "8084", protocol: TCP}]
      rules:
        http:
        - method: POST
          path: /v1/request-landing
        - method: GET
          path: /v1/.*
    - ports: [{port: "50051", protocol: TCP}, {port: "50052", protocol: TCP}]
      rules:
        http:
        - method: POST
          path: '/echo\.Echo/(Unary|Collect|Expand|Chat|Slow|Watch|Fail)'
    - ports: [{port: "81", protocol: TCP}]
"#;

/// The deathstar's nginx plus a cleartext HTTP/2 server on 8080 whose log
/// names each request's connection (`$connection`) and protocol.
fn start_nginx(s: &mut Scenario) {
    let d = s.dir.0.join("nginx");
    let dir = d.display().to_string();
    s.start_deathstar_with(&[81], move |c| {
        let h2 = format!(
            r#"  log_format h2 '$remote_addr $connection $server_protocol "$request" $status';
  server {{
    listen 8080 http2;
    listen [::]:8080 http2;
    access_log {dir}/h2.log h2;
    location = /v1/request-landing {{ return 200 "Ship landed\n"; }}
    location /v1/static/ {{ alias {dir}/static/; }}
    location / {{ return 200 "Deathstar API\n"; }}
  }}
  server {{
    listen 8083 http2;
    listen [::]:8083 http2;
    http2_max_concurrent_streams 4;
    access_log {dir}/h2small.log h2;
    location / {{ return 200 "Deathstar API\n"; }}
  }}
"#
        );
        let end = c.rfind('}').expect("http block");
        format!("{}{h2}{}", &c[..end], &c[end..])
    });
    s.lab
        .wait_for_tcp(DEATHSTAR4, 8080, Duration::from_secs(10))
        .expect("nginx h2 listening");
}

fn h2_log(s: &Scenario) -> Vec<String> {
    settled_lines(&s.dir.0.join("nginx/h2.log"))
}

fn url(ip: &str, port: u16, path: &str) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]:{port}{path}")
    } else {
        format!("http://{ip}:{port}{path}")
    }
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

#[test]
fn http2_streams_allowed_and_denied_interleave_over_one_upstream_connection() {
    let Some(mut s) = Scenario::star_wars("h2-streams") else {
        return;
    };
    start_nginx(&mut s);
    s.start_weir(POLICY, NFT);
    for (ip, client) in [(DEATHSTAR4, "10.200.0.20 "), (DEATHSTAR6, "fd00:200::20 ")] {
        let before = h2_log(&s).len();
        // curl: six requests side by side. curl 7.88 fails (error 16) every
        // request after the first on a reused prior-knowledge connection, even
        // straight to nginx, so each gets its own connection here: six downstream
        // connections that must share one upstream connection. (nghttp and h2load
        // below interleave streams on one downstream connection.)
        let mut args = vec![
            "--http2-prior-knowledge",
            "--parallel",
            "--parallel-immediate",
            "-w",
            "%{http_code} %{http_version} %{num_connects}\\n",
        ];
        let urls: Vec<String> = [
            "/v1/one",
            "/deny/one",
            "/v1/two",
            "/deny/two",
            "/v1/three",
            "/deny/3",
        ]
        .iter()
        .map(|p| url(ip, 8080, p))
        .collect();
        for u in &urls {
            args.extend(["-o", "/dev/null", u.as_str()]);
        }
        let out = text(&s.curl("tiefighter", &args));
        let mut lines: Vec<&str> = out.lines().collect();
        lines.sort();
        let codes: Vec<&str> = lines.iter().map(|l| &l[..5]).collect();
        assert_eq!(
            codes,
            ["200 2", "200 2", "200 2", "403 2", "403 2", "403 2"],
            "{out}\n{}",
            s.weir_log_text()
        );
        let connects: u32 = lines
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u32>().ok())
            .sum();
        assert_eq!(connects, 6, "{out}");

        // nghttp: the same, frame by frame.
        let out = run_in(
            &s,
            "tiefighter",
            &[
                "nghttp",
                "-nv",
                "-t",
                "10",
                &url(ip, 8080, "/v1/four"),
                &url(ip, 8080, "/deny/four"),
                &url(ip, 8080, "/v1/five"),
            ],
        );
        let v = text(&out);
        assert_eq!(v.matches(":status: 200").count(), 2, "{v}");
        assert_eq!(v.matches(":status: 403").count(), 1, "{v}");

        // h2load: 60 requests, 10 streams at a time, allowed and denied
        // alternating. (h2load 1.52 sends an IPv6 `:authority` without brackets,
        // which HTTP/2 servers refuse: it is given the right one.)
        let authority = if ip.contains(':') {
            format!(":authority: [{ip}]:8080")
        } else {
            format!(":authority: {ip}:8080")
        };
        let out = run_in(
            &s,
            "tiefighter",
            &[
                "h2load",
                "-H",
                &authority,
                "-n",
                "60",
                "-c",
                "1",
                "-m",
                "10",
                &url(ip, 8080, "/v1/load"),
                &url(ip, 8080, "/deny/load"),
            ],
        );
        let o = text(&out);
        assert!(
            o.contains("60 done, 30 succeeded, 30 failed, 0 errored"),
            "{o}\n{}",
            s.weir_log_text()
        );
        assert!(o.contains("status codes: 30 2xx, 0 3xx, 30 4xx"), "{o}");

        let log = h2_log(&s);
        let new = &log[before..];
        assert_eq!(
            new.len(),
            3 + 2 + 30,
            "only allowed streams reach nginx: {new:?}"
        );
        assert!(new.iter().all(|l| l.contains("GET /v1/")), "{new:?}");
        assert!(!new.iter().any(|l| l.contains("/deny/")), "{new:?}");
        assert!(
            new.iter().all(|l| l.contains(" HTTP/2.0 ")),
            "upstream leg is HTTP/2: {new:?}"
        );
        // From the client's own address, over ONE upstream connection shared by
        // the client's three downstream connections (curl, nghttp, h2load).
        assert!(new.iter().all(|l| l.starts_with(client)), "{new:?}");
        let conns: BTreeSet<&str> = new.iter().filter_map(|l| l.split(' ').nth(1)).collect();
        assert_eq!(conns.len(), 1, "one upstream connection: {new:?}");
    }
    let flows = s.flows();
    let denied = flows
        .iter()
        .filter(|f| f["verdict"] == "DROPPED" && f["l7"]["http"]["protocol"] == "HTTP/2")
        .count();
    assert_eq!(denied, 2 * (3 + 1 + 30), "one record per denied stream");
}

#[test]
fn another_upstream_connection_opens_at_the_servers_stream_limit() {
    let Some(mut s) = Scenario::star_wars("h2-maxstreams") else {
        return;
    };
    start_nginx(&mut s);
    s.start_weir(POLICY, NFT);
    let mut before = 0;
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        // 16 streams at once on one client connection; the server allows 4 per
        // connection (SETTINGS_MAX_CONCURRENT_STREAMS).
        let authority = if ip.contains(':') {
            format!(":authority: [{ip}]:8083")
        } else {
            format!(":authority: {ip}:8083")
        };
        let out = run_in(
            &s,
            "tiefighter",
            &[
                "h2load",
                "-H",
                &authority,
                "-n",
                "200",
                "-c",
                "1",
                "-m",
                "16",
                &url(ip, 8083, "/v1/many"),
            ],
        );
        let o = text(&out);
        assert!(o.contains("200 succeeded"), "{o}\n{}", s.weir_log_text());
        let log = settled_lines(&s.dir.0.join("nginx/h2small.log"));
        let new = &log[before..];
        before = log.len();
        assert_eq!(new.len(), 200, "{new:?}");
        let conns: BTreeSet<&str> = new.iter().filter_map(|l| l.split(' ').nth(1)).collect();
        // More than one, and no more than --upstream-conns-per-client (16).
        assert!((2..=16).contains(&conns.len()), "{conns:?}");
    }
}

#[test]
fn trailers_resets_and_goaway_pass_between_client_and_server() {
    let Some(mut s) = Scenario::star_wars("h2-trailers") else {
        return;
    };
    let py = python();
    let mut cmd = s.lab.workload("deathstar").ns.command(py.to_str().unwrap());
    cmd.args([&script("h2_peer.py"), "serve", "8084"]);
    s.lab.spawn("h2-peer", cmd).expect("start h2 server");
    s.lab
        .wait_for_tcp(DEATHSTAR4, 8084, Duration::from_secs(10))
        .expect("h2 server listening");
    s.start_weir(POLICY, NFT);
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        let out = run_in(
            &s,
            "tiefighter",
            &[
                py.to_str().unwrap(),
                &script("h2_peer.py"),
                "call",
                ip,
                "8084",
            ],
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                s.weir_log_text()
            )
        });
        assert_eq!(r["status"], "200", "{r}");
        assert_eq!(r["body"], "ok");
        // The request's trailer reached the server (it echoes it back), and
        // the server's trailers reached the client.
        assert_eq!(r["trailers"]["x-echo"], "from-client", "{r}");
        assert_eq!(r["trailers"]["x-server-trailer"], "yes");
        // RST_STREAM(HTTP_1_1_REQUIRED = 0xd) from the server, code intact.
        assert_eq!(r["rst_code"], 13, "{r}");
        // The server's GOAWAY that did not take a stream: the client's stream is
        // reset REFUSED_STREAM (7, safe to retry), and its next request goes over
        // a new upstream connection.
        let out = run_in(
            &s,
            "tiefighter",
            &[
                py.to_str().unwrap(),
                &script("h2_peer.py"),
                "goaway",
                ip,
                "8084",
            ],
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                s.weir_log_text()
            )
        });
        assert_eq!(r["goaway_rst_code"], 7, "{r}");
        assert_eq!(r["after_status"], "200", "{r}");
        assert_eq!(r["after_trailers"]["x-echo"], "again", "{r}");
    }
    let flows = s.flows();
    assert!(
        flows
            .iter()
            .any(|f| f["drop_reason_desc"] == "UPSTREAM_RESET"),
        "{flows:?}"
    );
}

#[test]
fn a_100_mb_response_to_a_slow_reader_keeps_weir_small() {
    let Some(mut s) = Scenario::star_wars("h2-bigbody") else {
        return;
    };
    start_nginx(&mut s);
    let static_dir = s.dir.0.join("nginx/static");
    std::fs::create_dir_all(&static_dir).unwrap();
    let big = std::fs::File::create(static_dir.join("big.bin")).unwrap();
    big.set_len(100 * 1024 * 1024).unwrap();
    s.start_weir(POLICY, NFT);
    let pid = s.weir().pid();
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        let baseline = rss_kib(pid);
        let mut child = s
            .lab
            .workload("tiefighter")
            .ns
            .command("curl")
            .args([
                "-s",
                "--http2-prior-knowledge",
                "--limit-rate",
                "25M",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download} %{http_version}",
                &url(ip, 8080, "/v1/static/big.bin"),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run curl");
        let mut peak = baseline;
        while child.try_wait().ok().flatten().is_none() {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(text(&out), "200 104857600 2", "{}", s.weir_log_text());
        eprintln!("{ip}: weir RSS {baseline} KiB, peak {peak} KiB during the download");
        assert!(
            peak.saturating_sub(baseline) < RSS_GROWTH_BOUND_KIB,
            "{ip}: weir grew from {baseline} KiB to {peak} KiB"
        );
    }
}

#[test]
fn tls_on_an_http_rules_port_is_refused_at_once_and_upgrade_h2c_stays_http1() {
    let Some(mut s) = Scenario::star_wars("h2-detect") else {
        return;
    };
    start_nginx(&mut s);
    s.start_weir(POLICY, NFT);
    // Port 81 has no HTTP rules: the ClientHello is spliced through, and nginx
    // (plain HTTP) logs it as a bad request.
    let out = s.curl("tiefighter", &["-k", &format!("https://{DEATHSTAR4}:81/")]);
    assert_ne!(out.status.code(), Some(0));
    let log = s.access_log();
    assert_eq!(
        log.len(),
        1,
        "the probe reaches nginx on a port without HTTP rules: {log:?}"
    );
    assert!(log[0].contains("\" 400 "), "{log:?}");
    // Port 80 has HTTP rules: refused at once (no hang), nothing reaches nginx.
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        let started = Instant::now();
        let target = if ip.contains(':') {
            format!("https://[{ip}]:80/v1/x")
        } else {
            format!("https://{ip}:80/v1/x")
        };
        let out = s.curl("tiefighter", &["-k", &target]);
        assert_eq!(out.status.code(), Some(35), "TLS handshake fails: {out:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(s.access_log().len(), 1, "{:?}", s.access_log());
    let flows = s.flows();
    let tls: Vec<_> = flows
        .iter()
        .filter(|f| f["drop_reason_desc"] == "TLS_ON_HTTP_PORT")
        .collect();
    assert_eq!(tls.len(), 2, "{flows:?}");
    assert_eq!(tls[0]["verdict"], "DROPPED");
    assert_eq!(
        tls[0]["policy"],
        "TLS on an HTTP-rules port; weir cannot inspect it"
    );
    // `Upgrade: h2c` (curl --http2 on http://) is answered in HTTP/1.1.
    let out = s.curl(
        "tiefighter",
        &[
            "--http2",
            "-w",
            " %{http_version} %{http_code}",
            "-X",
            "POST",
            &format!("http://{DEATHSTAR4}/v1/request-landing"),
        ],
    );
    assert_eq!(text(&out), "Ship landed\n 1.1 200", "{}", s.weir_log_text());
    let log = s.access_log();
    assert!(
        log[1].contains("\"POST /v1/request-landing HTTP/1.1\" 200"),
        "{log:?}"
    );
}

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

/// Runs the grpcio client from the tiefighter: one JSON object per call.
fn grpc_calls(s: &Scenario, target: &str, calls: &[&str]) -> Vec<serde_json::Value> {
    let py = python();
    let mut argv = vec![
        py.to_str().unwrap().to_string(),
        script("grpc_echo_client.py"),
        target.to_string(),
    ];
    argv.extend(calls.iter().map(|c| c.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = run_in(s, "tiefighter", &argv);
    let lines: Vec<serde_json::Value> = text(&out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        lines.len(),
        calls.len(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.weir_log_text()
    );
    lines
}

#[test]
fn grpc_calls_of_every_kind_with_denials_deadlines_and_cancellation() {
    let Some(mut s) = Scenario::star_wars("h2-grpc") else {
        return;
    };
    assert!(
        python().exists(),
        "{} is missing: make deps installs grpcio into .venv",
        python().display()
    );
    let server_log = s.path("grpc-server.log");
    std::fs::write(&server_log, "").unwrap();
    let py = python();
    let mut cmd = s.lab.workload("deathstar").ns.command(py.to_str().unwrap());
    cmd.arg(script("grpc_echo_server.py"))
        .arg("50051")
        .arg(&server_log)
        .env("GRPC_VERBOSITY", "debug")
        .env("GRPC_TRACE", "http")
        .stderr(std::fs::File::create(s.path("grpc-server.err")).unwrap());
    s.lab.spawn("grpc-server", cmd).expect("start grpc server");
    s.lab
        .wait_for_tcp(DEATHSTAR4, 50051, Duration::from_secs(20))
        .expect("grpc server listening");
    s.start_weir(POLICY, &["--steering", "nft", "--upstream-timeout", "2s"]);
    for (ip, peer) in [
        (DEATHSTAR4, "ipv4:10.200.0.20:"),
        (DEATHSTAR6, "ipv6:%5Bfd00:200::20%5D:"),
    ] {
        let target = if ip.contains(':') {
            format!("ipv6:[{ip}]:50051")
        } else {
            format!("{ip}:50051")
        };
        std::fs::write(&server_log, "").unwrap();
        let calls = [
            "unary",
            "forbidden",
            "collect",
            "expand",
            "chat",
            "fail",
            "slow",
            "slow-long",
            "watch-cancel",
            "slow-cancel",
        ];
        let got = grpc_calls(&s, &target, &calls);
        let by = |c: &str| got.iter().find(|g| g["call"] == c).unwrap().clone();
        assert_eq!(
            by("unary")["code"],
            "OK",
            "{got:?}\n{}\n{}",
            s.weir_log_text(),
            std::fs::read_to_string(s.path("grpc-server.err")).unwrap_or_default()
        );
        assert_eq!(by("unary")["result"], "b'echo:hi'");
        assert_eq!(by("collect")["result"], "b'a,b,c'");
        assert_eq!(by("expand")["result"], "[b'x-0', b'x-1', b'x-2']");
        assert_eq!(by("chat")["result"], "[b're:1', b're:2']");
        assert_eq!(by("watch-cancel")["result"], "b'tick'");
        assert_eq!(by("slow-cancel")["result"], "'cancelled'");
        let denied = by("forbidden");
        assert_eq!(denied["code"], "PERMISSION_DENIED", "{got:?}");
        assert!(
            denied["details"]
                .as_str()
                .unwrap()
                .starts_with("denied by weir policy: "),
            "{denied}"
        );
        // The server's own status (trailers-only) passes through.
        assert_eq!(by("fail")["code"], "NOT_FOUND");
        assert_eq!(by("fail")["details"], "no such ship");
        // The call's deadline (1 s), and weir's --upstream-timeout (2 s) before
        // the client's 20 s.
        assert_eq!(by("slow")["code"], "DEADLINE_EXCEEDED", "{got:?}");
        let long = by("slow-long");
        assert_eq!(long["code"], "DEADLINE_EXCEEDED", "{got:?}");
        assert!(long["details"].as_str().unwrap().contains("weir"), "{long}");
        // The server saw every allowed call from the client's address, never the
        // denied one, and the client's cancellation.
        let ok = lab::wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&server_log).is_ok_and(|l| l.contains("Watch cancelled"))
        });
        let log = std::fs::read_to_string(&server_log).unwrap();
        assert!(ok.is_ok(), "cancellation reached the server: {log}");
        for m in [
            "Unary", "Collect", "Expand", "Chat", "Fail", "Slow", "Watch",
        ] {
            assert!(log.contains(&format!("{m} {peer}")), "{m}: {log}");
        }
        assert!(!log.contains("Forbidden"), "{log}");
        // A second client implementation: tonic.
        let uri = if ip.contains(':') {
            format!("http://[{ip}]:50051")
        } else {
            format!("http://{ip}:50051")
        };
        let tonic = weir_tests::weir_bin().with_file_name("tonic-grpc-client");
        let out = run_in(
            &s,
            "tiefighter",
            &[
                tonic.to_str().unwrap(),
                &uri,
                "unary",
                "forbidden",
                "expand",
                "chat",
            ],
        );
        let got: Vec<serde_json::Value> = text(&out)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert_eq!(got.len(), 4, "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(got[0]["result"], "echo:hi", "{got:?}");
        assert_eq!(got[1]["code"], "PermissionDenied", "{got:?}");
        assert!(
            got[1]["message"]
                .as_str()
                .unwrap()
                .starts_with("denied by weir policy: "),
            "{got:?}"
        );
        assert_eq!(got[2]["result"], "x-0,x-1,x-2", "{got:?}");
        assert_eq!(got[3]["result"], "re:1,re:2", "{got:?}");
        // Nothing listens on 50052: UNAVAILABLE, from weir.
        let target = target.replace("50051", "50052");
        let got = grpc_calls(&s, &target, &["unary"]);
        assert_eq!(got[0]["code"], "UNAVAILABLE", "{got:?}");
        assert!(
            got[0]["details"].as_str().unwrap().contains("weir"),
            "{got:?}"
        );
    }
    let flows = s.flows();
    let grpc = |method: &str, status: u64| {
        flows.iter().any(|f| {
            let g = &f["l7"]["http"]["grpc"];
            g["service"] == "echo.Echo" && g["method"] == method && g["status"] == status
        })
    };
    assert!(grpc("Unary", 0), "{flows:?}");
    assert!(grpc("Chat", 0));
    assert!(grpc("Forbidden", 7));
    assert!(grpc("Fail", 5));
    assert!(grpc("Slow", 4));
    assert!(grpc("Unary", 14));
    // Cancelled by the client before the response head: still recorded.
    assert!(flows.iter().any(|f| {
        f["l7"]["http"]["grpc"]["method"] == "Slow"
            && f["l7"]["http"]["grpc"]["status"] == 1
            && f["drop_reason_desc"] == "CLIENT_CANCELLED"
    }));
    let forbidden = flows
        .iter()
        .find(|f| f["l7"]["http"]["grpc"]["method"] == "Forbidden")
        .unwrap();
    assert_eq!(forbidden["verdict"], "DROPPED");
}

/// The `drop_reason_desc` of the flow records for HTTP/2 connections weir ended.
fn http2_records(s: &Scenario) -> Vec<String> {
    s.flows()
        .iter()
        .filter_map(|f| f["drop_reason_desc"].as_str())
        .filter(|r| r.starts_with("HTTP2_"))
        .map(str::to_string)
        .collect()
}

/// One attack from the tiefighter while a good client (nghttp, its own
/// connection) keeps making requests: the attacker's JSON result, and how many
/// good requests succeeded / were made meanwhile.
fn attack(s: &Scenario, ip: &str, port: u16, name: &str) -> (serde_json::Value, usize, usize) {
    let py = python();
    let mut child = s
        .lab
        .workload("tiefighter")
        .ns
        .command(py.to_str().unwrap())
        .args([
            &script("h2_abuse.py"),
            ip,
            &port.to_string(),
            name,
            "/v1/abuse",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run attacker");
    let (mut ok, mut tried) = (0, 0);
    let started = Instant::now();
    loop {
        let done = child.try_wait().ok().flatten().is_some();
        let v = text(&run_in(
            s,
            "tiefighter",
            &["nghttp", "-n", "-s", "-t", "5", &url(ip, 8080, "/v1/good")],
        ));
        tried += 1;
        if v.contains(" 200 ") {
            ok += 1;
        }
        if done && tried >= 3 || started.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    let out = child.wait_with_output().expect("attacker output");
    let result = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{name}: {e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (result, ok, tried)
}

#[test]
fn http2_abuse_ends_only_the_offending_connection() {
    let Some(mut s) = Scenario::star_wars("h2-abuse") else {
        return;
    };
    start_nginx(&mut s);
    // A server that takes connections and never answers.
    let cmd = {
        let mut c = s.lab.workload("deathstar").ns.command("socat");
        c.args([
            "-u",
            "TCP6-LISTEN:8082,fork,reuseaddr,ipv6only=0",
            "OPEN:/dev/null",
        ]);
        c
    };
    s.lab.spawn("silent-server", cmd).expect("start socat");
    s.lab
        .wait_for_tcp(DEATHSTAR4, 8082, Duration::from_secs(10))
        .expect("silent server listening");
    s.start_weir(
        POLICY,
        &[
            "--steering",
            "nft",
            "--http2-max-resets-per-sec",
            "50",
            "--http2-max-local-resets",
            "100",
            "--request-head-timeout",
            "2s",
        ],
    );
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        for name in [
            "rapid-reset",
            "reset-after-accept",
            "made-you-reset",
            "continuation-flood",
            "settings-flood",
            "malformed-frame",
            "oversized-headers",
            "slowloris-preface",
        ] {
            let before = h2_log(&s).len();
            let records_before = http2_records(&s).len();
            // Streams weir has taken stay open when the server never answers
            // (8082): there a client's resets are weir's to count.
            let port = if name == "reset-after-accept" {
                8082
            } else {
                8080
            };
            let (r, ok, tried) = attack(&s, ip, port, name);
            let what = format!(
                "{ip} {name}: {r}, good {ok}/{tried}; nginx: {:?}",
                h2_log(&s)[before..]
                    .iter()
                    .filter(|l| l.contains("abuse"))
                    .take(5)
                    .collect::<Vec<_>>()
            );
            // The good client on its own connection never noticed.
            assert!(tried >= 3 && ok == tried, "{what}\n{}", s.weir_log_text());
            // The attacker's connection was ended (floods by GOAWAY, a stalled
            // preface or header block by the request-head deadline).
            assert_eq!(r["closed"], true, "{what}");
            let elapsed = r["elapsed"].as_f64().unwrap();
            match name {
                "malformed-frame" => assert_eq!(r["goaway"], 1, "{what}"),
                "slowloris-preface" | "oversized-headers" => {
                    assert!((1.5..5.0).contains(&elapsed), "{what}")
                }
                "settings-flood" => {}
                // GOAWAY, then a second's grace for the streams in flight.
                "reset-after-accept" => assert!(elapsed < 5.0, "{what}"),
                _ => assert!(elapsed < 2.0, "{what}"),
            }
            // Nothing of the attacker's reached nginx but the good requests
            // (and a few of the request floods' own, before the GOAWAY).
            let log = h2_log(&s);
            assert!(
                log[before..]
                    .iter()
                    .all(|l| l.contains("/v1/good") || l.contains("/v1/abuse")),
                "{what}: {:?}",
                &log[before..]
            );
            if name == "oversized-headers" {
                assert!(!log[before..].iter().any(|l| l.contains("/v1/abuse")));
            }
            // A connection ended for abuse has a flow record saying why.
            let records = http2_records(&s);
            let new = &records[records_before..];
            match name {
                "reset-after-accept" => assert_eq!(new, ["HTTP2_TOO_MANY_RESETS"], "{what}"),
                "rapid-reset" | "continuation-flood" => {
                    assert_eq!(new, ["HTTP2_GOAWAY: ENHANCE_YOUR_CALM"], "{what}")
                }
                // h2 ends it either at its local-reset limit (ENHANCE_YOUR_CALM)
                // or, when a WINDOW_UPDATE lands on a stream already closed, at
                // once (PROTOCOL_ERROR): both only this connection.
                "made-you-reset" => assert!(
                    new == ["HTTP2_GOAWAY: ENHANCE_YOUR_CALM"]
                        || new == ["HTTP2_GOAWAY: PROTOCOL_ERROR"],
                    "{what}: {new:?}"
                ),
                "malformed-frame" => assert_eq!(new, ["HTTP2_GOAWAY: PROTOCOL_ERROR"], "{what}"),
                _ => {}
            }
        }
    }
}

/// `weir policy explain` decides a gRPC method as the proxy does: a POST to
/// `/package.Service/Method` (no root needed).
#[test]
fn policy_explain_decides_grpc_methods() {
    let dir = ScratchDir::new("h2-explain");
    let pol = dir.0.join("policy.yaml");
    let eps = dir.0.join("endpoints.yaml");
    std::fs::write(&pol, POLICY).unwrap();
    std::fs::write(&eps, ENDPOINTS).unwrap();
    let explain = |http: &str| {
        let out = weir_cli(&[
            "policy",
            "explain",
            "--policy",
            pol.to_str().unwrap(),
            "--endpoints",
            eps.to_str().unwrap(),
            "--from",
            "tiefighter",
            "--to",
            "deathstar",
            "--port",
            "50051",
            "--http",
            http,
        ]);
        (out.status.code(), text(&out))
    };
    let (code, out) = explain("POST /echo.Echo/Unary");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("ALLOWED\nh2 spec.ingress[0].toPorts[1].rules.http[0]"),
        "{out}"
    );
    let (code, out) = explain("POST /echo.Echo/Forbidden");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.starts_with("DENIED\nno rule matched (ingress, HTTP)"),
        "{out}"
    );
}
