//! The proxy never loops: connections addressed to the proxy port on a node
//! address are refused, and the nftables fallback polices egress to node-local
//! services (which the proxy reaches from the node's address).
//!
//! Clients are small Python 3 scripts (written into the test's scratch directory
//! and run inside the client's namespace) so that exact close times can be
//! observed.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use weir_tests::{DEATHSTAR4, Scenario, lab, text};

const NFT: &str = "nft";

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
        - method: GET
          path: /v1/.*
"#;

/// One TCP connection driven by commands on stdin: `req` sends an HTTP/1.1 GET
/// and prints the status line of the answer; `wait` waits (up to the limit) for
/// the server to close and prints `eof SECONDS`, `reset SECONDS` or `open`.
/// Prints `ready` once connected.
const HOLD_PY: &str = r#"
import socket, sys, time

dst, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(5)
# getaddrinfo keeps a link-local address's scope (fe80::1%eth0).
s.connect(socket.getaddrinfo(dst, port, fam, socket.SOCK_STREAM)[0][4])
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "req":
        s.settimeout(5)
        s.sendall(b"GET /v1/x HTTP/1.1\r\nHost: deathstar\r\n\r\n")
        got = b""
        try:
            while not got.endswith(b"Deathstar API\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except OSError:
            pass
        print(got.split(b"\r\n")[0].decode() or "closed", flush=True)
    elif cmd == "wait":
        t0 = time.monotonic()
        s.settimeout(limit)
        try:
            while True:
                if not s.recv(65536):
                    print("eof %.3f" % (time.monotonic() - t0), flush=True)
                    break
        except socket.timeout:
            print("open", flush=True)
        except OSError:
            print("reset %.3f" % (time.monotonic() - t0), flush=True)
        break
"#;

fn write_script(s: &Scenario, name: &str, body: &str) -> String {
    let p = s.path(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

fn python(s: &Scenario, from: &str, script: &str, args: &[&str]) -> Command {
    let mut c = s.lab.workload(from).ns.command("python3");
    c.arg(script).args(args);
    c
}

fn landing_code(s: &Scenario) -> String {
    text(&s.curl(
        "tiefighter",
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            &format!("http://{DEATHSTAR4}/v1/request-landing"),
        ],
    ))
}

/// A `hold.py` client, talking over its stdin/stdout.
struct Held {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Held {
    fn open(s: &Scenario, from: &str, dst: &str, port: u16, limit: &str) -> Held {
        let script = write_script(s, "hold.py", HOLD_PY);
        let mut child = python(s, from, &script, &[dst, &port.to_string(), limit])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start hold.py");
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut h = Held { child, out };
        assert_eq!(h.line(), "ready");
        h
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).expect("read from hold.py");
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

/// Seconds from an `eof S` / `reset S` answer; panics on `open`.
fn closed_after(answer: &str, log: &str) -> f64 {
    answer
        .split_once(' ')
        .and_then(|(_, t)| t.parse().ok())
        .unwrap_or_else(|| panic!("connection was not closed: {answer:?}\n{log}"))
}

fn reload(s: &mut Scenario, policy: &str) {
    let before = s.weir_log_text().matches("policy reloaded").count();
    std::fs::write(s.path("policy.yaml"), policy).unwrap();
    let pid = s.weir().pid() as i32;
    assert!(lab::send_signal(pid, libc::SIGHUP));
    let ok = lab::wait_until(Duration::from_secs(5), || {
        s.weir_log_text().matches("policy reloaded").count() > before
    });
    assert!(ok.is_ok(), "{}", s.weir_log_text());
}

/// (b) A connection addressed to the proxy port on a node address (here the
/// link-local gateway) is closed at once, not forwarded to the proxy itself; weir
/// stays healthy.
#[test]
fn connections_to_the_proxy_port_on_a_node_address_are_refused() {
    refuses_loops(NFT);
}

/// The same on the eBPF datapath.
#[test]
fn connections_to_the_proxy_port_on_a_node_address_are_refused_ebpf() {
    refuses_loops("ebpf");
}

fn refuses_loops(steering: &str) {
    let Some(mut s) = Scenario::star_wars(&format!("loop-{steering}")) else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(POLICY, &["--steering", steering]);
    // The same probe to the deathstar is held open (a connection that has not
    // sent its request yet waits for the 10 s request-head deadline).
    let mut control = Held::open(&s, "tiefighter", DEATHSTAR4, 80, "1.5");
    assert_eq!(control.ask("wait"), "open");
    for dst in ["169.254.1.1", "fe80::1%eth0"] {
        let mut h = Held::open(&s, "tiefighter", dst, 15001, "8");
        let answer = h.ask("wait");
        let t = closed_after(&answer, &s.weir_log_text());
        assert!(t < 1.0, "{dst}: closed after {t} s");
        assert_eq!(landing_code(&s), "200");
    }
    assert!(s.weir().alive());
    let log = s.weir_log_text();
    assert_eq!(
        log.matches("addressed to the proxy port on a node address")
            .count(),
        2,
        "{log}"
    );
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| f["drop_reason_desc"] == "PROXY_LOOP"
            && f["l4"]["TCP"]["destination_port"] == 15001),
        "{flows:#?}"
    );
}

/// The tiefighter may reach the deathstar; `extra` adds egress rules.
fn tie_egress(extra: &str) -> String {
    format!(
        "{POLICY}---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: tie-egress}}
spec:
  endpointSelector: {{matchLabels: {{class: tiefighter}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{class: deathstar}}}}]
    toPorts: [{{ports: [{{port: '80', protocol: TCP}}]}}]
{extra}"
    )
}

/// (d) With the nftables fallback an egress-enforced endpoint reaches a
/// node-local TCP service only when policy allows it.
#[test]
fn egress_to_node_local_services_is_policed_by_the_nft_fallback() {
    let Some(mut s) = Scenario::star_wars("nft-local") else {
        return;
    };
    s.start_deathstar(&[]);
    let www = s.path("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "node-local service\n").unwrap();
    let requests = s.path("local-service.log");
    let mut srv = s.lab.node.command("python3");
    srv.args(["-m", "http.server", "8080", "--directory"])
        .arg(&www)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&requests).unwrap());
    s.lab.spawn("local-service", srv).unwrap();
    s.lab
        .wait_for_tcp("169.254.1.1", 8080, Duration::from_secs(10))
        .unwrap();
    // The node's own addresses are the `host` entity.
    let allowed = tie_egress(
        "  - toEntities: [host]
    toPorts: [{ports: [{port: '8080', protocol: TCP}]}]
",
    );
    s.start_weir(&allowed, &["--steering", NFT]);
    let get = |s: &Scenario| {
        text(&s.curl(
            "tiefighter",
            &["-w", " %{http_code}", "http://169.254.1.1:8080/hello.txt"],
        ))
    };
    assert_eq!(get(&s), "node-local service\n 200", "{}", s.weir_log_text());
    let served = || {
        std::fs::read_to_string(&requests)
            .unwrap_or_default()
            .matches("GET /hello.txt")
            .count()
    };
    assert_eq!(served(), 1);
    assert!(
        s.flows().iter().any(|f| f["verdict"] == "FORWARDED"
            && f["l4"]["TCP"]["destination_port"] == 8080
            && f["source"]["pod_name"] == "tiefighter"),
        "the allowed connection went through the proxy: {:#?}",
        s.flows()
    );
    reload(&mut s, &tie_egress(""));
    assert_eq!(get(&s), "Access denied\n 403", "{}", s.weir_log_text());
    assert_eq!(served(), 1, "the denied request never reached the service");
    // The tiefighter's own traffic to the deathstar is unaffected.
    assert_eq!(landing_code(&s), "200");
}
