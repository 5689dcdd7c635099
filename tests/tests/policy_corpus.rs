//! Cilium's documented policies against weir (no root needed).
//!
//! `tests/corpus/cilium/NN-topic.yaml` are CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy files written after the examples of Cilium's
//! documentation (each names the example it follows in its first line), with the
//! fields real users write. Every file goes through `weir policy validate`; a file
//! that loads also goes through `weir policy explain` for one pair of endpoints
//! (from `endpoints.yaml`) that the policy is about.
//!
//! [`CORPUS`] is the truth about today's weir: a file that starts to load, is
//! refused for another reason, or gets another verdict fails this test, and so
//! does a file that is missing from the table. Update the row with the change.

use std::path::Path;
use std::process::Output;

use weir_tests::{repo_root, weir_cli};

/// What weir does with one corpus file.
enum Expect {
    /// `weir policy validate` exits 0. `explain`: `(from, to, port, allowed)`,
    /// where `port` is `N`, `N/UDP`, `N/ICMP` (TCP by default) or a port name,
    /// and `allowed` is the verdict: exit 0 ALLOWED, exit 1 DENIED.
    Loads {
        explain: Option<(&'static str, &'static str, &'static str, bool)>,
    },
    /// `weir policy validate` exits 1 with `FILE:LINE:COL: message` lines; the
    /// first names `field`, the others name `also`, in order. A message names a
    /// field with its first `backquoted` word, or (without backquotes) by
    /// containing it as a word (`protocol SCTP is not supported ...`).
    Refused {
        field: &'static str,
        also: &'static [&'static str],
    },
}

use Expect::{Loads, Refused};

const fn pair(from: &'static str, to: &'static str, port: &'static str, allowed: bool) -> Expect {
    Loads {
        explain: Some((from, to, port, allowed)),
    }
}

const ALLOWED: bool = true;
const DENIED: bool = false;

/// One row per file of `tests/corpus/cilium/` (besides `endpoints.yaml`).
const CORPUS: &[(&str, Expect)] = &[
    (
        "01-getting-started-l3-l4.yaml",
        pair("tiefighter", "deathstar", "80", ALLOWED),
    ),
    (
        "02-getting-started-l7.yaml",
        pair("xwing", "deathstar", "80", DENIED),
    ),
    // L3/L4 allowed; each request must match one of the HTTP rules.
    (
        "03-http-method-path-headers.yaml",
        pair("client", "my-service", "80", ALLOWED),
    ),
    (
        "04-http-multi-specs.yaml",
        pair("dev-client", "service", "80", DENIED),
    ),
    (
        "05-l3-l4-combined.yaml",
        pair("tiefighter", "my-service", "80", DENIED),
    ),
    (
        "06-l4-any-peer.yaml",
        pair("my-service", "198.51.100.1", "80", ALLOWED),
    ),
    // L3/L4 allowed; each request must be allowed by the Kafka rules (`explain --kafka`).
    (
        "07-kafka-apikey.yaml",
        pair("empire-hq", "kafka", "9092", ALLOWED),
    ),
    (
        "08-kafka-role.yaml",
        pair("empire-outpost", "kafka", "9092", ALLOWED),
    ),
    // toFQDNs allows only addresses the DNS proxy has learned from allowed
    // answers; `explain` learns none, so an address of api.github.com is denied
    // (fail closed). The DNS rule on port 53 lets the lookups through L3/L4.
    (
        "09-fqdn-matchname.yaml",
        pair("xwing", "140.82.112.3", "443", DENIED),
    ),
    (
        "10-fqdn-matchpattern.yaml",
        pair("xwing", "kube-dns", "53/UDP", ALLOWED),
    ),
    (
        "11-fqdn-with-ports.yaml",
        pair("xwing", "140.82.112.3", "443", DENIED),
    ),
    // Each query must match one of the DNS rules (checked by `explain --dns`
    // in tests/cli.rs).
    (
        "12-dns-visibility.yaml",
        pair("xwing", "kube-dns", "53/UDP", ALLOWED),
    ),
    (
        "13-dns-rules-only.yaml",
        pair("test-app", "kube-dns", "53/TCP", ALLOWED),
    ),
    (
        "14-entities-world.yaml",
        pair("frontend", "1.1.1.1", "443", ALLOWED),
    ),
    // `explain` cannot name the host as a source; another peer is refused.
    (
        "15-entities-host.yaml",
        pair("tiefighter", "backend", "80", DENIED),
    ),
    // Selects only `reserved:health` endpoints (Cilium's health checkers),
    // which weir never has: the corpus's endpoints stay unselected.
    (
        "16-entities-remote-node-health.yaml",
        pair("tiefighter", "deathstar", "80", ALLOWED),
    ),
    // `cluster`: every local endpoint (and the --cluster-cidr ranges).
    (
        "17-entities-cluster.yaml",
        pair("frontend", "backend", "80", ALLOWED),
    ),
    // No --kube-apiserver is given here: the entity selects no address (explain
    // says so on stderr), so the dev client's egress is denied.
    (
        "18-entities-kube-apiserver.yaml",
        pair("dev-client", "10.96.0.1", "443", DENIED),
    ),
    // `health`: weir runs no health endpoints; port 4240 stays closed to others.
    (
        "19-entities-health.yaml",
        pair("client", "my-service", "4240", DENIED),
    ),
    // `init` selects nothing; the second rule opens 53/UDP to every peer.
    (
        "20-entities-init.yaml",
        pair("client", "my-service", "53/UDP", ALLOWED),
    ),
    // Selects only `reserved:init` endpoints, none of the corpus's.
    (
        "21-init-identity-policy.yaml",
        pair("tiefighter", "deathstar", "80", ALLOWED),
    ),
    (
        "22-entities-all-deny-world.yaml",
        pair("1.2.3.4", "victim", "80", DENIED),
    ),
    // 10.96.0.1 is in the `except` of 10.0.0.0/8.
    (
        "23-cidr-and-cidrset-except.yaml",
        pair("my-service", "10.96.0.1", "443", DENIED),
    ),
    (
        "24-cidr-l4-combined.yaml",
        pair("frontend", "192.0.2.10", "80", ALLOWED),
    ),
    // 203.0.113.200 is in the `except` of 203.0.113.0/24.
    (
        "25-ingress-from-cidrset.yaml",
        pair("203.0.113.200", "backend", "443", DENIED),
    ),
    // `myservice` (endpoints.yaml) selects the `client` pods.
    (
        "26-services-k8s-service.yaml",
        pair("my-service", "client", "80", ALLOWED),
    ),
    // The service labelled `head: none` has the backend 192.0.2.80.
    (
        "27-services-selector.yaml",
        pair("my-service", "192.0.2.80", "80", ALLOWED),
    ),
    (
        "28-deny-egress.yaml",
        pair("frontend", "backend", "80", DENIED),
    ),
    (
        "29-deny-ingress-port.yaml",
        pair("frontend", "backend", "80", DENIED),
    ),
    // The empty selectors are confined to ns1/ns2: ns2 does not reach ns1 (as in
    // Cilium).
    (
        "30-namespace-isolation.yaml",
        pair("ns2-web", "ns1-web", "80", DENIED),
    ),
    (
        "31-namespace-kube-dns.yaml",
        pair("ns1-web", "kube-dns", "53/UDP", ALLOWED),
    ),
    (
        "32-namespace-cross.yaml",
        pair("luke", "leia", "80", ALLOWED),
    ),
    (
        "33-namespace-labels.yaml",
        pair("empire-spy", "rebel-base", "80", DENIED),
    ),
    (
        "34-clusterwide-wildcard.yaml",
        pair("xwing", "kube-dns", "53/UDP", ALLOWED),
    ),
    (
        "35-clusterwide-scope.yaml",
        pair("ns1-web", "leia", "80", DENIED),
    ),
    (
        "36-serviceaccount.yaml",
        pair("sa-luke", "sa-leia", "80", ALLOWED),
    ),
    // `role NotIn [debug]` keeps the debug pod out.
    (
        "37-match-expressions.yaml",
        pair("payments-debug", "db", "5432", DENIED),
    ),
    (
        "38-requires.yaml",
        Refused {
            field: "fromRequires",
            also: &[],
        },
    ),
    // The policy allows ICMP echo (type 8) from my-service, as Cilium does.
    (
        "39-icmp.yaml",
        pair("my-service", "client", "8/ICMP", ALLOWED),
    ),
    // Host policies select nodes in Cilium, never pods: weir refuses them rather
    // than match `nodeSelector` against its endpoints (which made every endpoint
    // default-deny under 41's `nodeSelector: {}`).
    (
        "40-host-policy-entities.yaml",
        Refused {
            field: "nodeSelector",
            also: &[],
        },
    ),
    (
        "41-host-policy-cidr.yaml",
        Refused {
            field: "nodeSelector",
            also: &[],
        },
    ),
    // 444 is the range's last port.
    (
        "42-port-range.yaml",
        pair("my-service", "client", "444", ALLOWED),
    ),
    (
        "43-named-port-any-protocol.yaml",
        pair("tiefighter", "deathstar", "http", ALLOWED),
    ),
    // All three forms of `headers`, `Name value` included.
    (
        "44-http-headers-forms.yaml",
        pair("tiefighter", "deathstar", "80", ALLOWED),
    ),
    // headerMatches with a REPLACE action: the request is never denied for it.
    (
        "45-http-header-matches.yaml",
        pair("tiefighter", "deathstar", "80", ALLOWED),
    ),
    // Selects every endpoint without making it default-deny: what no rule
    // allows still passes.
    (
        "46-enable-default-deny.yaml",
        pair("frontend", "backend", "80", ALLOWED),
    ),
    (
        "47-envoy-listener-redirect.yaml",
        Refused {
            field: "listener",
            also: &[],
        },
    ),
    (
        "48-auth-mutual.yaml",
        Refused {
            field: "authentication",
            also: &[],
        },
    ),
    (
        "49-tls-server-names.yaml",
        Refused {
            field: "serverNames",
            also: &[],
        },
    ),
    (
        "50-tls-interception.yaml",
        Refused {
            field: "terminatingTLS",
            also: &["originatingTLS"],
        },
    ),
    (
        "51-l7proto-generic.yaml",
        Refused {
            field: "l7proto",
            also: &["l7"],
        },
    ),
    (
        "52-from-nodes.yaml",
        Refused {
            field: "fromNodes",
            also: &[],
        },
    ),
    (
        "53-to-groups-aws.yaml",
        Refused {
            field: "toGroups",
            also: &[],
        },
    ),
    // `egress: [{}]` selects the endpoint and allows nothing, as in Cilium.
    (
        "54-egress-default-deny.yaml",
        pair("restricted", "1.1.1.1", "443", DENIED),
    ),
    (
        "55-ingress-allow-all.yaml",
        pair("xwing", "victim", "80", ALLOWED),
    ),
    // Valid Cilium; weir has no CiliumCIDRGroup to resolve it from.
    (
        "56-cidr-group-ref.yaml",
        Refused {
            field: "cidrGroupRef",
            also: &[],
        },
    ),
    // No corpus endpoint carries a cluster label: nothing is selected.
    (
        "57-clustermesh-cross-cluster.yaml",
        pair("empire-spy", "rebel-base", "80", ALLOWED),
    ),
    (
        "58-egress-deny-cidr-ports.yaml",
        pair("test-app", "169.254.169.254", "80", DENIED),
    ),
    (
        "59-egress-sctp.yaml",
        Refused {
            field: "SCTP",
            also: &[],
        },
    ),
    // The API server prunes the unknown top-level field, so Cilium loads it: so does weir.
    (
        "60-toplevel-description.yaml",
        pair("xwing", "kube-dns", "53/UDP", ALLOWED),
    ),
];

fn corpus_dir() -> std::path::PathBuf {
    repo_root().join("tests/corpus/cilium")
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The field a refusal message names: its first `backquoted` word, or `want`
/// when the message has no backquotes and contains `want` as a word.
fn named<'m>(message: &'m str, want: &str) -> Option<&'m str> {
    if let Some((_, rest)) = message.split_once('`') {
        return rest.split_once('`').map(|(name, _)| name);
    }
    message
        .split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_'))
        .find(|w| *w == want)
}

/// Splits `FILE:LINE:COL: message` (FILE being `file`), or says why it cannot.
fn positioned<'l>(line: &'l str, file: &str) -> Result<&'l str, String> {
    let rest = line
        .strip_prefix(file)
        .and_then(|r| r.strip_prefix(':'))
        .ok_or_else(|| format!("`{line}` does not start with `{file}:`"))?;
    let mut parts = rest.splitn(3, ':');
    let (Some(l), Some(c), Some(msg)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("`{line}` is not FILE:LINE:COL: message"));
    };
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match msg.strip_prefix(' ') {
        Some(msg) if number(l) && number(c) && !msg.is_empty() => Ok(msg),
        _ => Err(format!("`{line}` is not FILE:LINE:COL: message")),
    }
}

fn check_refused(path: &Path, out: &Output, field: &str, also: &[&str]) -> Result<(), String> {
    if code(out) != 1 {
        return Err(format!(
            "expected a refusal naming `{field}` (exit 1), got exit {}: {}{}",
            code(out),
            stdout(out),
            stderr(out)
        ));
    }
    let file = path.to_str().expect("utf-8 path");
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().collect();
    let want: Vec<&str> = std::iter::once(field).chain(also.iter().copied()).collect();
    let mut got = Vec::new();
    for line in &lines {
        let msg = positioned(line, file)?;
        got.push((line, msg));
    }
    let names: Vec<Option<&str>> = got
        .iter()
        .enumerate()
        .map(|(i, (_, msg))| named(msg, want.get(i).copied().unwrap_or("")))
        .collect();
    if names.len() != want.len() || names.iter().zip(&want).any(|(n, w)| n != &Some(*w)) {
        return Err(format!(
            "expected refusals naming {want:?}, got:\n{}",
            err.trim_end()
        ));
    }
    Ok(())
}

fn check_explain(
    path: &Path,
    (from, to, port, allowed): (&str, &str, &str, bool),
) -> Result<(), String> {
    let endpoints = corpus_dir().join("endpoints.yaml");
    let (port, proto) = port.split_once('/').unwrap_or((port, "TCP"));
    let out = weir_cli(&[
        "policy",
        "explain",
        "--policy",
        path.to_str().expect("utf-8 path"),
        "--endpoints",
        endpoints.to_str().expect("utf-8 path"),
        "--from",
        from,
        "--to",
        to,
        "--port",
        port,
        "--proto",
        proto,
    ]);
    let want = if allowed { "ALLOWED" } else { "DENIED" };
    let got = match code(&out) {
        0 => "ALLOWED",
        1 => "DENIED",
        c => {
            return Err(format!(
                "explain {from} -> {to} {port}/{proto}: exit {c} (could not decide): {}",
                stderr(&out).trim_end()
            ));
        }
    };
    if got != want || !stdout(&out).starts_with(got) {
        return Err(format!(
            "explain {from} -> {to} {port}/{proto}: expected {want}, got exit {}:\n{}",
            code(&out),
            stdout(&out).trim_end()
        ));
    }
    Ok(())
}

fn check(name: &str, expect: &Expect) -> Result<(), String> {
    let path = corpus_dir().join(name);
    let out = weir_cli(&["policy", "validate", path.to_str().expect("utf-8 path")]);
    match expect {
        Refused { field, also } => check_refused(&path, &out, field, also),
        Loads { explain } => {
            if code(&out) != 0 {
                return Err(format!(
                    "expected to load, got exit {}:\n{}",
                    code(&out),
                    stderr(&out).trim_end()
                ));
            }
            match explain {
                Some(p) => check_explain(&path, *p),
                None => Ok(()),
            }
        }
    }
}

#[test]
fn every_corpus_file_is_in_the_table() {
    let mut on_disk: Vec<String> = std::fs::read_dir(corpus_dir())
        .expect("read tests/corpus/cilium")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| (n.ends_with(".yaml") || n.ends_with(".yml")) && n != "endpoints.yaml")
        .collect();
    on_disk.sort();
    let in_table: Vec<String> = CORPUS.iter().map(|(n, _)| n.to_string()).collect();
    let mut sorted = in_table.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), in_table.len(), "a file is in the table twice");
    let missing: Vec<&String> = on_disk.iter().filter(|n| !in_table.contains(n)).collect();
    let stale: Vec<&String> = in_table.iter().filter(|n| !on_disk.contains(n)).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "corpus files without a row in CORPUS: {missing:?}; rows without a file: {stale:?}"
    );
    assert!(
        on_disk.len() >= 32,
        "the corpus has {} files",
        on_disk.len()
    );
}

#[test]
fn corpus_outcomes_match_the_table() {
    let failures: Vec<String> = CORPUS
        .iter()
        .filter_map(|(name, expect)| check(name, expect).err().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} corpus files changed outcome (update CORPUS in tests/tests/policy_corpus.rs):\n\n{}",
        failures.len(),
        CORPUS.len(),
        failures.join("\n\n")
    );
}
