use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir_policy::identity::IdentityAllocator;
use weir_policy::{CompiledPolicy, Protocol};

use super::*;
use crate::{FlowSink, ProxyConfig};

/// A flow-record sink that keeps the lines.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn ctx(config: ProxyConfig) -> (ConnContext, Lines) {
    let policy =
        Arc::new(CompiledPolicy::compile(&[], &[], &mut IdentityAllocator::default()).unwrap());
    let lines = Lines::default();
    let shared = Shared::new(policy, FlowSink::new(Box::new(lines.clone())), config);
    let client: SocketAddr = "10.0.0.2:40000".parse().unwrap();
    let dst: SocketAddr = "10.0.0.1:53".parse().unwrap();
    (
        ConnContext::with_protocol(shared, client, dst, Protocol::Udp),
        lines,
    )
}

fn records(ctx: &ConnContext, lines: &Lines) -> Vec<serde_json::Value> {
    ctx.shared.flows.flush(Duration::from_secs(5));
    String::from_utf8(lines.0.lock().unwrap().clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn qname(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A query for `name`, type A (1), class IN.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&qname(name));
    m.extend_from_slice(&[0, 1, 0, 1]);
    m
}

/// The answer to [`query`] with one A record per address.
fn answer(id: u16, name: &str, ips: &[[u8; 4]]) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x81, 0x80, 0, 1]);
    m.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&qname(name));
    m.extend_from_slice(&[0, 1, 0, 1]);
    for ip in ips {
        m.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        m.extend_from_slice(ip);
    }
    m
}

fn forward(ctx: &ConnContext, msg: &[u8]) -> Pending {
    match decide_query(ctx, msg, true) {
        QueryAction::Forward(p) => {
            ctx.shared.flows.emit(query_record(ctx, &p));
            p
        }
        _ => panic!("not forwarded"),
    }
}

#[test]
fn answers_match_their_query_by_id_and_question() {
    let (ctx, lines) = ctx(ProxyConfig::default());
    let mut o = Outstanding::new(10);
    assert_eq!(
        o.add(forward(&ctx, &query(1, "a.example"))),
        AddOutcome::Added
    );
    assert_eq!(
        o.add(forward(&ctx, &query(2, "b.example"))),
        AddOutcome::Added
    );
    // A retransmission is tracked once.
    assert_eq!(
        o.add(forward(&ctx, &query(1, "a.example"))),
        AddOutcome::Retransmission
    );
    assert_eq!(o.len(), 2);
    // Right ID, wrong question: not the answer (a forgery or a stray).
    assert!(matches!(
        o.take_answer(&answer(1, "b.example", &[[192, 0, 2, 1]])),
        AnswerMatch::Unmatched
    ));
    // Unknown ID, garbage.
    assert!(matches!(
        o.take_answer(&answer(3, "a.example", &[])),
        AnswerMatch::Unmatched
    ));
    assert!(matches!(o.take_answer(&[1, 2, 3]), AnswerMatch::Unmatched));
    // Out of order: b first, then a.
    match o.take_answer(&answer(2, "b.example", &[[192, 0, 2, 2]])) {
        AnswerMatch::Matched(p, Ok(a)) => {
            assert_eq!(p.facts.name, "b.example.");
            let req = learn_request(&p, &a).unwrap();
            assert_eq!(req.names, ["b.example."]);
            assert_eq!(req.addresses, [("192.0.2.2".parse().unwrap(), 30)]);
            assert!(!req.selected());
            ctx.shared.flows.emit(answer_flow(&ctx, &p, &a));
        }
        _ => panic!("b's answer not matched"),
    }
    assert!(matches!(
        o.take_answer(&answer(1, "A.Example", &[])),
        AnswerMatch::Matched(_, Ok(_))
    ));
    assert!(o.is_empty());
    // An answer that arrives twice is matched once.
    assert!(matches!(
        o.take_answer(&answer(1, "a.example", &[])),
        AnswerMatch::Unmatched
    ));
    let flows = records(&ctx, &lines);
    let requests: Vec<_> = flows
        .iter()
        .filter(|f| f["l7"]["type"] == "REQUEST")
        .collect();
    assert_eq!(requests.len(), 3);
    assert!(
        requests
            .iter()
            .all(|f| f["verdict"] == "FORWARDED" && f["l4"]["UDP"]["destination_port"] == 53)
    );
    let resp = flows
        .iter()
        .find(|f| f["l7"]["type"] == "RESPONSE")
        .unwrap();
    assert_eq!(resp["l7"]["dns"]["ips"][0], "192.0.2.2");
    assert_eq!(resp["l7"]["dns"]["ttl"], 30);
    assert_eq!(resp["l7"]["dns"]["query"], "b.example.");
}

/// With many outstanding queries sharing an ID, an answer is decoded once:
/// the query is picked by its question bytes first (before, the answer was
/// decoded once per query with that ID, up to `dns_max_outstanding` times).
#[test]
fn an_answer_is_decoded_once_whatever_shares_its_id() {
    let (ctx, _lines) = ctx(ProxyConfig::default());
    let mut o = Outstanding::new(100);
    for n in 0..100 {
        o.add(forward(&ctx, &query(9, &format!("n{n}.example"))));
    }
    let before = ANSWER_DECODES.with(|c| c.get());
    match o.take_answer(&answer(9, "N99.Example", &[[192, 0, 2, 99]])) {
        AnswerMatch::Matched(p, Ok(a)) => {
            assert_eq!(p.facts.name, "n99.example.");
            // Matched case-insensitively, and learned like any other answer.
            assert_eq!(a.addresses.len(), 1);
        }
        _ => panic!("not matched"),
    }
    assert_eq!(ANSWER_DECODES.with(|c| c.get()) - before, 1);
    // Another question with that ID: nothing decoded, dropped.
    assert!(matches!(
        o.take_answer(&answer(9, "other.example", &[])),
        AnswerMatch::Unmatched
    ));
    assert_eq!(ANSWER_DECODES.with(|c| c.get()) - before, 1);
    assert_eq!(o.len(), 99);
}

/// A forwarded query's records (REQUEST, then RESPONSE or weir's SERVFAIL)
/// carry the verdict's reason as `ConnContext::flow` writes it, rendered once
/// per query and kept in `Pending::reason`.
#[test]
fn a_querys_records_carry_the_verdicts_reason() {
    let (ctx, lines) = ctx(ProxyConfig::default());
    let d = ctx.decide();
    let expected = ctx
        .flow(&d, &d.verdict.dns_verdict(&d.policy, "a.example."))
        .policy;
    assert!(!expected.is_empty());
    let mut o = Outstanding::new(10);
    o.add(forward(&ctx, &query(5, "a.example")));
    o.add(forward(&ctx, &query(6, "a.example")));
    match o.take_answer(&answer(5, "a.example", &[[192, 0, 2, 1]])) {
        AnswerMatch::Matched(p, Ok(a)) => ctx.shared.flows.emit(answer_flow(&ctx, &p, &a)),
        _ => panic!("answer not matched"),
    }
    let Some(p) = o.drain().pop() else {
        panic!("query 6 not outstanding");
    };
    servfail(&ctx, &p, "timed out").unwrap();
    let flows = records(&ctx, &lines);
    let kinds: Vec<_> = flows.iter().map(|f| f["l7"]["type"].clone()).collect();
    assert_eq!(
        kinds,
        ["REQUEST", "REQUEST", "RESPONSE", "RESPONSE"],
        "{flows:?}"
    );
    for f in &flows[..3] {
        assert_eq!(f["policy"], expected.as_str(), "{f}");
    }
    assert_eq!(flows[3]["policy"], format!("{expected} (timed out)"));
}

#[test]
fn a_malformed_answer_is_matched_and_answered_servfail() {
    let (ctx, lines) = ctx(ProxyConfig::default());
    let mut o = Outstanding::new(10);
    let q = query(7, "a.example");
    o.add(forward(&ctx, &q));
    // Right ID and question, then junk after the last record.
    let mut bad = answer(7, "a.example", &[[192, 0, 2, 1]]);
    bad.extend_from_slice(&[0xde, 0xad]);
    match o.take_answer(&bad) {
        AnswerMatch::Matched(p, Err(_)) => {
            let r = servfail(&ctx, &p, "unusable").unwrap();
            assert_eq!(&r[..2], &7u16.to_be_bytes());
            assert_eq!(r[3] & 0x0f, 2, "SERVFAIL");
        }
        _ => panic!("malformed answer not matched"),
    }
    let flows = records(&ctx, &lines);
    assert!(
        flows
            .iter()
            .any(|f| f["verdict"] == "ERROR" && f["l7"]["dns"]["rcode"] == 2),
        "{flows:?}"
    );
}

#[test]
fn outstanding_queries_are_capped_and_time_out() {
    let cfg = ProxyConfig {
        dns_upstream_timeout: Duration::from_millis(50),
        dns_max_outstanding: 2,
        ..ProxyConfig::default()
    };
    let (ctx, lines) = ctx(cfg);
    let mut o = Outstanding::new(2);
    o.add(forward(&ctx, &query(1, "a.example")));
    o.add(forward(&ctx, &query(2, "b.example")));
    assert!(!o.has_room(0));
    // Beyond the cap: SERVFAIL at once, nothing forwarded.
    match decide_query(&ctx, &query(3, "c.example"), o.has_room(0)) {
        QueryAction::Reply(r) => assert_eq!(r[3] & 0x0f, 2),
        _ => panic!("not answered SERVFAIL"),
    }
    let first = o.next_deadline().unwrap();
    assert!(first <= Instant::now() + Duration::from_millis(50));
    assert!(o.expire(Instant::now()).is_empty());
    std::thread::sleep(Duration::from_millis(60));
    let expired = o.expire(Instant::now());
    assert_eq!(expired.len(), 2);
    assert!(o.is_empty() && o.next_deadline().is_none());
    let flows = records(&ctx, &lines);
    assert!(flows.iter().any(|f| f["verdict"] == "ERROR"
        && f["drop_reason_desc"] == "DNS_TOO_MANY_OUTSTANDING"
        && f["l7"]["dns"]["query"] == "c.example."));
}

/// An outstanding query keeps its facts, not its bytes: a query padded to
/// 16 KiB (EDNS padding) costs well under 1 KiB while it waits, and its
/// SERVFAIL still carries the ID, question and OPT.
#[test]
fn outstanding_queries_do_not_keep_the_query_bytes() {
    let (ctx, _lines) = ctx(ProxyConfig::default());
    let mut q = query(21, "a.example");
    q[11] = 1; // ARCOUNT: OPT
    let pad = 16 * 1024;
    q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0]); // OPT, 4096, DO
    q.extend_from_slice(&(pad as u16 + 4).to_be_bytes());
    q.extend_from_slice(&[0, 12]); // padding (RFC 7830)
    q.extend_from_slice(&(pad as u16).to_be_bytes());
    q.resize(q.len() + pad, 0);
    let p = forward(&ctx, &q);
    assert!(p.heap_bytes() < 1024, "{} bytes kept", p.heap_bytes());
    let r = servfail(&ctx, &p, "test").unwrap();
    assert_eq!(&r[..2], &21u16.to_be_bytes());
    assert_eq!((r[3] & 0x0f, r[11]), (2, 1), "SERVFAIL with OPT");
    assert_eq!(r.len(), 12 + qname("a.example").len() + 4 + 11);
}

#[test]
fn rejected_queries_are_answered_as_the_parser_says_with_a_record() {
    let (ctx, lines) = ctx(ProxyConfig::default());
    // Two questions: FORMERR.
    let mut two = query(9, "a.example");
    two[5] = 2;
    two.extend_from_slice(&qname("b.example"));
    two.extend_from_slice(&[0, 1, 0, 1]);
    match decide_query(&ctx, &two, true) {
        QueryAction::Reply(r) => assert_eq!(r[3] & 0x0f, 1, "FORMERR"),
        _ => panic!("not answered"),
    }
    // NOTIFY (opcode 4): REFUSED.
    let mut notify = query(10, "a.example");
    notify[2] = 4 << 3;
    match decide_query(&ctx, &notify, true) {
        QueryAction::Reply(r) => assert_eq!(r[3] & 0x0f, 5, "REFUSED"),
        _ => panic!("not answered"),
    }
    // Shorter than a header: dropped.
    assert!(matches!(
        decide_query(&ctx, &[1, 2, 3], true),
        QueryAction::Drop
    ));
    let flows = records(&ctx, &lines);
    assert_eq!(flows.len(), 3);
    assert!(flows.iter().all(|f| f["verdict"] == "DROPPED"));
    assert!(
        flows[0]["drop_reason_desc"]
            .as_str()
            .unwrap()
            .contains("question_count")
    );
}

/// An answer no toFQDNs selector selects is released without waiting for the
/// learner (which here does not even exist).
#[tokio::test]
async fn unselected_answers_do_not_wait_for_the_learner() {
    let (ctx, _lines) = ctx(ProxyConfig::default());
    let req = crate::fqdn::LearnRequest {
        names: vec!["a.example.".into()],
        addresses: vec![("192.0.2.1".parse().unwrap(), 30)],
        policy: ctx.shared.policy.load_full(),
        client: crate::fqdn::DnsClient::new(std::net::IpAddr::from([10, 0, 0, 1])),
    };
    // Not selected by any policy: released without waiting.
    assert_eq!(learn_gate(&ctx.shared, req).await, Ok(()));
}

/// A message with QR set, an optional question (name, qtype) and A records
/// written with uncompressed owner names.
fn response(id: u16, question: Option<(&str, u16)>, records: &[(&str, [u8; 4])]) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x84, 0x00]);
    m.extend_from_slice(&u16::from(question.is_some()).to_be_bytes());
    m.extend_from_slice(&(records.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    if let Some((name, qtype)) = question {
        m.extend_from_slice(&qname(name));
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&[0, 1]);
    }
    for (owner, ip) in records {
        m.extend_from_slice(&qname(owner));
        m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        m.extend_from_slice(ip);
    }
    m
}

fn typed_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = query(id, name);
    let n = q.len();
    q[n - 4..n - 2].copy_from_slice(&qtype.to_be_bytes());
    q
}

/// A weir whose policy went stale after it handed over decides nothing: the
/// same query it forwarded before is dropped (the client's retry reaches the
/// new weir).
#[test]
fn a_superseded_weir_forwards_no_query() {
    let (ctx, _lines) = ctx(ProxyConfig::default());
    assert!(matches!(
        decide_query(&ctx, &query(1, "a.example"), true),
        QueryAction::Forward(_)
    ));
    ctx.shared.supersede();
    assert!(matches!(
        decide_query(&ctx, &query(2, "a.example"), true),
        QueryAction::Drop
    ));
}

/// An answer to [`query`] for `chain[0]`: a CNAME from each name of `chain`
/// to the next, then `ip` owned by the last (owner names uncompressed).
fn cname_answer(id: u16, chain: &[&str], ip: [u8; 4]) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x81, 0x80, 0, 1]);
    m.extend_from_slice(&(chain.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&qname(chain[0]));
    m.extend_from_slice(&[0, 1, 0, 1]);
    for pair in chain.windows(2) {
        let target = qname(pair[1]);
        m.extend_from_slice(&qname(pair[0]));
        m.extend_from_slice(&[0, 5, 0, 1, 0, 0, 0, 60]);
        m.extend_from_slice(&(target.len() as u16).to_be_bytes());
        m.extend_from_slice(&target);
    }
    m.extend_from_slice(&qname(chain[chain.len() - 1]));
    m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    m.extend_from_slice(&ip);
    m
}

/// A CNAME chain is the resolver's word: a client whose DNS rules allow only
/// `*.attacker.example` gets an answer `x.attacker.example CNAME
/// bank.example`, `bank.example A 6.6.6.6` from a resolver that does not
/// scrub (or its own), released as it came, but it must not teach the
/// node's `toFQDNs: bank.example` selector that address. A chain name the
/// client could have asked for still teaches; with a DNS rule that allows
/// every name the same answer teaches `bank.example` (so the check can fail).
#[test]
fn a_cname_target_the_client_may_not_ask_for_teaches_no_selector() {
    let policy_for = |dns_rules: &str| {
        let endpoints = "endpoints:\n  - {name: app, ips: [10.0.0.2], labels: {app: x}}\n";
        let policy = format!(
            "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: dns}}
spec:
  endpointSelector: {{matchLabels: {{app: x}}}}
  egress:
  - toCIDR: [10.0.0.1/32]
    toPorts:
    - ports: [{{port: '53', protocol: UDP}}]
      rules:
        dns: {dns_rules}
  - toFQDNs: [{{matchName: bank.example}}, {{matchPattern: '*.attacker.example'}}]
"
        );
        let p = weir_policy::parse_policies(&policy, "p.yaml").unwrap();
        let e = weir_policy::parse_endpoints(endpoints, "e.yaml").unwrap();
        Arc::new(CompiledPolicy::compile(&p, &e, &mut IdentityAllocator::default()).unwrap())
    };
    let learned = |policy: Arc<CompiledPolicy>, chain: &[&str]| {
        let shared = Shared::new(
            policy,
            FlowSink::new(Box::new(std::io::sink())),
            ProxyConfig::default(),
        );
        let ctx = ConnContext::with_protocol(
            shared,
            "10.0.0.2:40000".parse().unwrap(),
            "10.0.0.1:53".parse().unwrap(),
            Protocol::Udp,
        );
        let mut out = Outstanding::new(10);
        out.add(forward(&ctx, &query(9, chain[0])));
        let AnswerMatch::Matched(p, Ok(facts)) =
            out.take_answer(&cname_answer(9, chain, [6, 6, 6, 6]))
        else {
            panic!("the answer matches its query");
        };
        // The record keeps the whole chain.
        assert_eq!(facts.cnames.len(), chain.len() - 1);
        let req = learn_request(&p, &facts).expect("an address");
        let names: Vec<String> = facts.names().map(str::to_string).collect();
        assert_eq!(req.names, names);
        (names, req.selected_by(&p.decision.policy), req)
    };
    let strict = policy_for("[{matchPattern: '*.attacker.example'}]");
    let (names, _, req) = learned(strict.clone(), &["x.attacker.example", "bank.example"]);
    assert_eq!(names, ["x.attacker.example."]);
    // Selected by `*.attacker.example` only: `bank.example`'s selector never sees 6.6.6.6.
    assert!(
        req.names
            .iter()
            .all(|n| strict.fqdn_selectors_matching(n).len() == 1)
    );
    // A name in the middle is withheld on its own; the rest of the chain teaches.
    let (names, selected, _) = learned(
        strict,
        &["x.attacker.example", "bank.example", "y.attacker.example"],
    );
    assert_eq!(names, ["x.attacker.example.", "y.attacker.example."]);
    assert!(selected);
    // Allowed to ask for every name: the chain teaches `bank.example` too.
    let open = policy_for("[{matchPattern: '*'}]");
    let (names, _, req) = learned(open.clone(), &["x.attacker.example", "bank.example"]);
    assert_eq!(names, ["x.attacker.example.", "bank.example."]);
    assert!(
        req.names
            .iter()
            .any(|n| n == "bank.example." && !open.fqdn_selectors_matching(n).is_empty())
    );
}

mod over_tcp {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use weir_parsers::dns::{TcpDnsFramer, tcp_frame};

    use super::*;

    pub(super) async fn read_message(
        s: &mut TcpStream,
        framer: &mut TcpDnsFramer,
    ) -> Option<Vec<u8>> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = framer.next_message().unwrap() {
                return Some(m);
            }
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => framer.push(&buf[..n]),
                Err(_) => panic!("nothing read within 5 s"),
            }
        }
    }

    /// A proxy connection (as `dns::tcp::serve` gets it) towards `resolver`;
    /// returns the client's end.
    async fn proxied(config: ProxyConfig, resolver: SocketAddr) -> TcpStream {
        let (ctx, _lines) = ctx(config);
        proxied_shared(ctx.shared.clone(), resolver, None).await
    }

    /// [`proxied`] with the given `Shared`; `rcvbuf` sets the client's receive
    /// buffer (small: a client that does not read stalls the proxy soon).
    pub(super) async fn proxied_shared(
        shared: Arc<Shared>,
        resolver: SocketAddr,
        rcvbuf: Option<u32>,
    ) -> TcpStream {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(n) = rcvbuf {
            sock.set_recv_buffer_size(n).unwrap();
        }
        let client = sock.connect(front.local_addr().unwrap()).await.unwrap();
        let (accepted, peer) = front.accept().await.unwrap();
        let ctx = Arc::new(ConnContext::new(shared, peer, resolver));
        tokio::spawn(tcp::serve(ctx, accepted));
        client
    }

    /// A client that sends a zone-transfer query and never reads: once the
    /// proxy cannot write an answer within `idle_timeout` it closes the client
    /// and the resolver connection (before, the connection was held forever),
    /// with a flow record naming the reason.
    #[tokio::test]
    async fn a_client_that_stops_reading_is_closed() {
        let resolver = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = resolver.local_addr().unwrap();
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = resolver.accept().await.unwrap();
            let mut f = TcpDnsFramer::default();
            read_message(&mut s, &mut f).await.unwrap();
            // Endless ~46 KB transfer messages until the proxy goes away.
            let records: Vec<(&str, [u8; 4])> = vec![("example", [198, 51, 100, 1]); 2000];
            let first = tcp_frame(&response(3, Some(("example", 252)), &records)).unwrap();
            let next = tcp_frame(&response(3, None, &records)).unwrap();
            let mut sent = 0usize;
            let mut r = s.write_all(&first).await;
            while r.is_ok() {
                sent += next.len();
                r = s.write_all(&next).await;
            }
            let _ = gone_tx.send(sent);
        });
        let cfg = ProxyConfig {
            idle_timeout: Duration::from_millis(300),
            ..ProxyConfig::default()
        };
        let (ctx, lines) = ctx(cfg);
        let mut client = proxied_shared(ctx.shared.clone(), addr, Some(4096)).await;
        client
            .write_all(&tcp_frame(&typed_query(3, "example", 252)).unwrap())
            .await
            .unwrap();
        let sent = tokio::time::timeout(Duration::from_secs(20), gone_rx)
            .await
            .expect("the resolver connection was held open")
            .unwrap();
        assert!(sent > 0);
        // The client's connection is reset (or ends) too.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
                Err(_) => panic!("client connection still open"),
            }
        }
        let flows = records(&ctx, &lines);
        assert!(
            flows
                .iter()
                .any(|f| f["drop_reason_desc"] == "DNS_CLIENT_WRITE_TIMEOUT"),
            "{flows:?}"
        );
    }

    /// Pipelined queries answered out of order by the resolver come back matched
    /// by ID; a zone transfer's messages come through in order; a stray answer
    /// is dropped.
    #[tokio::test]
    async fn pipelined_queries_out_of_order_answers_and_a_zone_transfer() {
        let resolver = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = resolver.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = resolver.accept().await.unwrap();
            let mut f = TcpDnsFramer::default();
            let mut ids = Vec::new();
            for _ in 0..3 {
                let q = read_message(&mut s, &mut f).await.unwrap();
                ids.push(u16::from_be_bytes([q[0], q[1]]));
            }
            assert_eq!(ids, [1, 2, 3], "forwarded in order");
            let mut out = Vec::new();
            // A stray answer with an unknown ID, then b before a, then the
            // transfer in three messages.
            for m in [
                response(
                    77,
                    Some(("b.example", 1)),
                    &[("b.example", [192, 0, 2, 77])],
                ),
                response(2, Some(("b.example", 1)), &[("b.example", [192, 0, 2, 2])]),
                response(1, Some(("a.example", 1)), &[("a.example", [192, 0, 2, 1])]),
                response(3, Some(("example", 252)), &[("example", [198, 51, 100, 1])]),
                response(3, None, &[("example", [198, 51, 100, 2])]),
                response(3, None, &[("example", [198, 51, 100, 3])]),
            ] {
                out.extend_from_slice(&tcp_frame(&m).unwrap());
            }
            s.write_all(&out).await.unwrap();
            // Keep the connection open until the client is done.
            let _ = s.read(&mut [0u8; 16]).await;
        });
        let mut client = proxied(ProxyConfig::default(), addr).await;
        let mut out = Vec::new();
        for q in [
            query(1, "a.example"),
            query(2, "b.example"),
            typed_query(3, "example", 252),
        ] {
            out.extend_from_slice(&tcp_frame(&q).unwrap());
        }
        client.write_all(&out).await.unwrap();
        let mut f = TcpDnsFramer::default();
        let mut got = Vec::new();
        for _ in 0..5 {
            let m = read_message(&mut client, &mut f).await.unwrap();
            got.push((u16::from_be_bytes([m[0], m[1]]), m[m.len() - 1]));
        }
        assert_eq!(got, [(2, 2), (1, 1), (3, 1), (3, 2), (3, 3)]);
    }

    /// A resolver that never answers: SERVFAIL after the upstream timeout. A
    /// bad length prefix from the client closes the connection.
    #[tokio::test]
    async fn silent_resolver_servfail_and_bad_frames_close() {
        let resolver = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = resolver.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = resolver.accept().await.unwrap();
            let mut sink = [0u8; 4096];
            while s.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        let cfg = ProxyConfig {
            dns_upstream_timeout: Duration::from_millis(100),
            ..ProxyConfig::default()
        };
        let mut client = proxied(cfg, addr).await;
        let started = Instant::now();
        client
            .write_all(&tcp_frame(&query(5, "a.example")).unwrap())
            .await
            .unwrap();
        let mut f = TcpDnsFramer::default();
        let m = read_message(&mut client, &mut f).await.unwrap();
        assert_eq!((m[1], m[3] & 0x0f), (5, 2), "SERVFAIL for id 5");
        assert!(started.elapsed() >= Duration::from_millis(100));
        client.write_all(&[0, 5, 1, 2, 3, 4, 5]).await.unwrap();
        assert!(read_message(&mut client, &mut f).await.is_none(), "closed");
    }

    /// A client that sends a message a byte at a time, each byte within
    /// `idle_timeout` of the last, is closed once the message has not
    /// completed within `idle_timeout` of its first byte (before, each byte
    /// renewed the idle timer and the connection was held for as long as the
    /// client liked).
    #[tokio::test]
    async fn a_message_trickled_in_is_cut_off() {
        let resolver = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = ProxyConfig {
            idle_timeout: Duration::from_millis(300),
            ..ProxyConfig::default()
        };
        let (ctx, lines) = ctx(cfg);
        let client = proxied_shared(ctx.shared.clone(), resolver.local_addr().unwrap(), None).await;
        let (mut rd, mut wr) = client.into_split();
        let frame = tcp_frame(&query(8, "a.example")).unwrap();
        tokio::spawn(async move {
            for b in frame {
                if wr.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            std::future::pending::<()>().await;
        });
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(2), rd.read(&mut [0u8; 64])).await;
        assert!(
            matches!(r, Ok(Ok(0) | Err(_))),
            "still open after {:?}",
            started.elapsed()
        );
        let flows = records(&ctx, &lines);
        assert!(
            flows
                .iter()
                .any(|f| f["drop_reason_desc"] == "DNS_FRAME_TIMEOUT"),
            "{flows:?}"
        );
    }

    /// A resolver that accepts and never reads: once its window is full the
    /// proxy's write waits at most the upstream timeout, then every query on
    /// the connection is answered SERVFAIL (before, the write waited forever
    /// and the client never heard back).
    #[tokio::test]
    async fn a_resolver_that_stops_reading_gets_servfail_not_a_hang() {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let resolver = sock.listen(16).unwrap();
        let addr = resolver.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let (s, _) = resolver.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let cfg = ProxyConfig {
            dns_upstream_timeout: Duration::from_millis(300),
            dns_max_outstanding: 1000,
            ..ProxyConfig::default()
        };
        let client = proxied(cfg, addr).await;
        let (mut rd, mut wr) = client.into_split();
        // 16 MiB of queries: far more than the socket buffers between the
        // proxy and a resolver that reads nothing.
        let n = 1000u16;
        let writer = tokio::spawn(async move {
            for id in 0..n {
                let mut q = query(id, "a.example");
                q[11] = 1; // ARCOUNT: OPT with 16 KiB of padding
                let pad = 16 * 1024u16;
                q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0]);
                q.extend_from_slice(&(pad + 4).to_be_bytes());
                q.extend_from_slice(&[0, 12]);
                q.extend_from_slice(&pad.to_be_bytes());
                q.resize(q.len() + usize::from(pad), 0);
                if wr.write_all(&tcp_frame(&q).unwrap()).await.is_err() {
                    break;
                }
            }
            wr
        });
        let mut f = TcpDnsFramer::default();
        let mut buf = vec![0u8; 65536];
        let mut servfails = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while servfails < n && Instant::now() < deadline {
            while let Some(m) = f.next_message().unwrap() {
                assert_eq!(m[3] & 0x0f, 2, "SERVFAIL");
                servfails += 1;
            }
            if servfails == n {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(k)) => f.push(&buf[..k]),
                Err(_) => panic!("no answer within 5 s: the proxy hangs ({servfails} answered)"),
            }
        }
        assert_eq!(servfails, n, "every query answered");
        let _ = writer.await;
        held.abort();
    }

    /// Nothing listens upstream: the query gets SERVFAIL at once, so does the
    /// next one within a second; once the resolver is back and a second has
    /// passed, the same client connection is answered again.
    #[tokio::test]
    async fn failed_upstream_connect_answers_servfail_then_retries() {
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        let mut client = proxied(ProxyConfig::default(), addr).await;
        let mut f = TcpDnsFramer::default();
        for id in [6, 7] {
            client
                .write_all(&tcp_frame(&query(id, "a.example")).unwrap())
                .await
                .unwrap();
            let m = read_message(&mut client, &mut f).await.unwrap();
            assert_eq!((m[1], m[3] & 0x0f), (id as u8, 2));
        }
        // The resolver comes back on the same port.
        let back = TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move {
            let (mut s, _) = back.accept().await.unwrap();
            let mut rf = TcpDnsFramer::default();
            while let Some(q) = read_message(&mut s, &mut rf).await {
                let id = u16::from_be_bytes([q[0], q[1]]);
                let a = answer(id, "a.example", &[[192, 0, 2, 1]]);
                s.write_all(&tcp_frame(&a).unwrap()).await.unwrap();
            }
        });
        tokio::time::sleep(Duration::from_millis(1100)).await;
        client
            .write_all(&tcp_frame(&query(8, "a.example")).unwrap())
            .await
            .unwrap();
        let m = read_message(&mut client, &mut f).await.unwrap();
        assert_eq!((m[1], m[3] & 0x0f), (8, 0), "answered by the resolver");
    }
}

mod learning {
    use tokio::sync::oneshot;

    use super::*;
    use crate::fqdn::{FqdnLearner, LearnError};

    /// Answers each request as `reply` says (`None`: holds it and never answers);
    /// says every answer's pairs are committed while `committed` is set.
    struct Learner {
        reply: Option<Result<(), LearnError>>,
        held: Mutex<Vec<oneshot::Sender<Result<(), LearnError>>>>,
        waits: Mutex<Vec<bool>>,
        committed: std::sync::atomic::AtomicBool,
    }

    impl FqdnLearner for Learner {
        fn try_committed(
            &self,
            _policy: &CompiledPolicy,
            _answer: &weir_parsers::dns::AnswerFacts,
        ) -> bool {
            self.committed.load(std::sync::atomic::Ordering::Relaxed)
        }

        fn learn(
            &self,
            _req: LearnRequest,
            wait: bool,
        ) -> oneshot::Receiver<Result<(), LearnError>> {
            self.waits.lock().unwrap().push(wait);
            let (tx, rx) = oneshot::channel();
            match &self.reply {
                Some(r) => {
                    let _ = tx.send(r.clone());
                }
                None => self.held.lock().unwrap().push(tx),
            }
            rx
        }
    }

    const FQDN_POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn}
spec:
  endpointSelector: {matchLabels: {app: x}}
  egress:
  - toFQDNs: [{matchName: selected.example}]
";

    fn shared_with(reply: Option<Result<(), LearnError>>) -> (Arc<Shared>, Arc<Learner>) {
        let config = ProxyConfig {
            dns_learn_timeout: Duration::from_millis(50),
            ..ProxyConfig::default()
        };
        shared_with_config(reply, config)
    }

    fn shared_with_config(
        reply: Option<Result<(), LearnError>>,
        config: ProxyConfig,
    ) -> (Arc<Shared>, Arc<Learner>) {
        let policies = weir_policy::parse_policies(FQDN_POLICY, "p.yaml").unwrap();
        let policy = Arc::new(
            CompiledPolicy::compile(&policies, &[], &mut IdentityAllocator::default()).unwrap(),
        );
        let shared = Shared::new(policy, FlowSink::new(Box::new(std::io::sink())), config);
        let learner = Arc::new(Learner {
            reply,
            held: Mutex::default(),
            waits: Mutex::default(),
            committed: Default::default(),
        });
        assert!(shared.set_fqdn_learner(learner.clone()));
        (shared, learner)
    }

    fn req(shared: &Shared, name: &str) -> LearnRequest {
        LearnRequest {
            names: vec![name.into(), "cname.example.".into()],
            addresses: vec![("192.0.2.1".parse().unwrap(), 30)],
            policy: shared.policy.load_full(),
            client: crate::fqdn::DnsClient::new(std::net::IpAddr::from([10, 0, 0, 1])),
        }
    }

    /// A resolver on loopback that answers every query at once with one A
    /// record for its question's name (`selected.example` or another).
    async fn answering_resolver() -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use weir_parsers::dns::{TcpDnsFramer, tcp_frame};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut f = TcpDnsFramer::default();
            let mut buf = [0u8; 4096];
            loop {
                while let Some(q) = f.next_message().unwrap() {
                    let mut a = q.clone();
                    a[2] |= 0x80; // QR
                    a[7] = 1; // ANCOUNT
                    a.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 192, 0, 2, 1]);
                    if s.write_all(&tcp_frame(&a).unwrap()).await.is_err() {
                        return;
                    }
                }
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => f.push(&buf[..n]),
                }
            }
        });
        addr
    }

    /// A conn whose only pending work is a release waiting for the learner does
    /// not spin (its idle deadline is past: before, `sleep_until` fired at once
    /// on every turn of the loop).
    #[tokio::test]
    async fn a_waiting_release_does_not_spin_the_conn() {
        use tokio::io::AsyncWriteExt;
        use weir_parsers::dns::{TcpDnsFramer, tcp_frame};
        let config = ProxyConfig {
            idle_timeout: Duration::from_millis(20),
            dns_learn_timeout: Duration::from_millis(600),
            ..ProxyConfig::default()
        };
        let (shared, learner) = shared_with_config(None, config);
        let resolver = answering_resolver().await;
        let mut client = super::over_tcp::proxied_shared(shared, resolver, None).await;
        client
            .write_all(&tcp_frame(&query(1, "selected.example")).unwrap())
            .await
            .unwrap();
        // The answer is parked on the learner; the idle deadline passes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(learner.held.lock().unwrap().len(), 1, "answer not parked");
        let before = tcp::LOOP_TURNS.with(|c| c.get());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let turns = tcp::LOOP_TURNS.with(|c| c.get()) - before;
        assert!(turns < 20, "{turns} loop turns while waiting");
        // The release then fails closed: SERVFAIL.
        let mut f = TcpDnsFramer::default();
        let m = super::over_tcp::read_message(&mut client, &mut f)
            .await
            .unwrap();
        assert_eq!((m[1], m[3] & 0x0f), (1, 2));
    }

    /// Answers parked on the learner count toward `dns_max_outstanding`: with
    /// two parked, a third query is answered SERVFAIL at once (before, the
    /// query was forwarded — it had left the outstanding table — and parked
    /// answers grew without limit).
    #[tokio::test]
    async fn parked_answers_count_toward_the_outstanding_cap() {
        use tokio::io::AsyncWriteExt;
        use weir_parsers::dns::{TcpDnsFramer, tcp_frame};
        let config = ProxyConfig {
            dns_learn_timeout: Duration::from_secs(3),
            dns_max_outstanding: 2,
            ..ProxyConfig::default()
        };
        let (shared, learner) = shared_with_config(None, config);
        let resolver = answering_resolver().await;
        let mut client = super::over_tcp::proxied_shared(shared, resolver, None).await;
        for id in 1..=2 {
            client
                .write_all(&tcp_frame(&query(id, "selected.example")).unwrap())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(learner.held.lock().unwrap().len(), 2, "answers not parked");
        let started = Instant::now();
        client
            .write_all(&tcp_frame(&query(3, "selected.example")).unwrap())
            .await
            .unwrap();
        let mut f = TcpDnsFramer::default();
        let m = super::over_tcp::read_message(&mut client, &mut f)
            .await
            .unwrap();
        assert_eq!((m[1], m[3] & 0x0f), (3, 2), "SERVFAIL for the third");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(learner.held.lock().unwrap().len(), 2, "third not forwarded");
    }

    /// An answer whose pairs the datapath holds goes at once, without a learn
    /// request (this learner would refuse one); otherwise the request is made.
    #[test]
    fn a_committed_answer_is_released_without_a_learn_request() {
        let (shared, learner) = shared_with(Some(Err(LearnError::Datapath("refused".into()))));
        let ctx = ConnContext::with_protocol(
            shared,
            "10.0.0.2:5353".parse().unwrap(),
            "10.0.0.1:53".parse().unwrap(),
            Protocol::Udp,
        );
        let q = query(1, "selected.example");
        let p = Pending {
            facts: weir_parsers::dns::inspect_query(&q).unwrap(),
            decision: ctx.decide(),
            verdict: ctx.decide().verdict.l4_verdict(),
            reason: String::new(),
            sent: Instant::now(),
            deadline: Instant::now(),
            timeout: Duration::from_secs(1),
            answered: false,
            client: crate::fqdn::DnsClient::new(std::net::IpAddr::from([10, 0, 0, 1])),
        };
        let a = answer(1, "selected.example", &[[192, 0, 2, 1]]);
        let facts = weir_parsers::dns::inspect_answer(&a, &p.facts).unwrap();
        learner
            .committed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(matches!(gate(&ctx.shared, &p, &facts), Gate::Open));
        assert!(learner.waits.lock().unwrap().is_empty(), "no request");
        learner
            .committed
            .store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(matches!(gate(&ctx.shared, &p, &facts), Gate::Closed(_)));
        assert_eq!(*learner.waits.lock().unwrap(), [true]);
    }

    /// A name that only the policy in force now selects (the query was decided
    /// under one without the selector) still waits for the learner.
    #[tokio::test]
    async fn a_name_selected_by_the_current_policy_waits() {
        let (shared, learner) = shared_with(Some(Ok(())));
        let old =
            Arc::new(CompiledPolicy::compile(&[], &[], &mut IdentityAllocator::default()).unwrap());
        let mut r = req(&shared, "selected.example.");
        r.policy = old;
        assert!(!r.selected());
        assert_eq!(learn_gate(&shared, r).await, Ok(()));
        assert_eq!(*learner.waits.lock().unwrap(), [true]);
    }

    /// A selected name's answer waits for the learner and is released only on
    /// its success; an error or no reply within `dns_learn_timeout` keeps it
    /// back. Other names only feed the learner.
    #[tokio::test]
    async fn selected_names_wait_for_the_learner_and_fail_closed() {
        let (shared, learner) = shared_with(Some(Ok(())));
        assert_eq!(
            learn_gate(&shared, req(&shared, "selected.example.")).await,
            Ok(())
        );
        assert_eq!(
            learn_gate(&shared, req(&shared, "other.example.")).await,
            Ok(())
        );
        assert_eq!(*learner.waits.lock().unwrap(), [true, false]);

        let (shared, _) = shared_with(Some(Err(LearnError::Datapath("map full".into()))));
        let r = learn_gate(&shared, req(&shared, "selected.example.")).await;
        assert!(r.unwrap_err().contains("map full"));
        assert_eq!(
            learn_gate(&shared, req(&shared, "other.example.")).await,
            Ok(())
        );

        let (shared, _) = shared_with(None);
        let started = Instant::now();
        let r = learn_gate(&shared, req(&shared, "selected.example.")).await;
        assert!(r.unwrap_err().contains("did not answer"));
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}

/// A zone transfer stays outstanding for its next messages, its timeout
/// counting from the last one; once answered it expires quietly.
#[test]
fn zone_transfers_stay_outstanding_between_messages() {
    let cfg = ProxyConfig {
        dns_upstream_timeout: Duration::from_millis(40),
        ..ProxyConfig::default()
    };
    let (ctx, _lines) = ctx(cfg);
    let mut o = Outstanding::new(4);
    o.add(forward(&ctx, &typed_query(3, "example", 252)));
    std::thread::sleep(Duration::from_millis(30));
    let first = response(3, Some(("example", 252)), &[("example", [198, 51, 100, 1])]);
    assert!(matches!(
        o.take_answer(&first),
        AnswerMatch::Matched(_, Ok(_))
    ));
    std::thread::sleep(Duration::from_millis(20));
    assert!(o.expire(Instant::now()).is_empty(), "deadline moved on");
    let next = response(3, None, &[("example", [198, 51, 100, 2])]);
    assert!(matches!(
        o.take_answer(&next),
        AnswerMatch::Matched(_, Ok(_))
    ));
    std::thread::sleep(Duration::from_millis(50));
    let expired = o.expire(Instant::now());
    assert!(expired.len() == 1 && expired[0].answered);
}

/// Every message of a zone transfer can be failed with SERVFAIL (a learn that
/// fails, an unusable message): the copy handed out per message keeps the
/// query's facts. Before, it kept no query bytes, SERVFAIL came out `None`
/// and the client got nothing. A non-NOERROR message ends the transfer as
/// failed on the client's side (RFC 5936 §2.2).
#[test]
fn every_zone_transfer_message_can_be_answered_servfail() {
    let (ctx, lines) = ctx(ProxyConfig::default());
    let mut o = Outstanding::new(4);
    o.add(forward(&ctx, &typed_query(3, "example", 252)));
    for m in [
        response(3, Some(("example", 252)), &[("example", [198, 51, 100, 1])]),
        response(3, None, &[("example", [198, 51, 100, 2])]),
    ] {
        let AnswerMatch::Matched(p, Ok(_)) = o.take_answer(&m) else {
            panic!("transfer message not matched");
        };
        let r = servfail(&ctx, &p, "the learner failed").expect("a SERVFAIL");
        assert_eq!(&r[..2], &3u16.to_be_bytes());
        assert_eq!((r[3] & 0x0f, r[5]), (2, 1), "SERVFAIL with the question");
    }
    let flows = records(&ctx, &lines);
    assert_eq!(
        flows
            .iter()
            .filter(|f| f["l7"]["dns"]["rcode"] == 2 && f["l7"]["type"] == "RESPONSE")
            .count(),
        2
    );
}

// ---- dns-review reproducers (branch `dns-review`): each asserts what an
// attacker / a real client gets TODAY; a fix flips the marked assertions. ----
mod review_findings {
    use tokio::sync::oneshot;

    use super::*;
    use crate::fqdn::{FqdnLearner, LearnError};

    /// A learner that refuses every request and counts them: an answer that
    /// passes the gate with this learner was released without the datapath
    /// being asked to hold anything.
    #[derive(Default)]
    struct Refusing {
        calls: Mutex<usize>,
    }

    impl FqdnLearner for Refusing {
        fn learn(
            &self,
            _req: LearnRequest,
            _wait: bool,
        ) -> oneshot::Receiver<Result<(), LearnError>> {
            *self.calls.lock().unwrap() += 1;
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(LearnError::Datapath("refused (review learner)".into())));
            rx
        }
    }

    const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn}
spec:
  endpointSelector: {matchLabels: {app: x}}
  egress:
  - toFQDNs: [{matchName: selected.example}]
";

    /// Shared state with [`POLICY`] installed and `learner` as the FQDN learner.
    fn shared_with(learner: Arc<dyn FqdnLearner>) -> Arc<Shared> {
        let policies = weir_policy::parse_policies(POLICY, "p.yaml").unwrap();
        let policy = Arc::new(
            CompiledPolicy::compile(&policies, &[], &mut IdentityAllocator::default()).unwrap(),
        );
        let shared = Shared::new(
            policy,
            FlowSink::new(Box::new(std::io::sink())),
            ProxyConfig::default(),
        );
        assert!(shared.set_fqdn_learner(learner));
        shared
    }

    fn setup() -> (ConnContext, Arc<Refusing>) {
        let learner = Arc::new(Refusing::default());
        let shared = shared_with(learner.clone());
        let ctx = ConnContext::with_protocol(
            shared,
            "10.0.0.2:5353".parse().unwrap(),
            "10.0.0.1:53".parse().unwrap(),
            Protocol::Udp,
        );
        (ctx, learner)
    }

    /// The facts of answer `a` to query `q`, outstanding on a fresh flow.
    fn matched(ctx: &ConnContext, q: &[u8], a: &[u8]) -> (Box<Pending>, AnswerFacts) {
        let mut out = Outstanding::new(10);
        out.add(pending(ctx, q));
        let AnswerMatch::Matched(p, Ok(facts)) = out.take_answer(a) else {
            panic!("the answer matches the query");
        };
        (p, facts)
    }

    fn pending(ctx: &ConnContext, q: &[u8]) -> Pending {
        let d = ctx.decide();
        Pending {
            facts: weir_parsers::dns::inspect_query(q).unwrap(),
            verdict: d.verdict.l4_verdict(),
            decision: d,
            reason: String::new(),
            sent: Instant::now(),
            deadline: Instant::now() + Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            answered: false,
            client: crate::fqdn::DnsClient::new(std::net::IpAddr::from([10, 0, 0, 1])),
        }
    }

    /// The A record addresses in `msg` (built by [`answer`]: one question,
    /// then 16-byte A records whose owner is a pointer to the question name,
    /// which a client compares case-insensitively: glibc `res_queriesmatch`
    /// / `ns_samename`, musl, Go).
    fn client_addresses(msg: &[u8], _qname: &str) -> Vec<std::net::IpAddr> {
        let ancount = usize::from(u16::from_be_bytes([msg[6], msg[7]]));
        let start = msg.len() - ancount * 16;
        msg[start..]
            .chunks(16)
            .filter(|r| r[..4] == [0xc0, 0x0c, 0, 1])
            .map(|r| std::net::IpAddr::from([r[12], r[13], r[14], r[15]]))
            .collect()
    }

    /// Review finding F1 (fixed; it was released unlearned): the client asks `SELECTED.example` (an application or
    /// stub that keeps the name's case; no 0x20 check of its own), the resolver
    /// answers with the question lower-cased (as some resolvers/forwarders do).
    /// The answer matches the query (ID, question case-insensitively), weir
    /// learns nothing from it (`exact_question` in parsers' answer.rs), and the
    /// gate opens at once: the client gets 192.0.2.1 for a name a `toFQDNs`
    /// selector selects while the datapath was never asked to allow it; its
    /// SYN to 192.0.2.1 is dropped. Issue 9: "Never release an answer whose
    /// connection the datapath would drop".
    #[test]
    fn a_case_changed_answer_is_gated() {
        let (ctx, learner) = setup();
        let a = answer(7, "selected.example", &[[192, 0, 2, 1]]);
        let (p, facts) = matched(&ctx, &query(7, "SELECTED.example"), &a);
        // What the client takes from the bytes weir forwards unchanged:
        assert_eq!(
            client_addresses(&a, "SELECTED.example."),
            vec!["192.0.2.1".parse::<std::net::IpAddr>().unwrap()]
        );
        // Learned, so gated: this learner refuses, the client gets SERVFAIL.
        assert_eq!(facts.addresses.len(), 1);
        assert!(matches!(gate(&ctx.shared, &p, &facts), Gate::Closed(_)));
        assert_eq!(*learner.calls.lock().unwrap(), 1);
    }

    /// Review finding F2 (fixed): a UDP answer with TC set that still decodes
    /// completely (a resolver that sets TC but keeps the records that fit) was
    /// released with its A record and nothing learned. A client that uses a
    /// truncated answer's records instead of retrying over TCP (musl before
    /// 1.2.4 never retried over TCP) connects to an address the datapath
    /// does not hold.
    #[test]
    fn a_truncated_answer_with_addresses_is_gated() {
        let (ctx, learner) = setup();
        let mut a = answer(8, "selected.example", &[[192, 0, 2, 2]]);
        a[2] |= 0x02; // TC
        let (p, facts) = matched(&ctx, &query(8, "selected.example"), &a);
        assert!(facts.truncated);
        assert_eq!(client_addresses(&a, "selected.example.").len(), 1);
        // Learned, so gated: this learner refuses, the client gets SERVFAIL.
        assert_eq!(facts.addresses.len(), 1);
        assert!(matches!(gate(&ctx.shared, &p, &facts), Gate::Closed(_)));
        assert_eq!(*learner.calls.lock().unwrap(), 1);
    }

    /// Second review, finding 1 (fixed): a truncated answer that does not
    /// decode — cut mid-record (the answer count says two, one A record is
    /// there), or a complete one with a byte past its end — was released as it
    /// came, its complete A record unlearned; a stub that uses the records
    /// before the cut (musl before 1.2.4) then connects to an address the
    /// datapath drops. Now the client gets TC and the question only, and
    /// retries over TCP.
    #[test]
    fn a_truncated_answer_that_does_not_decode_is_replaced_by_tc_and_the_question() {
        let (ctx, learner) = setup();
        let q = query(21, "selected.example");
        let mut cut = answer(21, "selected.example", &[[192, 0, 2, 21]]);
        cut[2] |= 0x02; // TC
        cut[7] = 2; // two answers announced, one there
        let mut trailing = answer(22, "selected.example", &[[192, 0, 2, 22]]);
        trailing[2] |= 0x02;
        trailing.push(0);
        for (id, a) in [(21u16, cut), (22, trailing)] {
            let mut q = q.clone();
            q[..2].copy_from_slice(&id.to_be_bytes());
            let (p, facts) = matched(&ctx, &q, &a);
            assert!(facts.truncated && !facts.decoded);
            assert!(facts.addresses.is_empty());
            // The resolver's bytes would have given the client an address...
            assert!(a.windows(4).any(|w| w == [192, 0, 2, id as u8]));
            // ...what it gets instead: same ID, QR and TC set, the question, no records.
            let r = replacement(&p, &facts).expect("replaced");
            assert_eq!(&r[..2], &id.to_be_bytes());
            assert_eq!(r[2] & 0x82, 0x82, "QR and TC");
            assert_eq!(&r[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
            assert!(client_addresses(&r, "selected.example.").is_empty());
            let asked = weir_parsers::dns::inspect_query(&q).unwrap();
            assert_eq!(&r[12..], &asked.question_wire[..]);
        }
        assert_eq!(*learner.calls.lock().unwrap(), 0);
        // Control: the same answer, TC set, complete: not replaced, and gated.
        let mut whole = answer(23, "selected.example", &[[192, 0, 2, 23]]);
        whole[2] |= 0x02;
        let (p, facts) = matched(&ctx, &query(23, "selected.example"), &whole);
        assert!(facts.decoded);
        assert!(replacement(&p, &facts).is_none());
        assert!(matches!(gate(&ctx.shared, &p, &facts), Gate::Closed(_)));
    }

    /// Second review, finding 3 (fixed): an error answer without a question
    /// (header only) was given to the first outstanding query with its ID,
    /// though it may have been another's; that query's real answer was then
    /// dropped. With two queries of that ID outstanding it now matches
    /// neither; with one, it is that one's.
    #[test]
    fn a_header_only_error_answer_matches_only_an_unambiguous_query() {
        let (ctx, _learner) = setup();
        let mut err = 26u16.to_be_bytes().to_vec();
        err.extend_from_slice(&[0x81, 0x82, 0, 0, 0, 0, 0, 0, 0, 0]); // SERVFAIL, no question
        let mut out = Outstanding::new(10);
        out.add(pending(&ctx, &query(26, "a.example")));
        out.add(pending(&ctx, &query(26, "b.example")));
        assert!(matches!(out.take_answer(&err), AnswerMatch::Unmatched));
        // Each still gets its own answer.
        for name in ["a.example", "b.example"] {
            let real = answer(26, name, &[[192, 0, 2, 26]]);
            let AnswerMatch::Matched(p, Ok(_)) = out.take_answer(&real) else {
                panic!("{name}'s answer matches it");
            };
            assert_eq!(p.facts.name, format!("{name}."));
        }
        // Control: with one query of that ID, the error answer is its.
        out.add(pending(&ctx, &query(26, "c.example")));
        let AnswerMatch::Matched(p, Ok(facts)) = out.take_answer(&err) else {
            panic!("the only query with the ID takes the error answer");
        };
        assert_eq!(p.facts.name, "c.example.");
        assert_eq!(facts.rcode, 2);
    }

    /// While a policy change is under way the datapath may already hold a policy
    /// that selects a name the proxy's does not: every answer with addresses waits
    /// for the learner (review finding: it was released at once).
    #[test]
    fn during_a_policy_change_every_answer_waits_for_the_learner() {
        let (ctx, _learner) = setup();
        let a = answer(10, "other.example", &[[192, 0, 2, 4]]);
        let (p, facts) = matched(&ctx, &query(10, "other.example"), &a);
        // Selected by no policy the proxy knows: released at once.
        assert!(matches!(gate(&ctx.shared, &p, &facts), Gate::Open));
        let changing = ctx.shared.policy_change();
        // The learner decides (this one refuses: SERVFAIL).
        assert!(matches!(gate(&ctx.shared, &p, &facts), Gate::Closed(_)));
        drop(changing);
        assert!(matches!(gate(&ctx.shared, &p, &facts), Gate::Open));
    }

    /// Second review, finding 4 (fixed): a policy change that began after
    /// `learn` decided not to wait, and before it queued the request, runs
    /// first on the control thread; the answer went out at once while the
    /// incoming policy's datapath did not hold its addresses yet. This
    /// learner installs a policy just as the request is queued (and refuses
    /// it): the answer waits for it now, and is not released.
    #[test]
    fn a_policy_installed_while_an_answer_is_queued_makes_it_wait() {
        #[derive(Default)]
        struct InstallsPolicy {
            shared: std::sync::OnceLock<Arc<Shared>>,
        }
        impl FqdnLearner for InstallsPolicy {
            fn learn(
                &self,
                _req: LearnRequest,
                _wait: bool,
            ) -> oneshot::Receiver<Result<(), LearnError>> {
                if let Some(shared) = self.shared.get() {
                    shared.set_policy(shared.policy.load_full());
                }
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(Err(LearnError::Datapath("refused (review learner)".into())));
                rx
            }
        }
        let (ctx, _refusing) = setup();
        let a = answer(11, "other.example", &[[192, 0, 2, 5]]);
        let (p, facts) = matched(&ctx, &query(11, "other.example"), &a);
        // Control: no policy change, a name no policy selects: at once.
        assert!(matches!(gate(&ctx.shared, &p, &facts), Gate::Open));
        let learner = Arc::new(InstallsPolicy::default());
        let shared = shared_with(learner.clone());
        assert!(learner.shared.set(shared.clone()).is_ok());
        assert!(matches!(gate(&shared, &p, &facts), Gate::Closed(_)));
    }

    /// Review of the fragment path: an answer the kernel reassembled from IP
    /// fragments may carry a fragment an off-path attacker spliced in (an
    /// address of theirs, the checksum kept). It is not learned, and the
    /// client gets TC and the question instead.
    #[test]
    fn a_reassembled_answer_is_not_learned_and_becomes_tc() {
        let (ctx, learner) = setup();
        let a = answer(12, "selected.example", &[[192, 0, 2, 6]]);
        let (p, mut facts) = matched(&ctx, &query(12, "selected.example"), &a);
        // Control: as it came, it goes to the (refusing) learner, unreplaced.
        assert!(matches!(gate(&ctx.shared, &p, &facts), Gate::Closed(_)));
        assert!(replacement(&p, &facts).is_none());
        distrust_reassembled(&mut facts);
        assert!(facts.addresses.is_empty());
        assert!(matches!(gate(&ctx.shared, &p, &facts), Gate::Open));
        assert_eq!(*learner.calls.lock().unwrap(), 1, "not learned");
        let tc = replacement(&p, &facts).expect("replaced by TC");
        let back = weir_parsers::dns::inspect_answer(&tc, &p.facts).expect("answers the query");
        assert!(back.truncated && back.decoded && back.addresses.is_empty());
    }

    /// Control: the same answer with the exact question case and no TC goes
    /// to the learner (and with this refusing learner is not released).
    #[test]
    fn an_exact_answer_is_gated() {
        let (ctx, learner) = setup();
        let a = answer(9, "selected.example", &[[192, 0, 2, 3]]);
        let (p, facts) = matched(&ctx, &query(9, "selected.example"), &a);
        assert_eq!(facts.addresses.len(), 1);
        assert!(matches!(gate(&ctx.shared, &p, &facts), Gate::Closed(_)));
        assert_eq!(*learner.calls.lock().unwrap(), 1);
    }
}
