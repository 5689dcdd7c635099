//! Synthesized denials decode, as a client decodes them, as a response of the request's
//! key and version with its correlation id and the right error codes — for every
//! (API key, version) the crate knows.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use super::apis::{
    default_request, request_versions, response_versions, set_top_level_error, top_level_error,
};
use super::{
    CLUSTER_AUTHORIZATION_FAILED, DenyError, GROUP_AUTHORIZATION_FAILED,
    TOPIC_AUTHORIZATION_FAILED, TRANSACTIONAL_ID_AUTHORIZATION_FAILED, UNSUPPORTED_VERSION, apis,
    deny_response, non_topic_error,
};

/// Keys whose denial mirrors topics, partitions or groups instead of a top-level code.
const MIRRORED: &[i16] = &[
    0, 1, 2, 3, 8, 9, 10, 15, 19, 20, 21, 23, 28, 32, 33, 37, 42, 44, 61, 69,
];

/// See `every_key_and_version_gets_a_well_formed_denial`.
const EMPTY_DENIALS: &[&str] = &[
    "WriteTxnMarkers v1",
    "CreateAcls v1",
    "CreateAcls v2",
    "CreateAcls v3",
    "DeleteAcls v1",
    "DeleteAcls v2",
    "DeleteAcls v3",
    "AlterReplicaLogDirs v1",
    "AlterReplicaLogDirs v2",
    "DescribeLogDirs v1",
    "DescribeLogDirs v2",
    "ElectLeaders v0",
    "AlterClientQuotas v0",
    "AlterClientQuotas v1",
    "AlterUserScramCredentials v0",
    "DescribeTransactions v0",
    "DescribeTopicPartitions v0",
    "ShareGroupDescribe v1",
    "InitializeShareGroupState v0",
    "ReadShareGroupState v0",
    "WriteShareGroupState v0",
    "DeleteShareGroupState v0",
    "ReadShareGroupStateSummary v0",
    "DescribeShareGroupOffsets v0",
];

fn payload(key: ApiKey, v: i16, body: &RequestKind) -> Option<Bytes> {
    let mut out = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(v)
        .with_correlation_id(0x1234_5678)
        .with_client_id(Some(StrBytes::from_static_str("c")))
        .encode(&mut out, key.request_header_version(v))
        .ok()?;
    body.encode(&mut out, v).ok()?;
    Some(out.freeze())
}

/// Decode a synthesized frame as the client would; the response and its version.
fn client_reads(key: ApiKey, v: i16, frame: &Bytes) -> ResponseKind {
    let mut buf = frame.clone();
    let len = buf.get_i32();
    assert_eq!(
        usize::try_from(len).ok(),
        Some(buf.remaining()),
        "{key:?} v{v}: length"
    );
    let hv = if key == ApiKey::ApiVersions {
        0
    } else {
        key.response_header_version(v)
    };
    let h = ResponseHeader::decode(&mut buf, hv).expect("response header");
    assert_eq!(h.correlation_id, 0x1234_5678, "{key:?} v{v}");
    let r = ResponseKind::decode(key, &mut buf, v).unwrap_or_else(|e| panic!("{key:?} v{v}: {e}"));
    assert_eq!(buf.remaining(), 0, "{key:?} v{v}: bytes left");
    r
}

/// Whether `key`'s response carries a top-level error code in version `v`.
fn carries_top_level_error(key: ApiKey, v: i16) -> bool {
    let mut r = apis::default_response(key);
    if !set_top_level_error(&mut r, 1) {
        return false;
    }
    let mut out = BytesMut::new();
    if r.encode(&mut out, v).is_err() {
        return false;
    }
    let mut b = out.freeze();
    ResponseKind::decode(key, &mut b, v)
        .ok()
        .and_then(|d| top_level_error(&d))
        == Some(1)
}

#[test]
fn every_key_and_version_gets_a_well_formed_denial() {
    let mut pairs = 0;
    let mut missing = Vec::new();
    let mut no_top_level = Vec::new();
    let mut skipped = Vec::new();
    for key in ApiKey::iter() {
        let range = request_versions(key);
        for v in range.min..=range.max {
            let mut req = default_request(key);
            if let RequestKind::Produce(p) = &mut req {
                // acks=0 gets no response at all (tested below).
                p.acks = 1;
            }
            let Some(p) = payload(key, v, &req) else {
                skipped.push(format!("{key:?} v{v}"));
                continue;
            };
            let resp_range = response_versions(key);
            if !(resp_range.min..=resp_range.max).contains(&v) {
                missing.push(format!("{key:?} v{v}"));
                continue;
            }
            let frame = match deny_response(&p) {
                Ok(Some(f)) => f,
                other => panic!("{key:?} v{v}: {other:?}"),
            };
            let resp = client_reads(key, v, &frame);
            pairs += 1;
            if MIRRORED.contains(&(key as i16)) || (key == ApiKey::AddPartitionsToTxn && v < 4) {
                continue;
            }
            if !carries_top_level_error(key, v) {
                no_top_level.push(format!("{key:?} v{v}"));
            } else {
                assert_eq!(
                    top_level_error(&resp),
                    Some(non_topic_error(key as i16)),
                    "{key:?} v{v}"
                );
            }
        }
    }
    assert!(
        missing.is_empty(),
        "request versions without a response version: {missing:?}"
    );
    println!("skipped: {skipped:?}");
    // The pairs whose response has no top-level error code and that weir does not
    // mirror entry by entry: they get an empty response. Keep this list short.
    println!("{pairs} pairs; empty denials: {no_top_level:?}");
    assert_eq!(no_top_level, EMPTY_DENIALS, "{no_top_level:?}");
}

fn topic(n: &str) -> TopicName {
    TopicName(StrBytes::from_string(n.to_owned()))
}

/// Every error code in the decoded response, by its debug rendering (generic across
/// response types: each `error_code` field, at any depth).
fn codes(resp: &ResponseKind) -> Vec<i16> {
    let text = format!("{resp:?}");
    text.match_indices("error_code: ")
        .filter_map(|(i, m)| {
            let rest = &text[i + m.len()..];
            let end = rest.find(|c: char| c != '-' && !c.is_ascii_digit())?;
            rest[..end].parse().ok()
        })
        .collect()
}

#[test]
fn topic_requests_get_topic_authorization_failed_on_every_partition() {
    let id = uuid::Uuid::from_bytes([3; 16]);
    let produce = move |v: i16| {
        let t = produce_request::TopicProduceData::default().with_partition_data(vec![
            produce_request::PartitionProduceData::default().with_index(0),
            produce_request::PartitionProduceData::default().with_index(1),
        ]);
        let t = if v >= 13 {
            t.with_topic_id(id)
        } else {
            t.with_name(topic("a"))
        };
        RequestKind::Produce(
            ProduceRequest::default()
                .with_acks(-1)
                .with_topic_data(vec![t]),
        )
    };
    let fetch = move |v: i16| {
        let t = fetch_request::FetchTopic::default().with_partitions(vec![
            fetch_request::FetchPartition::default().with_partition(2),
        ]);
        let t = if v >= 13 {
            t.with_topic_id(id)
        } else {
            t.with_topic(topic("a"))
        };
        RequestKind::Fetch(
            FetchRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_topics(vec![t]),
        )
    };
    let metadata = |_v: i16| {
        RequestKind::Metadata(MetadataRequest::default().with_topics(Some(vec![
            metadata_request::MetadataRequestTopic::default().with_name(Some(topic("a"))),
            metadata_request::MetadataRequestTopic::default().with_name(Some(topic("b"))),
        ])))
    };
    let list_offsets = |_v: i16| {
        RequestKind::ListOffsets(
            ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_topics(vec![
                    list_offsets_request::ListOffsetsTopic::default()
                        .with_name(topic("a"))
                        .with_partitions(vec![
                            list_offsets_request::ListOffsetsPartition::default(),
                        ]),
                ]),
        )
    };
    let commit = |_v: i16| {
        RequestKind::OffsetCommit(OffsetCommitRequest::default().with_topics(vec![
                offset_commit_request::OffsetCommitRequestTopic::default()
                    .with_name(topic("a"))
                    .with_partitions(vec![
                        offset_commit_request::OffsetCommitRequestPartition::default(),
                    ]),
            ]))
    };
    let offset_fetch = |v: i16| {
        if v >= 8 {
            RequestKind::OffsetFetch(OffsetFetchRequest::default().with_groups(vec![
                offset_fetch_request::OffsetFetchRequestGroup::default().with_topics(Some(vec![
                    offset_fetch_request::OffsetFetchRequestTopics::default()
                        .with_name(topic("a"))
                        .with_partition_indexes(vec![0, 1]),
                ])),
            ]))
        } else {
            RequestKind::OffsetFetch(OffsetFetchRequest::default().with_topics(Some(vec![
                offset_fetch_request::OffsetFetchRequestTopic::default()
                    .with_name(topic("a"))
                    .with_partition_indexes(vec![0, 1]),
            ])))
        }
    };
    let create = |_v: i16| {
        RequestKind::CreateTopics(CreateTopicsRequest::default().with_topics(vec![
            create_topics_request::CreatableTopic::default().with_name(topic("a")),
        ]))
    };
    let delete = |v: i16| {
        RequestKind::DeleteTopics(if v >= 6 {
            DeleteTopicsRequest::default().with_topics(vec![
                delete_topics_request::DeleteTopicState::default().with_name(Some(topic("a"))),
            ])
        } else {
            DeleteTopicsRequest::default().with_topic_names(vec![topic("a")])
        })
    };
    let epoch = |_v: i16| {
        RequestKind::OffsetForLeaderEpoch(OffsetForLeaderEpochRequest::default().with_topics(vec![
                offset_for_leader_epoch_request::OffsetForLeaderTopic::default()
                    .with_topic(topic("a"))
                    .with_partitions(vec![
                        offset_for_leader_epoch_request::OffsetForLeaderPartition::default(),
                    ]),
            ]))
    };
    type Build = Box<dyn Fn(i16) -> RequestKind>;
    let cases: Vec<(ApiKey, Build, usize)> = vec![
        (ApiKey::Produce, Box::new(produce), 2),
        (ApiKey::Fetch, Box::new(fetch), 1),
        (ApiKey::Metadata, Box::new(metadata), 2),
        (ApiKey::ListOffsets, Box::new(list_offsets), 1),
        (ApiKey::OffsetCommit, Box::new(commit), 1),
        (ApiKey::OffsetFetch, Box::new(offset_fetch), 2),
        (ApiKey::CreateTopics, Box::new(create), 1),
        (ApiKey::DeleteTopics, Box::new(delete), 1),
        (ApiKey::OffsetForLeaderEpoch, Box::new(epoch), 1),
    ];
    for (key, build, want) in cases {
        let range = request_versions(key);
        for v in range.min..=range.max {
            let p = payload(key, v, &build(v)).unwrap_or_else(|| panic!("{key:?} v{v} encodes"));
            let frame = deny_response(&p)
                .unwrap_or_else(|e| panic!("{key:?} v{v}: {e}"))
                .unwrap_or_else(|| panic!("{key:?} v{v}: no response"));
            let resp = client_reads(key, v, &frame);
            let n = codes(&resp)
                .iter()
                .filter(|c| **c == TOPIC_AUTHORIZATION_FAILED)
                .count();
            assert_eq!(n, want, "{key:?} v{v}: {resp:?}");
        }
    }
}

#[test]
fn group_transaction_and_cluster_apis_get_their_authorization_error() {
    let cases: Vec<(ApiKey, i16, RequestKind, i16)> = vec![
        (
            ApiKey::JoinGroup,
            9,
            RequestKind::JoinGroup(JoinGroupRequest::default()),
            GROUP_AUTHORIZATION_FAILED,
        ),
        (
            ApiKey::Heartbeat,
            4,
            RequestKind::Heartbeat(HeartbeatRequest::default()),
            GROUP_AUTHORIZATION_FAILED,
        ),
        (
            ApiKey::ConsumerGroupHeartbeat,
            0,
            RequestKind::ConsumerGroupHeartbeat(ConsumerGroupHeartbeatRequest::default()),
            GROUP_AUTHORIZATION_FAILED,
        ),
        (
            ApiKey::FindCoordinator,
            3,
            RequestKind::FindCoordinator(FindCoordinatorRequest::default()),
            GROUP_AUTHORIZATION_FAILED,
        ),
        (
            ApiKey::FindCoordinator,
            4,
            RequestKind::FindCoordinator(
                FindCoordinatorRequest::default()
                    .with_key_type(1)
                    .with_coordinator_keys(vec![StrBytes::from_static_str("tx")]),
            ),
            TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        ),
        (
            ApiKey::DescribeGroups,
            5,
            RequestKind::DescribeGroups(
                DescribeGroupsRequest::default()
                    .with_groups(vec![GroupId(StrBytes::from_static_str("g"))]),
            ),
            GROUP_AUTHORIZATION_FAILED,
        ),
        (
            ApiKey::InitProducerId,
            4,
            RequestKind::InitProducerId(InitProducerIdRequest::default()),
            TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        ),
        (
            ApiKey::DescribeAcls,
            3,
            RequestKind::DescribeAcls(DescribeAclsRequest::default()),
            CLUSTER_AUTHORIZATION_FAILED,
        ),
    ];
    for (key, v, req, code) in cases {
        let p = payload(key, v, &req).expect("encodes");
        let frame = deny_response(&p).expect("denial").expect("response");
        let resp = client_reads(key, v, &frame);
        assert!(codes(&resp).contains(&code), "{key:?} v{v}: {resp:?}");
    }
}

#[test]
fn api_versions_in_an_unknown_version_gets_v0_unsupported_version() {
    // ApiVersions v9 (newer than weir knows), as a new client's first request.
    let mut p = BytesMut::new();
    p.extend_from_slice(&[0, 18, 0, 9, 0, 0, 0, 7, 0, 1, b'c', 0]);
    let frame = deny_response(&p.freeze())
        .expect("answer")
        .expect("response");
    let mut buf = frame.slice(4..);
    assert_eq!(buf.get_i32(), 7, "correlation id, header v0");
    let r = ApiVersionsResponse::decode(&mut buf, 0).expect("v0 body");
    assert_eq!(r.error_code, UNSUPPORTED_VERSION);
}

#[test]
fn produce_acks_0_gets_no_response_and_unknown_versions_none() {
    let p = payload(
        ApiKey::Produce,
        9,
        &RequestKind::Produce(ProduceRequest::default().with_acks(0)),
    )
    .expect("encodes");
    assert_eq!(deny_response(&p), Ok(None));
    // Produce v2 (read by hand, `old.rs`) with acks=0: no response either.
    let old = Bytes::from_static(&[0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(deny_response(&old), Ok(None));
    // LeaderAndIsr (key 4), which the crate does not know: no response can be built
    // (the proxy closes the connection).
    let unknown = Bytes::from_static(&[0, 4, 0, 0, 0, 0, 0, 1, 0, 0]);
    assert_eq!(
        deny_response(&unknown),
        Err(DenyError::Unsupported {
            api_key: 4,
            version: 0
        })
    );
}

#[test]
fn old_versions_get_a_denial_in_their_own_format() {
    // Produce v2, acks=1, topic "secret", partition 0 with three bytes of records.
    let mut p = BytesMut::new();
    p.put_i16(0);
    p.put_i16(2);
    p.put_i32(41);
    p.put_i16(-1);
    p.put_i16(1);
    p.put_i32(1000);
    p.put_i32(1);
    p.put_i16(6);
    p.put_slice(b"secret");
    p.put_i32(1);
    p.put_i32(0);
    p.put_i32(3);
    p.put_slice(&[1, 2, 3]);
    let frame = deny_response(&p.freeze())
        .expect("answered")
        .expect("acks=1");
    let mut buf = frame.slice(4..);
    assert_eq!(buf.get_i32(), 41, "correlation id, header v0");
    assert_eq!(buf.get_i32(), 1);
    assert_eq!(buf.get_i16(), 6);
    assert_eq!(&buf.split_to(6)[..], b"secret");
    assert_eq!(buf.get_i32(), 1);
    assert_eq!(buf.get_i32(), 0, "partition");
    assert_eq!(buf.get_i16(), TOPIC_AUTHORIZATION_FAILED);
    assert_eq!(buf.get_i64(), -1, "base offset");
    assert_eq!(buf.get_i64(), -1, "log append time (v2)");
    assert_eq!(buf.get_i32(), 0, "throttle time (v1+)");
    assert!(buf.is_empty());
}
