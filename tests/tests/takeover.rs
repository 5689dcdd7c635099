//! Planned restart: a second `weir run` takes over the running weir's listening
//! sockets while real clients keep going, on the eBPF datapath and on the nft
//! fallback, over IPv4 and IPv6. Not one request or datagram may fail; the old
//! weir drains and exits by itself; the new one enforces its own policy.

use std::time::Duration;

use weir_tests::{DEATHSTAR4, DEATHSTAR6, Scenario, lab, text};

/// The running weir's policy: landing and the exhaust port are both allowed.
const ALLOW_BOTH: &str = r#"
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
        - {method: PUT, path: /v1/exhaust-port}
"#;

/// The new weir's policy: landing only.
const LANDING_ONLY: &str = r#"
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

const UDP_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: udp}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts:
    - ports: [{port: "5300", endPort: 5399, protocol: UDP}]
"#;

fn url(ip: &str, path: &str) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]{path}")
    } else {
        format!("http://{ip}{path}")
    }
}

/// A background shell loop of real curls from the tiefighter: five POSTs on
/// one keep-alive connection per curl (HTTP/1.1, or HTTP/2 streams at once
/// with `flags`), a new connection per curl, until `stop` exists. Every
/// response's status (or curl's failure) goes to `out`.
fn start_curl_loop(s: &mut Scenario, name: &str, ip: &str, out: &str, stop: &str, flags: &str) {
    let u = url(ip, "/v1/request-landing");
    let urls = vec![format!("-o /dev/null {u}"); 5].join(" ");
    let script = format!(
        "while [ ! -e {stop} ]; do \
           curl {flags} -s -w '%{{http_code}}\\n' --max-time 5 -X POST {urls} 2>/dev/null >> {out} \
             || echo \"curl-exit-$?\" >> {out}; \
         done"
    );
    let mut cmd = s.lab.workload("tiefighter").ns.command("sh");
    cmd.args(["-c", &script]);
    s.lab.spawn(name, cmd).expect("start curl loop");
}

/// The pid of the weir that wrote the ready file.
fn ready_pid(s: &Scenario) -> u32 {
    std::fs::read_to_string(s.state_dir.join("ready"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .expect("a ready weir")
}

fn wait_for_exit(s: &mut Scenario, name: &str, within: Duration) {
    let ok = lab::wait_until(within, || {
        !s.lab
            .processes
            .iter_mut()
            .filter(|p| p.name == name)
            .any(|p| p.alive())
    });
    assert!(ok.is_ok(), "{name} did not stop");
}

fn takeover_loses_no_request(test: &str, steering: &str) {
    let Some(mut s) = Scenario::star_wars(test) else {
        return;
    };
    s.start_deathstar(&[]);
    let args = ["--steering", steering, "--drain-timeout", "10s"];
    s.start_weir(ALLOW_BOTH, &args);
    let old = ready_pid(&s);
    // The request the new weir will deny passes under the running weir's
    // policy: the denial below is the new policy's doing.
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        assert_eq!(
            s.status("tiefighter", "PUT", &url(ip, "/v1/exhaust-port")),
            "200"
        );
    }
    let stop = s.path("stop");
    let stop = stop.to_str().expect("utf-8");
    const H2: &str = "--http2-prior-knowledge --parallel --parallel-immediate";
    let loops = [
        ("curl4", "IPv4 HTTP/1.1", DEATHSTAR4, ""),
        ("curl6", "IPv6 HTTP/1.1", DEATHSTAR6, ""),
        ("curl4h2", "IPv4 HTTP/2", DEATHSTAR4, H2),
        ("curl6h2", "IPv6 HTTP/2", DEATHSTAR6, H2),
    ];
    for (name, _, ip, flags) in loops {
        let out = s.path(&format!("{name}.txt"));
        start_curl_loop(&mut s, name, ip, out.to_str().expect("utf-8"), stop, flags);
    }
    std::thread::sleep(Duration::from_millis(3000));

    std::fs::write(s.path("policy.yaml"), LANDING_ONLY).unwrap();
    let Some(new) = s.start_next_weir(&args, "weir-new.log") else {
        panic!(
            "the new weir did not take over:\n{}\n--- old:\n{}",
            std::fs::read_to_string(s.path("weir-new.log")).unwrap_or_default(),
            s.weir_log_text()
        );
    };
    std::thread::sleep(Duration::from_millis(3000));
    std::fs::write(stop, "").unwrap();
    for (name, ..) in loops {
        wait_for_exit(&mut s, name, Duration::from_secs(20));
    }

    let new_log = std::fs::read_to_string(s.path("weir-new.log")).unwrap_or_default();
    for (name, family, ..) in loops {
        let codes = std::fs::read_to_string(s.path(&format!("{name}.txt"))).unwrap_or_default();
        let total = codes.lines().count();
        let failed: Vec<&str> = codes.lines().filter(|l| *l != "200").collect();
        assert!(
            failed.is_empty(),
            "{family}: {} of {total} requests failed across the takeover: {:?}\n--- old:\n{}\n--- new:\n{new_log}",
            failed.len(),
            &failed[..failed.len().min(20)],
            s.weir_log_text()
        );
        assert!(total >= 100, "{family}: only {total} requests were made");
        eprintln!("{family}: {total} requests, all 200, across the takeover");
    }
    assert!(new_log.contains("took over: serving"), "{new_log}");

    // The old weir drains and exits by itself, leaving the steering in place.
    let ok = lab::wait_until(Duration::from_secs(20), || {
        !s.weir_with_pid(old).is_some_and(|p| p.alive())
    });
    assert!(
        ok.is_ok(),
        "the old weir is still running:\n{}",
        s.weir_log_text()
    );
    let old_log = s.weir_log_text();
    assert!(
        old_log.contains("handed over and drained; exiting"),
        "{old_log}"
    );
    assert!(!old_log.contains("removing steering"), "{old_log}");
    assert!(
        lab::wait_until(Duration::from_secs(5), || std::fs::read_to_string(
            s.path("weir-new.log")
        )
        .unwrap_or_default()
        .contains("the old weir has drained"))
        .is_ok(),
        "the new weir never heard that the old one drained"
    );

    // The new weir enforces its own policy, on both families.
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        assert_eq!(
            s.status("tiefighter", "POST", &url(ip, "/v1/request-landing")),
            "200"
        );
        let out = s.curl(
            "tiefighter",
            &[
                "-w",
                " %{http_code}",
                "-X",
                "PUT",
                &url(ip, "/v1/exhaust-port"),
            ],
        );
        assert_eq!(text(&out), "Access denied\n 403", "{ip}");
    }

    // A weir that itself took over (and adopted the pins) is taken over in
    // turn, back to the allowing policy.
    std::fs::write(s.path("policy.yaml"), ALLOW_BOTH).unwrap();
    let Some(newer) = s.start_next_weir(&args, "weir-newer.log") else {
        panic!(
            "the second takeover failed:\n{}",
            std::fs::read_to_string(s.path("weir-newer.log")).unwrap_or_default()
        );
    };
    let ok = lab::wait_until(Duration::from_secs(20), || {
        !s.weir_with_pid(new).is_some_and(|p| p.alive())
    });
    assert!(ok.is_ok(), "the second weir is still running");
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        assert_eq!(
            s.status("tiefighter", "PUT", &url(ip, "/v1/exhaust-port")),
            "200"
        );
    }
    assert!(s.weir_with_pid(newer).is_some_and(|p| p.alive()));
}

#[test]
fn takeover_loses_no_http_request_on_the_ebpf_datapath() {
    takeover_loses_no_request("takeover-ebpf", "ebpf");
}

#[test]
fn takeover_loses_no_http_request_on_the_nft_fallback() {
    takeover_loses_no_request("takeover-nft", "nft");
}

/// A steady UDP sender from the tiefighter: one datagram every 10 ms, each
/// waiting up to 2 s for its echo; `one` flow (one socket throughout) or a new
/// socket (a new flow, as DNS clients do) per datagram. Prints
/// `sent N lost M` when `stop` exists.
const SENDER: &str = r#"
import os, socket, sys, time
dst, port, mode, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
fam = socket.AF_INET6 if ':' in dst else socket.AF_INET
def sock():
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(2.0)
    s.connect((dst, port))
    return s
s = sock()
sent = lost = 0
while not os.path.exists(stop):
    if mode == 'many':
        s.close()
        s = sock()
    msg = ('%s-%d' % (mode, sent)).encode()
    s.send(msg)
    sent += 1
    try:
        while s.recv(100) != msg:
            pass
    except OSError:
        lost += 1
    time.sleep(0.01)
print('sent %d lost %d' % (sent, lost), flush=True)
"#;

#[test]
fn udp_flows_keep_answering_across_a_takeover() {
    let Some(mut s) = Scenario::star_wars("takeover-udp") else {
        return;
    };
    for (name, listen) in [
        ("echo4", "UDP4-RECVFROM:5353,fork"),
        ("echo6", "UDP6-RECVFROM:5353,fork,ipv6only=1"),
    ] {
        let mut echo = s.lab.workload("deathstar").ns.command("socat");
        echo.args(["-T", "1", listen, "PIPE"]);
        s.lab.spawn(name, echo).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    // UDP reaches the proxy through the nft fallback (the eBPF datapath sends
    // only UDP with L7 rules to it).
    let args = [
        "--steering",
        "nft",
        "--udp-idle-timeout",
        "2s",
        "--drain-timeout",
        "4s",
    ];
    s.start_weir(UDP_POLICY, &args);
    let old = ready_pid(&s);
    let script = s.path("sender.py");
    std::fs::write(&script, SENDER).unwrap();
    let stop = s.path("udp-stop");
    let mut outs = Vec::new();
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        for mode in ["one", "many"] {
            let out = s.path(&format!("udp-{mode}-{}.txt", outs.len()));
            let mut cmd = s.lab.workload("tiefighter").ns.command("python3");
            cmd.arg(&script)
                .args([ip, "5353", mode])
                .arg(&stop)
                .stdout(std::fs::File::create(&out).unwrap());
            s.lab.spawn("udp-sender", cmd).unwrap();
            outs.push((format!("{ip} {mode}"), out));
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    let Some(_new) = s.start_next_weir(&args, "weir-new.log") else {
        panic!(
            "the new weir did not take over:\n{}",
            std::fs::read_to_string(s.path("weir-new.log")).unwrap_or_default()
        );
    };
    // The old weir keeps its sessions until their next reply (or the drain
    // ends); the senders go on past its exit, into flows of the new weir.
    let ok = lab::wait_until(Duration::from_secs(20), || {
        !s.weir_with_pid(old).is_some_and(|p| p.alive())
    });
    assert!(
        ok.is_ok(),
        "the old weir is still running:\n{}",
        s.weir_log_text()
    );
    // The policy did not change: the old weir did not stop deciding.
    assert!(
        !s.weir_log_text().contains("decides nothing more"),
        "{}",
        s.weir_log_text()
    );
    // Its sessions ended between a reply and the next datagram, each flow's
    // next datagram going to the new weir.
    assert!(
        s.weir_log_text()
            .contains("handed over; UDP session closed between datagrams"),
        "{}",
        s.weir_log_text()
    );
    std::thread::sleep(Duration::from_millis(3000));
    std::fs::write(&stop, "").unwrap();
    wait_for_exit(&mut s, "udp-sender", Duration::from_secs(10));
    let new_log = std::fs::read_to_string(s.path("weir-new.log")).unwrap_or_default();
    for (what, out) in outs {
        let got = std::fs::read_to_string(&out).unwrap_or_default();
        let mut words = got.split_whitespace();
        let (sent, lost) = match (words.next(), words.next(), words.next(), words.next()) {
            (Some("sent"), Some(n), Some("lost"), Some(m)) => (
                n.parse::<u32>().unwrap_or(0),
                m.parse::<u32>().unwrap_or(u32::MAX),
            ),
            _ => panic!("{what}: sender said {got:?}"),
        };
        // A new flow per datagram costs a session each: a loaded machine sends
        // fewer; a few dozen still cross the takeover.
        assert!(sent >= 50, "{what}: only {sent} datagrams sent");
        assert_eq!(
            lost,
            0,
            "{what}: {lost} of {sent} datagrams lost across the takeover\n--- old:\n{}\n--- new:\n{new_log}",
            s.weir_log_text()
        );
        eprintln!("{what}: {sent} datagrams, none lost");
    }
}

/// The old weir's policy holds on both families: landing allowed, the
/// exhaust port denied by its L7 rule.
fn old_weir_enforces(s: &Scenario) {
    for ip in [DEATHSTAR4, DEATHSTAR6] {
        assert_eq!(
            s.status("tiefighter", "POST", &url(ip, "/v1/request-landing")),
            "200",
            "{}",
            s.weir_log_text()
        );
        assert_eq!(
            s.status("tiefighter", "PUT", &url(ip, "/v1/exhaust-port")),
            "403",
            "{}",
            s.weir_log_text()
        );
    }
}

/// The old weir's API is bound and answers.
fn old_weir_api_answers(s: &Scenario) {
    let api = s.run_in_node(&[
        weir_tests::weir_bin().to_str().expect("utf-8"),
        "endpoint",
        "list",
        "--api-socket",
        s.path("weir.sock").to_str().expect("utf-8"),
    ]);
    assert!(api.contains("deathstar"), "{api}");
}

#[test]
fn refused_and_abandoned_takeovers_leave_the_old_weir_serving() {
    let Some(mut s) = Scenario::star_wars("takeover-refused") else {
        return;
    };
    s.start_deathstar(&[]);
    std::fs::write(s.path("policy.yaml"), LANDING_ONLY).unwrap();
    // Nothing to take over: a clear error, nothing started.
    assert!(
        s.start_next_weir(&["--steering", "nft", "--takeover"], "none.log")
            .is_none()
    );
    let log = std::fs::read_to_string(s.path("none.log")).unwrap_or_default();
    assert!(log.contains("--takeover: no running weir answers"), "{log}");

    for steering in ["nft", "ebpf"] {
        s.start_weir(LANDING_ONLY, &["--steering", steering]);
        let old = ready_pid(&s);
        // Another proxy port: refused before the new weir touches anything; the
        // old one goes on serving, API included.
        let log_name = format!("other-port-{steering}.log");
        assert!(
            s.start_next_weir(
                &[
                    "--steering",
                    steering,
                    "--takeover",
                    "--proxy-port",
                    "15002"
                ],
                &log_name
            )
            .is_none()
        );
        let log = std::fs::read_to_string(s.path(&log_name)).unwrap_or_default();
        assert!(log.contains("cannot be taken over"), "{log}");
        assert!(log.contains("15002"), "{log}");
        assert!(s.weir_with_pid(old).is_some_and(|p| p.alive()));
        old_weir_enforces(&s);
        // A new weir that takes the sockets and goes away before it serves (a
        // client of the protocol here, holding them for a moment): the old one
        // stops its API meanwhile, then resumes, and re-applies its steering
        // (which that weir may have changed: here the nft table is gone).
        let takeover_sock = s.path("weir.sock.takeover");
        let conn = weir_agent::takeover::connect(&takeover_sock)
            .expect("connect")
            .expect("the old weir answers");
        let taken = weir_agent::takeover::request(conn, 15001).expect("the sockets");
        assert!(
            !s.path("weir.sock").exists(),
            "the API is stopped meanwhile"
        );
        if steering == "nft" {
            s.run_in_node(&["nft", "delete", "table", "inet", "weir"]);
        }
        drop(taken);
        let resumed = lab::wait_until(Duration::from_secs(10), || {
            s.weir_log_text()
                .contains("steering re-applied after an abandoned takeover")
                && s.path("weir.sock").exists()
        });
        assert!(resumed.is_ok(), "{}", s.weir_log_text());
        assert!(
            s.weir_log_text()
                .contains("takeover abandoned; serving as before")
        );
        old_weir_enforces(&s);
        old_weir_api_answers(&s);

        // The old weir cannot write its FQDN cache for the new one (a directory
        // where its temporary file goes): refused with the reason, and the old
        // weir goes on serving, its API back, its steering re-applied (the new
        // weir's datapath load rewrote the shared config before it asked).
        let reapplied = |s: &Scenario| {
            s.weir_log_text()
                .matches("steering re-applied after an abandoned takeover")
                .count()
        };
        let before = reapplied(&s);
        let tmp = s.state_dir.join("fqdn-cache.json.tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let log_name = format!("cache-unwritable-{steering}.log");
        assert!(
            s.start_next_weir(&["--steering", steering, "--takeover"], &log_name)
                .is_none(),
            "a new weir took over although the FQDN cache could not be written"
        );
        let log = std::fs::read_to_string(s.path(&log_name)).unwrap_or_default();
        assert!(
            log.contains("could not write the FQDN cache for the new weir"),
            "{log}"
        );
        assert!(s.weir_with_pid(old).is_some_and(|p| p.alive()));
        let resumed = lab::wait_until(Duration::from_secs(10), || {
            reapplied(&s) > before && s.path("weir.sock").exists()
        });
        assert!(resumed.is_ok(), "{}", s.weir_log_text());
        old_weir_enforces(&s);
        old_weir_api_answers(&s);
        std::fs::remove_dir(&tmp).unwrap();
        if let Some(p) = s.weir_with_pid(old) {
            p.stop_with(libc::SIGTERM, Duration::from_secs(10));
        }
        s.lab.processes.retain(|p| p.name != "weir");
    }
}
