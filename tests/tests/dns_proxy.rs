//! The DNS proxy on the eBPF datapath, against a real resolver (dnsmasq) in the
//! `world` (a non-endpoint peer behind its own node device) and real clients
//! (dig, and small python3 clients for what dig cannot send): the tiefighter's
//! queries are decided by name over UDP and TCP, IPv4 and IPv6; denied names never
//! reach the resolver; the resolver's replies to the proxy's upstream sockets (bound
//! to the client's address) come back through the datapath's reverse lookup.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use weir_tests::{Scenario, lab, text};

const WORLD4: &str = "10.201.1.1";
const WORLD6: &str = "fd00:201:1::1";

/// The tiefighter may ask the world's resolver (ports 53 and 5353, UDP and TCP)
/// for names matching the DNS rules `rules`.
fn policy(rules: &str) -> String {
    format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: dns}}
spec:
  endpointSelector: {{matchLabels: {{class: tiefighter}}}}
  egress:
  - toCIDR: [10.201.1.0/24, "fd00:201:1::/64"]
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}, {{port: "5353", protocol: ANY}}]
      rules:
        dns:
{rules}"#
    )
}

const ONLY_ALLOWED: &str = "        - matchPattern: '*.allowed.test'\n";
const EVERY_NAME: &str = "        - matchPattern: '*'\n";

fn world(test: &str) -> Option<Scenario> {
    let mut s = Scenario::star_wars(test)?;
    s.lab.add_outside("world", 1).expect("add the world");
    // Resolve the neighbours first. The node's link-local address on the fresh
    // `weirx1` is still tentative (DAD, about 1 s), and the kernel sends no
    // neighbour solicitation without a usable source: a packet from an address
    // that is not the node's (the proxy's upstream socket, bound to the client's)
    // would wait for the retransmit, as long as the 1 s upstream timeout below.
    // A ping from the node's own global address solicits at once.
    for ip in [WORLD4, WORLD6] {
        let _ = s.lab.node.run(&["ping", "-c", "1", "-W", "2", ip]);
    }
    Some(s)
}

/// dnsmasq in the world on `port`, v4 and v6: `api.allowed.test` (A and AAAA),
/// `www.allowed.test` (a CNAME to it), `secret.denied.test`, and
/// `many.allowed.test` with 60 A records (too many for 512 bytes). Returns its
/// query log.
fn start_dnsmasq(s: &mut Scenario, port: u16) -> PathBuf {
    let log = s.path(&format!("dnsmasq-{port}.log"));
    let hosts = s.path(&format!("many-{port}.hosts"));
    let many: String = (1..=60)
        .map(|i| format!("198.51.100.{i} many.allowed.test\n"))
        .collect();
    std::fs::write(&hosts, many).unwrap();
    let mut cmd = s.lab.workload("world").ns.command("/usr/sbin/dnsmasq");
    cmd.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--user=root",
        "--log-queries",
        "--bind-interfaces",
        "--listen-address=10.201.1.1,fd00:201:1::1",
        "--host-record=api.allowed.test,192.0.2.10,2001:db8::10",
        "--host-record=secret.denied.test,192.0.2.66",
        "--cname=www.allowed.test,api.allowed.test",
        // A zone it serves with authority, which only the tiefighter (so only
        // the proxy connecting from its address) may transfer.
        "--auth-server=ns.axfr.allowed.test",
        "--auth-zone=axfr.allowed.test",
        "--auth-sec-servers=192.0.2.53",
        "--auth-peer=10.200.0.20,fd00:200::20",
        "--host-record=h.axfr.allowed.test,192.0.2.20",
    ])
    .arg(format!("--port={port}"))
    .arg(format!("--log-facility={}", log.display()))
    .arg(format!("--addn-hosts={}", hosts.display()))
    .arg(format!(
        "--pid-file={}",
        s.path(&format!("dnsmasq-{port}.pid")).display()
    ))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    s.lab
        .spawn(&format!("dnsmasq-{port}"), cmd)
        .expect("start dnsmasq");
    let ok = lab::wait_until(Duration::from_secs(10), || {
        [WORLD4, WORLD6].iter().all(|ip| {
            let out = s
                .lab
                .workload("world")
                .ns
                .command("dig")
                .args([&format!("@{ip}"), "-p", &port.to_string()])
                .args(["api.allowed.test", "+short", "+time=1", "+tries=1"])
                .output();
            out.is_ok_and(|o| text(&o).contains("192.0.2.10"))
        })
    });
    assert!(ok.is_ok(), "dnsmasq on port {port} did not start");
    log
}

/// How many queries for `name` dnsmasq logged.
fn resolver_saw(log: &PathBuf, name: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("query[") && l.contains(&format!(" {name} from")))
        .count()
}

/// dig from the tiefighter (one try, 3 s); the whole output.
fn dig(s: &Scenario, server: &str, port: u16, name: &str, extra: &[&str]) -> String {
    let out = s
        .lab
        .workload("tiefighter")
        .ns
        .command("dig")
        .args([&format!("@{server}"), "-p", &port.to_string(), name])
        .args(["+time=3", "+tries=1"])
        .args(extra)
        .output()
        .expect("run dig");
    text(&out)
}

fn status(dig_out: &str) -> &str {
    dig_out
        .split("status: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or("NO ANSWER")
}

/// The data of the answer section's records.
fn answers(dig_out: &str) -> Vec<String> {
    dig_out
        .split(";; ANSWER SECTION:\n")
        .nth(1)
        .map(|sec| {
            sec.lines()
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| l.split_whitespace().last().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A python3 client in the tiefighter: sends `queries` (id, name) framed on one
/// TCP connection before reading anything, then prints `id rcode ancount` for
/// each answer in the order they arrive.
fn pipelined_tcp(s: &Scenario, server: &str, port: u16, queries: &[(u16, &str)]) -> String {
    let qs: Vec<String> = queries
        .iter()
        .map(|(id, n)| format!("({id}, '{n}')"))
        .collect();
    let script = format!(
        r#"
import socket, struct
def q(i, name):
    b = struct.pack('>HHHHHH', i, 0x0100, 1, 0, 0, 0)
    for l in name.split('.'):
        b += bytes([len(l)]) + l.encode()
    return b + b'\x00\x00\x01\x00\x01'
qs = [{qs}]
fam = socket.AF_INET6 if ':' in '{server}' else socket.AF_INET
c = socket.socket(fam, socket.SOCK_STREAM)
c.settimeout(5)
c.connect(('{server}', {port}))
c.sendall(b''.join(struct.pack('>H', len(m)) + m for m in (q(i, n) for i, n in qs)))
buf = b''
def need(n):
    global buf
    while len(buf) < n:
        d = c.recv(65536)
        if not d:
            raise SystemExit('closed')
        buf += d
for _ in qs:
    need(2)
    ln = struct.unpack('>H', buf[:2])[0]
    need(2 + ln)
    m, buf = buf[2:2 + ln], buf[2 + ln:]
    i, flags, qd, an = struct.unpack('>HHHH', m[:8])
    print(i, flags & 15, an)
"#,
        qs = qs.join(", ")
    );
    let out = s
        .lab
        .workload("tiefighter")
        .ns
        .command("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    format!("{}{}", text(&out), String::from_utf8_lossy(&out.stderr))
}

/// Sends `bytes` over UDP from the tiefighter and returns `id rcode` of the reply,
/// or `timeout`.
fn udp_raw(s: &Scenario, server: &str, port: u16, hex: &str) -> String {
    let script = format!(
        r#"
import socket
fam = socket.AF_INET6 if ':' in '{server}' else socket.AF_INET
c = socket.socket(fam, socket.SOCK_DGRAM)
c.settimeout(3)
c.sendto(bytes.fromhex('{hex}'), ('{server}', {port}))
try:
    r = c.recv(65536)
    print(r[:2].hex(), r[3] & 15)
except socket.timeout:
    print('timeout')
"#
    );
    let out = s
        .lab
        .workload("tiefighter")
        .ns
        .command("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    text(&out).trim().to_string()
}

fn dns_flows(s: &Scenario) -> Vec<serde_json::Value> {
    s.flows()
        .into_iter()
        .filter(|f| f["l7"]["dns"].is_object())
        .collect()
}

#[test]
fn queries_are_decided_by_name_over_udp_and_tcp() {
    let Some(mut s) = world("dns-proxy") else {
        return;
    };
    let log = start_dnsmasq(&mut s, 53);
    s.start_weir(&policy(EVERY_NAME), &["--steering", "ebpf"]);
    for server in [WORLD4, WORLD6] {
        // The name denied below resolves while the policy allows it: the denial
        // is the policy's doing, not the lab's.
        let out = dig(&s, server, 53, "secret.denied.test", &[]);
        assert_eq!(
            status(&out),
            "NOERROR",
            "{server}: {out}\n{}",
            s.weir_log_text()
        );
        assert_eq!(answers(&out), ["192.0.2.66"], "{server}: {out}");
        let out = dig(&s, server, 53, "secret.denied.test", &["+tcp"]);
        assert_eq!(answers(&out), ["192.0.2.66"], "{server} TCP: {out}");
    }
    assert_eq!(resolver_saw(&log, "secret.denied.test"), 4);

    s.reload(&policy(ONLY_ALLOWED));
    for server in [WORLD4, WORLD6] {
        for tcp in [&[][..], &["+tcp"][..]] {
            let what = format!("{server} {tcp:?}");
            let out = dig(&s, server, 53, "api.allowed.test", tcp);
            assert_eq!(
                status(&out),
                "NOERROR",
                "{what}: {out}\n{}",
                s.weir_log_text()
            );
            assert_eq!(answers(&out), ["192.0.2.10"], "{what}: {out}");
            let out = dig(
                &s,
                server,
                53,
                "api.allowed.test",
                &[tcp, &["AAAA"]].concat(),
            );
            assert_eq!(answers(&out), ["2001:db8::10"], "{what}: {out}");
            // Mixed case (0x20) passes and comes back as sent.
            let out = dig(&s, server, 53, "WwW.Allowed.TEST", tcp);
            assert_eq!(
                answers(&out),
                ["api.allowed.test.", "192.0.2.10"],
                "{what}: {out}"
            );
            assert!(out.contains("WwW.Allowed.TEST."), "{what}: {out}");
            let out = dig(&s, server, 53, "secret.denied.test", tcp);
            assert_eq!(status(&out), "REFUSED", "{what}: {out}");
            assert!(answers(&out).is_empty(), "{what}: {out}");
        }
        // Too many A records for 512 bytes: the UDP answer is truncated and
        // passes as it is; dig retries over TCP and gets all 60.
        let out = dig(&s, server, 53, "many.allowed.test", &["+noedns"]);
        assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
        assert_eq!(answers(&out).len(), 60, "{server}: {out}");

        // Pipelined on one connection: all answered, each matched by ID; the
        // denial comes from the proxy.
        let mut got: Vec<String> = pipelined_tcp(
            &s,
            server,
            53,
            &[
                (101, "api.allowed.test"),
                (102, "secret.denied.test"),
                (103, "www.allowed.test"),
                (104, "many.allowed.test"),
            ],
        )
        .lines()
        .map(str::to_string)
        .collect();
        got.sort();
        assert_eq!(
            got,
            ["101 0 1", "102 5 0", "103 0 2", "104 0 60"],
            "{server}: {}",
            s.weir_log_text()
        );

        // A query whose header reads but whose question does not: FORMERR with
        // its ID. A NOTIFY: REFUSED. Neither goes upstream.
        assert_eq!(
            udp_raw(&s, server, 53, "abcd01000001000000000000036170690761"),
            "abcd 1"
        );
        assert_eq!(
            udp_raw(&s, server, 53, "abce2000000100000000000001780000060001"),
            "abce 5"
        );
    }
    assert_eq!(
        resolver_saw(&log, "secret.denied.test"),
        4,
        "denied queries never reach the resolver"
    );

    // Stub resolvers use a new source port per query, so each is a session of
    // its own: 300 of them in a row all get answers, and their sessions (two
    // sockets each) are gone soon after, not after --udp-idle-timeout.
    let pid = s.weir().pid();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let before = fds();
    let burst = s
        .lab
        .workload("tiefighter")
        .ns
        .command("python3")
        .args([
            "-c",
            &format!(
                r#"
import socket, struct
q = struct.pack('>HHHHHH', 7, 0x0100, 1, 0, 0, 0) + b'\x03api\x07allowed\x04test\x00\x00\x01\x00\x01'
ok = 0
for i in range(300):
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(3)
    c.sendto(q, ('{WORLD4}', 53))
    r = c.recv(512)
    ok += r[:2] == b'\x00\x07' and r[3] & 15 == 0
    c.close()
print(ok)
"#
            ),
        ])
        .output()
        .expect("run python3");
    assert_eq!(text(&burst).trim(), "300", "{burst:?}");
    std::thread::sleep(Duration::from_millis(2500));
    let after = fds();
    assert!(
        after <= before + 4,
        "DNS sessions still open 2.5 s after the burst: {before} fds before, {after} after"
    );

    let flows = dns_flows(&s);
    let dns = |f: &serde_json::Value, k: &str| f["l7"]["dns"][k].clone();
    assert!(
        flows.iter().any(|f| f["verdict"] == "FORWARDED"
            && f["l7"]["type"] == "REQUEST"
            && dns(f, "query") == "api.allowed.test."
            && f["policy"].as_str().unwrap_or("").contains("rules.dns")
            && f["source"]["pod_name"] == "tiefighter"),
        "{flows:#?}"
    );
    assert!(
        flows.iter().any(|f| f["verdict"] == "DROPPED"
            && dns(f, "query") == "secret.denied.test."
            && dns(f, "rcode") == 5
            && f["l4"]["TCP"].is_object()),
        "{flows:#?}"
    );
    assert!(
        flows.iter().any(|f| f["l7"]["type"] == "RESPONSE"
            && dns(f, "query") == "www.allowed.test."
            && dns(f, "cnames")[0] == "api.allowed.test."
            && dns(f, "ips")[0] == "192.0.2.10"
            && f["l4"]["UDP"].is_object()),
        "{flows:#?}"
    );
    assert!(
        flows
            .iter()
            .any(|f| f["drop_reason_desc"] == "DNS_QUERY_REJECTED:opcode"),
        "{flows:#?}"
    );
}

#[test]
fn denials_can_answer_nxdomain_any_port_works_and_silent_resolvers_get_servfail() {
    let Some(mut s) = world("dns-proxy-5353") else {
        return;
    };
    let log = start_dnsmasq(&mut s, 5353);
    // Port 53 of the world receives and never answers, over UDP and TCP.
    for (name, addr) in [
        ("mute-udp4", "UDP4-RECV:53,bind=10.201.1.1"),
        ("mute-udp6", "UDP6-RECV:53,bind=[fd00:201:1::1]"),
        ("mute-tcp4", "TCP4-LISTEN:53,bind=10.201.1.1,fork,reuseaddr"),
        (
            "mute-tcp6",
            "TCP6-LISTEN:53,bind=[fd00:201:1::1],fork,reuseaddr",
        ),
    ] {
        let mut cmd = s.lab.workload("world").ns.command("socat");
        cmd.args(["-u", addr, "/dev/null"]);
        s.lab.spawn(name, cmd).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    s.start_weir(
        &policy(EVERY_NAME),
        &[
            "--steering",
            "ebpf",
            "--dns-deny-rcode",
            "nxdomain",
            "--dns-upstream-timeout",
            "1s",
        ],
    );
    for server in [WORLD4, WORLD6] {
        let out = dig(&s, server, 5353, "secret.denied.test", &[]);
        assert_eq!(answers(&out), ["192.0.2.66"], "{server}: {out}");
    }
    s.reload(&policy(ONLY_ALLOWED));
    for server in [WORLD4, WORLD6] {
        for tcp in [&[][..], &["+tcp"][..]] {
            let what = format!("{server} {tcp:?}");
            let out = dig(&s, server, 5353, "api.allowed.test", tcp);
            assert_eq!(answers(&out), ["192.0.2.10"], "{what}: {out}");
            let out = dig(&s, server, 5353, "secret.denied.test", tcp);
            assert_eq!(status(&out), "NXDOMAIN", "{what}: {out}");
            // An allowed zone transfer passes (TCP only; UDP gets what the
            // resolver answers a UDP AXFR).
            if !tcp.is_empty() {
                let out = dig(&s, server, 5353, "axfr.allowed.test", &["AXFR"]);
                assert!(
                    out.contains("XFR size") && out.contains("192.0.2.20"),
                    "{what}: {out}"
                );
            }
            // The resolver on port 53 never answers: SERVFAIL after 1 s.
            let started = Instant::now();
            let out = dig(&s, server, 53, "api.allowed.test", tcp);
            assert_eq!(status(&out), "SERVFAIL", "{what}: {out}");
            assert!(started.elapsed() < Duration::from_millis(2900), "{what}");
        }
    }
    assert_eq!(resolver_saw(&log, "secret.denied.test"), 2);
    let flows = dns_flows(&s);
    assert!(
        flows.iter().any(|f| f["verdict"] == "DROPPED"
            && f["l7"]["dns"]["rcode"] == 3
            && f["l4"]["UDP"]["destination_port"] == 5353),
        "{flows:#?}"
    );
    assert!(
        flows.iter().any(|f| f["verdict"] == "ERROR"
            && f["l7"]["type"] == "RESPONSE"
            && f["l7"]["dns"]["rcode"] == 2),
        "{flows:#?}"
    );
}

/// The same decisions with the nftables steering (TPROXY) instead of eBPF.
#[test]
fn queries_are_decided_by_name_through_nft() {
    let Some(mut s) = world("dns-proxy-nft") else {
        return;
    };
    let log = start_dnsmasq(&mut s, 53);
    s.start_weir(&policy(ONLY_ALLOWED), &["--steering", "nft"]);
    for server in [WORLD4, WORLD6] {
        for tcp in [&[][..], &["+tcp"][..]] {
            let what = format!("{server} {tcp:?}");
            let out = dig(&s, server, 53, "www.allowed.test", tcp);
            assert_eq!(
                answers(&out),
                ["api.allowed.test.", "192.0.2.10"],
                "{what}: {out}\n{}",
                s.weir_log_text()
            );
            let out = dig(&s, server, 53, "secret.denied.test", tcp);
            assert_eq!(status(&out), "REFUSED", "{what}: {out}");
        }
    }
    assert_eq!(resolver_saw(&log, "secret.denied.test"), 0);
    assert_eq!(resolver_saw(&log, "www.allowed.test"), 4);
    // /metrics counts each query by verdict, each relayed answer by rcode, and
    // each DNS-over-TCP connection (dig +tcp opens one per query).
    let want = [
        r#"weir_dns_queries_total{verdict="FORWARDED"} 4"#,
        r#"weir_dns_queries_total{verdict="DROPPED"} 4"#,
        r#"weir_dns_responses_total{rcode="NoError"} 4"#,
        r#"weir_proxy_connections_total{protocol="dns"} 4"#,
    ];
    let metrics = || s.run_in_node(&["curl", "-s", "http://127.0.0.1:9965/metrics"]);
    let _ = weir_tests::lab::wait_until(std::time::Duration::from_secs(5), || {
        let m = metrics();
        want.iter().all(|w| m.lines().any(|l| l == *w))
    });
    let m = metrics();
    for w in want {
        assert!(m.lines().any(|l| l == w), "`{w}` missing:\n{m}");
    }
}
