//! The Kafka handler between a real client socket and a scripted broker on loopback:
//! allowed requests reach the broker unchanged, a denial comes back in request order
//! behind a slow broker response, and a denied acks=0 Produce closes the connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::metadata_response::MetadataResponseTopic;
use kafka_protocol::messages::{
    ApiKey, FetchRequest, FetchResponse, MetadataRequest, MetadataResponse, ProduceRequest,
    ProduceResponse, RequestHeader, ResponseHeader, TopicName,
    fetch_request::{FetchPartition, FetchTopic},
    produce_request::{PartitionProduceData, TopicProduceData},
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weir_parsers::kafka::{DEFAULT_MAX_FRAME, FrameSplitter, TOPIC_AUTHORIZATION_FAILED};
use weir_policy::identity::IdentityAllocator;
use weir_policy::{CompiledPolicy, parse_endpoints, parse_policies};

use super::serve;
use crate::context::ConnContext;
use crate::{FlowSink, ProxyConfig, Shared};

const V: i16 = 9;

fn produce(corr: i32, topic: &str, acks: i16) -> Vec<u8> {
    let t =
        TopicProduceData::default().with_name(TopicName(StrBytes::from_string(topic.to_owned())));
    produce_v(V, corr, t, acks)
}

/// Produce v13: the topic by id.
fn produce_by_id(corr: i32, id: u8) -> Vec<u8> {
    let t = TopicProduceData::default().with_topic_id(uuid::Uuid::from_bytes([id; 16]));
    produce_v(13, corr, t, 1)
}

fn produce_v(v: i16, corr: i32, topic: TopicProduceData, acks: i16) -> Vec<u8> {
    let mut p = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Produce as i16)
        .with_request_api_version(v)
        .with_correlation_id(corr)
        .with_client_id(Some(StrBytes::from_static_str("t")))
        .encode(&mut p, ApiKey::Produce.request_header_version(v))
        .expect("header");
    ProduceRequest::default()
        .with_acks(acks)
        .with_topic_data(vec![topic.with_partition_data(vec![
            PartitionProduceData::default().with_index(0),
        ])])
        .encode(&mut p, v)
        .expect("body");
    let mut out = Vec::new();
    out.put_i32(i32::try_from(p.len()).expect("small"));
    out.extend_from_slice(&p);
    out
}

/// A broker that answers every Produce with an empty response, the first one of its
/// first connection late; it records the correlation ids and the exact bytes it
/// received (all connections: weir's own Metadata requests too).
async fn broker(listener: TcpListener, seen: Arc<Mutex<(Vec<i32>, Vec<u8>)>>) {
    let mut first = true;
    while let Ok((s, _)) = listener.accept().await {
        tokio::spawn(broker_connection(s, seen.clone(), first));
        first = false;
    }
}

/// The whole frames one read from `s` completes; `None` once the peer is gone.
async fn read_frames(
    s: &mut TcpStream,
    split: &mut FrameSplitter,
) -> Option<Vec<weir_parsers::kafka::Frame>> {
    let mut buf = vec![0u8; 4096];
    let n = match s.read(&mut buf).await {
        Ok(0) | Err(_) => return None,
        Ok(n) => n,
    };
    split.push(&buf[..n]);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = split.next_frame() {
        frames.push(f);
    }
    Some(frames)
}

async fn broker_connection(
    mut s: TcpStream,
    seen: Arc<Mutex<(Vec<i32>, Vec<u8>)>>,
    mut first: bool,
) {
    let mut split = FrameSplitter::new(DEFAULT_MAX_FRAME);
    while let Some(frames) = read_frames(&mut s, &mut split).await {
        for f in frames {
            let mut p = f.payload();
            let key = p.get_i16();
            let ver = p.get_i16();
            let corr = p.get_i32();
            {
                let mut g = seen.lock().expect("lock");
                g.0.push(corr);
                g.1.extend_from_slice(f.wire());
            }
            if first {
                first = false;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let mut r = BytesMut::new();
            r.put_i32(0);
            if key == ApiKey::Metadata as i16 {
                ResponseHeader::default()
                    .with_correlation_id(corr)
                    .encode(&mut r, ApiKey::Metadata.response_header_version(ver))
                    .expect("header");
                let t = |n: &'static str, id: u8| {
                    MetadataResponseTopic::default()
                        .with_name(Some(TopicName(StrBytes::from_static_str(n))))
                        .with_topic_id(uuid::Uuid::from_bytes([id; 16]))
                };
                MetadataResponse::default()
                    .with_topics(vec![t("allowed", 0xa1), t("secret", 0xa2)])
                    .encode(&mut r, ver)
                    .expect("body");
            } else if key == ApiKey::Fetch as i16 {
                // Every Fetch that asks for a session gets session 77.
                ResponseHeader::default()
                    .with_correlation_id(corr)
                    .encode(&mut r, ApiKey::Fetch.response_header_version(ver))
                    .expect("header");
                FetchResponse::default()
                    .with_session_id(77)
                    .encode(&mut r, ver)
                    .expect("body");
            } else {
                ResponseHeader::default()
                    .with_correlation_id(corr)
                    .encode(&mut r, ApiKey::Produce.response_header_version(ver))
                    .expect("header");
                ProduceResponse::default()
                    .encode(&mut r, ver)
                    .expect("body");
            }
            let len = i32::try_from(r.len() - 4).expect("small");
            r[..4].copy_from_slice(&len.to_be_bytes());
            if s.write_all(&r).await.is_err() {
                return;
            }
        }
    }
}

/// weir closed the client's connection (within 5 s), sending nothing more.
async fn assert_closed(client: &mut TcpStream) {
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
}

/// An allowed Produce (correlation id 1) is answered.
async fn allowed_round_trip(client: &mut TcpStream) {
    client
        .write_all(&produce(1, "allowed", 1))
        .await
        .expect("write");
    let first = tokio::time::timeout(Duration::from_secs(5), read_frame(client)).await;
    assert!(
        matches!(first, Ok(Some(_))),
        "no answer to an allowed Produce"
    );
}

async fn read_frame(c: &mut TcpStream) -> Option<Bytes> {
    let mut len = [0u8; 4];
    c.read_exact(&mut len).await.ok()?;
    let mut body = vec![0u8; usize::try_from(i32::from_be_bytes(len)).ok()?];
    c.read_exact(&mut body).await.ok()?;
    Some(Bytes::from(body))
}

type Seen = Arc<Mutex<(Vec<i32>, Vec<u8>)>>;

/// A flow-record sink that keeps the lines.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The flow records written so far.
fn records(shared: &Shared, lines: &Lines) -> Vec<serde_json::Value> {
    shared.flows.flush(Duration::from_secs(5));
    String::from_utf8(lines.0.lock().expect("lock").clone())
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

/// A scripted broker, a policy allowing `role: produce` on topic `allowed`, and a
/// client connection through the Kafka handler.
async fn start(config: ProxyConfig) -> (TcpStream, Seen, Arc<Shared>, Lines) {
    let (client, seen, shared, lines, _) =
        start_with(config, "- {role: produce, topic: allowed}").await;
    (client, seen, shared, lines)
}

/// The client's endpoints and a policy with these Kafka rules (YAML list items at
/// column 0) towards the broker on `port`.
fn compiled_policy(port: u16, rules: &str) -> CompiledPolicy {
    let endpoints = "endpoints:
  - {name: app, ips: [127.0.0.2], labels: {app: a}}
  - {name: broker, ips: [127.0.0.1], labels: {app: kafka}}
";
    let rules: String = rules.lines().map(|l| format!("        {l}\n")).collect();
    let policy = format!(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: k}}
spec:
  endpointSelector: {{matchLabels: {{app: a}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{app: kafka}}}}]
    toPorts:
    - ports: [{{port: '{port}', protocol: TCP}}]
      rules:
        kafka:
{rules}"
    );
    let p = parse_policies(&policy, "p.yaml").expect("policy");
    let e = parse_endpoints(endpoints, "e.yaml").expect("endpoints");
    CompiledPolicy::compile(&p, &e, &mut IdentityAllocator::default()).expect("compiles")
}

/// Like [`start`], with these Kafka rules; also returns the broker's port.
async fn start_with(
    config: ProxyConfig,
    rules: &str,
) -> (TcpStream, Seen, Arc<Shared>, Lines, u16) {
    let broker_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = broker_listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    tokio::spawn(broker(broker_listener, seen.clone()));
    let compiled = compiled_policy(port, rules);
    let lines = Lines::default();
    let shared = Shared::new(
        Arc::new(compiled),
        FlowSink::new(Box::new(lines.clone())),
        config,
    );
    let client_addr: SocketAddr = "127.0.0.2:40000".parse().expect("addr");
    let dst: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let ctx = Arc::new(ConnContext::new(shared.clone(), client_addr, dst));
    assert!(ctx.decide().verdict.needs_kafka());

    // The client's connection to the proxy, over real sockets.
    let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = TcpStream::connect(front.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (accepted, _) = front.accept().await.expect("accept");
    tokio::spawn(serve(ctx, accepted));
    (client, seen, shared, lines, port)
}

#[tokio::test]
async fn denials_keep_request_order_and_allowed_requests_pass_unchanged() {
    let (mut client, seen, shared, lines) = start(ProxyConfig::default()).await;

    // Allowed (answered late), denied, allowed: pipelined in one write.
    let (a1, denied, a3) = (
        produce(1, "allowed", 1),
        produce(2, "secret", 1),
        produce(3, "allowed", 1),
    );
    let mut all = a1.clone();
    all.extend_from_slice(&denied);
    all.extend_from_slice(&a3);
    client.write_all(&all).await.expect("write");
    let mut order = Vec::new();
    for _ in 0..3 {
        let f = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut client))
            .await
            .expect("in time")
            .expect("a response");
        let mut b = f.clone();
        let h = ResponseHeader::decode(&mut b, ApiKey::Produce.response_header_version(V))
            .expect("header");
        order.push(h.correlation_id);
        if h.correlation_id == 2 {
            let r = ProduceResponse::decode(&mut b, V).expect("a Produce v9 response");
            let codes: Vec<i16> = r
                .responses
                .iter()
                .flat_map(|t| t.partition_responses.iter().map(|p| p.error_code))
                .collect();
            assert_eq!(codes, vec![TOPIC_AUTHORIZATION_FAILED]);
        }
    }
    assert_eq!(order, vec![1, 2, 3], "responses in request order");
    {
        let g = seen.lock().expect("lock");
        assert_eq!(
            g.0,
            vec![1, 3],
            "the denied request never reached the broker"
        );
        let mut want = a1.clone();
        want.extend_from_slice(&a3);
        assert_eq!(g.1, want, "allowed requests forwarded byte for byte");
    }

    // Metadata for every topic: the broker lists both, the client sees the allowed one.
    let mut m = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Metadata as i16)
        .with_request_api_version(12)
        .with_correlation_id(5)
        .with_client_id(Some(StrBytes::from_static_str("t")))
        .encode(&mut m, ApiKey::Metadata.request_header_version(12))
        .expect("header");
    MetadataRequest::default()
        .with_topics(None)
        .encode(&mut m, 12)
        .expect("body");
    let mut wire = Vec::new();
    wire.put_i32(i32::try_from(m.len()).expect("small"));
    wire.extend_from_slice(&m);
    client.write_all(&wire).await.expect("write");
    let f = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut client))
        .await
        .expect("in time")
        .expect("a response");
    let mut b = f.clone();
    let h = ResponseHeader::decode(&mut b, ApiKey::Metadata.response_header_version(12))
        .expect("header");
    assert_eq!(h.correlation_id, 5);
    let r = MetadataResponse::decode(&mut b, 12).expect("Metadata v12");
    let names: Vec<&str> = r
        .topics
        .iter()
        .filter_map(|t| t.name.as_ref().map(|n| n.as_str()))
        .collect();
    assert_eq!(names, vec!["allowed"]);

    // Produce v13 names topics by id: ids learned from that Metadata response resolve;
    // an id no Metadata response named is denied.
    for (corr, id, allowed) in [(6, 0xa1u8, true), (7, 0xa2, false), (8, 0xa3, false)] {
        client
            .write_all(&produce_by_id(corr, id))
            .await
            .expect("write");
        let f = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut client))
            .await
            .expect("in time")
            .expect("a response");
        let mut b = f.clone();
        let h = ResponseHeader::decode(&mut b, ApiKey::Produce.response_header_version(13))
            .expect("header");
        assert_eq!(h.correlation_id, corr);
        let r = ProduceResponse::decode(&mut b, 13).expect("Produce v13");
        let codes: Vec<i16> = r
            .responses
            .iter()
            .flat_map(|t| t.partition_responses.iter().map(|p| p.error_code))
            .collect();
        let want = if allowed {
            vec![]
        } else {
            vec![TOPIC_AUTHORIZATION_FAILED]
        };
        assert_eq!(codes, want, "id {id:#x}");
    }

    // A denied acks=0 Produce: no response is possible, so the connection closes.
    client
        .write_all(&produce(4, "secret", 0))
        .await
        .expect("write");
    assert_closed(&mut client).await;
    // 0x7765_6972: weir asked the broker about id 0xa3 (on its own connection).
    assert_eq!(seen.lock().expect("lock").0, vec![1, 3, 5, 6, 0x7765_6972]);
    // One record per request: Hubble's l7.kafka, the denial's error code.
    let recs = records(&shared, &lines);
    let kafka: Vec<(i64, String, i64)> = recs
        .iter()
        .filter_map(|r| {
            let k = &r["l7"]["kafka"];
            Some((
                k["correlation_id"].as_i64()?,
                r["verdict"].as_str()?.to_string(),
                k["error_code"].as_i64()?,
            ))
        })
        .collect();
    let find = |c: i64| kafka.iter().find(|k| k.0 == c).cloned();
    assert_eq!(find(1), Some((1, "FORWARDED".into(), 0)), "{recs:#?}");
    assert_eq!(find(2), Some((2, "DROPPED".into(), 29)), "{recs:#?}");
    let r2 = recs
        .iter()
        .find(|r| r["l7"]["kafka"]["correlation_id"] == 2)
        .expect("record");
    assert_eq!(r2["l7"]["kafka"]["api_key"], "produce");
    assert_eq!(r2["l7"]["kafka"]["topic"], "secret");
    assert!(
        recs.iter().any(|r| r["Summary"]
            .as_str()
            .is_some_and(|s| s.contains("Kafka connection closed"))),
        "{recs:#?}"
    );
}

/// A weir that has handed over with a stale policy forwards no further
/// request: the connection closes (the client reconnects to the new weir).
#[tokio::test]
async fn a_superseded_weir_forwards_no_kafka_request() {
    let (mut client, seen, shared, _) = start(ProxyConfig::default()).await;
    allowed_round_trip(&mut client).await;
    shared.supersede();
    client
        .write_all(&produce(2, "allowed", 1))
        .await
        .expect("write");
    assert_closed(&mut client).await;
    assert_eq!(seen.lock().expect("lock").0, vec![1]);
}

#[tokio::test]
async fn a_frame_longer_than_the_limit_closes_the_connection() {
    let config = ProxyConfig {
        kafka_max_frame: 1024,
        ..ProxyConfig::default()
    };
    let (mut client, seen, _, _) = start(config).await;
    // An allowed request still passes under the limit.
    allowed_round_trip(&mut client).await;
    // A length of 1 MiB: refused as soon as its four bytes are in, nothing forwarded.
    client
        .write_all(&(1024 * 1024i32).to_be_bytes())
        .await
        .expect("write");
    assert_closed(&mut client).await;
    assert_eq!(seen.lock().expect("lock").0, vec![1]);
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_tcp_idle_timeout() {
    let config = ProxyConfig {
        tcp_idle_timeout: Duration::from_secs(1),
        ..ProxyConfig::default()
    };
    let (mut client, _, _, _) = start(config).await;
    allowed_round_trip(&mut client).await;
    let quiet_from = std::time::Instant::now();
    assert_closed(&mut client).await;
    assert!(quiet_from.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn a_request_with_more_entries_than_the_limit_closes_the_connection() {
    // A Produce naming one topic and one partition decodes two array elements.
    let config = ProxyConfig {
        kafka_max_request_entries: 2,
        ..ProxyConfig::default()
    };
    let (mut client, seen, _, _) = start(config).await;
    allowed_round_trip(&mut client).await;
    // The same allowed topic with two partitions: three elements, over the limit.
    let t = TopicProduceData::default()
        .with_name(TopicName(StrBytes::from_static_str("allowed")))
        .with_partition_data(vec![
            PartitionProduceData::default().with_index(0),
            PartitionProduceData::default().with_index(1),
        ]);
    let mut p = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Produce as i16)
        .with_request_api_version(V)
        .with_correlation_id(2)
        .with_client_id(Some(StrBytes::from_static_str("t")))
        .encode(&mut p, ApiKey::Produce.request_header_version(V))
        .expect("header");
    ProduceRequest::default()
        .with_acks(1)
        .with_topic_data(vec![t])
        .encode(&mut p, V)
        .expect("body");
    let mut wire = Vec::new();
    wire.put_i32(i32::try_from(p.len()).expect("small"));
    wire.extend_from_slice(&p);
    client.write_all(&wire).await.expect("write");
    assert_closed(&mut client).await;
    assert_eq!(seen.lock().expect("lock").0, vec![1]);
}

/// A Fetch v12 (fetch sessions, topics by name) naming `topics`.
fn fetch(corr: i32, session_id: i32, epoch: i32, topics: &[&str]) -> Vec<u8> {
    const FV: i16 = 12;
    let mut p = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Fetch as i16)
        .with_request_api_version(FV)
        .with_correlation_id(corr)
        .with_client_id(Some(StrBytes::from_static_str("t")))
        .encode(&mut p, ApiKey::Fetch.request_header_version(FV))
        .expect("header");
    FetchRequest::default()
        .with_session_id(session_id)
        .with_session_epoch(epoch)
        .with_topics(
            topics
                .iter()
                .map(|t| {
                    FetchTopic::default()
                        .with_topic(TopicName(StrBytes::from_string((*t).to_owned())))
                        .with_partitions(vec![FetchPartition::default()])
                })
                .collect(),
        )
        .encode(&mut p, FV)
        .expect("body");
    let mut out = Vec::new();
    out.put_i32(i32::try_from(p.len()).expect("small"));
    out.extend_from_slice(&p);
    out
}

async fn response_in_time(client: &mut TcpStream) -> Option<Bytes> {
    tokio::time::timeout(Duration::from_secs(5), read_frame(client))
        .await
        .expect("in time")
}

#[tokio::test]
async fn an_incremental_fetch_is_decided_on_every_topic_its_session_holds() {
    let rules = "- {role: consume, topic: allowed}\n- {role: consume, topic: secret}";
    let (mut client, seen, shared, lines, port) = start_with(ProxyConfig::default(), rules).await;
    // A full Fetch opening a session with both topics, then an incremental one
    // naming nothing: both allowed and forwarded (the broker opens session 77).
    client
        .write_all(&fetch(1, 0, 0, &["allowed", "secret"]))
        .await
        .expect("write");
    assert!(response_in_time(&mut client).await.is_some());
    client
        .write_all(&fetch(2, 77, 1, &[]))
        .await
        .expect("write");
    assert!(response_in_time(&mut client).await.is_some());
    // The policy no longer allows `secret`: the session's next incremental Fetch,
    // naming nothing, would still fetch it. It is not forwarded; the connection
    // closes so the client opens a new session.
    shared.set_policy(Arc::new(compiled_policy(
        port,
        "- {role: consume, topic: allowed}",
    )));
    client
        .write_all(&fetch(3, 77, 2, &[]))
        .await
        .expect("write");
    assert_closed(&mut client).await;
    assert_eq!(seen.lock().expect("lock").0, vec![1, 2]);
    let recs = records(&shared, &lines);
    assert!(
        recs.iter().any(|r| r["verdict"] == "DROPPED"
            && r["policy"]
                .as_str()
                .is_some_and(|p| p.contains("topic `secret` is allowed by no rule"))),
        "{recs:#?}"
    );
    assert!(
        recs.iter().any(|r| r["Summary"]
            .as_str()
            .is_some_and(|s| s.contains("incremental Fetch of fetch session 77 denied"))),
        "{recs:#?}"
    );
}

#[tokio::test]
async fn an_incremental_fetch_of_a_session_opened_elsewhere_is_not_forwarded() {
    let rules = "- {role: consume, topic: allowed}";
    let (mut client, seen, _, _, _) = start_with(ProxyConfig::default(), rules).await;
    // The same probe is allowed on a session this connection opened...
    client
        .write_all(&fetch(1, 0, 0, &["allowed"]))
        .await
        .expect("write");
    assert!(response_in_time(&mut client).await.is_some());
    client
        .write_all(&fetch(2, 77, 1, &[]))
        .await
        .expect("write");
    assert!(response_in_time(&mut client).await.is_some());
    // ...but session 78 is not one of them.
    client
        .write_all(&fetch(3, 78, 1, &[]))
        .await
        .expect("write");
    assert_closed(&mut client).await;
    assert_eq!(seen.lock().expect("lock").0, vec![1, 2]);
}

/// The Produce v13 response codes of the next response (`corr` checked).
async fn produce_v13_codes(client: &mut TcpStream, corr: i32) -> Vec<i16> {
    let f = response_in_time(client).await.expect("a response");
    let mut b = f.clone();
    let h = ResponseHeader::decode(&mut b, ApiKey::Produce.response_header_version(13))
        .expect("header");
    assert_eq!(h.correlation_id, corr);
    let r = ProduceResponse::decode(&mut b, 13).expect("Produce v13");
    r.responses
        .iter()
        .flat_map(|t| t.partition_responses.iter().map(|p| p.error_code))
        .collect()
}

/// Sends a Produce v13 naming topic id `[id; 16]` and returns its response's codes.
async fn produce_by_id_codes(client: &mut TcpStream, corr: i32, id: u8) -> Vec<i16> {
    client
        .write_all(&produce_by_id(corr, id))
        .await
        .expect("write");
    produce_v13_codes(client, corr).await
}

#[tokio::test]
async fn an_unknown_topic_id_is_asked_of_the_broker_before_deciding() {
    // No Metadata response has gone through this proxy: ids are unknown to it.
    let (mut client, seen, shared, lines) = start(ProxyConfig::default()).await;
    assert_eq!(
        produce_by_id_codes(&mut client, 1, 0xa1).await,
        Vec::<i16>::new()
    );
    // Only the id asked is learned from the answer: 0xa2 is asked in turn, and is
    // `secret`.
    assert_eq!(
        produce_by_id_codes(&mut client, 2, 0xa2).await,
        vec![TOPIC_AUTHORIZATION_FAILED]
    );
    // An id the broker does not know either: denied, after asking once.
    assert_eq!(
        produce_by_id_codes(&mut client, 3, 0xee).await,
        vec![TOPIC_AUTHORIZATION_FAILED]
    );
    assert_eq!(
        produce_by_id_codes(&mut client, 4, 0xee).await,
        vec![TOPIC_AUTHORIZATION_FAILED]
    );
    const WEIR: i32 = 0x7765_6972;
    assert_eq!(seen.lock().expect("lock").0, vec![WEIR, 1, WEIR, WEIR]);
    let recs = records(&shared, &lines);
    let policy_of = |corr: i64| {
        recs.iter()
            .find(|r| r["l7"]["kafka"]["correlation_id"] == corr)
            .and_then(|r| r["policy"].as_str())
            .unwrap_or("")
            .to_string()
    };
    assert!(
        policy_of(2).contains("topic `secret` is allowed by no rule"),
        "{recs:#?}"
    );
    assert!(policy_of(4).contains("topic id unknown"), "{recs:#?}");
}

#[tokio::test]
async fn weir_asks_the_broker_only_when_a_name_could_change_the_decision() {
    // Produce allowed without a topic rule: the id's name cannot matter.
    let (mut client, seen, _, _, _) = start_with(ProxyConfig::default(), "- {role: produce}").await;
    assert_eq!(
        produce_by_id_codes(&mut client, 1, 0xee).await,
        Vec::<i16>::new()
    );
    assert_eq!(seen.lock().expect("lock").0, vec![1]);
    // No rule for Produce at all: denied whatever the name, nothing asked.
    let (mut client, seen, _, _, _) =
        start_with(ProxyConfig::default(), "- {apiKey: fetch, topic: allowed}").await;
    assert_eq!(
        produce_by_id_codes(&mut client, 2, 0xa1).await,
        vec![TOPIC_AUTHORIZATION_FAILED]
    );
    assert!(seen.lock().expect("lock").0.is_empty());
}

#[tokio::test]
async fn a_broker_that_answers_acks_0_does_not_break_the_connection() {
    // The scripted broker answers every Produce, acks=0 too (as tansu 0.6 does).
    let (mut client, seen, shared, lines) = start(ProxyConfig::default()).await;
    let mut both = produce(1, "allowed", 0);
    both.extend_from_slice(&produce(2, "allowed", 1));
    client.write_all(&both).await.expect("write");
    // Only the acks=1 request's answer reaches the client; the connection stays.
    let f = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut client))
        .await
        .expect("in time")
        .expect("a response");
    let mut b = f.clone();
    let h =
        ResponseHeader::decode(&mut b, ApiKey::Produce.response_header_version(V)).expect("header");
    assert_eq!(h.correlation_id, 2);
    client
        .write_all(&produce(3, "allowed", 1))
        .await
        .expect("write");
    let f = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut client))
        .await
        .expect("in time")
        .expect("the connection is still open");
    let mut b = f.clone();
    let h =
        ResponseHeader::decode(&mut b, ApiKey::Produce.response_header_version(V)).expect("header");
    assert_eq!(h.correlation_id, 3);
    assert_eq!(seen.lock().expect("lock").0, vec![1, 2, 3]);
    let recs = records(&shared, &lines);
    assert!(
        !recs.iter().any(|r| r["Summary"]
            .as_str()
            .is_some_and(|s| s.contains("Kafka connection closed"))),
        "{recs:#?}"
    );
}

// ---------------------------------------------------------------------------------
// kafka-review reproducers. Each test PASSES while the hole it names is open (it
// asserts what an attacker gets today); flip its final assertions when fixing.
// ---------------------------------------------------------------------------------

/// One request frame (length prefix included) of `key`/`v` with this body.
fn request_frame<M: Encodable>(key: ApiKey, v: i16, corr: i32, body: &M) -> Vec<u8> {
    let mut p = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(v)
        .with_correlation_id(corr)
        .with_client_id(Some(StrBytes::from_static_str("t")))
        .encode(&mut p, key.request_header_version(v))
        .expect("header");
    body.encode(&mut p, v).expect("body");
    let mut out = Vec::new();
    out.put_i32(i32::try_from(p.len()).expect("small"));
    out.extend_from_slice(&p);
    out
}

/// The topic names of a Metadata response frame payload of version `v`.
fn metadata_names(payload: &Bytes, v: i16) -> Vec<String> {
    let mut b = payload.clone();
    ResponseHeader::decode(&mut b, ApiKey::Metadata.response_header_version(v)).expect("header");
    MetadataResponse::decode(&mut b, v)
        .expect("Metadata")
        .topics
        .iter()
        .filter_map(|t| t.name.as_ref().map(|n| n.as_str().to_owned()))
        .collect()
}

/// Review finding (fixed): responses are matched to requests by correlation id, and the
/// client chooses correlation ids. With a broker that answers acks=0 Produce (tansu 0.6,
/// like the scripted broker here), a client reusing one id made weir take the Produce
/// answer for the filtered "every topic" Metadata request and hand the broker's
/// unfiltered answer to a later request: the client saw `secret`. A request reusing an
/// id whose response is still owed now closes the connection, unforwarded.
#[tokio::test]
async fn a_correlation_id_reused_while_owed_closes_the_connection() {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    let (mut client, seen, _, _) = start(ProxyConfig::default()).await;
    // Control: Metadata v0 for every topic (an empty list in v0) is filtered.
    let all = MetadataRequest::default().with_topics(Some(vec![]));
    client
        .write_all(&request_frame(ApiKey::Metadata, 0, 5, &all))
        .await
        .expect("write");
    let f = response_in_time(&mut client).await.expect("a response");
    assert_eq!(metadata_names(&f, 0), vec!["allowed"]);

    // The attack, pipelined: an allowed acks=0 Produce v3 naming no topic (its answer
    // is 8 zero bytes after the correlation id, which also decode as an empty Metadata
    // v0 response), Metadata for every topic, Metadata naming `allowed` — all with
    // correlation id 7.
    let produce0 = ProduceRequest::default().with_acks(0);
    let named = MetadataRequest::default().with_topics(Some(vec![
        MetadataRequestTopic::default()
            .with_name(Some(TopicName(StrBytes::from_static_str("allowed")))),
    ]));
    let mut wire = request_frame(ApiKey::Produce, 3, 7, &produce0);
    wire.extend(request_frame(ApiKey::Metadata, 0, 7, &all));
    wire.extend(request_frame(ApiKey::Metadata, 0, 7, &named));
    client.write_all(&wire).await.expect("write");
    // Only the acks=0 Produce went on; the first reuse closed the connection, and
    // nothing the client got back names `secret`.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(_))), "{closed:?}");
    assert!(!rest.windows(6).any(|w| w == b"secret"), "{rest:?}");
    // (The acks=0 Produce may not reach the broker: the close can reset it first.)
    let seen = seen.lock().expect("lock").0.clone();
    assert!(seen == vec![5, 7] || seen == vec![5], "{seen:?}");
}

/// A one-connection-at-a-time fake "broker" that answers every Metadata request of
/// version `ver` with one topic `name` whose id is `[id; 16]`.
async fn lying_broker(listener: TcpListener, name: &'static str, id: u8) {
    while let Ok((mut s, _)) = listener.accept().await {
        let mut split = FrameSplitter::new(DEFAULT_MAX_FRAME);
        while let Some(frames) = read_frames(&mut s, &mut split).await {
            for f in frames {
                let mut p = f.payload();
                let _key = p.get_i16();
                let ver = p.get_i16();
                let corr = p.get_i32();
                let mut r = BytesMut::new();
                r.put_i32(0);
                ResponseHeader::default()
                    .with_correlation_id(corr)
                    .encode(&mut r, ApiKey::Metadata.response_header_version(ver))
                    .expect("header");
                MetadataResponse::default()
                    .with_topics(vec![
                        MetadataResponseTopic::default()
                            .with_name(Some(TopicName(StrBytes::from_static_str(name))))
                            .with_topic_id(uuid::Uuid::from_bytes([id; 16])),
                    ])
                    .encode(&mut r, ver)
                    .expect("body");
                let len = i32::try_from(r.len() - 4).expect("small");
                r[..4].copy_from_slice(&len.to_be_bytes());
                let _ = s.write_all(&r).await;
            }
        }
    }
}

/// Review finding (fixed): the topic id map was scoped by the destination's identity,
/// and a CIDR identity covers every address of the prefix, not only the brokers: any
/// Kafka-speaking host there could teach "id X is `allowed`" and a Produce v13 naming
/// X at the real broker (where X is `secret`) was allowed. Ids are now the word of
/// the broker address that said them.
#[tokio::test]
async fn a_host_in_the_brokers_cidr_cannot_teach_a_topic_id() {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    // The real broker at 127.0.0.1 (`allowed` = 0xa1, `secret` = 0xa2); a lying host at
    // 127.0.0.3 in the same /24 (it says `allowed` = 0xa2).
    let real = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let real_port = real.local_addr().expect("addr").port();
    let seen: Seen = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    tokio::spawn(broker(real, seen.clone()));
    let liar = TcpListener::bind("127.0.0.3:0").await.expect("bind");
    let liar_port = liar.local_addr().expect("addr").port();
    tokio::spawn(lying_broker(liar, "allowed", 0xa2));

    let endpoints = "endpoints:\n  - {name: app, ips: [127.0.0.2], labels: {app: a}}\n";
    let policy = format!(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: k}}
spec:
  endpointSelector: {{matchLabels: {{app: a}}}}
  egress:
  - toCIDR: [127.0.0.0/24]
    toPorts:
    - ports: [{{port: '{real_port}', protocol: TCP}}, {{port: '{liar_port}', protocol: TCP}}]
      rules:
        kafka:
        - {{role: produce, topic: allowed}}
"
    );
    let p = parse_policies(&policy, "p.yaml").expect("policy");
    let e = parse_endpoints(endpoints, "e.yaml").expect("endpoints");
    let compiled =
        CompiledPolicy::compile(&p, &e, &mut IdentityAllocator::default()).expect("compiles");
    let shared = Shared::new(
        Arc::new(compiled),
        FlowSink::new(Box::new(Lines::default())),
        ProxyConfig::default(),
    );
    let connect = |dst: SocketAddr, src_port: u16| {
        let shared = shared.clone();
        async move {
            let client_addr: SocketAddr = format!("127.0.0.2:{src_port}").parse().expect("addr");
            let ctx = Arc::new(ConnContext::new(shared, client_addr, dst));
            assert!(ctx.decide().verdict.needs_kafka());
            let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let client = TcpStream::connect(front.local_addr().expect("addr"))
                .await
                .expect("connect");
            let (accepted, _) = front.accept().await.expect("accept");
            tokio::spawn(serve(ctx, accepted));
            client
        }
    };
    let real_dst: SocketAddr = format!("127.0.0.1:{real_port}").parse().expect("addr");
    let liar_dst: SocketAddr = format!("127.0.0.3:{liar_port}").parse().expect("addr");

    // 1. An allowed Metadata v12 naming `allowed`, sent to the lying host.
    let mut to_liar = connect(liar_dst, 40001).await;
    let named = MetadataRequest::default().with_topics(Some(vec![
        MetadataRequestTopic::default()
            .with_name(Some(TopicName(StrBytes::from_static_str("allowed")))),
    ]));
    to_liar
        .write_all(&request_frame(ApiKey::Metadata, 12, 1, &named))
        .await
        .expect("write");
    assert!(response_in_time(&mut to_liar).await.is_some());

    // 2. Produce v13 by id 0xa2 (the real broker's `secret`) to the real broker: what
    // the lying host said is not the real broker's word, so weir asks the real broker
    // (which says `secret`) and denies.
    let mut to_real = connect(real_dst, 40002).await;
    assert_eq!(produce_by_id_codes(&mut to_real, 2, 0xa2).await, vec![29]);
    assert_eq!(
        seen.lock().expect("lock").0,
        vec![0x7765_6972],
        "only weir's own question reached the broker"
    );
}

/// Review finding F5 (fixed): an incremental Fetch's named topics join its session's
/// set, which grew without bound (under a Fetch rule without `topic` every one is
/// forwarded, even naming topics that do not exist). Past `MAX_SESSION_TOPICS` the
/// session is forgotten: the Fetch is refused as one of an unknown session.
#[test]
fn a_fetch_session_holds_a_bounded_number_of_topics() {
    let sessions = Mutex::new(super::FetchSessions::default());
    super::lock(&sessions).opened(77, vec![weir_parsers::kafka::TopicRef::Name("a".into())]);
    for i in 0..20i32 {
        let names: Vec<String> = (0..1000).map(|j| format!("t{i}-{j}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let frame = fetch(i + 1, 77, i + 1, &refs);
        let facts =
            weir_parsers::kafka::request_facts(&Bytes::from(frame[4..].to_vec())).expect("facts");
        let list = match &facts.body.as_ref().expect("body").topics {
            weir_parsers::kafka::Topics::Listed(l) => l.clone(),
            other => panic!("{other:?}"),
        };
        let decided = super::decided_topics(&list, &facts, &sessions);
        let held = 1 + (i as usize + 1) * 1000;
        if held <= super::MAX_SESSION_TOPICS {
            assert_eq!(decided.map(|d| d.len()), Some(held));
        } else {
            assert!(decided.is_none(), "{i}");
            assert!(!super::lock(&sessions).by_id.contains_key(&77));
            return;
        }
    }
    panic!("never reached the bound");
}

/// A Produce v9 naming `topic` with `partitions` empty partitions.
fn wide_produce(corr: i32, topic: &str, partitions: i32) -> Vec<u8> {
    let t = TopicProduceData::default()
        .with_name(TopicName(StrBytes::from_string(topic.to_string())))
        .with_partition_data(
            (0..partitions)
                .map(|i| PartitionProduceData::default().with_index(i))
                .collect(),
        );
    let req = ProduceRequest::default()
        .with_acks(1)
        .with_topic_data(vec![t]);
    request_frame(ApiKey::Produce, 9, corr, &req)
}

/// Review finding F6 (fixed): a denial names every partition of its request, so it can
/// be 5x the request, and up to 512 could wait (by count) for a client that does not
/// read. Denial bytes waiting are now bounded: past 16 MiB the connection closes.
#[tokio::test]
async fn denials_a_client_does_not_read_are_bounded_in_bytes() {
    let frame = wide_produce(1, "secret", 99_999);
    let payload = Bytes::from(frame[4..].to_vec());
    let denial = weir_parsers::kafka::deny_response(&payload)
        .expect("denial")
        .expect("acks=1");
    assert!(
        denial.len() > 5 * frame.len(),
        "{} -> {}",
        frame.len(),
        denial.len()
    );
    let (mut client, seen, shared, lines) = start(ProxyConfig::default()).await;
    // 20 of them (12 MB sent, 66 MB of denials), none read.
    // weir closes the connection on the way (the client's write then fails).
    let mut closed_while_writing = false;
    for corr in 1..=20 {
        if client
            .write_all(&wide_produce(corr, "secret", 99_999))
            .await
            .is_err()
        {
            closed_while_writing = true;
            break;
        }
    }
    if !closed_while_writing {
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest)).await;
        // Closed: EOF, or a reset for what the client sent after the close.
        assert!(read.is_ok(), "weir kept the connection open");
        assert!(
            rest.len() < 10 * denial.len(),
            "{} bytes of denials came back",
            rest.len()
        );
    }
    assert!(seen.lock().expect("lock").0.is_empty());
    let recs = records(&shared, &lines);
    assert!(
        recs.iter().any(|r| r["Summary"]
            .as_str()
            .is_some_and(|s| s.contains("bytes of Kafka denials wait"))),
        "{recs:#?}"
    );
}

/// Kafka's names are at most 249 bytes; a longer one closes the connection before any
/// decision (its denial would repeat it).
#[tokio::test]
async fn a_topic_name_longer_than_kafka_allows_closes_the_connection() {
    let (mut client, seen, _, _) = start(ProxyConfig::default()).await;
    allowed_round_trip(&mut client).await;
    client
        .write_all(&wide_produce(2, &"s".repeat(250), 1))
        .await
        .expect("write");
    assert_closed(&mut client).await;
    assert_eq!(seen.lock().expect("lock").0, vec![1]);
}

/// Whether weir forwarded correlation id `corr` (the scripted broker saw it), after
/// waiting up to a second for it.
async fn forwarded(seen: &Seen, corr: i32) -> bool {
    for _ in 0..50 {
        if seen.lock().expect("lock").0.contains(&corr) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Review finding F4 (fixed): ACL bindings and filters name the resources they are
/// on; weir read them as naming no topic, and a request naming no topic ignores
/// `topic`: `{apiKey: createacls, topic: allowed}` let a client grant itself ACLs on
/// `secret`. Only a literal topic name is now a topic a rule can allow.
#[tokio::test]
async fn acls_are_decided_on_the_topics_they_name() {
    use kafka_protocol::messages::CreateAclsRequest;
    use kafka_protocol::messages::create_acls_request::AclCreation;
    let (mut client, seen, _, _, _) = start_with(
        ProxyConfig::default(),
        "- {apiKey: createacls, topic: allowed}",
    )
    .await;
    let acl = |name: &'static str, kind: i8, pattern: i8| {
        CreateAclsRequest::default().with_creations(vec![
            AclCreation::default()
                .with_resource_type(kind)
                .with_resource_name(StrBytes::from_static_str(name))
                .with_resource_pattern_type(pattern)
                .with_principal(StrBytes::from_static_str("User:attacker"))
                .with_host(StrBytes::from_static_str("*"))
                .with_operation(2) // ALL
                .with_permission_type(3), // ALLOW
        ])
    };
    // (type 2 TOPIC, 4 CLUSTER; pattern 3 LITERAL, 4 PREFIXED)
    let cases = [
        (8, acl("allowed", 2, 3), true),
        (9, acl("secret", 2, 3), false),
        (10, acl("a", 2, 4), false),
        (11, acl("*", 2, 3), false),
        (12, acl("kafka-cluster", 4, 3), false),
    ];
    for (corr, req, allowed) in cases {
        client
            .write_all(&request_frame(ApiKey::CreateAcls, 3, corr, &req))
            .await
            .expect("write");
        assert!(response_in_time(&mut client).await.is_some(), "{corr}");
        assert_eq!(
            seen.lock().expect("lock").0.contains(&corr),
            allowed,
            "{corr}"
        );
    }
}

/// Review finding F4 (fixed): a config request on a broker (type 4), a group, ... names
/// no topic, and passed `{apiKey: incrementalalterconfigs, topic: allowed}`.
#[tokio::test]
async fn configs_of_what_is_no_topic_are_not_allowed_by_a_topic_rule() {
    use kafka_protocol::messages::IncrementalAlterConfigsRequest;
    use kafka_protocol::messages::incremental_alter_configs_request::{
        AlterConfigsResource, AlterableConfig,
    };
    let (mut client, seen, _, _, _) = start_with(
        ProxyConfig::default(),
        "- {apiKey: incrementalalterconfigs, topic: allowed}",
    )
    .await;
    let change = |kind: i8, name: &'static str| {
        IncrementalAlterConfigsRequest::default().with_resources(vec![
            AlterConfigsResource::default()
                .with_resource_type(kind)
                .with_resource_name(StrBytes::from_static_str(name))
                .with_configs(vec![
                    AlterableConfig::default()
                        .with_name(StrBytes::from_static_str("retention.ms"))
                        .with_config_operation(0) // SET
                        .with_value(Some(StrBytes::from_static_str("1"))),
                ]),
        ])
    };
    // Broker 1's config: weir's denial, nothing forwarded.
    client
        .write_all(&request_frame(
            ApiKey::IncrementalAlterConfigs,
            1,
            4,
            &change(4, "1"),
        ))
        .await
        .expect("write");
    assert!(response_in_time(&mut client).await.is_some());
    // Topic `allowed`'s: forwarded (the scripted broker cannot answer this version).
    client
        .write_all(&request_frame(
            ApiKey::IncrementalAlterConfigs,
            1,
            5,
            &change(2, "allowed"),
        ))
        .await
        .expect("write");
    assert!(forwarded(&seen, 5).await);
    assert_eq!(seen.lock().expect("lock").0, vec![5]);
}

/// Review finding F3 (fixed): a DeleteTopics v6 entry with a name and an id was
/// decided on the name; Kafka refuses such an entry, but tansu deletes by the id.
/// Both must now be allowed.
#[tokio::test]
async fn a_topic_deleted_by_name_and_id_needs_both_allowed() {
    use kafka_protocol::messages::DeleteTopicsRequest;
    use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
    let (mut client, seen, _, _, _) = start_with(
        ProxyConfig::default(),
        "- {apiKey: deletetopics, topic: allowed}\n- {apiKey: metadata}",
    )
    .await;
    // weir learns 0xa1 = `allowed`, 0xa2 = `secret` from an allowed Metadata v12.
    let all = MetadataRequest::default().with_topics(None);
    client
        .write_all(&request_frame(ApiKey::Metadata, 12, 1, &all))
        .await
        .expect("write");
    assert!(response_in_time(&mut client).await.is_some());
    let del = |id: u8| {
        DeleteTopicsRequest::default().with_topics(vec![
            DeleteTopicState::default()
                .with_name(Some(TopicName(StrBytes::from_static_str("allowed"))))
                .with_topic_id(uuid::Uuid::from_bytes([id; 16])),
        ])
    };
    for (corr, id) in [(2, 0xa1), (3, 0xa2)] {
        client
            .write_all(&request_frame(ApiKey::DeleteTopics, 6, corr, &del(id)))
            .await
            .expect("write");
        assert!(response_in_time(&mut client).await.is_some());
    }
    assert_eq!(seen.lock().expect("lock").0, vec![1, 2]);
}

/// Review finding F3 (fixed): a Metadata v12 entry with a name and an id was decided
/// on the id; tansu answers by the name, so {`secret`, id of `allowed`} described
/// `secret`. Both must now be allowed.
#[tokio::test]
async fn a_metadata_entry_with_a_name_and_an_id_needs_both_allowed() {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    let (mut client, seen, _, _) = start(ProxyConfig::default()).await;
    let m = |name: &'static str| {
        MetadataRequest::default().with_topics(Some(vec![
            MetadataRequestTopic::default()
                .with_name(Some(TopicName(StrBytes::from_static_str(name))))
                .with_topic_id(uuid::Uuid::from_bytes([0xa1; 16])),
        ]))
    };
    for (corr, name) in [(3, "secret"), (4, "allowed")] {
        client
            .write_all(&request_frame(ApiKey::Metadata, 12, corr, &m(name)))
            .await
            .expect("write");
        assert!(response_in_time(&mut client).await.is_some());
    }
    let seen = seen.lock().expect("lock").0.clone();
    assert!(!seen.contains(&3) && seen.contains(&4), "{seen:?}");
}
