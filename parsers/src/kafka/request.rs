//! Request facts: what policy needs from one request frame. The header always decodes;
//! the body is decoded with the `kafka-protocol` crate where it knows the key and version,
//! and only read — the frame is forwarded as it came, never re-encoded.

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, RequestKind};
use thiserror::Error;

use super::apis::request_versions;
use super::header::{HeaderError, RequestHeader, decode_request_header};

/// A topic as a request names it: by name, or by id in the versions that use ids
/// (Produce v13+, Fetch v13+, Metadata v10+ when the name is null, OffsetCommit v10+,
/// OffsetFetch v10+, DeleteTopics v6+ when the name is null, ShareFetch, ShareAcknowledge,
/// ConsumerGroupHeartbeat assignments).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TopicRef {
    Name(String),
    Id([u8; 16]),
}

/// Which topics a request is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topics {
    /// These topics (possibly none: an API that is not about topics, or an empty list).
    Listed(Vec<TopicRef>),
    /// Every topic: Metadata with a null or empty list (the one response weir filters).
    All,
    /// Topics weir cannot name: an API that names topics where weir does not extract
    /// them (inter-broker, KRaft and share-group state APIs), or a request that means
    /// "every topic" outside Metadata (a null OffsetFetch or ElectLeaders list, an empty
    /// DescribeTopicPartitions, a regex subscription): a topic rule cannot allow it.
    Unknown,
}

impl Topics {
    /// Whether some topic is named by id.
    pub fn has_ids(&self) -> bool {
        matches!(self, Topics::Listed(list) if list.iter().any(|t| matches!(t, TopicRef::Id(_))))
    }
}

/// What the decoded body says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyFacts {
    pub topics: Topics,
    /// Produce only: 0 means the broker sends no response.
    pub acks: Option<i16>,
    /// Fetch v7+ only: the fetch session (KIP-227) the request opens, continues or
    /// closes.
    pub fetch_session: Option<FetchSession>,
}

/// A Fetch request's session fields (KIP-227). An incremental Fetch (`epoch > 0`)
/// names only the partitions that changed — often none — and the broker answers for
/// every partition of the session: its topics are those of the Fetch requests that
/// built the session, not the ones it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchSession {
    /// 0 when opening a session or fetching without one; else the broker's id.
    pub id: i32,
    /// 0 opens a session, -1 fetches without one (closing `id` if set), above 0
    /// continues session `id`.
    pub epoch: i32,
}

impl FetchSession {
    /// Whether this Fetch continues a session (its named topics are only the changes).
    pub fn is_incremental(&self) -> bool {
        // Kafka's own test (`FetchMetadata.isFull`): every epoch but 0 (initial) and -1
        // (final) continues a session — one with id 0, or a negative epoch, is an
        // unknown session's, never a full Fetch.
        self.epoch != 0 && self.epoch != -1
    }

    /// Whether this Fetch asks the broker to open a new session.
    pub fn opens(&self) -> bool {
        self.epoch == 0
    }
}

/// Why the body has no facts.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BodyError {
    /// An API key the crate does not know, or a version outside its range: policy that
    /// needs topics cannot be decided (`unsupported version for topic rule`).
    #[error("unsupported version {version} of API key {api_key}")]
    Unsupported { api_key: i16, version: i16 },
    /// The crate knows the version but the bytes do not decode, or leave bytes over:
    /// the request is malformed and the connection should close.
    #[error("malformed body of API key {api_key} v{version}: {reason}")]
    Malformed {
        api_key: i16,
        version: i16,
        reason: String,
    },
}

/// Everything weir reads from one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFacts {
    pub header: RequestHeader,
    pub body: Result<BodyFacts, BodyError>,
}

/// Whether weir reads the body of this key and version: with the crate, or by hand
/// (the versions Kafka 4 removed, `old`).
pub fn body_decodable(api_key: i16, version: i16) -> bool {
    crate_decodable(api_key, version) || super::old::handles(api_key, version)
}

/// Whether the crate can decode a body of this key and version.
pub(super) fn crate_decodable(api_key: i16, version: i16) -> bool {
    ApiKey::try_from(api_key).is_ok_and(|key| {
        let range = request_versions(key);
        (range.min..=range.max).contains(&version)
    })
}

/// Array elements and unknown tagged fields one request may decode into, all nested
/// arrays together (`--kafka-max-request-entries`). Every element takes at least a
/// byte on the wire but tens in memory: without a bound a 100 MiB frame of one-byte
/// elements decodes into gigabytes. 100 000 covers a Fetch or OffsetCommit of
/// thousands of partitions and Metadata naming 100 000 topics.
pub const DEFAULT_MAX_REQUEST_ENTRIES: usize = 100_000;

/// Read the facts of one request frame's payload (the bytes after the length prefix),
/// decoding at most [`DEFAULT_MAX_REQUEST_ENTRIES`] entries.
pub fn request_facts(payload: &Bytes) -> Result<RequestFacts, HeaderError> {
    request_facts_bounded(payload, DEFAULT_MAX_REQUEST_ENTRIES)
}

/// Read the facts of one request frame's payload, decoding at most `max_entries` array
/// elements and tagged fields (header and body together); a request with more is
/// [`BodyError::Malformed`] (or a header error when its header alone has more). Only
/// a header that cannot be read is an error; body problems are in `body`.
pub fn request_facts_bounded(
    payload: &Bytes,
    max_entries: usize,
) -> Result<RequestFacts, HeaderError> {
    kafka_protocol::protocol::types::with_decode_budget(max_entries, || {
        let (header, body) = decode_request_header(payload)?;
        let body = body_facts(header.api_key, header.api_version, body);
        Ok(RequestFacts { header, body })
    })
}

fn body_facts(api_key: i16, version: i16, mut body: Bytes) -> Result<BodyFacts, BodyError> {
    let unsupported = BodyError::Unsupported { api_key, version };
    let Ok(key) = ApiKey::try_from(api_key) else {
        return Err(unsupported);
    };
    let malformed = |reason: String| BodyError::Malformed {
        api_key,
        version,
        reason,
    };
    if !crate_decodable(api_key, version) {
        // The versions Kafka 4 removed, read by hand.
        return match super::old::facts(api_key, version, &body) {
            Some(r) => r.map_err(malformed),
            None => Err(unsupported),
        };
    }
    let whole = body.clone();
    let request =
        RequestKind::decode(key, &mut body, version).map_err(|e| malformed(format!("{e:#}")))?;
    if !body.is_empty() && !librdkafka_all_topics(&request, version, &whole, &body) {
        // The broker reads the same schema; bytes it would ignore are a smuggling risk
        // and no real client sends them.
        return Err(malformed(format!("{} bytes after the body", body.len())));
    }
    Ok(facts_of(&request, version))
}

/// librdkafka's Metadata for every topic in a flexible version (v9+) keeps the
/// four-byte placeholder it wrote for the topic count (`00 00 00 00`, "keep 0" in
/// `rd_kafka_MetadataRequest0`) instead of the one-byte null: a broker reads a null
/// topic list, `allow_auto_topic_creation` and `include_topic_authorized_operations`
/// false and no tagged fields from those four bytes, and ignores the three that
/// follow (the fields librdkafka meant). The crate reads the same; the three bytes are
/// not extra data but that quirk, so the request is not malformed. Every other
/// trailing byte still is.
fn librdkafka_all_topics(request: &RequestKind, version: i16, whole: &Bytes, rest: &Bytes) -> bool {
    matches!(request, RequestKind::Metadata(m) if m.topics.is_none())
        && version >= 9
        && whole.len() == 7
        && whole.starts_with(&[0, 0, 0, 0])
        && rest.len() == 3
}

fn name(n: &str) -> TopicRef {
    TopicRef::Name(n.to_owned())
}

fn id(bytes: &[u8; 16]) -> TopicRef {
    TopicRef::Id(*bytes)
}

fn listed(topics: Vec<TopicRef>) -> BodyFacts {
    BodyFacts {
        topics: Topics::Listed(topics),
        acks: None,
        fetch_session: None,
    }
}

fn unknown() -> BodyFacts {
    BodyFacts {
        topics: Topics::Unknown,
        acks: None,
        fetch_session: None,
    }
}

fn all() -> BodyFacts {
    BodyFacts {
        topics: Topics::All,
        acks: None,
        fetch_session: None,
    }
}

/// A topic entry that may carry a name, an id or both (all-zero: no id): every one
/// it carries.
fn name_and_id(n: Option<&str>, topic_id: &[u8; 16]) -> Vec<TopicRef> {
    let mut out = Vec::with_capacity(2);
    if let Some(n) = n {
        out.push(name(n));
    }
    if topic_id != &[0; 16] || n.is_none() {
        out.push(id(topic_id));
    }
    out
}

/// Kafka's resource type TOPIC (configs and ACLs) and pattern type LITERAL (ACLs).
const TOPIC_RESOURCE: i8 = 2;
const LITERAL: i8 = 3;

/// The topics of config or ACL resources `(type, name, pattern type)`: each must be
/// a literal topic name (not `*`), or the request names what no topic rule can allow.
fn resources<'a>(
    it: impl Iterator<Item = (i8, Option<&'a kafka_protocol::protocol::StrBytes>, i8)>,
) -> BodyFacts {
    let mut out = Vec::new();
    for (kind, n, pattern) in it {
        match n {
            Some(n) if kind == TOPIC_RESOURCE && pattern == LITERAL && n.as_str() != "*" => {
                out.push(name(n));
            }
            _ => return unknown(),
        }
    }
    listed(out)
}

/// The topics of every API that names topics. An API not listed here is about groups,
/// transactions, the cluster, ACLs or credentials and names no topic.
fn facts_of(request: &RequestKind, v: i16) -> BodyFacts {
    use RequestKind as R;
    match request {
        R::Produce(r) => BodyFacts {
            topics: Topics::Listed(
                r.topic_data
                    .iter()
                    .map(|t| {
                        if v >= 13 {
                            id(t.topic_id.as_bytes())
                        } else {
                            name(&t.name)
                        }
                    })
                    .collect(),
            ),
            acks: Some(r.acks),
            fetch_session: None,
        },
        R::Fetch(r) => BodyFacts {
            fetch_session: (v >= 7).then_some(FetchSession {
                id: r.session_id,
                epoch: r.session_epoch,
            }),
            ..listed(
                r.topics
                    .iter()
                    .map(|t| {
                        if v >= 13 {
                            id(t.topic_id.as_bytes())
                        } else {
                            name(&t.topic)
                        }
                    })
                    .chain(r.forgotten_topics_data.iter().map(|t| {
                        if v >= 13 {
                            id(t.topic_id.as_bytes())
                        } else {
                            name(&t.topic)
                        }
                    }))
                    .collect(),
            )
        },
        R::ListOffsets(r) => listed(r.topics.iter().map(|t| name(&t.name)).collect()),
        R::Metadata(r) => match &r.topics {
            None => all(),
            Some(t) if t.is_empty() => all(),
            // From v10 an entry may carry an id. Kafka answers by the id when one is
            // set, tansu by the name: an entry with both is about both, and both
            // must be allowed (review F3).
            Some(t) => listed(
                t.iter()
                    .flat_map(|t| {
                        name_and_id(t.name.as_deref().map(|n| &**n), t.topic_id.as_bytes())
                    })
                    .collect(),
            ),
        },
        R::OffsetCommit(r) => listed(
            r.topics
                .iter()
                .map(|t| {
                    if v >= 10 {
                        id(t.topic_id.as_bytes())
                    } else {
                        name(&t.name)
                    }
                })
                .collect(),
        ),
        R::OffsetFetch(r) => {
            // A null topic list (v2-7, or a group's from v8) asks for every topic
            // the group committed: not something a topic rule can allow.
            if ((2..=7).contains(&v) && r.topics.is_none())
                || (v >= 8 && r.groups.iter().any(|g| g.topics.is_none()))
            {
                return unknown();
            }
            let mut out: Vec<TopicRef> = r.topics.iter().flatten().map(|t| name(&t.name)).collect();
            for g in &r.groups {
                out.extend(g.topics.iter().flatten().map(|t| {
                    if v >= 10 {
                        id(t.topic_id.as_bytes())
                    } else {
                        name(&t.name)
                    }
                }));
            }
            listed(out)
        }
        R::OffsetDelete(r) => listed(r.topics.iter().map(|t| name(&t.name)).collect()),
        R::TxnOffsetCommit(r) => listed(r.topics.iter().map(|t| name(&t.name)).collect()),
        R::AddPartitionsToTxn(r) => listed(
            r.v3_and_below_topics
                .iter()
                .map(|t| name(&t.name))
                .chain(
                    r.transactions
                        .iter()
                        .flat_map(|x| x.topics.iter().map(|t| name(&t.name))),
                )
                .collect(),
        ),
        R::CreateTopics(r) => listed(r.topics.iter().map(|t| name(&t.name)).collect()),
        R::DeleteTopics(r) => listed(
            r.topic_names
                .iter()
                .map(|n| name(n))
                // Kafka refuses an entry with both; tansu deletes by the id when it is
                // set: both must be allowed (review F3).
                .chain(r.topics.iter().flat_map(|t| {
                    name_and_id(t.name.as_deref().map(|n| &**n), t.topic_id.as_bytes())
                }))
                .collect(),
        ),
        R::DeleteRecords(r) => listed(r.topics.iter().map(|t| name(&t.name)).collect()),
        R::CreatePartitions(r) => listed(r.topics.iter().map(|t| name(&t.name)).collect()),
        // Null: every partition of every topic. Only Metadata's "every topic"
        // is answered with a filtered response; elsewhere a topic rule cannot allow it.
        R::ElectLeaders(r) => match &r.topic_partitions {
            None => unknown(),
            Some(t) => listed(t.iter().map(|t| name(&t.topic)).collect()),
        },
        R::OffsetForLeaderEpoch(r) => listed(r.topics.iter().map(|t| name(&t.topic)).collect()),
        R::DescribeProducers(r) => listed(r.topics.iter().map(|t| name(&t.name)).collect()),
        // An empty list asks for every topic (from the cursor on); the cursor
        // only says where a listing resumes.
        R::DescribeTopicPartitions(r) if r.topics.is_empty() => unknown(),
        R::DescribeTopicPartitions(r) => listed(r.topics.iter().map(|t| name(&t.name)).collect()),
        // A subscription by regex may match any topic.
        R::ConsumerGroupHeartbeat(r) if r.subscribed_topic_regex.is_some() => unknown(),
        R::ConsumerGroupHeartbeat(r) => listed(
            r.subscribed_topic_names
                .iter()
                .flatten()
                .map(|n| name(n))
                .chain(
                    r.topic_partitions
                        .iter()
                        .flatten()
                        .map(|t| id(t.topic_id.as_bytes())),
                )
                .collect(),
        ),
        R::AlterPartitionReassignments(r) => {
            listed(r.topics.iter().map(|t| name(&t.name)).collect())
        }
        R::ListPartitionReassignments(r) => match &r.topics {
            None => unknown(),
            Some(t) => listed(t.iter().map(|t| name(&t.name)).collect()),
        },
        // Config resources of type 2 are topics; a broker's, a group's, ... config
        // is no topic's, so a rule with a topic cannot allow it (review F4).
        R::DescribeConfigs(r) => resources(
            r.resources
                .iter()
                .map(|x| (x.resource_type, Some(&x.resource_name), LITERAL)),
        ),
        R::AlterConfigs(r) => resources(
            r.resources
                .iter()
                .map(|x| (x.resource_type, Some(&x.resource_name), LITERAL)),
        ),
        R::IncrementalAlterConfigs(r) => resources(
            r.resources
                .iter()
                .map(|x| (x.resource_type, Some(&x.resource_name), LITERAL)),
        ),
        // ACL bindings and filters name resources the same way: only a literal topic
        // name is a topic a rule can allow; a prefix, a pattern, `*`, any other
        // resource type is not (review F4: `{apiKey: createacls, topic: a}` let a
        // client grant itself ACLs on any topic).
        R::CreateAcls(r) => resources(r.creations.iter().map(|c| {
            (
                c.resource_type,
                Some(&c.resource_name),
                c.resource_pattern_type,
            )
        })),
        R::DeleteAcls(r) => resources(r.filters.iter().map(|f| {
            (
                f.resource_type_filter,
                f.resource_name_filter.as_ref(),
                f.pattern_type_filter,
            )
        })),
        R::DescribeAcls(r) => resources(std::iter::once((
            r.resource_type_filter,
            r.resource_name_filter.as_ref(),
            r.pattern_type_filter,
        ))),
        // A share session (KIP-932) continued (epoch above 0) fetches every partition
        // it holds, which the request does not name: no topic rule can allow it
        // (weir does not track share sessions).
        R::ShareFetch(r) if r.share_session_epoch > 0 => unknown(),
        R::ShareFetch(r) => listed(
            r.topics
                .iter()
                .map(|t| id(t.topic_id.as_bytes()))
                .chain(
                    r.forgotten_topics_data
                        .iter()
                        .map(|t| id(t.topic_id.as_bytes())),
                )
                .collect(),
        ),
        R::ShareAcknowledge(r) => {
            listed(r.topics.iter().map(|t| id(t.topic_id.as_bytes())).collect())
        }
        R::ApiVersions(_)
        | R::SaslHandshake(_)
        | R::SaslAuthenticate(_)
        | R::FindCoordinator(_)
        | R::JoinGroup(_)
        | R::Heartbeat(_)
        | R::LeaveGroup(_)
        | R::SyncGroup(_)
        | R::DescribeGroups(_)
        | R::ListGroups(_)
        | R::DeleteGroups(_)
        | R::InitProducerId(_)
        | R::AddOffsetsToTxn(_)
        | R::EndTxn(_)
        | R::CreateDelegationToken(_)
        | R::RenewDelegationToken(_)
        | R::ExpireDelegationToken(_)
        | R::DescribeDelegationToken(_)
        | R::DescribeClientQuotas(_)
        | R::AlterClientQuotas(_)
        | R::DescribeUserScramCredentials(_)
        | R::AlterUserScramCredentials(_)
        | R::DescribeCluster(_)
        | R::DescribeTransactions(_)
        | R::ListTransactions(_)
        | R::ConsumerGroupDescribe(_)
        | R::ShareGroupDescribe(_)
        | R::GetTelemetrySubscriptions(_)
        | R::PushTelemetry(_)
        | R::UpdateFeatures(_) => listed(Vec::new()),
        // Resource type 2 (or none given: every type) lists topic names.
        R::ListConfigResources(r)
            if v >= 1 && (r.resource_types.is_empty() || r.resource_types.contains(&2)) =>
        {
            unknown()
        }
        R::ListConfigResources(_) => listed(Vec::new()),
        _ => unknown(),
    }
}
