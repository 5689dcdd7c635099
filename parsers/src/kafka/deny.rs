//! Denials a client cannot tell from a broker's own ACL denial: for a request policy
//! refuses, a well-formed response of the same API key and version, with the request's
//! correlation id and the right response header version, carrying
//! TOPIC_AUTHORIZATION_FAILED on every topic and partition the request named, or the
//! fitting GROUP / TRANSACTIONAL_ID / CLUSTER authorization error where the API is not
//! about topics. This is the only place weir encodes Kafka messages; requests it
//! forwards are never re-encoded.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::Encodable;
use thiserror::Error;

use super::apis::{default_response, response_versions, set_top_level_error};
use super::header::decode_request_header;
use super::request::crate_decodable;

pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
pub const GROUP_AUTHORIZATION_FAILED: i16 = 30;
pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
pub const UNSUPPORTED_VERSION: i16 = 35;
pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;

/// Why no response can be synthesized; the caller closes the connection instead
/// (which no client mistakes for an answer, and none waits on forever).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DenyError {
    #[error("request header unreadable: {0}")]
    Header(#[from] super::header::HeaderError),
    #[error("no response can be built for API key {api_key} v{version}")]
    Unsupported { api_key: i16, version: i16 },
    #[error("request body of API key {api_key} v{version} does not decode")]
    Malformed { api_key: i16, version: i16 },
    #[error("encoding the response failed: {0}")]
    Encode(String),
}

/// The error a denial of `api_key` carries where the API is not about topics.
pub fn non_topic_error(api_key: i16) -> i16 {
    match api_key {
        // Group membership, offsets of a group, group administration.
        10 | 11 | 12 | 13 | 14 | 15 | 42 | 47 | 68 | 69 | 76 | 77 | 88 | 89 | 90 | 91 | 92 => {
            GROUP_AUTHORIZATION_FAILED
        }
        // Transactions and idempotent producers.
        22 | 24 | 25 | 26 | 28 | 65 => TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        _ => CLUSTER_AUTHORIZATION_FAILED,
    }
}

/// The denial for one request `payload` (a frame without its length prefix), as a whole
/// frame ready to write; `Ok(None)` for a request that gets no response (Produce with
/// `acks=0`: the caller must close the connection, as a broker does).
pub fn deny_response(payload: &Bytes) -> Result<Option<Bytes>, DenyError> {
    let (header, mut body) = decode_request_header(payload)?;
    let (api_key, version) = (header.api_key, header.api_version);
    let unsupported = DenyError::Unsupported { api_key, version };
    let Ok(key) = ApiKey::try_from(api_key) else {
        return Err(unsupported);
    };
    if key == ApiKey::ApiVersions && !crate_decodable(api_key, version) {
        // What a broker answers to a version it does not know: v0 with
        // UNSUPPORTED_VERSION, so the client retries with a version both know.
        return encode(key, 0, header.correlation_id, &unsupported_api_versions()).map(Some);
    }
    if let Some(r) = super::old::denial(api_key, version, header.correlation_id, &body) {
        return r.map_err(|_| DenyError::Malformed { api_key, version });
    }
    let range = response_versions(key);
    if !crate_decodable(api_key, version) || !(range.min..=range.max).contains(&version) {
        return Err(unsupported);
    }
    let request = RequestKind::decode(key, &mut body, version)
        .map_err(|_| DenyError::Malformed { api_key, version })?;
    if let RequestKind::Produce(p) = &request
        && p.acks == 0
    {
        return Ok(None);
    }
    let response = denial(&request, version, key);
    encode(key, version, header.correlation_id, &response).map(Some)
}

fn config_error(resource_type: i8) -> i16 {
    if resource_type == 2 {
        TOPIC_AUTHORIZATION_FAILED
    } else {
        CLUSTER_AUTHORIZATION_FAILED
    }
}

fn unsupported_api_versions() -> ResponseKind {
    let mut r = default_response(ApiKey::ApiVersions);
    set_top_level_error(&mut r, UNSUPPORTED_VERSION);
    r
}

fn encode(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    resp: &ResponseKind,
) -> Result<Bytes, DenyError> {
    let header_version = if key == ApiKey::ApiVersions {
        // ApiVersions responses always use header v0 (KIP-511): a client must read
        // them before it knows which versions the broker speaks.
        0
    } else {
        key.response_header_version(version)
    };
    let mut out = BytesMut::new();
    out.put_i32(0);
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut out, header_version)
        .map_err(|e| DenyError::Encode(e.to_string()))?;
    resp.encode(&mut out, version)
        .map_err(|e| DenyError::Encode(e.to_string()))?;
    let len =
        i32::try_from(out.len() - 4).map_err(|_| DenyError::Encode("response too large".into()))?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out.freeze())
}

/// The response that denies `request`: topic APIs mirror every topic and partition
/// with TOPIC_AUTHORIZATION_FAILED; the others carry their authorization error in
/// their top-level or per-entry error code.
fn denial(request: &RequestKind, v: i16, key: ApiKey) -> ResponseKind {
    use kafka_protocol::messages::*;
    const T: i16 = TOPIC_AUTHORIZATION_FAILED;
    const G: i16 = GROUP_AUTHORIZATION_FAILED;
    let other = non_topic_error(key as i16);
    match request {
        RequestKind::Produce(r) => ResponseKind::Produce(ProduceResponse::default().with_responses(
            r.topic_data
                .iter()
                .map(|t| {
                    produce_response::TopicProduceResponse::default()
                        .with_name(t.name.clone())
                        .with_topic_id(t.topic_id)
                        .with_partition_responses(
                            t.partition_data
                                .iter()
                                .map(|p| {
                                    produce_response::PartitionProduceResponse::default()
                                        .with_index(p.index)
                                        .with_error_code(T)
                                        .with_base_offset(-1)
                                })
                                .collect(),
                        )
                })
                .collect(),
        )),
        RequestKind::Fetch(r) => ResponseKind::Fetch(FetchResponse::default().with_responses(
            r.topics
                .iter()
                .map(|t| {
                    fetch_response::FetchableTopicResponse::default()
                        .with_topic(t.topic.clone())
                        .with_topic_id(t.topic_id)
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    fetch_response::PartitionData::default()
                                        .with_partition_index(p.partition)
                                        .with_error_code(T)
                                        .with_high_watermark(-1)
                                        .with_last_stable_offset(-1)
                                        .with_log_start_offset(-1)
                                        .with_records(Some(Bytes::new()))
                                })
                                .collect(),
                        )
                })
                .collect(),
        )),
        RequestKind::ListOffsets(r) => ResponseKind::ListOffsets(ListOffsetsResponse::default().with_topics(
            r.topics
                .iter()
                .map(|t| {
                    list_offsets_response::ListOffsetsTopicResponse::default()
                        .with_name(t.name.clone())
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    list_offsets_response::ListOffsetsPartitionResponse::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(T)
                                        .with_timestamp(-1)
                                        .with_offset(-1)
                                })
                                .collect(),
                        )
                })
                .collect(),
        )),
        RequestKind::Metadata(r) => ResponseKind::Metadata(
            MetadataResponse::default().with_topics(
                r.topics
                    .iter()
                    .flatten()
                    .map(|t| {
                        metadata_response::MetadataResponseTopic::default()
                            .with_name(t.name.clone())
                            .with_topic_id(t.topic_id)
                            .with_error_code(T)
                    })
                    .collect(),
            ),
        ),
        RequestKind::OffsetCommit(r) => ResponseKind::OffsetCommit(OffsetCommitResponse::default().with_topics(
            r.topics
                .iter()
                .map(|t| {
                    offset_commit_response::OffsetCommitResponseTopic::default()
                        .with_name(t.name.clone())
                        .with_topic_id(t.topic_id)
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    offset_commit_response::OffsetCommitResponsePartition::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(T)
                                })
                                .collect(),
                        )
                })
                .collect(),
        )),
        RequestKind::OffsetFetch(r) => {
            let partitions_v7 = |t: &offset_fetch_request::OffsetFetchRequestTopic| {
                offset_fetch_response::OffsetFetchResponseTopic::default()
                    .with_name(t.name.clone())
                    .with_partitions(
                        t.partition_indexes
                            .iter()
                            .map(|p| {
                                offset_fetch_response::OffsetFetchResponsePartition::default()
                                    .with_partition_index(*p)
                                    .with_committed_offset(-1)
                                    .with_error_code(T)
                            })
                            .collect(),
                    )
            };
            let groups = r
                .groups
                .iter()
                .map(|g| {
                    offset_fetch_response::OffsetFetchResponseGroup::default()
                        .with_group_id(g.group_id.clone())
                        .with_topics(
                            g.topics
                                .iter()
                                .flatten()
                                .map(|t| {
                                    offset_fetch_response::OffsetFetchResponseTopics::default()
                                        .with_name(t.name.clone())
                                        .with_topic_id(t.topic_id)
                                        .with_partitions(
                                            t.partition_indexes
                                                .iter()
                                                .map(|p| {
                                                    offset_fetch_response::OffsetFetchResponsePartitions::default()
                                                        .with_partition_index(*p)
                                                        .with_committed_offset(-1)
                                                        .with_error_code(T)
                                                })
                                                .collect(),
                                        )
                                })
                                .collect(),
                        )
                        // A request for all of a group's offsets names no topic.
                        .with_error_code(if g.topics.is_none() { G } else { 0 })
                })
                .collect();
            let whole_group = v < 8 && r.topics.is_none();
            ResponseKind::OffsetFetch(
                OffsetFetchResponse::default()
                    .with_topics(r.topics.iter().flatten().map(partitions_v7).collect())
                    .with_groups(groups)
                    .with_error_code(if whole_group { G } else { 0 }),
            )
        }
        RequestKind::CreateTopics(r) => ResponseKind::CreateTopics(CreateTopicsResponse::default().with_topics(
            r.topics
                .iter()
                .map(|t| {
                    create_topics_response::CreatableTopicResult::default()
                        .with_name(t.name.clone())
                        .with_error_code(T)
                        .with_num_partitions(-1)
                        .with_replication_factor(-1)
                })
                .collect(),
        )),
        RequestKind::DeleteTopics(r) => ResponseKind::DeleteTopics(
            DeleteTopicsResponse::default().with_responses(
                r.topic_names
                    .iter()
                    .map(|n| {
                        delete_topics_response::DeletableTopicResult::default()
                            .with_name(Some(n.clone()))
                            .with_error_code(T)
                    })
                    .chain(r.topics.iter().map(|t| {
                        delete_topics_response::DeletableTopicResult::default()
                            .with_name(t.name.clone())
                            .with_topic_id(t.topic_id)
                            .with_error_code(T)
                    }))
                    .collect(),
            ),
        ),
        RequestKind::DeleteRecords(r) => ResponseKind::DeleteRecords(DeleteRecordsResponse::default().with_topics(
            r.topics
                .iter()
                .map(|t| {
                    delete_records_response::DeleteRecordsTopicResult::default()
                        .with_name(t.name.clone())
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    delete_records_response::DeleteRecordsPartitionResult::default()
                                        .with_partition_index(p.partition_index)
                                        .with_low_watermark(-1)
                                        .with_error_code(T)
                                })
                                .collect(),
                        )
                })
                .collect(),
        )),
        RequestKind::OffsetForLeaderEpoch(r) => ResponseKind::OffsetForLeaderEpoch(
            OffsetForLeaderEpochResponse::default().with_topics(
                r.topics
                    .iter()
                    .map(|t| {
                        offset_for_leader_epoch_response::OffsetForLeaderTopicResult::default()
                            .with_topic(t.topic.clone())
                            .with_partitions(
                                t.partitions
                                    .iter()
                                    .map(|p| {
                                        offset_for_leader_epoch_response::EpochEndOffset::default()
                                            .with_partition(p.partition)
                                            .with_error_code(T)
                                            .with_leader_epoch(-1)
                                            .with_end_offset(-1)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::TxnOffsetCommit(r) => ResponseKind::TxnOffsetCommit(
            TxnOffsetCommitResponse::default().with_topics(
                r.topics
                    .iter()
                    .map(|t| {
                        txn_offset_commit_response::TxnOffsetCommitResponseTopic::default()
                            .with_name(t.name.clone())
                            .with_partitions(
                                t.partitions
                                    .iter()
                                    .map(|p| {
                                        txn_offset_commit_response::TxnOffsetCommitResponsePartition::default()
                                            .with_partition_index(p.partition_index)
                                            .with_error_code(T)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::CreatePartitions(r) => ResponseKind::CreatePartitions(
            CreatePartitionsResponse::default().with_results(
                r.topics
                    .iter()
                    .map(|t| {
                        create_partitions_response::CreatePartitionsTopicResult::default()
                            .with_name(t.name.clone())
                            .with_error_code(T)
                    })
                    .collect(),
            ),
        ),
        RequestKind::DescribeProducers(r) => ResponseKind::DescribeProducers(
            DescribeProducersResponse::default().with_topics(
                r.topics
                    .iter()
                    .map(|t| {
                        describe_producers_response::TopicResponse::default()
                            .with_name(t.name.clone())
                            .with_partitions(
                                t.partition_indexes
                                    .iter()
                                    .map(|p| {
                                        describe_producers_response::PartitionResponse::default()
                                            .with_partition_index(*p)
                                            .with_error_code(T)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        RequestKind::DescribeGroups(r) => ResponseKind::DescribeGroups(
            DescribeGroupsResponse::default().with_groups(
                r.groups
                    .iter()
                    .map(|g| {
                        describe_groups_response::DescribedGroup::default()
                            .with_group_id(g.clone())
                            .with_error_code(G)
                    })
                    .collect(),
            ),
        ),
        RequestKind::ConsumerGroupDescribe(r) => ResponseKind::ConsumerGroupDescribe(
            ConsumerGroupDescribeResponse::default().with_groups(
                r.group_ids
                    .iter()
                    .map(|g| {
                        consumer_group_describe_response::DescribedGroup::default()
                            .with_group_id(g.clone())
                            .with_error_code(G)
                    })
                    .collect(),
            ),
        ),
        RequestKind::DeleteGroups(r) => ResponseKind::DeleteGroups(
            DeleteGroupsResponse::default().with_results(
                r.groups_names
                    .iter()
                    .map(|g| {
                        delete_groups_response::DeletableGroupResult::default()
                            .with_group_id(g.clone())
                            .with_error_code(G)
                    })
                    .collect(),
            ),
        ),
        // v0-3 name one transaction's partitions; v4+ answer at the top level below.
        RequestKind::AddPartitionsToTxn(r) if v < 4 => ResponseKind::AddPartitionsToTxn(
            AddPartitionsToTxnResponse::default().with_results_by_topic_v3_and_below(
                r.v3_and_below_topics
                    .iter()
                    .map(|t| {
                        add_partitions_to_txn_response::AddPartitionsToTxnTopicResult::default()
                            .with_name(t.name.clone())
                            .with_results_by_partition(
                                t.partitions
                                    .iter()
                                    .map(|p| {
                                        add_partitions_to_txn_response::AddPartitionsToTxnPartitionResult::default()
                                            .with_partition_index(*p)
                                            .with_partition_error_code(T)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        // Config resources: topics (type 2) get the topic error, the rest the cluster's.
        RequestKind::DescribeConfigs(r) => ResponseKind::DescribeConfigs(
            DescribeConfigsResponse::default().with_results(
                r.resources
                    .iter()
                    .map(|x| {
                        describe_configs_response::DescribeConfigsResult::default()
                            .with_resource_type(x.resource_type)
                            .with_resource_name(x.resource_name.clone())
                            .with_error_code(config_error(x.resource_type))
                    })
                    .collect(),
            ),
        ),
        RequestKind::AlterConfigs(r) => ResponseKind::AlterConfigs(
            AlterConfigsResponse::default().with_responses(
                r.resources
                    .iter()
                    .map(|x| {
                        alter_configs_response::AlterConfigsResourceResponse::default()
                            .with_resource_type(x.resource_type)
                            .with_resource_name(x.resource_name.clone())
                            .with_error_code(config_error(x.resource_type))
                    })
                    .collect(),
            ),
        ),
        RequestKind::IncrementalAlterConfigs(r) => ResponseKind::IncrementalAlterConfigs(
            IncrementalAlterConfigsResponse::default().with_responses(
                r.resources
                    .iter()
                    .map(|x| {
                        incremental_alter_configs_response::AlterConfigsResourceResponse::default()
                            .with_resource_type(x.resource_type)
                            .with_resource_name(x.resource_name.clone())
                            .with_error_code(config_error(x.resource_type))
                    })
                    .collect(),
            ),
        ),
        RequestKind::FindCoordinator(r) => {
            let code = if r.key_type == 1 {
                TRANSACTIONAL_ID_AUTHORIZATION_FAILED
            } else {
                G
            };
            // v0-3 answer for one key at the top level, v4+ per key.
            let top = if v < 4 {
                FindCoordinatorResponse::default()
                    .with_error_code(code)
                    .with_node_id(BrokerId(-1))
                    .with_port(-1)
            } else {
                FindCoordinatorResponse::default()
            };
            ResponseKind::FindCoordinator(
                top.with_coordinators(
                        r.coordinator_keys
                            .iter()
                            .map(|k| {
                                find_coordinator_response::Coordinator::default()
                                    .with_key(k.clone())
                                    .with_node_id(BrokerId(-1))
                                    .with_port(-1)
                                    .with_error_code(code)
                            })
                            .collect(),
                    ),
            )
        }
        _ => {
            let mut resp = default_response(key);
            set_top_level_error(&mut resp, other);
            // Some versions have no top-level error code (ElectLeaders v0 answers per
            // partition only); the crate refuses to encode a field a version lacks, so
            // those get the empty response: an answer with nothing in it, never a hang.
            if resp.encode(&mut BytesMut::new(), v).is_err() {
                resp = default_response(key);
            }
            resp
        }
    }
}
