//! The DNS proxy on the eBPF datapath, against a real resolver (dnsmasq) in the
//! `world` (a non-endpoint peer behind its own node device) and real clients
//! (dig, and small python3 clients for what dig cannot send): the tiefighter's
//! queries are decided by name over UDP and TCP, IPv4 and IPv6; denied names never
//! reach the resolver; the resolver's replies to the proxy's upstream sockets (bound
//! to the client's address) come back through the datapath's reverse lookup.

use std::path::PathBuf;
use std::process::{Command, Stdio};
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
/// `www.allowed.test` (a CNAME to it), `-dash.allowed.test`, `secret.denied.test`, and
/// `many.allowed.test` with 60 A records (too many for 512 bytes) and
/// `huge.allowed.test` with 200 (more than fit in one packet). Returns its
/// query log.
fn start_dnsmasq(s: &mut Scenario, port: u16) -> PathBuf {
    start_dnsmasq_on(s, "world", [WORLD4, WORLD6], port)
}

/// [`start_dnsmasq`] on workload `on`, at its addresses `ips`.
fn start_dnsmasq_on(s: &mut Scenario, on: &str, ips: [&str; 2], port: u16) -> PathBuf {
    let log = s.path(&format!("dnsmasq-{port}.log"));
    let hosts = s.path(&format!("many-{port}.hosts"));
    let mut many: String = (1..=60)
        .map(|i| format!("198.51.100.{i} many.allowed.test\n"))
        .collect();
    // About 3 300 bytes of answer: more than one 1 500-byte packet.
    many.extend((1..=200).map(|i| format!("198.18.0.{i} huge.allowed.test\n")));
    std::fs::write(&hosts, many).unwrap();
    let mut cmd = s.lab.workload(on).ns.command("/usr/sbin/dnsmasq");
    cmd.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--user=root",
        "--log-queries",
        "--bind-interfaces",
        // Answers as large as a client's EDNS buffer allows (default 1 232).
        "--edns-packet-max=4096",
        "--host-record=api.allowed.test,192.0.2.10,2001:db8::10",
        "--host-record=secret.denied.test,192.0.2.66",
        "--host-record=-dash.allowed.test,192.0.2.11",
        "--cname=www.allowed.test,api.allowed.test",
        // A zone it serves with authority, which only the tiefighter (so only
        // the proxy connecting from its address) may transfer.
        "--auth-server=ns.axfr.allowed.test",
        "--auth-zone=axfr.allowed.test",
        "--auth-sec-servers=192.0.2.53",
        "--auth-peer=10.200.0.20,fd00:200::20",
        "--host-record=h.axfr.allowed.test,192.0.2.20",
    ])
    .arg(format!("--listen-address={},{}", ips[0], ips[1]))
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
        ips.iter().all(|ip| {
            let out = s
                .lab
                .workload(on)
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
            // A leading dash: no host name, but a DNS name whose labels
            // `*.allowed.test` matches, as in Cilium (`-q`: not an option).
            let out = s
                .lab
                .workload("tiefighter")
                .ns
                .command("dig")
                .args([&format!("@{server}"), "+time=3", "+tries=1"])
                .args(tcp)
                .args(["-q", "-dash.allowed.test"])
                .output()
                .expect("run dig");
            let out = text(&out);
            assert_eq!(answers(&out), ["192.0.2.11"], "{what}: {out}");
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

/// A 200-record answer with a 4 096-byte EDNS buffer: more than one packet on
/// the lab's 1 500-byte links, so the resolver sends it in IP fragments (the
/// control: asked from the node, past the proxy, it comes whole over UDP).
/// Only the first fragment carries the ports the datapath steers by; the rest
/// is delivered on the node as well, where the kernel reassembles it for the
/// proxy's socket — else it was lost on both sides. The proxy does not trust
/// a reassembled answer (an off-path fragment may be spliced in): the client
/// gets TC and nothing else, and dig's own TCP retry brings all 200 records.
fn a_fragmented_answer_gets_tc_and_tcp_brings_it(s: &Scenario, server: &str) {
    let direct = s.run_in_node(&[
        "dig",
        &format!("@{server}"),
        "huge.allowed.test",
        "+bufsize=4096",
        "+ignore",
        "+time=3",
        "+tries=1",
    ]);
    assert_eq!(answers(&direct).len(), 200, "control, {server}: {direct}");
    let size: usize = direct
        .lines()
        .find_map(|l| l.trim().strip_prefix(";; MSG SIZE  rcvd: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(size > 1500, "control, {server}: {size} bytes: {direct}");
    let flags = |out: &str| -> Vec<String> {
        out.lines()
            .find_map(|l| l.strip_prefix(";; flags: "))
            .and_then(|l| l.split(';').next())
            .map(|f| f.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    assert!(!flags(&direct).contains(&"tc".to_string()), "{direct}");
    // `+ignore`: a truncated answer stays the answer (no TCP retry).
    let out = dig(
        s,
        server,
        53,
        "huge.allowed.test",
        &["+bufsize=4096", "+ignore"],
    );
    assert_eq!(
        status(&out),
        "NOERROR",
        "{server}: {out}\n{}",
        s.weir_log_text()
    );
    assert!(flags(&out).contains(&"tc".to_string()), "{server}: {out}");
    assert!(answers(&out).is_empty(), "{server}: {out}");
    let out = dig(s, server, 53, "huge.allowed.test", &["+bufsize=4096"]);
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert_eq!(answers(&out).len(), 200, "{server}: {out}");
}

/// A query larger than one packet (kdig pads it to 2 049 bytes), as a flow's
/// first datagram: reassembled on the node, it has no session socket yet, and
/// the socket lookup hands it to the listener; the proxy decides it whole.
fn a_padded_query_is_answered(s: &Scenario, server: &str) {
    let out = s
        .lab
        .workload("tiefighter")
        .ns
        .command("kdig")
        .args([&format!("@{server}"), "api.allowed.test", "A"])
        .args(["+padding=2000", "+retry=0", "+timeout=3"])
        .output()
        .expect("run kdig");
    let out = text(&out);
    assert!(
        out.contains("status: NOERROR") && out.contains("192.0.2.10"),
        "{server}: {out}\n{}",
        s.weir_log_text()
    );
}

/// DNS messages larger than a packet, both ways, through the proxy to a
/// resolver outside the node.
#[test]
fn dns_messages_in_ip_fragments_go_through_the_proxy() {
    let Some(mut s) = world("dns-fragments") else {
        return;
    };
    start_dnsmasq(&mut s, 53);
    s.start_weir(&policy(ONLY_ALLOWED), &["--steering", "ebpf"]);
    for server in [WORLD4, WORLD6] {
        a_fragmented_answer_gets_tc_and_tcp_brings_it(&s, server);
        a_padded_query_is_answered(&s, server);
    }
    // The records come (and are learned) over TCP only.
    let flows = dns_flows(&s);
    let big_answers = |ips: usize, transport: &str| {
        flows
            .iter()
            .filter(|f| {
                f["l7"]["type"] == "RESPONSE"
                    && f["l7"]["dns"]["query"] == "huge.allowed.test."
                    && f["l7"]["dns"]["ips"].as_array().map_or(0, Vec::len) == ips
                    && f["l4"][transport].is_object()
            })
            .count()
    };
    assert_eq!(big_answers(200, "TCP"), 2, "{flows:#?}");
    assert_eq!(big_answers(200, "UDP"), 0, "{flows:#?}");
    assert_eq!(big_answers(0, "UDP"), 4, "{flows:#?}");
}

/// DNS rules for the tiefighter towards a resolver on the deathstar, which
/// enforces ingress (port 53 from the tiefighter only).
const LOCAL_RESOLVER_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns}
spec:
  endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
  - toEndpoints: [{matchLabels: {class: deathstar}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.allowed.test"}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: resolver}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
"#;

/// The same with a resolver that is a local endpoint enforcing ingress
/// policy: the proxy's upstream leg to it sends the padded query in
/// fragments, whose rest the endpoint's hook passes only behind a first
/// fragment it saw; its large answer comes back in fragments to the proxy
/// (and gets TC, as from outside).
#[test]
fn dns_messages_in_ip_fragments_go_through_the_proxy_to_a_local_resolver() {
    let Some(mut s) = Scenario::star_wars("dns-fragments-local") else {
        return;
    };
    start_dnsmasq_on(
        &mut s,
        "deathstar",
        [weir_tests::DEATHSTAR4, weir_tests::DEATHSTAR6],
        53,
    );
    s.start_weir(LOCAL_RESOLVER_POLICY, &["--steering", "ebpf"]);
    for server in [weir_tests::DEATHSTAR4, weir_tests::DEATHSTAR6] {
        a_fragmented_answer_gets_tc_and_tcp_brings_it(&s, server);
        a_padded_query_is_answered(&s, server);
        // Control: the proxy decides these queries (a denied name is refused).
        let out = dig(&s, server, 53, "secret.denied.test", &[]);
        assert_eq!(status(&out), "REFUSED", "{server}: {out}");
    }
}

/// Review of the fragment path: the rest of a datagram whose first fragment
/// went to the proxy's upstream socket is delivered on the node and
/// reassembled there. If the session ended between the fragments (its
/// sockets closed), the datagram — addressed to the pod — must reach no node
/// socket bound to that port on every address. A resolver that is the
/// attacker sends a first fragment for the tiefighter's port, answers the
/// query so that the session ends, and sends the rest a second later; a
/// socket on the node listens on that port. Control: the same fragments
/// addressed to the node itself reach that socket.
#[test]
fn a_reassembled_datagram_for_an_ended_session_reaches_no_node_socket() {
    let Some(mut s) = world("dns-frag-orphan") else {
        return;
    };
    const PORT: u16 = 40053;
    s.start_weir(&policy(EVERY_NAME), &["--steering", "ebpf"]);
    let listener = node_listener(&s, &[PORT], 5);
    let attacker = s
        .lab
        .workload("world")
        .ns
        .command("python3")
        .args([
            "-c",
            &format!(
                r#"
import socket, struct, time
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.bind(('{WORLD4}', 53))
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
def fragments(dst, ident, tag):
    payload = tag + b'-attacker-data' * 150
    udp = struct.pack('>HHHH', 53, {PORT}, 8 + len(payload), 0) + payload
    def ip(flags_offset, data):
        return struct.pack('>BBHHHBBH4s4s', 0x45, 0, 20 + len(data), ident, flags_offset,
                           64, 17, 0, socket.inet_aton('{WORLD4}'), socket.inet_aton(dst)) + data
    return ip(0x2000, udp[:1008]), ip(1008 // 8, udp[1008:])
time.sleep(1)
head, rest = fragments('10.201.1.254', 4242, b'node')
raw.sendto(head, ('10.201.1.254', 0)); raw.sendto(rest, ('10.201.1.254', 0))
srv.settimeout(5)
q, peer = srv.recvfrom(4096)
head, rest = fragments('10.200.0.20', 4343, b'pod')
raw.sendto(head, ('10.200.0.20', 0))
srv.sendto(q[:2] + bytes([q[2] | 0x80, 0x80]) + q[4:], peer)
time.sleep(1.5)
raw.sendto(rest, ('10.200.0.20', 0))
print('sent', flush=True)
"#
            ),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the attacking resolver");
    std::thread::sleep(Duration::from_millis(1500));
    let out = s
        .lab
        .workload("tiefighter")
        .ns
        .command("dig")
        .args([&format!("@{WORLD4}"), "-b", &format!("10.200.0.20#{PORT}")])
        .args(["+time=3", "+tries=1", "api.allowed.test"])
        .output()
        .expect("run dig");
    let dig_out = text(&out);
    let attacker = attacker.wait_with_output().expect("attacker");
    let heard = listener.wait_with_output().expect("listener");
    let heard = String::from_utf8_lossy(&heard.stdout).into_owned();
    assert!(
        String::from_utf8_lossy(&attacker.stdout).contains("sent"),
        "{attacker:?}\n{dig_out}"
    );
    assert!(status(&dig_out) == "NOERROR", "{dig_out}");
    assert!(heard.contains("got node"), "control: {heard}");
    assert!(
        !heard.contains("got pod-"),
        "a datagram for the pod reached a node socket: {heard}"
    );
}

/// Sends one fragment of a 2 100-byte UDP datagram (IPv4, made by hand: a raw
/// socket) from `from` to `to`, IP ID `ident`, its payload starting with `tag`:
/// `part` 0 is the first fragment (with the UDP header), 1 the rest.
fn send_fragment(
    ns: &weir_agent::lab::Netns,
    from: (&str, u16),
    to: (&str, u16),
    ident: u16,
    tag: &str,
    part: u8,
) {
    let out = ns
        .command("python3")
        .args([
            "-c",
            r#"
import socket, struct, sys
src, sport, dst, dport, ident, tag, part = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6].encode(), int(sys.argv[7])
payload = tag + b'-not-dns' * 260
udp = struct.pack('>HHHH', sport, dport, 8 + len(payload), 0) + payload
def ip(flags_offset, data):
    return struct.pack('>BBHHHBBH4s4s', 0x45, 0, 20 + len(data), ident, flags_offset,
                       64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst)) + data
pkt = ip(0x2000, udp[:1008]) if part == 0 else ip(1008 // 8, udp[1008:])
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).sendto(pkt, (dst, 0))
"#,
        ])
        .args([from.0, &from.1.to_string(), to.0, &to.1.to_string()])
        .args([&ident.to_string(), tag, &part.to_string()])
        .output()
        .expect("send a fragment");
    assert!(out.status.success(), "{out:?}");
}

/// A node socket on each of `ports`, bound to every address: prints `got TAG`
/// for each datagram (its first 4 bytes), until `secs` of silence.
fn node_listener(s: &Scenario, ports: &[u16], secs: u32) -> std::process::Child {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    s.lab
        .node
        .command("python3")
        .args([
            "-c",
            r#"
import select, socket, sys
socks = []
for p in sys.argv[2:]:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    u.bind(('0.0.0.0', int(p)))
    socks.append(u)
while True:
    ready, _, _ = select.select(socks, [], [], int(sys.argv[1]))
    if not ready:
        break
    for u in ready:
        print('got', u.recv(65535)[:4].decode(errors='replace'), flush=True)
"#,
            &secs.to_string(),
        ])
        .args(&ports)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the node's listener")
}

/// Review of the fragment path, again: weir stops (a crash) between a
/// datagram's first fragment, handed to one of its sockets, and the rest. Its
/// tc programs stay (they keep enforcing), its sockets and its socket-lookup
/// program go: the rest, reassembled on the node, would reach node sockets
/// bound to the port on every address — a resolver's datagram for the pod's
/// port (the proxy's upstream leg), a pod's datagram for port 53 (its own
/// flow). Both are dropped. Control: fragments to the node's own address
/// reach the same sockets.
#[test]
fn fragments_after_weir_stopped_reach_no_node_socket() {
    let Some(mut s) = world("dns-frag-crash") else {
        return;
    };
    const PORT: u16 = 40055;
    s.start_weir(&policy(EVERY_NAME), &["--steering", "ebpf"]);
    let pid = s.weir().pid() as i32;
    let go = s.path("send-the-rest");
    let listener = node_listener(&s, &[PORT, 53], 6);
    let attacker = s
        .lab
        .workload("world")
        .ns
        .command("python3")
        .args([
            "-c",
            &format!(
                r#"
import os, socket, subprocess, time
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.bind(('{WORLD4}', 53))
srv.settimeout(5)
q, peer = srv.recvfrom(4096)
print('query', flush=True)
while not os.path.exists('{go}'):
    time.sleep(0.05)
"#,
                go = go.display()
            ),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the resolver");
    std::thread::sleep(Duration::from_millis(1000));
    let world_ns = &s.lab.workload("world").ns;
    let pod = &s.lab.workload("tiefighter").ns;
    // The proxy's upstream socket for 10.200.0.20:PORT ↔ the resolver: a
    // query from that port, which the resolver leaves unanswered.
    let mut dig = pod
        .command("dig")
        .args([&format!("@{WORLD4}"), "-b", &format!("10.200.0.20#{PORT}")])
        .args(["+time=2", "+tries=1", "api.allowed.test"])
        .stdout(Stdio::null())
        .spawn()
        .expect("run dig");
    std::thread::sleep(Duration::from_millis(500));
    // A resolver's datagram for the pod's port (the proxy's upstream leg), a
    // pod's for port 53 (its own flow), and the control, to the node.
    let reply_to_pod = |part| {
        send_fragment(
            world_ns,
            (WORLD4, 53),
            ("10.200.0.20", PORT),
            4646,
            "prox",
            part,
        )
    };
    let pod_query = |part| {
        send_fragment(
            pod,
            ("10.200.0.20", PORT + 1),
            (WORLD4, 53),
            4747,
            "clie",
            part,
        )
    };
    reply_to_pod(0);
    pod_query(0);
    for part in [0, 1] {
        send_fragment(
            world_ns,
            (WORLD4, 53),
            ("10.201.1.254", 53),
            4848,
            "node",
            part,
        );
    }
    // (Its file descriptors — sockets, the socket-lookup link — close as it dies.)
    lab::send_signal(pid, libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::write(&go, "").unwrap();
    reply_to_pod(1);
    pod_query(1);
    let _ = dig.wait();
    let attacker = attacker.wait_with_output().expect("resolver");
    assert!(
        String::from_utf8_lossy(&attacker.stdout).contains("query"),
        "the proxy's query never came: {attacker:?}"
    );
    let heard = listener.wait_with_output().expect("listener");
    let heard = String::from_utf8_lossy(&heard.stdout).into_owned();
    let _ = s.weir().stop_with(libc::SIGKILL, Duration::from_secs(2));
    assert!(heard.contains("got node"), "control: {heard}");
    assert!(
        !heard.contains("got prox") && !heard.contains("got clie"),
        "a datagram reached a node socket after weir stopped: {heard}"
    );
}

/// The other direction: a client's datagram whose first fragment went to the
/// proxy, while its flow's conntrack entry is gone before the rest arrives
/// (an LRU map: a client can churn it). Reassembled on the node, it would be
/// looked up like any datagram to the resolver's port — and a node socket
/// bound to port 53 on every address would take a query the DNS proxy never
/// saw. The rest is dropped instead. Control: fragments to the node's own
/// address reach that socket.
#[test]
fn a_client_fragment_whose_flow_is_gone_reaches_no_node_socket() {
    let Some(mut s) = world("dns-frag-evicted") else {
        return;
    };
    const PORT: u16 = 40054;
    s.start_weir(&policy(EVERY_NAME), &["--steering", "ebpf"]);
    let listener = node_listener(&s, &[53], 4);
    let fragment =
        |ns: &weir_agent::lab::Netns, from: &str, dst: &str, ident: u16, tag: &str, part: u8| {
            send_fragment(ns, (from, PORT), (dst, 53), ident, tag, part);
        };
    std::thread::sleep(Duration::from_millis(500));
    let world_ns = &s.lab.workload("world").ns;
    fragment(world_ns, WORLD4, "10.201.1.254", 4444, "node", 0);
    fragment(world_ns, WORLD4, "10.201.1.254", 4444, "node", 1);
    let pod = &s.lab.workload("tiefighter").ns;
    fragment(pod, "10.200.0.20", WORLD4, 4545, "pod-", 0);
    // The flow's conntrack entry goes (as LRU eviction would take it).
    let mut key: Vec<u8> = vec![10, 200, 0, 20];
    key.extend([0; 12]);
    key.extend([10, 201, 1, 1]);
    key.extend([0; 12]);
    key.extend(PORT.to_be_bytes());
    key.extend(53u16.to_be_bytes());
    key.extend([17, 4, 0, 0]);
    let ct = s.bpf_root.join("v6/maps/weir_ct");
    let hex: Vec<String> = key.iter().map(|b| format!("{b:02x}")).collect();
    let out = Command::new("bpftool")
        .args(["map", "delete", "pinned"])
        .arg(&ct)
        .args(["key", "hex"])
        .args(&hex)
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "deleting the flow's entry: {out:?}");
    fragment(pod, "10.200.0.20", WORLD4, 4545, "pod-", 1);
    let heard = listener.wait_with_output().expect("listener");
    let heard = String::from_utf8_lossy(&heard.stdout).into_owned();
    assert!(heard.contains("got node"), "control: {heard}");
    assert!(
        !heard.contains("got pod"),
        "a pod's datagram reached a node socket past the DNS proxy: {heard}"
    );
}

/// Review of the fragment path: the proxy's own datagram to a local resolver
/// (its upstream leg, from the client's address) is remembered at its first
/// fragment, unmarked; its rest passes to the resolver only from the node. A
/// pod sending a fragment with that datagram's addresses and IP ID (guessed)
/// would splice its own bytes into what the resolver reassembles, past the
/// proxy: it is dropped. Control: the same fragment, behind the same
/// remembered head, sent by the node reaches the resolver's interface. (The
/// head is put in `weir_frags` as `proxy_leg` writes it: racing the proxy's
/// real fragments is not deterministic.)
#[test]
fn a_pods_fragment_cannot_join_the_proxys_own_datagram() {
    let Some(mut s) = Scenario::star_wars("dns-frag-splice") else {
        return;
    };
    s.start_weir(LOCAL_RESOLVER_POLICY, &["--steering", "ebpf"]);
    const PORT: u16 = 40056;
    let (pod, resolver) = ("10.200.0.20", weir_tests::DEATHSTAR4);
    // Every UDP fragment (not the first) that reaches the resolver's interface.
    let mut capture = s
        .lab
        .workload("deathstar")
        .ns
        .command("python3")
        .args([
            "-c",
            r#"
import socket, struct, sys
c = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
c.settimeout(float(sys.argv[1]))
print('ready', flush=True)
try:
    while True:
        p = c.recv(65535)
        ident, flags_offset, proto = struct.unpack('>HHxB', p[4:10])
        if proto == 17 and flags_offset & 0x1fff:
            print('fragment', ident, flush=True)
except socket.timeout:
    pass
"#,
            "3",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the capture");
    let mut out = std::io::BufReader::new(capture.stdout.take().expect("capture's output"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).expect("capture ready");
    assert_eq!(line.trim(), "ready");
    let frags = s.bpf_root.join("v6/maps/weir_frags");
    let remember_proxy_head = |ident: u16| {
        let mut key: Vec<u8> = vec![10, 200, 0, 20];
        key.extend([0; 12]);
        key.extend([10, 200, 0, 10]);
        key.extend([0; 12]);
        key.extend(ident.to_be_bytes()); // the IP header's bytes, as read
        key.extend([0, 0, 17, 4, 0, 0]);
        let now =
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("monotonic clock");
        let now_ns = u64::try_from(now.tv_sec()).unwrap() * 1_000_000_000
            + u64::try_from(now.tv_nsec()).unwrap();
        let mut value: Vec<u8> = now_ns.to_le_bytes().to_vec();
        value.extend(0u32.to_le_bytes()); // no mark: the proxy's own datagram
        value.extend(PORT.to_be_bytes());
        value.extend(53u16.to_be_bytes());
        value.push(1); // WEIR_LEG_PROXY
        value.extend([0; 7]);
        let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>();
        let out = Command::new("bpftool")
            .args(["map", "update", "pinned"])
            .arg(&frags)
            .arg("key")
            .arg("hex")
            .args(hex(&key))
            .arg("value")
            .arg("hex")
            .args(hex(&value))
            .output()
            .expect("run bpftool");
        assert!(out.status.success(), "remembering a head: {out:?}");
    };
    remember_proxy_head(5151);
    send_fragment(&s.lab.node, (pod, PORT), (resolver, 53), 5151, "node", 1);
    remember_proxy_head(5252);
    let pod_ns = &s.lab.workload("tiefighter").ns;
    send_fragment(pod_ns, (pod, PORT), (resolver, 53), 5252, "pod-", 1);
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut out, &mut seen).expect("capture's output");
    capture.wait().expect("capture ends after 3 s of silence");
    assert!(seen.contains("fragment 5151"), "control: {seen}");
    assert!(
        !seen.contains("fragment 5252"),
        "a pod's fragment joined the proxy's datagram: {seen}"
    );
    let flows = s.flows();
    assert!(
        flows
            .iter()
            .any(|f| f["drop_reason_desc"] == "FRAGMENT_WITHOUT_HEAD" && f["IP"]["source"] == pod),
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

    // An L3/L4 allow to the resolver beside the DNS rules allows every name
    // (as in Cilium: a match-all DNS rule), but the queries stay in the proxy:
    // each one is decided and recorded as DNS.
    s.reload(&format!(
        "{}  - toCIDR: [10.201.1.0/24, \"fd00:201:1::/64\"]\n    toPorts:\n    - ports: [{{port: \"53\", protocol: ANY}}]\n",
        policy(ONLY_ALLOWED)
    ));
    for server in [WORLD4, WORLD6] {
        for tcp in [&[][..], &["+tcp"][..]] {
            let out = dig(&s, server, 53, "secret.denied.test", tcp);
            assert_eq!(answers(&out), ["192.0.2.66"], "{server} {tcp:?}: {out}");
        }
    }
    assert_eq!(resolver_saw(&log, "secret.denied.test"), 4);
    let recorded = |flows: &[serde_json::Value]| {
        flows
            .iter()
            .filter(|f| {
                f["verdict"] == "FORWARDED"
                    && f["l7"]["type"] == "REQUEST"
                    && f["l7"]["dns"]["query"] == "secret.denied.test."
            })
            .count()
    };
    let _ = weir_tests::lab::wait_until(std::time::Duration::from_secs(5), || {
        recorded(&dns_flows(&s)) == 4
    });
    let flows = dns_flows(&s);
    assert_eq!(recorded(&flows), 4, "{flows:#?}");
}
