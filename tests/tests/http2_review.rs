//! HTTP/2 and gRPC after the attacker review of issue 11, with real peers in
//! network namespaces (IPv4 and IPv6): a destination that never answers SYN is
//! UNAVAILABLE (gRPC 14, HTTP 503) within the connect timeout; 100 MB uploaded
//! to a slow server keeps weir small and arrives whole; a reload that revokes the
//! client → server pair closes HTTP/2 connections with GOAWAY; an empty-bodied
//! POST that falls back to HTTP/1.1 says `content-length: 0`; a malformed gRPC
//! call gets a gRPC status, not HTTP 400; request trailers cannot carry a header
//! policy checks.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use weir_tests::{
    DEATHSTAR4, DEATHSTAR6, RSS_GROWTH_BOUND_KIB, Scenario, repo_root, rss_kib, settled_lines, text,
};

const NFT: &[&str] = &["--steering", "nft"];

const PORTS: &str = r#"{port: "8082", protocol: TCP}, {port: "8090", protocol: TCP}"#;

/// `ports` are the HTTP ports the empire may reach (besides 8082 and 8090).
fn policy(extra_ports: &str) -> String {
    format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: h2-review}}
spec:
  endpointSelector: {{matchLabels: {{org: empire, class: deathstar}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{org: empire}}}}]
    toPorts:
    - ports: [{PORTS}{extra_ports}]
      rules:
        http:
        - method: POST
          path: /v1/request-landing
        - method: GET
          path: /v1/.*
        - method: PUT
          path: /v1/upload
    - ports: [{{port: "50051", protocol: TCP}}]
      rules:
        http:
        - method: POST
          path: '/echo\.Echo/(Unary|Slow)'
    - ports: [{{port: "8084", protocol: TCP}}]
      rules:
        http:
        - method: GET
          path: /v1/trailers
          headers: ['X-Team: empire']
    - ports: [{{port: "81", protocol: TCP}}]
"#
    )
}

const WITH_8080: &str = r#", {port: "8080", protocol: TCP}"#;

/// nginx on the deathstar: 8080 cleartext HTTP/2, 8082 HTTP/1 only with a log
/// of each request's `Content-Length`.
fn start_nginx(s: &mut Scenario) {
    let d = s.dir.0.join("nginx");
    let dir = d.display().to_string();
    s.start_deathstar_with(&[81], move |c| {
        let servers = format!(
            r#"  log_format cl '$request cl=$http_content_length';
  server {{
    listen 8080 http2;
    listen [::]:8080 http2;
    access_log {dir}/h2.log;
    location / {{ return 200 "Deathstar API\n"; }}
  }}
  server {{
    listen 8082;
    listen [::]:8082;
    access_log {dir}/h1.log cl;
    location / {{ return 200 "Deathstar API\n"; }}
  }}
"#
        );
        let end = c.rfind('}').expect("http block");
        format!("{}{servers}{}", &c[..end], &c[end..])
    });
    s.lab
        .wait_for_tcp(DEATHSTAR4, 8080, Duration::from_secs(10))
        .expect("nginx h2 listening");
}

fn url(ip: &str, port: u16, path: &str) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]:{port}{path}")
    } else {
        format!("http://{ip}:{port}{path}")
    }
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

fn run_in(s: &Scenario, from: &str, argv: &[&str]) -> Output {
    s.lab
        .workload(from)
        .ns
        .command(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {argv:?}: {e}"))
}

/// Runs a Python script from `.venv` in a workload's namespace, in the background.
fn spawn_py(s: &mut Scenario, ns: &str, name: &str, args: &[&str], err: &str) {
    assert!(
        python().exists(),
        "{} is missing: make deps installs grpcio and h2 into .venv",
        python().display()
    );
    let mut cmd = s.lab.workload(ns).ns.command(python().to_str().unwrap());
    cmd.arg(script(name))
        .args(args)
        .stderr(std::fs::File::create(s.path(err)).unwrap());
    s.lab.spawn(name, cmd).expect("start the script");
}

/// One grpcio call from the tiefighter: (code, details, seconds it took).
fn grpc_call(s: &Scenario, target: &str, call: &str) -> (String, String, f64) {
    let py = python();
    let started = Instant::now();
    let out = run_in(
        s,
        "tiefighter",
        &[
            py.to_str().unwrap(),
            &script("grpc_echo_client.py"),
            target,
            call,
        ],
    );
    let took = started.elapsed().as_secs_f64();
    let v: serde_json::Value = text(&out)
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no answer: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                s.weir_log_text()
            )
        });
    let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    (field("code"), field("details"), took)
}

fn grpc_target(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("ipv6:[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// `curl --http2-prior-knowledge` from the tiefighter: "<code> <seconds>".
fn curl_h2(s: &Scenario, u: &str, extra: &[&str]) -> (String, f64) {
    let mut args = vec![
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{time_total}",
    ];
    args.extend_from_slice(extra);
    args.push(u);
    let out = text(&s.curl("tiefighter", &args));
    let (code, t) = out.split_once(' ').unwrap_or((&out, "0"));
    (code.to_string(), t.parse().unwrap_or(0.0))
}

/// In the deathstar's namespace: SYNs to `ports` are dropped (`on`) or no
/// longer (`!on`): a destination that never answers a new connection.
fn blackhole(s: &Scenario, ports: &str, on: bool) {
    let nft = |args: &[&str]| {
        let out = s
            .lab
            .workload("deathstar")
            .ns
            .command("nft")
            .args(args)
            .output()
            .expect("run nft");
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    if on {
        nft(&["add", "table", "inet", "weir_test_blackhole"]);
        nft(&[
            "add",
            "chain",
            "inet",
            "weir_test_blackhole",
            "in",
            "{ type filter hook input priority -300; }",
        ]);
        let rule = format!("tcp dport {{ {ports} }} tcp flags & (syn|ack) == syn drop");
        nft(&["add", "rule", "inet", "weir_test_blackhole", "in", &rule]);
    } else {
        nft(&["delete", "table", "inet", "weir_test_blackhole"]);
    }
}

#[test]
fn a_destination_that_never_answers_syn_is_unavailable_within_the_connect_timeout() {
    let Some(mut s) = Scenario::star_wars("h2r-blackhole") else {
        return;
    };
    start_nginx(&mut s);
    let log = s.path("grpc-server.log");
    let log_arg = log.display().to_string();
    spawn_py(
        &mut s,
        "deathstar",
        "grpc_echo_server.py",
        &["50051", &log_arg],
        "grpc-server.err",
    );
    s.lab
        .wait_for_tcp(DEATHSTAR4, 50051, Duration::from_secs(20))
        .expect("grpc server listening");
    // A short connect timeout; a short idle timeout lets the pooled upstream
    // connection of the first (successful) call go before the blackhole test.
    s.start_weir(
        &policy(WITH_8080),
        &[
            "--steering",
            "nft",
            "--upstream-connect-timeout",
            "1s",
            "--idle-timeout",
            "1s",
        ],
    );
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        let target = grpc_target(ip, 50051);
        // The same calls succeed while the server answers.
        let (code, details, _) = grpc_call(&s, &target, "unary");
        assert_eq!(code, "OK", "{details}\n{}", s.weir_log_text());
        let (code, _) = curl_h2(&s, &url(ip, 8080, "/v1/one"), &[]);
        assert_eq!(code, "200", "{}", s.weir_log_text());
        // The upstream connections idle out (two idle ticks), then the
        // server stops answering SYNs.
        std::thread::sleep(Duration::from_secs(3));
        blackhole(&s, "8080, 50051", true);
        let (code, details, took) = grpc_call(&s, &target, "unary");
        assert_eq!(code, "UNAVAILABLE", "{details}\n{}", s.weir_log_text());
        assert!(details.contains("weir"), "{details}");
        // 1 s connect timeout; the rest is Python starting grpcio.
        assert!(took < 4.0, "{ip}: UNAVAILABLE after {took:.2} s");
        let (code, t) = curl_h2(&s, &url(ip, 8080, "/v1/one"), &[]);
        assert_eq!(code, "503", "{}", s.weir_log_text());
        assert!(t < 2.5, "{ip}: 503 after {t} s");
        blackhole(&s, "8080, 50051", false);
    }
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| f["l7"]["http"]["grpc"]["status"] == 14
            && f["l7"]["http"]["grpc"]["method"] == "Unary"),
        "{flows:#?}"
    );
}

#[test]
fn a_malformed_grpc_call_gets_a_grpc_status_not_http_400() {
    let Some(mut s) = Scenario::star_wars("h2r-grpc-bad") else {
        return;
    };
    s.start_deathstar(&[81]);
    let log = s.path("grpc-server.log");
    std::fs::write(&log, "").unwrap();
    let log_arg = log.display().to_string();
    spawn_py(
        &mut s,
        "deathstar",
        "grpc_echo_server.py",
        &["50051", &log_arg],
        "grpc-server.err",
    );
    s.lab
        .wait_for_tcp(DEATHSTAR4, 50051, Duration::from_secs(20))
        .expect("grpc server listening");
    s.start_weir(&policy(""), NFT);
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        let target = grpc_target(ip, 50051);
        let (code, details, _) = grpc_call(&s, &target, "unary");
        assert_eq!(code, "OK", "{details}\n{}", s.weir_log_text());
        // An encoded `/` in the method: refused before policy, as INTERNAL with
        // weir's reason (an HTTP 400 reads as "Received http2 header with
        // status: 400").
        let (code, details, _) = grpc_call(&s, &target, "malformed");
        assert_eq!(code, "INTERNAL", "{details}");
        assert!(
            details.starts_with("weir: request refused before policy: "),
            "{details}"
        );
    }
    let served = std::fs::read_to_string(&log).unwrap();
    assert_eq!(served.matches("Unary").count(), 2, "{served}");
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| f["l7"]["http"]["grpc"]["status"] == 13
            && f["l7"]["http"]["code"] == 200
            && f["drop_reason_desc"]
                .as_str()
                .is_some_and(|e| e.starts_with("MALFORMED_REQUEST"))),
        "{flows:#?}"
    );
}

#[test]
fn a_100_mb_upload_to_a_slow_server_keeps_weir_small_and_arrives_whole() {
    let Some(mut s) = Scenario::star_wars("h2r-upload") else {
        return;
    };
    s.start_deathstar(&[81]);
    let sink_log = s.path("sink.log");
    let sink_arg = sink_log.display().to_string();
    // The server reads at most 20 MB/s; curl could send many times that.
    spawn_py(
        &mut s,
        "deathstar",
        "h2_slow_sink.py",
        &["8090", &sink_arg, "20000000"],
        "sink.err",
    );
    s.lab
        .wait_for_tcp(DEATHSTAR4, 8090, Duration::from_secs(20))
        .expect("sink listening");
    let body = s.path("upload.bin");
    {
        let mut f = std::fs::File::create(&body).unwrap();
        let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
        std::io::copy(
            &mut std::io::Read::take(&mut urandom, 100 * 1024 * 1024),
            &mut f,
        )
        .unwrap();
    }
    let sha = std::process::Command::new("sha256sum")
        .arg(&body)
        .output()
        .expect("sha256sum");
    let sha = text(&sha)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let want = format!("{sha} 104857600");
    s.start_weir(&policy(""), NFT);
    let pid = s.weir().pid();
    let body_arg = body.display().to_string();
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        let baseline = rss_kib(pid);
        let started = Instant::now();
        let mut child = s
            .lab
            .workload("tiefighter")
            .ns
            .command("curl")
            .args([
                "-s",
                "--http2-prior-knowledge",
                "-T",
                &body_arg,
                "-w",
                "\n%{http_code} %{size_upload} %{http_version}",
                &url(ip, 8090, "/v1/upload"),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("run curl");
        let mut peak = baseline;
        while child.try_wait().ok().flatten().is_none() {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let took = started.elapsed().as_secs_f64();
        let got = text(&out);
        assert_eq!(
            got,
            format!("{want}\n\n200 104857600 2"),
            "{}",
            s.weir_log_text()
        );
        eprintln!("{ip}: weir RSS {baseline} KiB, peak {peak} KiB during the upload ({took:.1} s)");
        // The server's pace, not curl's, set the upload's (so weir held back).
        assert!(
            took > 4.0,
            "{ip}: 100 MB in {took:.1} s: the server was not slow"
        );
        assert!(
            peak.saturating_sub(baseline) < RSS_GROWTH_BOUND_KIB,
            "{ip}: weir grew from {baseline} KiB to {peak} KiB"
        );
    }
    let received = settled_lines(&sink_log);
    assert_eq!(received, vec![want.clone(), want], "{}", s.weir_log_text());
}

/// `h2_hold.py`: an HTTP/2 connection kept open after one request.
struct Held {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Held {
    fn open(s: &Scenario, ip: &str, port: u16, path: &str) -> Held {
        let mut child = s
            .lab
            .workload("tiefighter")
            .ns
            .command(python().to_str().unwrap())
            .arg(script("h2_hold.py"))
            .args([ip, &port.to_string(), path])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start h2_hold.py");
        let out = BufReader::new(child.stdout.take().unwrap());
        Held { child, out }
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).expect("read from h2_hold.py");
        l.trim().to_string()
    }

    fn ask(&mut self, cmd: &str) -> String {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        self.line()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_reload_that_revokes_the_pair_closes_http2_connections_with_goaway() {
    let Some(mut s) = Scenario::star_wars("h2r-revoke") else {
        return;
    };
    start_nginx(&mut s);
    s.start_weir(&policy(WITH_8080), NFT);
    let mut held: Vec<Held> = [DEATHSTAR4, DEATHSTAR6]
        .iter()
        .map(|ip| Held::open(&s, ip, 8080, "/v1/one"))
        .collect();
    for h in &mut held {
        assert_eq!(h.line(), "status 200", "{}", s.weir_log_text());
    }
    // 8080 leaves the policy: the tiefighter may no longer reach it at all.
    let signalled = Instant::now();
    s.reload(&policy(""));
    for h in &mut held {
        let answer = h.ask("wait");
        let t: f64 = answer
            .strip_prefix("closed ")
            .and_then(|r| r.split(' ').next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("not closed: {answer}\n{}", s.weir_log_text()));
        assert!(t < 3.0, "{answer}");
        assert!(answer.ends_with("goaway=True"), "{answer}");
    }
    assert!(signalled.elapsed() < Duration::from_secs(15));
    let flows = s.flows();
    let closed: Vec<_> = flows
        .iter()
        .filter(|f| {
            f["verdict"] == "DROPPED"
                && f["l4"]["TCP"]["destination_port"] == 8080
                && f["Summary"]
                    .as_str()
                    .is_some_and(|p| p.contains("HTTP/2 connection closed with GOAWAY"))
        })
        .collect();
    assert!(closed.len() >= 2, "{flows:#?}");
    // Still no new connection passes either.
    let (code, _) = curl_h2(&s, &url(DEATHSTAR4, 8080, "/v1/one"), &["--max-time", "3"]);
    assert_ne!(code, "200");
}

#[test]
fn an_empty_post_falling_back_to_http1_says_content_length_0() {
    let Some(mut s) = Scenario::star_wars("h2r-emptypost") else {
        return;
    };
    start_nginx(&mut s);
    s.start_weir(&policy(""), NFT);
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        // The first finds out that 8082 speaks only HTTP/1 (the probe's answer),
        // the second goes straight to HTTP/1.1: both paths.
        for _ in 0..2 {
            let (code, _) = curl_h2(&s, &url(ip, 8082, "/v1/request-landing"), &["-X", "POST"]);
            assert_eq!(code, "200", "{}", s.weir_log_text());
        }
    }
    let log: Vec<String> = settled_lines(&s.dir.0.join("nginx/h1.log"))
        .into_iter()
        .filter(|l| !l.starts_with("PRI "))
        .collect();
    assert_eq!(
        log,
        vec!["POST /v1/request-landing HTTP/1.1 cl=0"; 4],
        "{}",
        s.weir_log_text()
    );
}

#[test]
fn request_trailers_cannot_carry_a_header_policy_checks() {
    let Some(mut s) = Scenario::star_wars("h2r-trailers") else {
        return;
    };
    spawn_py(
        &mut s,
        "deathstar",
        "h2_peer.py",
        &["serve", "8084"],
        "peer.err",
    );
    s.lab
        .wait_for_tcp(DEATHSTAR4, 8084, Duration::from_secs(10))
        .expect("h2 server listening");
    s.start_weir(&policy(""), NFT);
    let py = python();
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        // Headers say `x-team: empire` (what the rule requires); the trailers
        // say `rebels`, also as `x_team`: the server gets neither.
        let out = run_in(
            &s,
            "tiefighter",
            &[
                py.to_str().unwrap(),
                &script("h2_peer.py"),
                "call-checked",
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
        assert_eq!(r["status"], "200", "{r}\n{}", s.weir_log_text());
        // The trailer no rule names passes.
        assert_eq!(r["trailers"]["x-echo"], "from-client", "{r}");
        assert_eq!(r["trailers"]["x-trailer-names"], "x-client-trailer", "{r}");
    }
}
