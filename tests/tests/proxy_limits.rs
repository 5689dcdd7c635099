//! The proxy never loops, blocks or hoards: connections that never decide are
//! closed at the request-head deadline, connections beyond `--max-connections` are
//! closed at once, connections addressed to the proxy port on a node address are
//! refused, HTTP/2 clients get a stream limit, an idle timeout and a hard cap on
//! upstream connections, spliced TCP has an idle timeout and follows policy
//! reloads, and the nftables fallback polices egress to node-local services.
//!
//! Clients are small Python 3 scripts (written into the test's scratch directory
//! and run inside the client's namespace) so that thousands of sockets, partial
//! HTTP/2 prefaces and exact close times can be observed.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
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

/// POLICY plus an L3/L4-only allow for the tiefighter on port 81 (spliced).
const TIE_L4_81: &str = "---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tie-l4}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts: [{ports: [{port: '81', protocol: TCP}]}]
";

/// Opens `count` connections at `rate` per second, each of them sending one of
/// the `modes` (cycled) and then nothing, and records when the server closes
/// each one (EOF or reset), measured from connection establishment. Prints one
/// JSON object.
const FLOOD_PY: &str = r#"
import errno, json, resource, selectors, socket, sys, time

dst, port, count, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
modes, limit = sys.argv[5].split(","), float(sys.argv[6])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SEND = {
    "silent": b"",
    "partial-preface": PREFACE[:16],
    "preface": PREFACE,
    "partial-http1": b"GET /v1/x HTTP/1.1\r\nHost: deathstar\r\n",
}
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
sel = selectors.DefaultSelector()
start = time.monotonic()
live = {}
started = failed = 0
lifetimes = {m: [] for m in modes}
next_at = start
while True:
    now = time.monotonic()
    if now - start > limit:
        break
    while started < count and now >= next_at and len(live) < hard - 64:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex((dst, port))
        if err not in (0, errno.EINPROGRESS):
            failed += 1
            s.close()
        else:
            live[s.fileno()] = [s, modes[started % len(modes)], None]
            sel.register(s, selectors.EVENT_WRITE)
        started += 1
        next_at += 1.0 / rate
    if started >= count and not live:
        break
    wait = 0.05 if started >= count else max(0.0, min(0.05, next_at - time.monotonic()))
    for key, _ in sel.select(wait):
        s = key.fileobj
        fd = s.fileno()
        entry = live[fd]
        if entry[2] is None:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                failed += 1
                sel.unregister(s)
                del live[fd]
                s.close()
                continue
            entry[2] = time.monotonic()
            if SEND[entry[1]]:
                try:
                    s.send(SEND[entry[1]])
                except OSError:
                    pass
            sel.modify(s, selectors.EVENT_READ)
            continue
        try:
            chunk = s.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            lifetimes[entry[1]].append(time.monotonic() - entry[2])
            sel.unregister(s)
            del live[fd]
            s.close()

def stats(xs):
    xs = sorted(xs)
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "min": xs[0], "p50": xs[len(xs) // 2], "max": xs[-1],
            "fast": sum(1 for x in xs if x < 0.5)}

print(json.dumps({"started": started, "failed": failed, "still_open": len(live),
                  "seconds": time.monotonic() - start,
                  "modes": {m: stats(v) for m, v in lifetimes.items()}}), flush=True)
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
if len(sys.argv) > 4:
    s.bind((sys.argv[4], 0))
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

/// A minimal HTTP/2 client on one connection: preface, SETTINGS, then `count`
/// GETs for /v1/N with at most `parallel` streams open at once; once all are
/// answered it stays silent for up to `linger` seconds. Reports the server's
/// SETTINGS, how many responses were 200 (HPACK index 8), how many streams were
/// reset, and when GOAWAY and the close came (seconds after the last response).
/// Prints one JSON object. (curl 7.88's `--parallel` over HTTP/2 prior knowledge
/// fails with "Error in the HTTP2 framing layer" even against nginx, so the
/// streams come from here.)
const H2_PY: &str = r#"
import json, socket, struct, sys, time

dst, port, count, parallel, linger = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
s = socket.create_connection((dst, port), timeout=5)

def frame(kind, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload

def request(sid):
    path, auth = b"/v1/%d" % sid, dst.encode()
    # :method GET, :scheme http, :path and :authority as literals without indexing.
    block = bytes([0x82, 0x86, 0x04, len(path)]) + path + bytes([0x01, len(auth)]) + auth
    return frame(1, 0x5, sid, block)

s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0))
buf = b""
settings, ok, reset, finished = {}, 0, 0, 0
sent, open_streams = 0, set()
done = goaway = closed = None
start = time.monotonic()
while True:
    while sent < count and len(open_streams) < parallel:
        sid = 2 * sent + 1
        s.sendall(request(sid))
        open_streams.add(sid)
        sent += 1
    if done is None and finished == count:
        done = time.monotonic()
        s.settimeout(linger)
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        break
    except OSError:
        chunk = b""
    if not chunk:
        closed = time.monotonic()
        break
    buf += chunk
    while len(buf) >= 9:
        n = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + n:
            break
        kind, flags, sid, payload = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9:9 + n]
        buf = buf[9 + n:]
        end = False
        if kind == 4 and not flags & 1:
            for i in range(0, len(payload), 6):
                settings[str(int.from_bytes(payload[i:i + 2], "big"))] = int.from_bytes(payload[i + 2:i + 6], "big")
            s.sendall(frame(4, 1, 0))
        elif kind == 6 and not flags & 1:
            s.sendall(frame(6, 1, 0, payload))
        elif kind == 1 and sid:
            ok += payload[:1] == b"\x88"
            end = bool(flags & 1)
        elif kind == 0 and sid:
            end = bool(flags & 1)
            if n:
                s.sendall(frame(8, 0, 0, struct.pack(">I", n)) + frame(8, 0, sid, struct.pack(">I", n)))
        elif kind == 3:
            reset += 1
            end = True
        elif kind == 7:
            goaway = time.monotonic()
        if end and sid in open_streams:
            open_streams.discard(sid)
            finished += 1
    if time.monotonic() - start > 60:
        break

rel = lambda t: None if t is None or done is None else round(t - done, 3)
print(json.dumps({"settings": settings, "ok": ok, "reset": reset, "finished": finished,
                  "goaway_after": rel(goaway), "closed_after": rel(closed)}), flush=True)
"#;

fn write_script(s: &Scenario, name: &str, body: &str) -> String {
    let p = s.path(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

/// Runs a script in `ns` and parses its last stdout line as JSON.
fn run_json(cmd: &mut Command) -> Value {
    let out = cmd.stderr(Stdio::inherit()).output().expect("run python3");
    let t = text(&out);
    serde_json::from_str(t.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!("script output is not JSON ({e}): {t:?}");
    })
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
        Held::open_from(s, from, None, dst, port, limit)
    }

    /// As [`Held::open`], from the source address `src` when given.
    fn open_from(
        s: &Scenario,
        from: &str,
        src: Option<&str>,
        dst: &str,
        port: u16,
        limit: &str,
    ) -> Held {
        let script = write_script(s, "hold.py", HOLD_PY);
        let port = port.to_string();
        let mut args = vec![dst, &port, limit];
        args.extend(src);
        let mut child = python(s, from, &script, &args)
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

/// (a) Thousands of connections that never send a request head — silent, a
/// partial or complete HTTP/2 preface and then nothing, a partial HTTP/1 head —
/// are each closed at the request-head deadline, and an allowed client keeps
/// getting 200 throughout. With `--max-connections 4096` the flood (about 2000
/// undecided connections at any time) fits only because the deadline frees them:
/// without it the cap, or the open-files limit, would refuse the allowed client.
///
/// 20 000 connections at 1 000 per second (about 25 s with the 2 s deadline's
/// tail) is what this 2-core machine sustains alongside weir and the curls.
#[test]
fn undecided_connections_are_closed_at_the_request_head_deadline() {
    let Some(mut s) = Scenario::star_wars("head-deadline") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(
        POLICY,
        &[
            "--steering",
            NFT,
            "--request-head-timeout",
            "2s",
            "--max-connections",
            "4096",
        ],
    );
    assert_eq!(landing_code(&s), "200", "{}", s.weir_log_text());
    let script = write_script(&s, "flood.py", FLOOD_PY);
    let mut flood = python(
        &s,
        "tiefighter",
        &script,
        &[
            DEATHSTAR4,
            "80",
            "20000",
            "1000",
            "silent,silent,silent,silent,silent,silent,partial-preface,preface,partial-http1",
            "50",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .expect("start flood.py");
    let mut codes = Vec::new();
    let started = Instant::now();
    while flood.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(60) {
        codes.push(landing_code(&s));
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = flood.wait_with_output().unwrap();
    let r: Value = serde_json::from_str(text(&out).trim()).unwrap_or_else(|e| {
        panic!("flood.py: {e}: {:?}", text(&out));
    });
    eprintln!("flood: {r}");
    assert!(codes.len() >= 20, "curl ran throughout: {codes:?}");
    assert!(
        codes.iter().all(|c| c == "200"),
        "every allowed request during the flood got 200: {codes:?}\n{r}"
    );
    assert_eq!(r["started"], 20000, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["still_open"], 0, "{r}");
    for (mode, st) in r["modes"].as_object().unwrap() {
        assert!(st["n"].as_u64().unwrap() > 1000, "{mode}: {r}");
        let (min, max) = (st["min"].as_f64().unwrap(), st["max"].as_f64().unwrap());
        assert!(min > 1.5, "{mode}: closed before the deadline: {r}");
        assert!(max < 5.0, "{mode}: held well past the 2 s deadline: {r}");
    }
    assert!(s.weir().alive());
    assert_eq!(landing_code(&s), "200");
    assert!(s.weir_log_text().contains("request-head deadline"));
}

/// Beyond `--max-connections` a new connection is accepted and closed at once;
/// the warning is rate-limited; the held ones still close at the deadline.
#[test]
fn connections_beyond_max_connections_are_closed_at_once() {
    let Some(mut s) = Scenario::star_wars("max-conns") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(
        POLICY,
        &[
            "--steering",
            NFT,
            "--request-head-timeout",
            "2s",
            "--max-connections",
            "50",
        ],
    );
    assert_eq!(landing_code(&s), "200");
    let script = write_script(&s, "flood.py", FLOOD_PY);
    let r = run_json(&mut python(
        &s,
        "tiefighter",
        &script,
        &[DEATHSTAR4, "80", "80", "2000", "silent", "15"],
    ));
    eprintln!("flood: {r}");
    let st = &r["modes"]["silent"];
    assert_eq!(st["n"], 80, "{r}");
    let fast = st["fast"].as_u64().unwrap();
    assert!(
        (25..=30).contains(&fast),
        "30 beyond the cap of 50 closed at once: {r}"
    );
    assert!(st["max"].as_f64().unwrap() > 1.5, "{r}");
    let warnings = s
        .weir_log_text()
        .matches("too many client connections")
        .count();
    assert!((1..=2).contains(&warnings), "rate-limited: {warnings}");
    assert_eq!(landing_code(&s), "200");
}

/// (b) A connection addressed to the proxy port on a node address (here the
/// gateway: IPv4, IPv6 link-local from the client's link-local address, and from
/// its global one — that connection carries no interface) is closed at once, not
/// forwarded to the proxy itself; weir stays healthy.
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
    let probes = [
        ("169.254.1.1", None),
        ("fe80::1%eth0", None),
        ("fe80::1%eth0", Some("fd00:200::20")),
    ];
    for (dst, src) in probes {
        let mut h = Held::open_from(&s, "tiefighter", src, dst, 15001, "8");
        let answer = h.ask("wait");
        let t = closed_after(&answer, &s.weir_log_text());
        assert!(t < 1.0, "{dst} from {src:?}: closed after {t} s");
        assert_eq!(landing_code(&s), "200");
    }
    assert!(s.weir().alive());
    let log = s.weir_log_text();
    assert_eq!(
        log.matches("addressed to the proxy port on a node address")
            .count(),
        probes.len(),
        "{log}"
    );
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| f["drop_reason_desc"] == "PROXY_LOOP"
            && f["l4"]["TCP"]["destination_port"] == 15001),
        "{flows:#?}"
    );
}

/// (c) Many parallel HTTP/2 streams on one client connection use at most
/// `--upstream-conns-per-client` upstream connections, and all succeed.
#[test]
fn http2_streams_share_a_capped_set_of_upstream_connections() {
    let Some(mut s) = Scenario::star_wars("h2-cap") else {
        return;
    };
    // nginx logging its connection serial number per request.
    let d = s.path("nginx");
    std::fs::create_dir_all(&d).unwrap();
    let conf = weir_agent::demo::deathstar_nginx_conf(&d).replace(
        &format!("access_log {}/access.log;", d.display()),
        &format!(
            "log_format conns '$connection $remote_addr:$remote_port \"$request\" $status';\n  access_log {}/access.log conns;",
            d.display()
        ),
    );
    assert!(conf.contains("log_format conns"));
    std::fs::write(d.join("nginx.conf"), conf).unwrap();
    let mut nginx = s.lab.workload("deathstar").ns.command("nginx");
    nginx.args(["-c", d.join("nginx.conf").to_str().unwrap()]);
    s.lab.spawn("nginx", nginx).unwrap();
    s.lab
        .wait_for_tcp(DEATHSTAR4, 80, Duration::from_secs(10))
        .unwrap();
    s.start_weir(
        POLICY,
        &[
            "--steering",
            NFT,
            "--upstream-conns-per-client",
            "4",
            "--http2-max-streams",
            "100",
        ],
    );
    let script = write_script(&s, "h2.py", H2_PY);
    let r = run_json(&mut python(
        &s,
        "tiefighter",
        &script,
        &[DEATHSTAR4, "80", "300", "100", "0.2"],
    ));
    eprintln!("h2: {r}");
    assert_eq!(r["settings"]["3"], 100, "{r}");
    assert_eq!(r["finished"], 300, "{r}\n{}", s.weir_log_text());
    assert_eq!(r["ok"], 300, "every stream got 200: {r}");
    let log = s.access_log();
    assert_eq!(log.len(), 300, "{log:?}");
    let upstream: std::collections::BTreeSet<&str> =
        log.iter().filter_map(|l| l.split(' ').next()).collect();
    assert!(
        upstream.len() <= 4,
        "{} upstream connections for one client connection: {upstream:?}",
        upstream.len()
    );
}

/// HTTP/2: the server advertises `--http2-max-streams`, and a connection with no
/// open stream and no bytes for `--idle-timeout` gets GOAWAY and is closed.
#[test]
fn idle_http2_connections_get_goaway_after_the_idle_timeout() {
    let Some(mut s) = Scenario::star_wars("h2-idle") else {
        return;
    };
    s.start_deathstar(&[]);
    s.start_weir(
        POLICY,
        &[
            "--steering",
            NFT,
            "--idle-timeout",
            "2s",
            "--http2-max-streams",
            "7",
        ],
    );
    let script = write_script(&s, "h2.py", H2_PY);
    let r = run_json(&mut python(
        &s,
        "tiefighter",
        &script,
        &[DEATHSTAR4, "80", "1", "1", "10"],
    ));
    eprintln!("h2: {r}");
    assert_eq!(
        r["settings"]["3"], 7,
        "SETTINGS_MAX_CONCURRENT_STREAMS: {r}"
    );
    assert_eq!(r["ok"], 1, "{r}");
    let goaway = r["goaway_after"].as_f64().expect("GOAWAY sent");
    let closed = r["closed_after"].as_f64().expect("connection closed");
    assert!((1.5..4.0).contains(&goaway), "{r}");
    assert!((1.5..4.5).contains(&closed), "{r}");
}

/// A spliced (L3/L4-only) connection with no bytes either way for
/// `--tcp-idle-timeout` is closed; one with traffic is not.
#[test]
fn silent_spliced_connections_are_closed_after_the_tcp_idle_timeout() {
    let Some(mut s) = Scenario::star_wars("tcp-idle") else {
        return;
    };
    s.start_deathstar(&[81]);
    s.start_weir(
        &format!("{POLICY}{TIE_L4_81}"),
        &["--steering", NFT, "--tcp-idle-timeout", "2s"],
    );
    let mut h = Held::open(&s, "tiefighter", DEATHSTAR4, 81, "10");
    // Requests a second apart keep it alive past the timeout.
    for _ in 0..4 {
        assert_eq!(h.ask("req"), "HTTP/1.1 200 OK", "{}", s.weir_log_text());
        std::thread::sleep(Duration::from_secs(1));
    }
    let t = closed_after(&h.ask("wait"), &s.weir_log_text());
    // One second of the timeout had passed already.
    assert!((0.5..3.5).contains(&t), "closed after {t} s");
}

/// (d) A spliced connection is closed when a reload removes the rule that allowed
/// it (a reload that keeps it leaves it alone), with a DROPPED flow record.
#[test]
fn spliced_connections_close_when_a_reload_removes_their_rule() {
    let Some(mut s) = Scenario::star_wars("splice-reload") else {
        return;
    };
    s.start_deathstar(&[81]);
    let with_rule = format!("{POLICY}{TIE_L4_81}");
    s.start_weir(&with_rule, &["--steering", NFT]);
    let mut h = Held::open(&s, "tiefighter", DEATHSTAR4, 81, "8");
    assert_eq!(h.ask("req"), "HTTP/1.1 200 OK", "{}", s.weir_log_text());
    reload(&mut s, &with_rule);
    assert_eq!(h.ask("req"), "HTTP/1.1 200 OK", "{}", s.weir_log_text());
    let signalled = Instant::now();
    reload(&mut s, POLICY);
    let t = closed_after(&h.ask("wait"), &s.weir_log_text());
    assert!(
        t < 3.0 && signalled.elapsed() < Duration::from_secs(5),
        "{t}"
    );
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| f["verdict"] == "DROPPED"
            && f["l4"]["TCP"]["destination_port"] == 81
            && f["source"]["pod_name"] == "tiefighter"
            && f["policy"]
                .as_str()
                .is_some_and(|p| p.contains("no rule matched (ingress, L3/L4)"))),
        "{flows:#?}"
    );
    assert!(s.weir_log_text().contains("policy no longer allows"));
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
