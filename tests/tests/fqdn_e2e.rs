//! `toFQDNs` end to end on the eBPF datapath: the tiefighter resolves names
//! through a real resolver outside the node (dnsmasq in the `dns` namespace, a
//! peer that is not a local endpoint), weir's DNS proxy checks each query and
//! learns the addresses of allowed answers into the kernel's allowlist before the
//! answer is released, and the tiefighter then connects by name to servers in the
//! `web` namespace (nginx, a real TCP echo peer), IPv4 and IPv6.
//!
//! Names served (see [`start_resolver`]): `api.example.com` (A + AAAA, TTL 60),
//! `www.example.com` (CNAME to `edge.cdnprovider.net`), `short.example.com`
//! (TTL 2), `other.example.com` (answered, but selected by no toFQDNs rule unless
//! the test adds it), `<a-b-c-d>.race.example.com` (dnsmasq's synth-domain:
//! one distinct address per name in 10.201.4.0/22, TTL 0), and
//! `keep.orphan.example.com` (IPv4 only, TTL 60) and `gone.orphan.example.com`
//! (IPv4 only, TTL 1), which only the takeover orphan test selects.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use weir_tests::{Scenario, lab, text, weir_bin};

const RESOLVER4: &str = "10.201.1.1";
const RESOLVER6: &str = "fd00:201:1::1";
const API4: &str = "10.201.2.1";
const API6: &str = "fd00:201:2::1";
const EDGE4: &str = "10.201.2.2";
const EDGE6: &str = "fd00:201:2::2";
const SHORT4: &str = "10.201.2.3";
const OTHER4: &str = "10.201.2.4";
const OTHER6: &str = "fd00:201:2::4";

/// DNS to the resolver only, checked by name (every name allowed: the toFQDNs
/// rules decide what may be connected to); HTTP and the echo port only to the
/// addresses of the selected names. `{extra}` adds toFQDNs selectors.
fn policy(extra: &str) -> String {
    policy_with(
        r#"[{matchPattern: "*"}]"#,
        &format!(
            r#"    - matchName: api.example.com
    - matchName: www.example.com
    - matchName: short.example.com
    - matchPattern: "*.race.example.com"
{extra}"#
        ),
    )
}

/// DNS to the resolver only, with these DNS rules; HTTP and the echo port only
/// to the addresses of these `toFQDNs` selectors (YAML list items, one per line).
fn policy_with(dns_rules: &str, selectors: &str) -> String {
    format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: fqdn}}
spec:
  endpointSelector: {{matchLabels: {{class: tiefighter}}}}
  egress:
  - toCIDR: [{RESOLVER4}/32, "{RESOLVER6}/128"]
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns: {dns_rules}
  - toFQDNs:
{selectors}
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}, {{port: "7000", protocol: TCP}}]
"#
    )
}

const WITH_OTHER: &str = "    - matchName: other.example.com";

/// The lab: star wars, the resolver (`dns`, 10.201.1.0/24) and the web servers
/// (`web`, 10.201.2.0/24 plus 10.201.4.0/22 answered on every address), weir on
/// the eBPF datapath.
fn fqdn_lab(test: &str, extra_policy: &str) -> Option<Scenario> {
    fqdn_lab_with(test, &policy(extra_policy), &[])
}

/// [`fqdn_lab`] with its own policy and more weir flags (`--steering` among
/// them replaces the eBPF datapath).
fn fqdn_lab_with(test: &str, policy: &str, weir_args: &[&str]) -> Option<Scenario> {
    let mut s = Scenario::star_wars(test)?;
    s.lab.add_outside("dns", 1).expect("add the resolver");
    s.lab.add_outside("web", 2).expect("add the web servers");
    let web = &s.lab.workload("web").ns;
    for i in 2..=4 {
        web.run(&[
            "ip",
            "addr",
            "add",
            &format!("10.201.2.{i}/24"),
            "dev",
            "eth0",
        ])
        .expect("web address");
        web.run(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("fd00:201:2::{i}/64"),
            "dev",
            "eth0",
            "nodad",
        ])
        .expect("web address");
    }
    // Every address of the race range is the web namespace's own.
    web.run(&["ip", "route", "add", "local", "10.201.4.0/22", "dev", "lo"])
        .expect("race range");
    s.lab
        .node
        .run(&["ip", "route", "add", "10.201.4.0/22", "via", "10.201.2.1"])
        .expect("route to the race range");
    s.start_nginx_in("web");
    let mut echo = s.lab.workload("web").ns.command("socat");
    echo.args(["TCP6-LISTEN:7000,fork,reuseaddr,ipv6only=0", "EXEC:cat"]);
    s.lab.spawn("echo", echo).expect("start the echo server");
    start_resolver(&mut s);
    let mut args = vec!["--fqdn-min-ttl", "0"];
    if !weir_args.contains(&"--steering") {
        args.extend(["--steering", "ebpf"]);
    }
    args.extend_from_slice(weir_args);
    s.start_weir(policy, &args);
    Some(s)
}

fn start_resolver(s: &mut Scenario) {
    let log = s.path("dnsmasq.log");
    let mut cmd = s.lab.workload("dns").ns.command("dnsmasq");
    cmd.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--user=root",
        "--pid-file=",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=10.201.1.1",
        "--listen-address=fd00:201:1::1",
        "--port=53",
        "--log-queries",
        "--local=/example.com/",
        "--local=/cdnprovider.net/",
        "--host-record=api.example.com,10.201.2.1,fd00:201:2::1,60",
        "--cname=www.example.com,edge.cdnprovider.net,60",
        "--host-record=edge.cdnprovider.net,10.201.2.2,fd00:201:2::2,60",
        "--host-record=short.example.com,10.201.2.3,fd00:201:2::3,2",
        "--host-record=mid.example.com,10.201.2.3,fd00:201:2::3,4",
        "--host-record=other.example.com,10.201.2.4,fd00:201:2::4,60",
        "--host-record=keep.orphan.example.com,10.201.2.5,60",
        "--host-record=gone.orphan.example.com,10.201.2.6,1",
        "--synth-domain=race.example.com,10.201.4.0/22",
    ])
    .arg(format!("--log-facility={}", log.display()))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    s.lab.spawn("dnsmasq", cmd).expect("start dnsmasq");
    let ok = lab::wait_until(Duration::from_secs(10), || {
        dig_direct(s, "api.example.com", "A") == API4
    });
    assert!(ok.is_ok(), "dnsmasq did not start");
}

/// A lookup from the resolver's own namespace (no weir on the way).
fn dig_direct(s: &Scenario, name: &str, qtype: &str) -> String {
    let out = s
        .lab
        .workload("dns")
        .ns
        .command("dig")
        .args(["@10.201.1.1", "+short", "+time=1", "+tries=1", name, qtype])
        .output()
        .expect("run dig");
    text(&out).trim().to_string()
}

/// `dig +short` from a workload through weir: the answer's last line (the
/// address after any CNAMEs), or the status line when there is no answer.
fn dig(s: &Scenario, from: &str, server: &str, name: &str, qtype: &str) -> String {
    let out = s
        .lab
        .workload(from)
        .ns
        .command("dig")
        .args([
            &format!("@{server}"),
            "+time=2",
            "+tries=1",
            "+noall",
            "+answer",
            "+comments",
            name,
            qtype,
        ])
        .output()
        .expect("run dig");
    dig_outcome(&out)
}

/// What `dig +noall +answer +comments` printed: the answer's last line's
/// address (after any CNAMEs) when the status is NOERROR, else the status
/// (`NO ANSWER` when there was none).
fn dig_outcome(out: &Output) -> String {
    let t = text(out);
    let status = t
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|r| r.split(',').next().unwrap_or("").to_string())
        .unwrap_or_else(|| "NO ANSWER".into());
    if status != "NOERROR" {
        return status;
    }
    t.lines()
        .rfind(|l| !l.starts_with(';') && !l.trim().is_empty())
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or("")
        .to_string()
}

/// Runs `script` in a workload's namespace with its own mount namespace whose
/// `/etc/resolv.conf` names only `nameserver`, so curl resolves through weir.
fn with_resolver(s: &Scenario, from: &str, nameserver: &str, script: &str) -> Output {
    let conf = s.path(&format!("resolv-{nameserver}.conf"));
    std::fs::write(
        &conf,
        format!("nameserver {nameserver}\noptions timeout:2 attempts:1\n"),
    )
    .unwrap();
    s.lab
        .workload(from)
        .ns
        .command("unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            &format!(
                "mount --bind {} /etc/resolv.conf && {script}",
                conf.display()
            ),
        ])
        .output()
        .expect("run with a resolver")
}

/// curl by name through weir's DNS proxy: the HTTP status (`000`: no answer).
fn curl_by_name(s: &Scenario, from: &str, family: &str, url: &str) -> String {
    let ns = if family == "-6" { RESOLVER6 } else { RESOLVER4 };
    let out = with_resolver(
        s,
        from,
        ns,
        &format!("curl -s {family} -o /dev/null -w '%{{http_code}}' --max-time 3 {url}"),
    );
    text(&out)
}

/// curl to an address, no lookup.
fn curl_ip(s: &Scenario, from: &str, url: &str) -> String {
    s.status(from, "GET", url)
}

fn fqdn_list(s: &Scenario) -> serde_json::Value {
    let out = Command::new(weir_bin())
        .args(["fqdn", "list", "--json", "--api-socket"])
        .arg(s.path("weir.sock"))
        .output()
        .expect("run weir fqdn list");
    assert!(
        out.status.success(),
        "weir fqdn list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "weir fqdn list --json is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn listed_ips(list: &serde_json::Value, name: &str) -> Vec<String> {
    let Some(names) = list.as_array() else {
        panic!("weir fqdn list --json is not an array: {list}");
    };
    names
        .iter()
        .filter(|n| n["name"] == name)
        .flat_map(|n| n["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|i| i["ip"].as_str().map(str::to_string))
        .collect()
}

/// The matrix both steering modes share, on a lab started with
/// `policy(WITH_OTHER)`: an address is allowed once an allowed answer for a
/// selected name taught it (by name and by address, IPv4 and IPv6, through a
/// CNAME chain), and refused (`denied`: how the mode refuses) before, and
/// again once no selector selects its name — each refusal the same probe that
/// gets 200 when a selector selects it.
fn learned_addresses_only(s: &mut Scenario, denied: &str) {
    // Nothing learned yet: the web servers' addresses are refused.
    assert_eq!(curl_ip(s, "tiefighter", &format!("http://{API4}/")), denied);

    // A selected name, by name, over IPv4 and IPv6 (DNS over v4 and over v6).
    assert_eq!(
        curl_by_name(s, "tiefighter", "-4", "http://api.example.com/"),
        "200"
    );
    assert_eq!(
        curl_by_name(s, "tiefighter", "-6", "http://api.example.com/"),
        "200"
    );
    // The learned addresses are allowed by address too, for the toFQDNs ports only.
    assert_eq!(curl_ip(s, "tiefighter", &format!("http://{API4}/")), "200");
    assert_eq!(
        curl_ip(s, "tiefighter", &format!("http://[{API6}]/")),
        "200"
    );

    // A CNAME chain: the alias is selected, the target's addresses are learned.
    assert_eq!(
        dig(s, "tiefighter", RESOLVER4, "www.example.com", "A"),
        EDGE4
    );
    assert_eq!(
        curl_by_name(s, "tiefighter", "-4", "http://www.example.com/"),
        "200"
    );

    // `other.example.com` is allowed while a selector names it ...
    assert_eq!(
        curl_by_name(s, "tiefighter", "-4", "http://other.example.com/"),
        "200"
    );
    assert_eq!(
        curl_by_name(s, "tiefighter", "-6", "http://other.example.com/"),
        "200"
    );
    // ... and refused once the policy no longer selects it, although
    // the lookup still succeeds.
    s.reload(&policy(""));
    assert_eq!(
        dig(s, "tiefighter", RESOLVER4, "other.example.com", "A"),
        OTHER4
    );
    assert_eq!(
        curl_ip(s, "tiefighter", &format!("http://{OTHER4}/")),
        denied
    );
    assert_eq!(
        curl_ip(s, "tiefighter", &format!("http://[{OTHER6}]/")),
        denied
    );
    assert_eq!(
        curl_by_name(s, "tiefighter", "-4", "http://other.example.com/"),
        denied
    );
}

#[test]
fn fqdn_rules_allow_only_the_addresses_of_allowed_answers() {
    let Some(mut s) = fqdn_lab("fqdn-matrix", WITH_OTHER) else {
        return;
    };
    learned_addresses_only(&mut s, "000");
    // A policy that selects it again allows the address already learned, at once,
    // without a new lookup.
    s.reload(&policy(WITH_OTHER));
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://{OTHER4}/")),
        "200"
    );

    // Other endpoints gain nothing from the tiefighter's lookups.
    assert_eq!(curl_ip(&s, "xwing", &format!("http://{API4}/")), "200");
    // (the xwing is not policed at all: the web server answers it, so the
    // tiefighter's 000s above are the policy's doing, not an absent server.)

    // What weir learned, through the API.
    let list = fqdn_list(&s);
    let api = listed_ips(&list, "api.example.com.");
    assert!(
        api.contains(&API4.to_string()) && api.contains(&API6.to_string()),
        "api.example.com. not listed with both addresses: {list}"
    );

    // Flow records: the lookups, with their answers.
    let flows = s.flows();
    let answered = flows.iter().any(|f| {
        f["l7"]["dns"]["query"] == "api.example.com."
            && f["l7"]["dns"]["ips"]
                .as_array()
                .is_some_and(|ips| ips.iter().any(|i| i == API4))
    });
    assert!(answered, "no DNS flow record with api.example.com's answer");
}

/// The same through the nft fallback, which has no allowlist in the kernel:
/// the proxy decides every connection of the enforced tiefighter, with the
/// addresses learned from the answers it relayed. Each refusal is the same
/// probe that gets 200 once a selector selects the name.
#[test]
fn fqdn_rules_allow_only_the_addresses_of_allowed_answers_through_nft() {
    let Some(mut s) = fqdn_lab_with("fqdn-nft", &policy(WITH_OTHER), &["--steering", "nft"]) else {
        return;
    };
    // The proxy answers a connection it refuses (HTTP: 403), where the
    // kernel would drop it.
    const DENIED: &str = "403";
    learned_addresses_only(&mut s, DENIED);
    assert_eq!(curl_ip(&s, "tiefighter", &format!("http://{API4}/")), "200");
}

/// A policy whose DNS rules are `dns_rules` and whose only `toFQDNs`
/// selector is the CNAME target `edge.cdnprovider.net` (`www.example.com`'s).
fn cname_target_policy(dns_rules: &str) -> String {
    policy_with(dns_rules, "    - matchName: edge.cdnprovider.net")
}

/// An answer's CNAME chain teaches a selector only the names its client may
/// ask for: allowed `*.example.com` only, the answer for `www.example.com`
/// (CNAME `edge.cdnprovider.net`) reaches the client but does not open
/// `edge.cdnprovider.net`'s address; allowed that name too, the same lookup
/// opens it (the same probe, the same server: 200).
#[test]
fn a_cname_target_the_client_may_not_ask_for_opens_nothing() {
    let strict = cname_target_policy(r#"[{matchPattern: "*.example.com"}]"#);
    let Some(mut s) = fqdn_lab_with("fqdn-cname-unasked", &strict, &[]) else {
        return;
    };
    // An A answer asked over IPv4, an AAAA answer asked over IPv6.
    let families = [
        (RESOLVER4, "A", EDGE4, format!("http://{EDGE4}/")),
        (RESOLVER6, "AAAA", EDGE6, format!("http://[{EDGE6}]/")),
    ];
    for (resolver, qtype, edge, url) in &families {
        assert_eq!(
            dig(&s, "tiefighter", resolver, "www.example.com", qtype),
            *edge
        );
        // The target itself is a name the client may not ask for.
        assert_eq!(
            dig(&s, "tiefighter", resolver, "edge.cdnprovider.net", qtype),
            "REFUSED"
        );
        assert_eq!(curl_ip(&s, "tiefighter", url), "000", "{url}");
    }
    let flows = s.flows();
    assert!(
        flows
            .iter()
            .any(|f| f["l7"]["dns"]["query"] == "www.example.com."
                && f["l7"]["dns"]["cnames"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|n| n == "edge.cdnprovider.net."))),
        "the answer's record keeps its CNAME"
    );

    s.reload(&cname_target_policy(
        r#"[{matchPattern: "*.example.com"}, {matchName: edge.cdnprovider.net}]"#,
    ));
    for (resolver, qtype, edge, url) in &families {
        assert_eq!(
            dig(&s, "tiefighter", resolver, "www.example.com", qtype),
            *edge
        );
        assert_eq!(curl_ip(&s, "tiefighter", url), "200", "{url}");
    }
}

#[test]
fn an_expired_address_stays_while_its_connection_lives_and_goes_after() {
    let Some(s) = fqdn_lab("fqdn-expiry", "") else {
        return;
    };
    // TTL 2: learn it, and hold one connection open to the echo server well past
    // the TTL.
    assert_eq!(
        dig(&s, "tiefighter", RESOLVER4, "short.example.com", "A"),
        SHORT4
    );
    let script = format!(
        "import socket, time, sys\n\
         c = socket.create_connection(('{SHORT4}', 7000), timeout=3)\n\
         for i in range(8):\n\
         \x20   c.sendall(b'ping%d\\n' % i)\n\
         \x20   got = c.recv(64)\n\
         \x20   print(got.decode().strip(), flush=True)\n\
         \x20   time.sleep(1)\n"
    );
    let held = s
        .lab
        .workload("tiefighter")
        .ns
        .command("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the long connection");
    // Past the TTL, the live connection keeps the address (as Cilium's zombies).
    std::thread::sleep(Duration::from_secs(5));
    let list = fqdn_list(&s);
    let kept = list.as_array().into_iter().flatten().any(|n| {
        n["name"] == "short.example.com."
            && n["addresses"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["ip"] == SHORT4 && a["kept"] == true))
    });
    assert!(
        kept,
        "short.example.com. is not kept for its live connection: {list}"
    );
    // The open connection worked through the whole time.
    let out = held.wait_with_output().expect("long connection");
    let echoed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        echoed.lines().count(),
        8,
        "the open connection broke when the TTL ran out: {echoed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Once it is closed, the address is forgotten, and new connections are dropped.
    let gone = lab::wait_until(Duration::from_secs(20), || {
        listed_ips(&fqdn_list(&s), "short.example.com.").is_empty()
    });
    assert!(
        gone.is_ok(),
        "short.example.com still listed: {}",
        fqdn_list(&s)
    );
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://{SHORT4}/")),
        "000"
    );
    // A new lookup allows it again (the 000 was the expiry's doing).
    assert_eq!(
        curl_by_name(&s, "tiefighter", "-4", "http://short.example.com/"),
        "200"
    );
}

/// An answer repeated before the TTL runs out keeps the address: the repeat is
/// answered from what the datapath already holds (the proxy's fast path), and
/// its later expiry must reach the cache the tick expires from. Timeline (TTL
/// 4 s, from the first answer): learned at 0 (expires at 4), repeated at 2.5
/// (expires at 6.5), connect at 5.5 — after the tick that would have removed it
/// between 4 and 5 had the repeat's expiry been lost. The same connect fails
/// once the TTL runs out.
#[test]
fn a_repeated_answer_extends_an_address_past_its_first_ttl() {
    let Some(s) = fqdn_lab("fqdn-extend", "    - matchName: mid.example.com") else {
        return;
    };
    let learned = Instant::now();
    assert_eq!(
        dig(&s, "tiefighter", RESOLVER4, "mid.example.com", "A"),
        SHORT4
    );
    let at = |secs: f64| {
        let t = Duration::from_secs_f64(secs);
        std::thread::sleep(t.saturating_sub(learned.elapsed()));
    };
    at(2.5);
    assert_eq!(
        dig(&s, "tiefighter", RESOLVER4, "mid.example.com", "A"),
        SHORT4
    );
    at(5.5);
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://{SHORT4}/")),
        "200",
        "the repeated answer did not keep the address: {}",
        fqdn_list(&s)
    );
    let gone = lab::wait_until(Duration::from_secs(20), || {
        listed_ips(&fqdn_list(&s), "mid.example.com.").is_empty()
    });
    assert!(gone.is_ok(), "never expired: {}", fqdn_list(&s));
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://{SHORT4}/")),
        "000"
    );
}

/// The issue's race: 1000 times, resolve a name never seen before and connect at
/// once, in one shell line, while another client keeps the proxy busy with
/// queries. An answer released before the kernel knows its address would lose
/// the first SYN and show as a failure (curl's connect timeout is 2 s, shorter
/// than the SYN retry).
#[test]
fn resolve_and_connect_at_once_succeeds_1000_times_out_of_1000() {
    let Some(mut s) = fqdn_lab("fqdn-race", "") else {
        return;
    };
    // Load: a second client process in the tiefighter keeps the DNS proxy busy
    // with queries (its own sessions) for the whole run.
    let mut load = s.lab.workload("tiefighter").ns.command("sh");
    load.args([
        "-c",
        &format!(
            "while true; do dig @{RESOLVER4} +time=1 +tries=1 +short api.example.com A >/dev/null; done"
        ),
    ]);
    s.lab.spawn("dig-load", load).expect("start the load");
    let script = "ok=0; for i in $(seq 0 999); do \
         a=$((i / 250)); b=$((i % 250 + 1)); \
         c=$(curl -s -o /dev/null -w '%{http_code} exit %{exitcode} dns %{time_namelookup}s connect %{time_connect}s' \
             --connect-timeout 2 --max-time 5 http://10-201-$((4 + a))-$b.race.example.com/); \
         case \"$c\" in 200*) ok=$((ok + 1)) ;; *) echo \"fail $i 10-201-$((4 + a))-$b $c\" ;; esac; \
         done; echo ok=$ok";
    let started = Instant::now();
    let out = with_resolver(&s, "tiefighter", RESOLVER4, script);
    let t = text(&out);
    eprintln!("race took {:?}", started.elapsed());
    if !t.contains("ok=1000") {
        // What weir saw of each failed name: its DNS records and log lines
        // (curl's exit code says whether the lookup or the connect failed).
        let flows = s.flows();
        let log = s.weir_log_text();
        for line in t.lines().filter(|l| l.starts_with("fail ")) {
            let Some(label) = line.split_whitespace().nth(2) else {
                continue;
            };
            eprintln!("--- {line}");
            // The client's ports for that name: every record and log line of
            // them (a kernel drop of an answer, a failed send, a session's end).
            let mut ports = std::collections::BTreeSet::new();
            for f in flows.iter().filter(|f| f.to_string().contains(label)) {
                eprintln!("flow: {f}");
                if let Some(p) = f.pointer("/l4/UDP/source_port").and_then(|p| p.as_u64()) {
                    ports.insert(p);
                }
            }
            for l in log.lines().filter(|l| l.contains(label)) {
                eprintln!("log: {l}");
            }
            for p in &ports {
                let tag = format!(":{p}");
                let port_field = format!("_port\":{p}");
                for f in flows.iter().map(|f| f.to_string()) {
                    if f.contains(&port_field) && !f.contains(label) {
                        eprintln!("flow of port {p}: {f}");
                    }
                }
                for l in log.lines().filter(|l| l.contains(&tag)) {
                    eprintln!("log of port {p}: {l}");
                }
            }
        }
        let learn_errors: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("could not learn") || l.contains("SERVFAIL") || l.contains("WARN")
            })
            .take(20)
            .collect();
        eprintln!("weir warnings: {learn_errors:#?}");
    }
    assert!(
        t.contains("ok=1000"),
        "not every resolve-and-connect succeeded:\n{t}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One client cannot fill the FQDN cache for everyone
/// (`--fqdn-max-entries-per-client 3`, `--fqdn-max-ips 8`): the tiefighter
/// brings five selected names — two beyond its share, while the cache has room
/// to spare — then, with only a share's worth of room left, gets SERVFAIL for a
/// sixth and cannot connect to its address, while the xwing (same rules, its
/// own share) resolves that same name — after which the tiefighter's same
/// connect succeeds: the address was only missing, the probe can pass.
#[test]
fn one_client_at_its_fqdn_share_cannot_crowd_out_another() {
    let both = policy("").replace(
        "endpointSelector: {matchLabels: {class: tiefighter}}",
        "endpointSelector: {matchExpressions: [{key: class, operator: In, values: [tiefighter, xwing]}]}",
    );
    let Some(s) = fqdn_lab_with(
        "fqdn-share",
        &both,
        &["--fqdn-max-entries-per-client", "3", "--fqdn-max-ips", "8"],
    ) else {
        return;
    };
    let race = |i: u8| {
        (
            format!("10-201-4-{i}.race.example.com"),
            format!("10.201.4.{i}"),
        )
    };
    for i in 1..=5 {
        let (name, addr) = race(i);
        assert_eq!(dig(&s, "tiefighter", RESOLVER4, &name, "A"), addr);
    }
    assert_eq!(curl_ip(&s, "tiefighter", "http://10.201.4.5/"), "200");
    // Beyond its share and 3 of 8 addresses left: a sixth is refused ...
    let (sixth, sixth_addr) = race(6);
    assert_eq!(dig(&s, "tiefighter", RESOLVER4, &sixth, "A"), "SERVFAIL");
    assert_eq!(curl_ip(&s, "tiefighter", "http://10.201.4.6/"), "000");
    // ... but what it has already is answered again.
    assert_eq!(
        dig(&s, "tiefighter", RESOLVER4, &race(2).0, "A"),
        "10.201.4.2"
    );
    // The xwing is not crowded out, for that very name.
    assert_eq!(dig(&s, "xwing", RESOLVER4, &sixth, "A"), sixth_addr);
    assert_eq!(curl_ip(&s, "xwing", "http://10.201.4.6/"), "200");
    // The address is learned now (the xwing's share): the tiefighter's same
    // connect passes.
    assert_eq!(curl_ip(&s, "tiefighter", "http://10.201.4.6/"), "200");
    // The refusal is on record, with its reason.
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| {
            let t = f.to_string();
            t.contains(&sixth) && t.contains("fqdn-max-entries-per-client")
        }),
        "no record of the refused answer naming the share: {flows:#?}"
    );
}

/// `kill -9`: the kernel keeps enforcing what weir had learned, queries are
/// dropped while no weir runs (fail closed), and the next weir answers again
/// right after it starts, with the learned names restored.
#[test]
fn learned_names_survive_a_crash() {
    let Some(mut s) = fqdn_lab("fqdn-crash", "") else {
        return;
    };
    // `api` is learned right after a cache file write, and weir killed at once:
    // only the journal has it (without the journal, the next weir's first sync
    // removed its addresses from the maps).
    assert_eq!(
        dig(&s, "tiefighter", RESOLVER4, "www.example.com", "A"),
        EDGE4
    );
    let cache_file = s.state_dir.join("fqdn-cache.json");
    let saved = lab::wait_until(Duration::from_secs(3), || {
        std::fs::read_to_string(&cache_file).is_ok_and(|c| c.contains("www.example.com"))
    });
    assert!(saved.is_ok(), "weir did not write its cache file");
    for family in ["-4", "-6"] {
        assert_eq!(
            curl_by_name(&s, "tiefighter", family, "http://api.example.com/"),
            "200"
        );
    }
    let pid = s.weir().pid() as i32;
    lab::send_signal(pid, libc::SIGKILL);
    let _ = s.weir().stop_with(libc::SIGKILL, Duration::from_secs(2));
    let in_file = std::fs::read_to_string(&cache_file).unwrap_or_default();
    eprintln!(
        "api.example.com in the cache file at the crash: {} (else in the journal only)",
        in_file.contains("api.example.com")
    );
    // While down: the learned address still works, DNS is dropped.
    assert_eq!(curl_ip(&s, "tiefighter", &format!("http://{API4}/")), "200");
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://[{API6}]/")),
        "200"
    );
    assert_eq!(
        dig(&s, "tiefighter", RESOLVER4, "api.example.com", "A"),
        "NO ANSWER"
    );
    // Unlearned addresses stay dropped.
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://{OTHER4}/")),
        "000"
    );
    // Restart; DNS answers within a second of the new process being ready.
    s.lab.processes.retain(|p| p.name != "weir");
    s.start_weir(&policy(""), &["--steering", "ebpf", "--fqdn-min-ttl", "0"]);
    let ready = Instant::now();
    // Restored from the state dir, before any new lookup.
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://{API4}/")),
        "200",
        "the restarted weir dropped an address learned just before the crash"
    );
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://[{API6}]/")),
        "200",
        "the restarted weir dropped an address learned just before the crash"
    );
    let answered = lab::wait_until(Duration::from_secs(5), || {
        dig(&s, "tiefighter", RESOLVER4, "api.example.com", "A") == API4
    });
    assert!(answered.is_ok(), "no DNS answer after the restart");
    assert!(
        ready.elapsed() < Duration::from_secs(1),
        "the first answer came {:?} after ready",
        ready.elapsed()
    );
    // The restored name still allows its address, and is listed.
    assert_eq!(curl_ip(&s, "tiefighter", &format!("http://{API4}/")), "200");
    assert!(listed_ips(&fqdn_list(&s), "api.example.com.").contains(&API4.to_string()));
}

/// Waits (at most `limit`) for the lab process `name` to exit.
fn wait_for_exit(s: &mut Scenario, name: &str, limit: Duration) {
    let ok = lab::wait_until(limit, || {
        !s.lab
            .processes
            .iter_mut()
            .any(|p| p.name == name && p.alive())
    });
    assert!(ok.is_ok(), "{name} did not finish within {limit:?}");
}

/// A number from dnsperf's summary (`Queries lost:  0 (0.00%)` → 0).
fn dnsperf_field(out: &str, label: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The issue's planned restart: 1 000 queries a second from dnsperf through weir
/// and a curl loop by name (each request a fresh lookup and a new connection to
/// a toFQDNs-allowed address), while a new weir takes the sockets over: no
/// query lost, every answer NOERROR, every request 200.
#[test]
fn a_planned_restart_loses_no_dns_query_and_no_request() {
    let Some(mut s) = fqdn_lab("fqdn-takeover", "") else {
        return;
    };
    let queries = s.path("queries.txt");
    std::fs::write(
        &queries,
        "api.example.com A\napi.example.com AAAA\nwww.example.com A\nother.example.com A\n",
    )
    .unwrap();
    let perf_out = s.path("dnsperf.txt");
    let mut perf = s.lab.workload("tiefighter").ns.command("sh");
    perf.args([
        "-c",
        &format!(
            "exec dnsperf -s {RESOLVER4} -d {} -l 14 -Q 1000 -c 4 -t 3 > {} 2>&1",
            queries.display(),
            perf_out.display()
        ),
    ]);
    s.lab.spawn("dnsperf", perf).expect("start dnsperf");
    let conf = s.path("resolv-loop.conf");
    std::fs::write(
        &conf,
        format!("nameserver {RESOLVER4}\noptions timeout:2 attempts:1\n"),
    )
    .unwrap();
    let (stop, codes) = (s.path("stop"), s.path("curl-codes.txt"));
    let mut curl = s.lab.workload("tiefighter").ns.command("unshare");
    curl.args([
        "--mount",
        "sh",
        "-c",
        &format!(
            "mount --bind {} /etc/resolv.conf && while [ ! -e {} ]; do \
             curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 5 http://api.example.com/ >> {}; done",
            conf.display(),
            stop.display(),
            codes.display()
        ),
    ]);
    s.lab.spawn("curl-loop", curl).expect("start the curl loop");
    std::thread::sleep(Duration::from_secs(4));

    let args = [
        "--steering",
        "ebpf",
        "--fqdn-min-ttl",
        "0",
        "--drain-timeout",
        "10s",
    ];
    let Some(_new) = s.start_next_weir(&args, "weir-new.log") else {
        panic!(
            "the new weir did not take over:\n{}\n--- old:\n{}",
            std::fs::read_to_string(s.path("weir-new.log")).unwrap_or_default(),
            s.weir_log_text()
        );
    };
    wait_for_exit(&mut s, "dnsperf", Duration::from_secs(30));
    std::fs::write(&stop, "").unwrap();
    wait_for_exit(&mut s, "curl-loop", Duration::from_secs(20));

    let perf = std::fs::read_to_string(&perf_out).unwrap_or_default();
    let completed = dnsperf_field(&perf, "Queries completed:").unwrap_or(0);
    let lost = dnsperf_field(&perf, "Queries lost:");
    let noerror = perf
        .lines()
        .find_map(|l| l.trim().strip_prefix("Response codes:"))
        .and_then(|r| r.split_whitespace().nth(1))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert_eq!(
        lost,
        Some(0),
        "dnsperf lost queries across the takeover:\n{perf}"
    );
    assert!(completed >= 10_000, "too few queries were made:\n{perf}");
    assert_eq!(noerror, completed, "not every answer was NOERROR:\n{perf}");
    let codes = std::fs::read_to_string(&codes).unwrap_or_default();
    let failed: Vec<&str> = codes.lines().filter(|l| *l != "200").collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests by name failed across the takeover: {:?}",
        failed.len(),
        codes.lines().count(),
        &failed[..failed.len().min(20)]
    );
    assert!(
        codes.lines().count() >= 50,
        "only {} requests",
        codes.lines().count()
    );
    // The policy did not change: the old weir never stopped deciding.
    assert!(
        !s.weir_log_text().contains("decides nothing more"),
        "{}",
        s.weir_log_text()
    );
    eprintln!(
        "{completed} queries, 0 lost, all NOERROR; {} requests by name, all 200",
        codes.lines().count()
    );
}

const KEEP4: &str = "10.201.2.5";
const GONE4: &str = "10.201.2.6";
/// A second resolver address in the `dns` namespace: [`start_slow_resolver`]'s.
const SLOW_RESOLVER4: &str = "10.201.1.2";

/// [`policy`] with `*.orphan.example.com` selected, DNS allowed to the slow
/// resolver too, and HTTP to the deathstar with an L7 rule, so it goes through
/// the proxy and keeps a draining weir busy (the toFQDNs ports are L3/L4 only:
/// the kernel alone passes them).
fn orphan_policy() -> String {
    policy(r#"    - matchPattern: "*.orphan.example.com""#)
        + &format!(
            r#"  - toCIDR: [{SLOW_RESOLVER4}/32]
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns: [{{matchPattern: "*"}}]
  - toEndpoints: [{{matchLabels: {{class: deathstar}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http: [{{method: GET}}]
"#
        )
}

/// A resolver at [`SLOW_RESOLVER4`]:53 that relays each query to dnsmasq
/// `delay` after it arrives (this kernel has no netem to delay packets with).
fn start_slow_resolver(s: &mut Scenario, delay: Duration) {
    start_delaying_resolver(s, delay, false);
}

/// [`start_slow_resolver`] that delays only queries for names whose first
/// label is `hold` (others are relayed at once).
fn start_holding_resolver(s: &mut Scenario, delay: Duration) {
    start_delaying_resolver(s, delay, true);
}

fn start_delaying_resolver(s: &mut Scenario, delay: Duration, only_hold: bool) {
    let dns = &s.lab.workload("dns").ns;
    dns.run(&[
        "ip",
        "addr",
        "add",
        &format!("{SLOW_RESOLVER4}/24"),
        "dev",
        "eth0",
    ])
    .expect("slow resolver address");
    let ready = s.path("slow-resolver.ready");
    let script = format!(
        "import socket, sys, threading, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{SLOW_RESOLVER4}', 53))\n\
         open(sys.argv[1], 'w').close()\n\
         def relay(q, client):\n\
         \x20   if {} or q[12:17].lower() == b'\\x04hold':\n\
         \x20       time.sleep({})\n\
         \x20   u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20   u.settimeout(3)\n\
         \x20   u.sendto(q, ('{RESOLVER4}', 53))\n\
         \x20   s.sendto(u.recvfrom(4096)[0], client)\n\
         while True:\n\
         \x20   q, client = s.recvfrom(4096)\n\
         \x20   threading.Thread(target=relay, args=(q, client), daemon=True).start()\n",
        if only_hold { "False" } else { "True" },
        delay.as_secs_f64()
    );
    let mut cmd = s.lab.workload("dns").ns.command("python3");
    cmd.args(["-c", &script])
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(s.path("slow-resolver.log")).unwrap());
    s.lab
        .spawn("slow-resolver", cmd)
        .expect("start the slow resolver");
    let ok = lab::wait_until(Duration::from_secs(10), || ready.exists());
    assert!(ok.is_ok(), "the slow resolver did not start");
}

/// [`policy`] with DNS to the slow resolver, every name allowed (`None`) or
/// only `only`.
fn holding_policy(only: Option<&str>) -> String {
    let rules = only.map_or(r#"[{matchPattern: "*"}]"#.to_string(), |n| {
        format!("[{{matchName: {n}}}, {{matchPattern: \"hold.*\"}}]")
    });
    policy("")
        + &format!(
            r#"  - toCIDR: [{SLOW_RESOLVER4}/32]
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns: {rules}
"#
        )
}

/// `dig` from the tiefighter's fixed source port 40053 to the slow resolver:
/// every query of this test is the same UDP flow, so one that reaches weir
/// while that flow's session is open is decided by that session.
fn dig_from_port(s: &Scenario, name: &str, seconds: u32) -> String {
    let out = s
        .lab
        .workload("tiefighter")
        .ns
        .command("dig")
        .args([
            "-b",
            "10.200.0.20#40053",
            &format!("@{SLOW_RESOLVER4}"),
            &format!("+time={seconds}"),
            "+tries=1",
            "+noall",
            "+answer",
            "+comments",
            name,
            "A",
        ])
        .output()
        .expect("run dig");
    dig_outcome(&out)
}

/// When the new policy is written, relative to the takeover.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Change {
    /// Before the new weir starts (the old one never read it: the lab runs weir
    /// with `--no-watch-policy`).
    BeforeTheTakeover,
    /// While the old weir drains (the new weir reloads it on SIGHUP).
    WhileDraining,
}

/// How many queries for `name` dnsmasq has logged.
fn resolver_saw(s: &Scenario, name: &str) -> usize {
    let log = std::fs::read_to_string(s.path("dnsmasq.log")).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("query[A]") && l.contains(name))
        .count()
}

/// Review finding: after a takeover the old weir decided what it still
/// carried under the policy it had at the handover. A DNS flow that always has
/// a query outstanding keeps its session there, and the session forwarded the
/// flow's new queries under that policy, whatever the new weir had loaded,
/// until the drain timeout. Now the old weir, seeing the policy's sources
/// changed since it read them, decides nothing more: the probe from the held
/// flow is dropped (the resolver never sees it), and the same name from
/// another flow reaches the new weir and is refused. Without the check the
/// held flow's probe was answered (the same probe is, before the takeover).
fn a_stale_old_weir_decides_nothing(test: &str, change: Change) {
    let args = [
        "--steering",
        "ebpf",
        "--fqdn-min-ttl",
        "0",
        "--dns-upstream-timeout",
        "90s",
        "--drain-timeout",
        "90s",
    ];
    let Some(mut s) = fqdn_lab_with(test, &holding_policy(None), &args[4..]) else {
        return;
    };
    // Longer than any wait below on a slow machine; the test does not wait
    // for it (the lab's end stops the resolver and both weirs).
    start_holding_resolver(&mut s, Duration::from_secs(60));
    // The probe, allowed: answered through the slow resolver without delay.
    assert_eq!(dig_from_port(&s, "api.example.com", 3), API4);
    // The held query: dig gives up after a second, weir keeps it outstanding
    // (and the flow's session open) until the resolver answers, 60 s on.
    assert_eq!(dig_from_port(&s, "hold.example.com", 1), "NO ANSWER");
    let held = Instant::now();
    let denying = holding_policy(Some("other.example.com"));
    if change == Change::BeforeTheTakeover {
        std::fs::write(s.path("policy.yaml"), &denying).unwrap();
    }
    let Some(new_pid) = s.start_next_weir(&args, "weir-new.log") else {
        panic!(
            "the new weir did not take over:\n{}\n--- old:\n{}",
            std::fs::read_to_string(s.path("weir-new.log")).unwrap_or_default(),
            s.weir_log_text()
        );
    };
    if change == Change::WhileDraining {
        let drained = lab::wait_until(Duration::from_secs(5), || {
            s.weir_log_text().contains("handed over; draining")
        });
        assert!(
            drained.is_ok(),
            "the old weir is not draining:\n{}",
            s.weir_log_text()
        );
        std::fs::write(s.path("policy.yaml"), &denying).unwrap();
        let new_log = || std::fs::read_to_string(s.path("weir-new.log")).unwrap_or_default();
        weir_agent::lab::send_signal(new_pid as i32, libc::SIGHUP);
        let reloaded = lab::wait_until(Duration::from_secs(10), || {
            new_log().contains("policy reloaded")
        });
        assert!(
            reloaded.is_ok(),
            "the new weir did not reload:\n{}",
            new_log()
        );
    }
    let stale = lab::wait_until(Duration::from_secs(5), || {
        s.weir_log_text().contains("it decides nothing more")
    });
    assert!(
        stale.is_ok(),
        "the old weir did not see its policy go stale:\n{}",
        s.weir_log_text()
    );
    let seen = resolver_saw(&s, "api.example.com");
    let got = dig_from_port(&s, "api.example.com", 2);
    assert!(
        held.elapsed() < Duration::from_secs(55),
        "too slow: the held query was answered before the probe ({:?}), so its session \
         had closed anyway",
        held.elapsed()
    );
    assert_eq!(
        got, "NO ANSWER",
        "the held flow's query was answered by the old weir under its stale policy"
    );
    assert_eq!(
        resolver_saw(&s, "api.example.com"),
        seen,
        "the old weir forwarded a query under its stale policy"
    );
    // Another flow reaches the new weir: refused by the new policy.
    assert_eq!(
        dig(&s, "tiefighter", SLOW_RESOLVER4, "api.example.com", "A"),
        "REFUSED"
    );
}

#[test]
fn a_policy_changed_before_a_takeover_is_not_undercut_by_the_old_weir() {
    a_stale_old_weir_decides_nothing("fqdn-stale-before", Change::BeforeTheTakeover);
}

#[test]
fn a_policy_changed_while_the_old_weir_drains_is_not_undercut_by_it() {
    a_stale_old_weir_decides_nothing("fqdn-stale-during", Change::WhileDraining);
}

/// The kernel's ipcache entry for exactly `ip` (a /32 or /128) in the
/// scenario's pinned maps: its identity.
fn ipcache_entry(s: &Scenario, ip: std::net::IpAddr) -> Option<u32> {
    use aya::maps::lpm_trie::LpmTrie;
    use aya::maps::{Map, MapData};
    use weir_agent::datapath::maps::{IpcacheValue, ip_words};
    let pin = weir_agent::datapath::pins::maps_dir(&s.bpf_root).join("weir_ipcache");
    let data = MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let trie: LpmTrie<MapData, [u32; 5], IpcacheValue> =
        LpmTrie::try_from(Map::LpmTrie(data)).expect("weir_ipcache is an LPM trie");
    let (w, fam) = ip_words(ip);
    let bits = if fam == 4 { 32 } else { 128 };
    trie.iter().filter_map(Result::ok).find_map(|(k, v)| {
        (k.prefix_len() == 32 + bits && k.data() == [fam, w[0], w[1], w[2], w[3]])
            .then_some(v.identity)
    })
}

/// Review F5: an address the old weir learns while it drains after a takeover,
/// and whose TTL runs out before it has drained, is in no cache — the old
/// weir's expiry stopped at the handover, the new weir never saw the answer,
/// and reading the cache the old one hands over drops entries already expired
/// — yet it is in the shared ipcache. The new weir must read the maps back when
/// the old one has drained and remove it (without that, this test fails at the
/// ipcache check after the drain, and the connect there gets 200).
///
/// `keep.orphan.example.com` (TTL 60) and `gone.orphan.example.com` (TTL 1)
/// are selected by one selector, so their addresses share one learned identity:
/// the new weir's policy entries keep it (for `keep`), which is what lets the
/// old weir write `gone`'s ipcache entry after the handover at all (a handed-over
/// weir may only add entries for identities the maps know) and what would keep
/// an orphaned `gone` reachable. A slow download through the old weir's proxy
/// keeps it draining ~10 s; `gone`'s query goes to a resolver that answers
/// 3 s late, sent just before the new weir takes over. IPv4 only.
#[test]
fn an_address_the_old_weir_learns_while_draining_goes_when_it_expires() {
    let Some(mut s) = fqdn_lab_with("fqdn-orphan", &orphan_policy(), &[]) else {
        return;
    };
    let web = &s.lab.workload("web").ns;
    for ip in [KEEP4, GONE4] {
        web.run(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])
            .expect("web address");
    }
    let answer_delay = Duration::from_secs(3);
    start_slow_resolver(&mut s, answer_delay);
    // The deathstar serves a 1 MB file at 100 kB/s: about 10 s.
    s.start_deathstar_with(&[], |c| {
        c.replace("/static/; }", "/static/; limit_rate 100k; }")
    });
    let statics = s.path("nginx/static");
    std::fs::create_dir_all(&statics).unwrap();
    std::fs::write(statics.join("big"), vec![b'x'; 1_000_000]).unwrap();

    // Nothing learned yet: both addresses are dropped.
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://{GONE4}/")),
        "000"
    );
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://{KEEP4}/")),
        "000"
    );
    // The slow download: the old weir drains until it ends.
    let download = s.path("download.txt");
    let mut get = s.lab.workload("tiefighter").ns.command("sh");
    get.args([
        "-c",
        &format!(
            "exec curl -s -o /dev/null -w '%{{http_code}} %{{size_download}}' --max-time 40 \
             http://{}/v1/static/big > {}",
            weir_tests::DEATHSTAR4,
            download.display()
        ),
    ]);
    s.lab.spawn("download", get).expect("start the download");
    std::thread::sleep(Duration::from_millis(500));

    // `keep` is learned by the old weir just before the takeover, right after
    // the old weir wrote its cache file (seen by a name learned first), so the
    // file lags at least a second behind. CI once saw this: the new weir
    // started from a file without `keep`, its first sync removed `keep`'s
    // ipcache and policy entries, and `gone` (same identity) was dropped too.
    assert_eq!(
        dig(&s, "tiefighter", RESOLVER4, "api.example.com", "A"),
        API4
    );
    let cache_file = s.state_dir.join("fqdn-cache.json");
    let saved = lab::wait_until(Duration::from_secs(3), || {
        std::fs::read_to_string(&cache_file).is_ok_and(|c| c.contains("api.example.com"))
    });
    assert!(saved.is_ok(), "the old weir did not write its cache file");
    assert_eq!(
        dig(&s, "tiefighter", RESOLVER4, "keep.orphan.example.com", "A"),
        KEEP4
    );
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://{KEEP4}/")),
        "200"
    );

    // `gone`'s query, in flight at the handover.
    let mut query = s.lab.workload("tiefighter").ns.command("dig");
    query.args([
        &format!("@{SLOW_RESOLVER4}"),
        "+time=8",
        "+tries=1",
        "+short",
        "gone.orphan.example.com",
        "A",
    ]);
    let asked = Instant::now();
    let query = std::thread::spawn(move || (query.output().expect("run dig"), Instant::now()));
    let old_pid = s.weir().pid();
    let args = ["--steering", "ebpf", "--fqdn-min-ttl", "0"];
    if s.start_next_weir(&args, "weir-new.log").is_none() {
        panic!(
            "the new weir did not take over:\n{}\n--- old:\n{}",
            std::fs::read_to_string(s.path("weir-new.log")).unwrap_or_default(),
            s.weir_log_text()
        );
    }
    let taken_over = Instant::now();
    let (out, answered) = query.join().expect("the dig thread");
    assert_eq!(text(&out).trim(), GONE4, "gone.orphan.example.com's answer");
    assert!(
        answered > taken_over,
        "the answer came {:?} after the query, before the new weir served ({:?}): \
         the resolver's delay is too short for this test",
        answered - asked,
        taken_over - asked
    );
    // What the old weir learned before the handover, the new weir has.
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://{KEEP4}/")),
        "200",
        "an address the old weir learned just before the handover is dropped after it"
    );
    // Within its 2 s (TTL 1, at least the connect grace): allowed, by an
    // ipcache entry only the old weir knows of.
    let gone4: std::net::IpAddr = GONE4.parse().unwrap();
    let got = curl_ip(&s, "tiefighter", &format!("http://{GONE4}/"));
    assert_eq!(
        got,
        "200",
        "the address the old weir learned while draining is not allowed \
         (ipcache: gone {:?}, keep {:?}); fqdn list: {}",
        ipcache_entry(&s, gone4),
        ipcache_entry(&s, KEEP4.parse().unwrap()),
        fqdn_list(&s)
    );
    let identity = ipcache_entry(&s, gone4);
    assert!(identity.is_some(), "{GONE4} is not in the ipcache");
    assert_eq!(
        identity,
        ipcache_entry(&s, KEEP4.parse().unwrap()),
        "keep and gone do not share their learned identity"
    );
    assert!(
        listed_ips(&fqdn_list(&s), "gone.orphan.example.com.").is_empty(),
        "the new weir saw gone.orphan.example.com's answer: {}",
        fqdn_list(&s)
    );

    // The old weir drains past the address's expiry, then exits.
    let limit = Duration::from_secs(30);
    let ok = lab::wait_until(limit, || {
        !s.weir_with_pid(old_pid).is_some_and(|p| p.alive())
    });
    assert!(ok.is_ok(), "the old weir did not exit within {limit:?}");
    let exited = Instant::now();
    assert!(
        exited > answered + Duration::from_secs(3),
        "the old weir exited {:?} after the answer, before the address expired: \
         the download is too short for this test",
        exited - answered
    );
    eprintln!(
        "new weir serving {:?} after the query, answer at {:?}, old weir gone at {:?}",
        taken_over - asked,
        answered - asked,
        exited - asked
    );
    let got = std::fs::read_to_string(&download).unwrap_or_default();
    assert_eq!(got, "200 1000000", "the download through the old weir");
    let new_log = s.path("weir-new.log");
    let drained = lab::wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&new_log).is_ok_and(|l| l.contains("the old weir has drained"))
    });
    assert!(
        drained.is_ok(),
        "the new weir did not log the old one's drain"
    );

    // The new weir removes the orphan (at its next tick, within a second or two).
    let removed = lab::wait_until(Duration::from_secs(5), || {
        ipcache_entry(&s, gone4).is_none()
    });
    if removed.is_err() {
        panic!(
            "{GONE4} stays in the ipcache (identity {:?}) {:?} after the old weir exited, \
             {:?} after its TTL ran out; a connect to it now gets {}; fqdn list: {}",
            ipcache_entry(&s, gone4),
            exited.elapsed(),
            answered.elapsed().saturating_sub(Duration::from_secs(2)),
            curl_ip(&s, "tiefighter", &format!("http://{GONE4}/")),
            fqdn_list(&s)
        );
    }
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://{GONE4}/")),
        "000",
        "the expired address is still allowed"
    );
    assert!(listed_ips(&fqdn_list(&s), "gone.orphan.example.com.").is_empty());
    // `keep` (same identity, TTL 60) is untouched.
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://{KEEP4}/")),
        "200"
    );
    assert!(listed_ips(&fqdn_list(&s), "keep.orphan.example.com.").contains(&KEEP4.to_string()));
}

/// An L3/L4 allow to the resolver on port 53 beside DNS rules for the same
/// port (a namespace-wide "allow DNS" policy next to an FQDN policy) passes
/// every query, as Cilium's "L3/L4 allow wins" says — but through the DNS
/// proxy, as Cilium does, so toFQDNs selectors still learn. Before, the allow
/// took DNS past the proxy: the lookup worked and the connection to the
/// selected name's address was dropped.
#[test]
fn an_l3_l4_allow_to_the_resolver_keeps_dns_in_the_proxy() {
    let policy = format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: fqdn}}
spec:
  endpointSelector: {{matchLabels: {{class: tiefighter}}}}
  egress:
  - toCIDR: [{RESOLVER4}/32, "{RESOLVER6}/128"]
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns: [{{matchName: api.example.com}}]
  - toFQDNs:
    - matchName: api.example.com
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: allow-dns}}
spec:
  endpointSelector: {{matchLabels: {{class: tiefighter}}}}
  egress:
  - toCIDR: [{RESOLVER4}/32, "{RESOLVER6}/128"]
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
"#
    );
    let Some(s) = fqdn_lab_with("fqdn-l4-allow", &policy, &[]) else {
        return;
    };
    // Nothing learned yet: the address is dropped in the kernel.
    assert_eq!(curl_ip(&s, "tiefighter", &format!("http://{API4}/")), "000");
    // The L3/L4 allow passes a name no DNS rule names (the DNS rule alone
    // would refuse it)...
    assert_eq!(
        dig(&s, "tiefighter", RESOLVER4, "other.example.com", "A"),
        OTHER4
    );
    // ...but no toFQDNs selector selects it: its address stays dropped.
    assert_eq!(
        curl_ip(&s, "tiefighter", &format!("http://{OTHER4}/")),
        "000"
    );
    // The selected name, looked up through the proxy, is learned: by name
    // and by address, over IPv4 and IPv6.
    assert_eq!(
        curl_by_name(&s, "tiefighter", "-4", "http://api.example.com/"),
        "200"
    );
    assert_eq!(
        curl_by_name(&s, "tiefighter", "-6", "http://api.example.com/"),
        "200"
    );
    assert_eq!(curl_ip(&s, "tiefighter", &format!("http://{API4}/")), "200");
    assert!(listed_ips(&fqdn_list(&s), "api.example.com.").contains(&API4.to_string()));
}
