//! Kafka rules end to end: tansu (a Kafka-compatible broker, memory storage) on the
//! deathstar, real clients on the tiefighter — confluent-kafka (librdkafka 2.x) in
//! today's protocol versions and pinned to Kafka 0.9's ([`OLD`]: only denials, tansu
//! cannot serve them), kafka-python, and hand-framed requests on a raw socket — and
//! weir between them, on the eBPF (sk_assign) and the nft steering paths, IPv4 and
//! IPv6.
//!
//! Every denial is first shown succeeding under [`open`] (same client, same broker),
//! then refused under [`strict`]; what the broker stored is read back directly in the
//! deathstar's own namespace, where no steering applies. The clients are
//! `tests/scripts/kafka_client.py`, which prints one JSON object per outcome.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use weir_tests::{DEATHSTAR4, DEATHSTAR6, Scenario, lab, repo_root, text};

const PORT: u16 = 9092;

/// Topics: `orders` may be produced and consumed; `audit` may be listed but neither
/// produced nor fetched (denials of Produce and Fetch themselves); `secrets` not even
/// listed (the client learns the denial from Metadata); `reports` only for the client
/// id `reporter`, and by Metadata v1 for anyone.
const TOPICS: &[&str] = &["orders", "audit", "secrets", "reports"];

/// Where the broker runs, and so which side of weir's policy its rules are on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Broker {
    /// On the deathstar, a local endpoint: ingress rules on the deathstar.
    Deathstar,
    /// Outside the node (10.201.1.1, fd00:201:1::1), no endpoint: egress rules on the
    /// tiefighter, `toCIDR`.
    World,
}

impl Broker {
    /// The workload (namespace) tansu runs in.
    fn workload(self) -> &'static str {
        match self {
            Broker::Deathstar => "deathstar",
            Broker::World => "world",
        }
    }
}

const WORLD4: &str = "10.201.1.1";
const WORLD6: &str = "fd00:201:1::1";

fn policy(broker: Broker, rules: &str) -> String {
    let peer = match broker {
        Broker::Deathstar => {
            "endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]"
        }
        Broker::World => {
            "endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
  - toCIDR: [10.201.1.0/24, 'fd00:201:1::/64']"
        }
    };
    format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: kafka}}
spec:
  {peer}
    toPorts:
    - ports: [{{port: "{PORT}", protocol: TCP}}]
      rules:
        kafka:
{rules}
"#
    )
}

/// Every topic, every API: the proxy is in the path, nothing is refused.
fn open(broker: Broker) -> String {
    policy(
        broker,
        "        - {topic: orders}
        - {topic: audit}
        - {topic: secrets}
        - {topic: reports}",
    )
}

fn strict(broker: Broker) -> String {
    policy(
        broker,
        "        - {role: produce, topic: orders}
        - {role: consume, topic: orders}
        - {apiKey: metadata, topic: audit}
        - {role: produce, topic: reports, clientID: reporter}
        - {apiKey: metadata, apiVersion: '1', topic: reports}",
    )
}

fn python() -> PathBuf {
    repo_root().join(".venv/bin/python")
}

fn script() -> String {
    repo_root()
        .join("tests/scripts/kafka_client.py")
        .display()
        .to_string()
}

/// tansu, installed by `make deps` into `.tools/bin`; `None` after a loud skip
/// (a failure under `CI=true`).
fn tansu() -> Option<PathBuf> {
    let bin = repo_root().join(".tools/bin/tansu");
    if bin.exists() {
        return Some(bin);
    }
    let msg = format!(
        "{} is missing: `make deps` installs it (cargo install tansu --features dynostore)",
        bin.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}, and CI=true forbids skipping");
    }
    eprintln!("\n*** SKIPPED *** {msg}\n");
    None
}

/// `ip:port` with IPv6 in brackets.
fn hostport(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{PORT}")
    } else {
        format!("{ip}:{PORT}")
    }
}

/// The broker and weir in front of it.
struct Kafka {
    s: Scenario,
    /// `ip:port` of the broker, as clients bootstrap (and the broker advertises).
    broker: String,
    /// Where it runs.
    place: Broker,
}

impl Kafka {
    /// tansu on the deathstar at `ip` (advertised there), the topics created, weir
    /// started with [`open`] and `steering`.
    fn start(name: &str, ip: &str, steering: &str) -> Option<Kafka> {
        Kafka::start_at(name, Broker::Deathstar, ip, steering)
    }

    /// The same with the broker at `place`.
    fn start_at(name: &str, place: Broker, ip: &str, steering: &str) -> Option<Kafka> {
        let tansu = tansu()?;
        let mut s = Scenario::star_wars(name)?;
        if place == Broker::World {
            s.lab.add_outside("world", 1).expect("add the world");
            // Neighbours first, from the node's own addresses: while the fresh link's
            // link-local address is tentative, a packet from a transparent upstream
            // socket (the tiefighter's address) solicits none and waits a retransmit.
            for ip in [WORLD4, WORLD6] {
                let _ = s.lab.node.run(&["ping", "-c", "1", "-W", "2", ip]);
            }
        }
        assert!(
            python().exists(),
            "{} is missing: make deps installs confluent-kafka and kafka-python into .venv",
            python().display()
        );
        let broker = hostport(ip);
        let url = format!("tcp://{broker}");
        let log = std::fs::File::create(s.path("tansu.log")).unwrap();
        let mut cmd = s
            .lab
            .workload(place.workload())
            .ns
            .command(tansu.to_str().unwrap());
        // Every address (both families): `tansu topic create` cannot reach an IPv6
        // broker URL (UnknownHost), so topics are created over 127.0.0.1.
        let any = format!("tcp://[::]:{PORT}");
        cmd.args([
            "broker",
            "--listener-url",
            &any,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        s.lab.spawn("tansu", cmd).expect("start tansu");
        s.lab
            .wait_for_tcp(ip, PORT, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("tansu not listening: {e}\n{}", tansu_log(&s)));
        let local = format!("tcp://127.0.0.1:{PORT}");
        for t in TOPICS {
            let out = s
                .lab
                .workload(place.workload())
                .ns
                .command(tansu.to_str().unwrap())
                .args([
                    "topic",
                    "create",
                    "--broker",
                    &local,
                    "--partitions",
                    "1",
                    t,
                ])
                .output()
                .expect("run tansu topic create");
            assert!(
                out.status.success(),
                "tansu topic create {t}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                tansu_log(&s)
            );
        }
        s.start_weir(&open(place), &["--steering", steering]);
        Some(Kafka { s, broker, place })
    }

    /// Runs the client script in `from`'s namespace (60 s at most): its JSON lines.
    /// A run that printed no `done` line fails the test with what explains it.
    fn client(&self, from: &str, args: &[&str]) -> Vec<Value> {
        let py = python();
        let out = self
            .s
            .lab
            .workload(from)
            .ns
            .command("timeout")
            .args(["60", py.to_str().unwrap(), &script()])
            .args(args)
            .args(["--bootstrap", &self.broker])
            .stdin(Stdio::null())
            .output()
            .expect("run kafka_client.py");
        let lines: Vec<Value> = text(&out)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert!(
            lines
                .iter()
                .any(|l| l["op"] == "done" || l["op"] == "offsets"),
            "{args:?} from {from}: no result\nstdout: {}\nstderr: {}\nweir: {}\ntansu: {}",
            text(&out),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.s.weir_log_text(), 40),
            tail(&tansu_log(&self.s), 20)
        );
        // A transport failure the client script retried (metadata only): not a
        // policy outcome, but left visible in the test's output.
        for r in lines.iter().filter(|l| l["op"] == "retry") {
            eprintln!(
                "{args:?} from {from}: the client retried after {}",
                r["error"]
            );
        }
        lines
    }

    /// Produces `count` records to each of `topics` (interleaved, all in flight at
    /// once): per record `Ok(offset)` or `Err(error name)`, grouped by topic in
    /// record order.
    fn produce(&self, lib: &str, topics: &[&str], count: usize, extra: &[&str]) -> Outcomes {
        let mut args = vec!["produce", "--lib", lib, "--timeout", "8"];
        for t in topics {
            args.extend(["--topic", t]);
        }
        let count = count.to_string();
        args.extend(["--count", &count]);
        args.extend(extra);
        outcomes(&self.client("tiefighter", &args))
    }

    /// Records stored in partition 0 of `topic`, read back from the broker directly
    /// (to the end of the partition: tansu 0.6's high watermark undercounts a batch).
    fn stored(&self, topic: &str) -> i64 {
        let lines = self.client(
            self.place.workload(),
            &[
                "consume",
                "--assign",
                "--until-eof",
                "--topic",
                topic,
                "--group",
                "direct",
            ],
        );
        let n = lines
            .iter()
            .find(|l| l["op"] == "done")
            .and_then(|l| l["count"].as_i64())
            .unwrap_or_else(|| panic!("reading {topic} back: {lines:?}"));
        assert!(
            !lines.iter().any(|l| l["op"] == "error"),
            "reading {topic} back: {lines:?}"
        );
        n
    }

    /// Consumes `topic` from the beginning (assigned partition 0, or subscribed in
    /// a group): the values read, or the first error's name.
    fn consume(&self, from: &str, lib: &str, topic: &str, max: usize, extra: &[&str]) -> Consumed {
        let max = max.to_string();
        let mut args = vec![
            "consume",
            "--lib",
            lib,
            "--topic",
            topic,
            "--max",
            &max,
            "--timeout",
            "10",
            "--stop-on-error",
        ];
        args.extend(extra);
        let lines = self.client(from, &args);
        if let Some(e) = lines.iter().find(|l| l["op"] == "error") {
            return Err(e["error"].as_str().unwrap_or("?").to_string());
        }
        Ok(lines
            .iter()
            .filter(|l| l["op"] == "record")
            .map(|l| l["value"].as_str().unwrap_or("").to_string())
            .collect())
    }

    /// Topics a Metadata request lists (`None`: every topic) with their errors.
    fn metadata(&self, from: &str, topic: Option<&str>, client_id: &str) -> Vec<(String, String)> {
        let mut args = vec!["metadata", "--client-id", client_id];
        if let Some(t) = topic {
            args.extend(["--topic", t]);
        }
        self.client(from, &args)
            .iter()
            .filter(|l| l["op"] == "topic")
            .map(|l| {
                (
                    l["topic"].as_str().unwrap_or("").to_string(),
                    l["error"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Hand-framed requests written in one send (`mode`: `pipeline` or a `lie-*`,
    /// see the script): the responses in arrival order, and whether weir closed.
    fn raw(&self, mode: &str, specs: &[&str]) -> (Vec<Value>, bool) {
        let mut args = vec!["raw", "--mode", mode, "--timeout", "5"];
        for t in specs {
            args.extend(["--topic", t]);
        }
        let lines = self.client("tiefighter", &args);
        let done = lines.iter().find(|l| l["op"] == "done").expect("done");
        let closed = done["closed"] == true;
        let responses = lines
            .into_iter()
            .filter(|l| l["op"] == "response")
            .collect();
        (responses, closed)
    }

    /// weir's Kafka flow records: (api_key, topic, error_code, verdict).
    fn kafka_flows(&self) -> Vec<(String, String, i64, String)> {
        self.s
            .flows()
            .iter()
            .filter_map(|f| {
                let k = &f["l7"]["kafka"];
                Some((
                    k["api_key"].as_str()?.to_string(),
                    k["topic"].as_str()?.to_string(),
                    k["error_code"].as_i64()?,
                    f["verdict"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    fn assert_denial_recorded(&self, api_key: &str, topic: &str) {
        let flows = self.kafka_flows();
        assert!(
            flows
                .iter()
                .any(|f| f.0 == api_key && f.1 == topic && f.2 == 29 && f.3 == "DROPPED"),
            "no DROPPED {api_key} record for {topic} with error 29: {flows:#?}"
        );
    }
}

type Outcomes = Vec<(String, Result<i64, String>)>;
type Consumed = Result<Vec<String>, String>;

fn outcomes(lines: &[Value]) -> Outcomes {
    let mut v: Vec<(i64, String, Result<i64, String>)> = lines
        .iter()
        .filter(|l| l["op"] == "produce")
        .map(|l| {
            let r = if l["ok"] == true {
                Ok(l["offset"].as_i64().unwrap_or(-1))
            } else {
                Err(l["error"].as_str().unwrap_or("?").to_string())
            };
            (
                l["i"].as_i64().unwrap_or(-1),
                l["topic"].as_str().unwrap_or("").to_string(),
                r,
            )
        })
        .collect();
    v.sort_by(|a, b| (&a.1, a.0).cmp(&(&b.1, b.0)));
    v.into_iter().map(|(_, t, r)| (t, r)).collect()
}

/// Whether every outcome for `topic` is an error named `err`, and there are `n`.
fn all_failed(o: &Outcomes, topic: &str, n: usize, err: &str) -> bool {
    let mine: Vec<_> = o.iter().filter(|(t, _)| t == topic).collect();
    mine.len() == n
        && mine
            .iter()
            .all(|(_, r)| r.as_ref().err().is_some_and(|e| e == err))
}

/// Offsets of `topic`'s records when all `n` were delivered, in order.
fn delivered(o: &Outcomes, topic: &str) -> Option<Vec<i64>> {
    o.iter()
        .filter(|(t, _)| t == topic)
        .map(|(_, r)| r.as_ref().ok().copied())
        .collect()
}

fn tansu_log(s: &Scenario) -> String {
    std::fs::read_to_string(s.path("tansu.log")).unwrap_or_default()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Under [`open`], through weir: every topic takes records and gives them back, and
/// Metadata for every topic lists them all.
fn core_open(k: &Kafka) {
    for t in ["orders", "audit", "secrets", "reports"] {
        let before = k.stored(t);
        let o = k.produce("confluent", &[t], 2, &[]);
        assert_eq!(
            delivered(&o, t),
            Some(vec![before, before + 1]),
            "{t}: {o:?}"
        );
        assert_eq!(k.stored(t), before + 2, "{t}");
    }
    for t in ["orders", "audit", "secrets"] {
        let got = k.consume("tiefighter", "confluent", t, 2, &["--assign"]);
        assert_eq!(
            got,
            Ok(vec![format!("weir-{t}-0"), format!("weir-{t}-1")]),
            "{t}"
        );
    }
    for client in ["weir-test", "reporter"] {
        let all = k.metadata("tiefighter", None, client);
        let names: Vec<&str> = all.iter().map(|(t, _)| t.as_str()).collect();
        for t in TOPICS {
            assert!(names.contains(t), "{t} missing under OPEN: {all:?}");
        }
    }
    for t in ["secrets", "reports"] {
        let one = k.metadata("tiefighter", Some(t), "weir-test");
        assert_eq!(one, [(t.to_string(), String::new())]);
    }
}

/// Under [`strict`]: the same clients refused where [`core_open`] showed them served.
fn core_strict(k: &Kafka) {
    let before: Vec<i64> = TOPICS.iter().map(|t| k.stored(t)).collect();
    let stored = |t: &str| {
        let i = TOPICS.iter().position(|x| *x == t).expect("a topic");
        k.stored(t) - before[i]
    };
    // Produce: orders allowed; audit refused by the Produce denial itself, secrets
    // by Metadata's; the broker stored nothing of either.
    let first = before[0];
    let o = k.produce("confluent", &["orders"], 5, &[]);
    assert_eq!(
        delivered(&o, "orders"),
        Some((first..first + 5).collect()),
        "{o:?}"
    );
    for t in ["audit", "secrets"] {
        let o = k.produce("confluent", &[t], 5, &[]);
        assert!(all_failed(&o, t, 5, "TOPIC_AUTHORIZATION_FAILED"), "{o:?}");
    }
    assert_eq!(stored("orders"), 5);
    assert_eq!(stored("audit"), 0);
    assert_eq!(stored("secrets"), 0);
    k.assert_denial_recorded("produce", "audit");
    k.assert_denial_recorded("metadata", "secrets");
    // Interleaved on one connection: librdkafka puts partitions of several topics in
    // one Produce request, and a request is allowed only when all its topics are, so
    // an orders record that shared a request with an audit one is refused with it.
    // Every record gets an answer (none times out), and the broker stored exactly
    // the orders records reported delivered, none of audit.
    let o = k.produce("confluent", &["orders", "audit"], 5, &[]);
    assert!(
        all_failed(&o, "audit", 5, "TOPIC_AUTHORIZATION_FAILED"),
        "{o:?}"
    );
    let ok = o.iter().filter(|(t, r)| t == "orders" && r.is_ok()).count();
    assert!(
        o.iter().all(|(t, r)| t == "audit"
            || r.as_ref().is_ok()
            || r.as_ref()
                .err()
                .is_some_and(|e| e == "TOPIC_AUTHORIZATION_FAILED")),
        "{o:?}"
    );
    assert_eq!(
        stored("orders"),
        5 + i64::try_from(ok).expect("small"),
        "{o:?}"
    );
    assert_eq!(stored("audit"), 0);

    // Consume: orders allowed, audit (ListOffsets/Fetch) and secrets refused.
    let n = usize::try_from(first + 5).expect("small") + ok;
    let got = k.consume("tiefighter", "confluent", "orders", n, &["--assign"]);
    assert_eq!(got.as_ref().map(Vec::len), Ok(n), "{got:?}");
    let got = k.consume("tiefighter", "confluent", "audit", 2, &["--assign"]);
    assert_eq!(got, Err("TOPIC_AUTHORIZATION_FAILED".into()));
    let flows = k.kafka_flows();
    assert!(
        flows
            .iter()
            .any(|f| (f.0 == "listoffsets" || f.0 == "fetch") && f.1 == "audit" && f.2 == 29),
        "no ListOffsets/Fetch denial for audit: {flows:#?}"
    );
    // A topic whose Metadata is refused: librdkafka reports the error for a
    // subscription when it asked for the topic by name; when it asked for every
    // topic, the filtered answer does not list it and the consumer just waits.
    // Either way it reads nothing.
    let got = k.consume(
        "tiefighter",
        "confluent",
        "secrets",
        2,
        &["--group", "g-secrets"],
    );
    assert!(
        got == Err("TOPIC_AUTHORIZATION_FAILED".into()) || got == Ok(vec![]),
        "{got:?}"
    );

    // clientID: reports takes records from `reporter` only.
    let r0 = before[3];
    let o = k.produce("confluent", &["reports"], 1, &["--client-id", "reporter"]);
    assert_eq!(delivered(&o, "reports"), Some(vec![r0]), "{o:?}");
    let o = k.produce("confluent", &["reports"], 1, &["--client-id", "intruder"]);
    assert!(
        all_failed(&o, "reports", 1, "TOPIC_AUTHORIZATION_FAILED"),
        "{o:?}"
    );
    assert_eq!(stored("reports"), 1);
    let flows = k.kafka_flows();
    assert!(
        flows.iter().any(|f| f.1 == "reports" && f.2 == 29),
        "no denial for the intruder's reports: {flows:#?}"
    );

    // Metadata for every topic: what the client may see; the broker lists all.
    let seen = k.metadata("tiefighter", None, "weir-test");
    let names: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(names, ["audit", "orders"], "{seen:?}");
    let seen = k.metadata("tiefighter", None, "reporter");
    let names: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(names, ["audit", "orders", "reports"], "{seen:?}");
    let direct = k.metadata(k.place.workload(), None, "weir-test");
    let names: Vec<&str> = direct.iter().map(|(t, _)| t.as_str()).collect();
    for t in TOPICS {
        assert!(names.contains(t), "{t} missing directly: {direct:?}");
    }
    // Metadata naming one denied topic.
    let one = k.metadata("tiefighter", Some("secrets"), "weir-test");
    assert_eq!(
        one,
        [(
            "secrets".to_string(),
            "TOPIC_AUTHORIZATION_FAILED".to_string()
        )]
    );
}

/// The matrix every steering path and address family runs.
fn core_matrix(k: &mut Kafka) {
    let t0 = Instant::now();
    core_open(k);
    k.s.reload(&strict(k.place));
    core_strict(k);
    kafka_counters_moved(k);
    eprintln!("core matrix: {:?}", t0.elapsed());
}

/// `/metrics` counts the matrix's Kafka requests: forwarded Produce requests, denied
/// ones with error 29, and the Kafka connections.
fn kafka_counters_moved(k: &Kafka) {
    let m =
        k.s.run_in_node(&["curl", "-sf", "http://127.0.0.1:9965/metrics"]);
    let value = |prefix: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    for sample in [
        r#"weir_kafka_requests_total{api_key="produce",verdict="FORWARDED",error_code="0"}"#,
        r#"weir_kafka_requests_total{api_key="produce",verdict="DROPPED",error_code="29"}"#,
        r#"weir_proxy_connections_total{protocol="kafka"}"#,
        r#"weir_flows_processed_total{verdict="DROPPED",type="L7",protocol="Kafka"}"#,
    ] {
        assert!(value(sample) >= 1.0, "{sample} missing or 0 in:\n{m}");
    }
}

#[test]
fn kafka_v6_on_the_nft_path() {
    let Some(mut k) = Kafka::start("kafka-v6-nft", DEATHSTAR6, "nft") else {
        return;
    };
    core_matrix(&mut k);
}

/// One response of [`pipelined`]: its correlation id and its (topic, error) pairs, sorted.
type Answer = (i64, Vec<(String, i64)>);

/// Metadata v0/v1 requests by hand, pipelined: the answers in arrival order, and
/// whether weir closed the connection.
fn pipelined(k: &Kafka, specs: &[&str]) -> (Vec<Answer>, bool) {
    let (responses, closed) = k.raw("pipeline", specs);
    let got = responses
        .iter()
        .map(|r| {
            let mut topics: Vec<(String, i64)> = r["topics"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|t| {
                            (
                                t["topic"].as_str().unwrap_or("").to_string(),
                                t["error"].as_i64().unwrap_or(-1),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            topics.sort();
            (r["correlation_id"].as_i64().unwrap_or(-1), topics)
        })
        .collect();
    (got, closed)
}

const PIPELINE: &[&str] = &[
    "orders",
    "secrets",
    "orders",
    "orders,secrets",
    "*",
    "v0:reports",
    "reports",
];

fn t(list: &[(&str, i64)]) -> Vec<(String, i64)> {
    list.iter().map(|(n, e)| (n.to_string(), *e)).collect()
}

/// Under [`open`]: the pipeline of [`PIPELINE`] all answered, in order; old-version
/// and kafka-python clients, acks=0 and an idempotent producer served.
fn extras_open(k: &Kafka) {
    let (got, closed) = pipelined(k, PIPELINE);
    let all = t(&[("audit", 0), ("orders", 0), ("reports", 0), ("secrets", 0)]);
    assert_eq!(
        got,
        [
            (1, vec![]),
            (2, t(&[("orders", 0)])),
            (3, t(&[("secrets", 0)])),
            (4, t(&[("orders", 0)])),
            (5, t(&[("orders", 0), ("secrets", 0)])),
            (6, all),
            (7, t(&[("reports", 0)])),
            (8, t(&[("reports", 0)])),
        ]
    );
    assert!(!closed);

    // acks=0 to audit: stored.
    let before = k.stored("audit");
    k.produce("confluent", &["audit"], 2, &["--conf", "acks=0"]);
    assert!(
        lab::wait_until(Duration::from_secs(5), || k.stored("audit") == before + 2).is_ok(),
        "acks=0 records not stored under OPEN"
    );
    // tansu answers acks=0 Produce requests (Kafka does not): weir drops those
    // answers instead of closing the connection as out of order.
    let flows = k.s.flows();
    assert!(
        !flows.iter().any(|f| f["Summary"]
            .as_str()
            .is_some_and(|s| s.contains("out of order"))),
        "weir closed a connection over tansu's acks=0 answer"
    );

    for (lib, extra) in LIBS {
        for t in ["orders", "audit"] {
            let before = k.stored(t);
            let o = k.produce(lib, &[t], 2, extra);
            assert_eq!(
                delivered(&o, t),
                Some(vec![before, before + 1]),
                "{lib} {extra:?} {t}: {o:?}"
            );
            let got = k.consume("tiefighter", lib, t, 2, &with(extra, &["--assign"]));
            assert_eq!(
                got.as_ref().map(Vec::len),
                Ok(2),
                "{lib} {extra:?} consume {t}"
            );
        }
    }
}

/// The clients besides today's librdkafka: kafka-python. (librdkafka 2.16 ignores
/// `api.version.request=false` with `broker.version.fallback=0.10.0` — it asks
/// ApiVersions and speaks today's versions — so the old versions come from
/// [`OLD`], which tansu cannot serve.)
const LIBS: &[(&str, &[&str])] = &[("kafka-python", &[])];

/// librdkafka pinned to Kafka 0.9's protocol: Metadata v0, Produce v1 (message
/// format v0), ListOffsets v0, Fetch v1. tansu 0.6 closes the connection on such a
/// Produce and answers ListOffsets v0 in a form librdkafka cannot read, so only the
/// denials (weir's own answers, in those versions' formats) can be shown.
const OLD: &[&str] = &[
    "--conf",
    "api.version.request=false",
    "--conf",
    "broker.version.fallback=0.9.0",
];

fn with<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
    a.iter().chain(b).copied().collect()
}

/// Under [`strict`]: the pipeline keeps its order around the denials; lying frames
/// close the connection; acks=0 to a denied topic closes it and stores nothing; old
/// versions and kafka-python get the same answers; an idempotent producer works.
fn extras_strict(k: &Kafka) {
    let (got, closed) = pipelined(k, PIPELINE);
    assert_eq!(
        got,
        [
            (1, vec![]),
            (2, t(&[("orders", 0)])),
            (3, t(&[("secrets", 29)])),
            (4, t(&[("orders", 0)])),
            (5, t(&[("orders", 29), ("secrets", 29)])),
            // Filtered as for Metadata v1 naming each topic: reports is visible
            // through the apiVersion rule.
            (6, t(&[("audit", 0), ("orders", 0), ("reports", 0)])),
            (7, t(&[("reports", 29)])),
            (8, t(&[("reports", 0)])),
        ],
        "{}",
        tail(&k.s.weir_log_text(), 30)
    );
    assert!(!closed);
    k.assert_denial_recorded("metadata", "orders,secrets");

    // Frames whose length lies: the good request before answered, then closed.
    for (mode, reason) in [
        ("lie-negative", "framing"),
        ("lie-huge", "framing"),
        ("lie-short", "header"),
        ("lie-long", "after the body"),
    ] {
        let (responses, closed) = k.raw(mode, &["orders"]);
        assert_eq!(responses.len(), 1, "{mode}: {responses:?}");
        assert_eq!(responses[0]["correlation_id"], 1, "{mode}");
        assert!(closed, "{mode}: connection left open");
        let flows = k.s.flows();
        assert!(
            flows.iter().any(|f| f["Summary"]
                .as_str()
                .is_some_and(|s| s.contains("Kafka connection closed") && s.contains(reason))),
            "{mode}: no close record naming {reason}"
        );
    }

    // acks=0 to audit: nothing stored, the connection closed with a record.
    let before = k.stored("audit");
    k.produce("confluent", &["audit"], 2, &["--conf", "acks=0"]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(k.stored("audit"), before);
    assert!(
        k.s.flows()
            .iter()
            .any(|f| f["Summary"].as_str().is_some_and(|s| s.contains("acks=0"))),
        "no close record for the acks=0 denial"
    );

    // Idempotent producer (InitProducerId first).
    let before = k.stored("orders");
    let o = k.produce(
        "confluent",
        &["orders"],
        2,
        &["--conf", "enable.idempotence=true"],
    );
    assert_eq!(
        delivered(&o, "orders"),
        Some(vec![before, before + 1]),
        "{o:?}"
    );
    assert!(
        k.kafka_flows()
            .iter()
            .any(|f| f.0 == "initproducerid" && f.3 == "FORWARDED"),
        "no InitProducerId record"
    );

    // A consumer in a (classic) group: FindCoordinator, JoinGroup, SyncGroup,
    // OffsetFetch, Heartbeat under the consume role. (A KIP-848 consumer,
    // `group.protocol=consumer`, cannot be tried: tansu 0.6 has no
    // ConsumerGroupHeartbeat — librdkafka: "ConsumerGroupHeartbeatRequest not
    // supported by broker".)
    let got = k.consume(
        "tiefighter",
        "confluent",
        "orders",
        2,
        &["--group", "g-orders"],
    );
    assert_eq!(got.as_ref().map(Vec::len), Ok(2), "{got:?}");
    let flows = k.kafka_flows();
    for api in ["findcoordinator", "joingroup", "syncgroup", "offsetfetch"] {
        assert!(
            flows.iter().any(|f| f.0 == api && f.3 == "FORWARDED"),
            "no forwarded {api}: {flows:#?}"
        );
    }

    // Old versions: weir's denials in Produce v1 and ListOffsets v0 format, read by
    // librdkafka as the broker's own.
    let before = k.stored("audit");
    let o = k.produce("confluent", &["audit"], 2, OLD);
    assert!(
        all_failed(&o, "audit", 2, "TOPIC_AUTHORIZATION_FAILED"),
        "{o:?}"
    );
    let got = k.consume(
        "tiefighter",
        "confluent",
        "audit",
        2,
        &with(OLD, &["--assign"]),
    );
    assert_eq!(got, Err("TOPIC_AUTHORIZATION_FAILED".into()));
    assert_eq!(k.stored("audit"), before);
    let old_denials: Vec<_> =
        k.s.flows()
            .iter()
            .filter_map(|f| {
                let kf = &f["l7"]["kafka"];
                (kf["topic"] == "audit"
                    && kf["error_code"] == 29
                    && kf["api_version"].as_i64().is_some_and(|v| v <= 1))
                .then(|| kf["api_key"].as_str().unwrap_or("").to_string())
            })
            .collect();
    for api in ["produce", "listoffsets"] {
        assert!(
            old_denials.iter().any(|a| a == api),
            "{api}: {old_denials:?}"
        );
    }

    for (lib, extra) in LIBS {
        // One topic per run: both clients may put several topics in one Produce.
        let before = k.stored("orders");
        let o = k.produce(lib, &["orders"], 2, extra);
        assert_eq!(
            delivered(&o, "orders"),
            Some(vec![before, before + 1]),
            "{lib} {extra:?}: {o:?}"
        );
        let o = k.produce(lib, &["audit"], 2, extra);
        assert!(
            all_failed(&o, "audit", 2, "TOPIC_AUTHORIZATION_FAILED"),
            "{lib} {extra:?}: {o:?}"
        );
        let got = k.consume("tiefighter", lib, "orders", 2, &with(extra, &["--assign"]));
        assert_eq!(got.as_ref().map(Vec::len), Ok(2), "{lib} {extra:?}");
        let got = k.consume("tiefighter", lib, "audit", 2, &with(extra, &["--assign"]));
        assert_eq!(
            got,
            Err("TOPIC_AUTHORIZATION_FAILED".into()),
            "{lib} {extra:?}"
        );
    }
}

#[test]
fn kafka_v4_on_the_ebpf_datapath_with_every_client() {
    let Some(mut k) = Kafka::start("kafka-v4-ebpf", DEATHSTAR4, "ebpf") else {
        return;
    };
    let t0 = Instant::now();
    core_open(&k);
    extras_open(&k);
    eprintln!("open: {:?}", t0.elapsed());
    k.s.reload(&strict(k.place));
    core_strict(&k);
    extras_strict(&k);
    eprintln!("all: {:?}", t0.elapsed());
}

#[test]
fn kafka_v4_on_the_nft_path() {
    let Some(mut k) = Kafka::start("kafka-v4-nft", DEATHSTAR4, "nft") else {
        return;
    };
    core_matrix(&mut k);
}

#[test]
fn kafka_v6_on_the_ebpf_datapath() {
    let Some(mut k) = Kafka::start("kafka-v6-ebpf", DEATHSTAR6, "ebpf") else {
        return;
    };
    core_matrix(&mut k);
}

/// The broker outside the node (no endpoint, reached by `toCIDR`): the tiefighter's
/// egress rules are enforced on its way out, where no ingress policy of a local
/// endpoint could see the request.
#[test]
fn kafka_to_a_broker_outside_v4_on_the_ebpf_datapath() {
    let Some(mut k) = Kafka::start_at("kafka-world4-ebpf", Broker::World, WORLD4, "ebpf") else {
        return;
    };
    core_matrix(&mut k);
}

#[test]
fn kafka_to_a_broker_outside_v6_on_the_ebpf_datapath() {
    let Some(mut k) = Kafka::start_at("kafka-world6-ebpf", Broker::World, WORLD6, "ebpf") else {
        return;
    };
    core_matrix(&mut k);
}

#[test]
fn kafka_to_a_broker_outside_v4_on_the_nft_path() {
    let Some(mut k) = Kafka::start_at("kafka-world4-nft", Broker::World, WORLD4, "nft") else {
        return;
    };
    core_matrix(&mut k);
}
