//! Kafka rules (`rules.kafka`) with Cilium's fields — `role`, `apiKey`, `apiVersion`,
//! `clientID`, `topic` — and the matching of one request against them.
//!
//! Semantics:
//! - a rule's fields AND; rules OR (the lowest matching rule decides, as for DNS);
//! - `role: produce` / `role: consume` stand for sets of API keys ([`PRODUCE_KEYS`],
//!   [`CONSUME_KEYS`]); `role` and `apiKey` in one rule is a load error;
//! - `apiKey` is an API's name, compared case-insensitively without separators
//!   (`ApiVersions`, `apiversions`, `api_versions`), or its number;
//! - `clientID` and `topic` are exact; a request without a client id matches no
//!   `clientID` rule;
//! - a request naming several topics is allowed only when every topic is allowed, each
//!   by some matching rule (different rules may allow different topics); a request that
//!   names no topic (Heartbeat, ApiVersions, ...) ignores `topic`, as in Cilium;
//! - a request for every topic (Metadata with a null or empty list) is allowed by any
//!   rule that allows the request otherwise (the proxy filters the response to the
//!   topics the client may see);
//! - a body weir cannot decode cannot satisfy a `topic`: only rules without `topic` can
//!   allow it (reason `unsupported version for topic rule`).
//!
//! Difference from Cilium: the role sets include the APIs today's clients send by
//! default (InitProducerId for idempotent producers; OffsetForLeaderEpoch and the KIP-848
//! ConsumerGroupHeartbeat / ConsumerGroupDescribe for consumers), which Cilium's sets
//! (written for Kafka 0.10) lack, so `role: produce` / `role: consume` work for a
//! default-configured librdkafka or Java client.

use thiserror::Error;

/// Kafka's limit on a topic name (`Topic.MAX_NAME_LENGTH`).
pub const MAX_TOPIC_LEN: usize = 249;

/// Produce, Metadata, ApiVersions, InitProducerId.
pub const PRODUCE_KEYS: &[i16] = &[0, 3, 18, 22];
/// Fetch, ListOffsets, Metadata, OffsetCommit, OffsetFetch, FindCoordinator, JoinGroup,
/// Heartbeat, LeaveGroup, SyncGroup, ApiVersions, OffsetForLeaderEpoch,
/// ConsumerGroupHeartbeat, ConsumerGroupDescribe.
pub const CONSUME_KEYS: &[i16] = &[1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18, 23, 68, 69];

/// Every API key name weir accepts: the protocol's names lower-cased without separators,
/// plus Cilium's `offsets` for ListOffsets.
const API_NAMES: &[(&str, i16)] = &[
    ("produce", 0),
    ("fetch", 1),
    ("listoffsets", 2),
    ("offsets", 2),
    ("metadata", 3),
    ("leaderandisr", 4),
    ("stopreplica", 5),
    ("updatemetadata", 6),
    ("controlledshutdown", 7),
    ("offsetcommit", 8),
    ("offsetfetch", 9),
    ("findcoordinator", 10),
    ("joingroup", 11),
    ("heartbeat", 12),
    ("leavegroup", 13),
    ("syncgroup", 14),
    ("describegroups", 15),
    ("listgroups", 16),
    ("saslhandshake", 17),
    ("apiversions", 18),
    ("createtopics", 19),
    ("deletetopics", 20),
    ("deleterecords", 21),
    ("initproducerid", 22),
    ("offsetforleaderepoch", 23),
    ("addpartitionstotxn", 24),
    ("addoffsetstotxn", 25),
    ("endtxn", 26),
    ("writetxnmarkers", 27),
    ("txnoffsetcommit", 28),
    ("describeacls", 29),
    ("createacls", 30),
    ("deleteacls", 31),
    ("describeconfigs", 32),
    ("alterconfigs", 33),
    ("alterreplicalogdirs", 34),
    ("describelogdirs", 35),
    ("saslauthenticate", 36),
    ("createpartitions", 37),
    ("createdelegationtoken", 38),
    ("renewdelegationtoken", 39),
    ("expiredelegationtoken", 40),
    ("describedelegationtoken", 41),
    ("deletegroups", 42),
    ("electleaders", 43),
    ("incrementalalterconfigs", 44),
    ("alterpartitionreassignments", 45),
    ("listpartitionreassignments", 46),
    ("offsetdelete", 47),
    ("describeclientquotas", 48),
    ("alterclientquotas", 49),
    ("describeuserscramcredentials", 50),
    ("alteruserscramcredentials", 51),
    ("vote", 52),
    ("beginquorumepoch", 53),
    ("endquorumepoch", 54),
    ("describequorum", 55),
    ("alterpartition", 56),
    ("updatefeatures", 57),
    ("envelope", 58),
    ("fetchsnapshot", 59),
    ("describecluster", 60),
    ("describeproducers", 61),
    ("brokerregistration", 62),
    ("brokerheartbeat", 63),
    ("unregisterbroker", 64),
    ("describetransactions", 65),
    ("listtransactions", 66),
    ("allocateproducerids", 67),
    ("consumergroupheartbeat", 68),
    ("consumergroupdescribe", 69),
    ("controllerregistration", 70),
    ("gettelemetrysubscriptions", 71),
    ("pushtelemetry", 72),
    ("assignreplicastodirs", 73),
    ("listconfigresources", 74),
    ("describetopicpartitions", 75),
    ("sharegroupheartbeat", 76),
    ("sharegroupdescribe", 77),
    ("sharefetch", 78),
    ("shareacknowledge", 79),
    ("addraftvoter", 80),
    ("removeraftvoter", 81),
    ("updateraftvoter", 82),
    ("initializesharegroupstate", 83),
    ("readsharegroupstate", 84),
    ("writesharegroupstate", 85),
    ("deletesharegroupstate", 86),
    ("readsharegroupstatesummary", 87),
    ("streamsgroupheartbeat", 88),
    ("streamsgroupdescribe", 89),
    ("describesharegroupoffsets", 90),
    ("altersharegroupoffsets", 91),
    ("deletesharegroupoffsets", 92),
];

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KafkaRuleError {
    #[error(
        "unknown Kafka apiKey `{0}` (a name such as `produce`, `fetch`, `apiversions`, or a number 0-32767)"
    )]
    UnknownApiKey(String),
    #[error("unknown Kafka role `{0}` (`produce` or `consume`)")]
    UnknownRole(String),
    #[error("Kafka apiVersion `{0}` is not a number 0-32767")]
    BadApiVersion(String),
    #[error("Kafka topic `{0}` is empty or longer than {MAX_TOPIC_LEN} characters")]
    TopicLength(String),
    #[error("Kafka topic `{0}` has characters outside [a-zA-Z0-9._-]")]
    TopicChars(String),
}

/// An API key from its name (case-insensitive, separators `_`/`-` ignored) or number.
pub fn parse_api_key(text: &str) -> Result<i16, KafkaRuleError> {
    let t = text.trim();
    if let Ok(n) = t.parse::<i16>() {
        return if n >= 0 {
            Ok(n)
        } else {
            Err(KafkaRuleError::UnknownApiKey(text.to_string()))
        };
    }
    let canon: String = t
        .chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect();
    API_NAMES
        .iter()
        .find(|(n, _)| *n == canon)
        .map(|(_, k)| *k)
        .ok_or_else(|| KafkaRuleError::UnknownApiKey(text.to_string()))
}

/// The name weir prints for an API key (the first of [`API_NAMES`] with that number).
pub fn api_key_name(key: i16) -> Option<&'static str> {
    API_NAMES.iter().find(|(_, k)| *k == key).map(|(n, _)| *n)
}

/// The API keys of a role, case-insensitive.
pub fn role_keys(role: &str) -> Result<&'static [i16], KafkaRuleError> {
    match role.to_ascii_lowercase().as_str() {
        "produce" => Ok(PRODUCE_KEYS),
        "consume" => Ok(CONSUME_KEYS),
        _ => Err(KafkaRuleError::UnknownRole(role.to_string())),
    }
}

pub fn parse_api_version(text: &str) -> Result<i16, KafkaRuleError> {
    match text.trim().parse::<i16>() {
        Ok(v) if v >= 0 => Ok(v),
        _ => Err(KafkaRuleError::BadApiVersion(text.to_string())),
    }
}

/// Kafka's own topic name rule: 1-249 characters of `[a-zA-Z0-9._-]`.
pub fn validate_topic(topic: &str) -> Result<(), KafkaRuleError> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return Err(KafkaRuleError::TopicLength(topic.to_string()));
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(KafkaRuleError::TopicChars(topic.to_string()));
    }
    Ok(())
}

/// One compiled rule. `None` fields match anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaRuleSpec {
    /// The L4 entry the rule belongs to.
    pub owner: u32,
    /// From `role` or `apiKey`; ascending.
    pub api_keys: Option<Vec<i16>>,
    pub api_version: Option<i16>,
    pub client_id: Option<String>,
    pub topic: Option<String>,
}

/// The topics of a request as policy sees them (topic ids already resolved to names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaTopics<'a> {
    /// The topics it names (none for APIs that are not about topics).
    Names(&'a [String]),
    /// Every topic (Metadata with a null or empty list).
    All,
    /// The body could not be decoded (a version or API key weir's decoder lacks).
    Undecodable,
    /// The request names a topic by an id weir has not seen in any Metadata response.
    UnknownTopicId,
    /// An incremental Fetch of a fetch session this connection did not open: the
    /// topics it fetches are unknown.
    UnknownFetchSession,
}

/// One request, as policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KafkaRequest<'a> {
    pub api_key: i16,
    pub api_version: i16,
    pub client_id: Option<&'a str>,
    pub topics: KafkaTopics<'a>,
}

/// Why no rule allowed a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KafkaDenial {
    /// No rule matches API key, version and client id.
    NoRule,
    /// This topic is allowed by no rule that matches the rest of the request.
    Topic(String),
    /// Rules match, but each needs a topic and the body could not be decoded.
    UnsupportedVersionForTopicRule,
    /// Rules match, but each needs a topic and a topic id could not be resolved.
    UnknownTopicId,
    /// Rules match, but each needs a topic and the fetch session's topics are unknown.
    UnknownFetchSession,
}

impl std::fmt::Display for KafkaDenial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KafkaDenial::NoRule => {
                f.write_str("no Kafka rule matches API key, version and client id")
            }
            KafkaDenial::Topic(t) => write!(f, "topic `{t}` is allowed by no rule"),
            KafkaDenial::UnsupportedVersionForTopicRule => {
                f.write_str("unsupported version for topic rule")
            }
            KafkaDenial::UnknownTopicId => {
                f.write_str("topic id unknown (not in any Metadata response weir has seen)")
            }
            KafkaDenial::UnknownFetchSession => {
                f.write_str("incremental Fetch of a fetch session this connection did not open")
            }
        }
    }
}

/// Every Kafka rule of one direction's table.
#[derive(Debug, Default)]
pub struct KafkaMatcher {
    rules: Vec<KafkaRuleSpec>,
}

impl KafkaMatcher {
    pub fn new(rules: Vec<KafkaRuleSpec>) -> Self {
        Self { rules }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules (indices into the matcher, ascending, unique) that together allow
    /// `req`, considering only rules whose owner `owners` accepts; or why none does.
    pub fn evaluate(
        &self,
        req: &KafkaRequest<'_>,
        owners: impl Fn(u32) -> bool,
    ) -> Result<Vec<u32>, KafkaDenial> {
        let candidates: Vec<(u32, &KafkaRuleSpec)> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| owners(r.owner) && base_match(r, req))
            .filter_map(|(i, r)| Some((u32::try_from(i).ok()?, r)))
            .collect();
        let Some(&(first, _)) = candidates.first() else {
            return Err(KafkaDenial::NoRule);
        };
        match req.topics {
            KafkaTopics::Names([]) | KafkaTopics::All => Ok(vec![first]),
            KafkaTopics::Undecodable => candidates
                .iter()
                .find(|(_, r)| r.topic.is_none())
                .map(|(i, _)| vec![*i])
                .ok_or(KafkaDenial::UnsupportedVersionForTopicRule),
            KafkaTopics::UnknownTopicId => candidates
                .iter()
                .find(|(_, r)| r.topic.is_none())
                .map(|(i, _)| vec![*i])
                .ok_or(KafkaDenial::UnknownTopicId),
            KafkaTopics::UnknownFetchSession => candidates
                .iter()
                .find(|(_, r)| r.topic.is_none())
                .map(|(i, _)| vec![*i])
                .ok_or(KafkaDenial::UnknownFetchSession),
            KafkaTopics::Names(topics) => {
                let mut out = Vec::new();
                for t in topics {
                    let Some((i, _)) = candidates
                        .iter()
                        .find(|(_, r)| r.topic.as_deref().is_none_or(|rt| rt == t))
                    else {
                        return Err(KafkaDenial::Topic(t.clone()));
                    };
                    out.push(*i);
                }
                out.sort_unstable();
                out.dedup();
                Ok(out)
            }
        }
    }

    pub fn rule(&self, i: u32) -> Option<&KafkaRuleSpec> {
        self.rules.get(i as usize)
    }
}

fn base_match(r: &KafkaRuleSpec, req: &KafkaRequest<'_>) -> bool {
    r.api_keys
        .as_ref()
        .is_none_or(|k| k.binary_search(&req.api_key).is_ok())
        && r.api_version.is_none_or(|v| v == req.api_version)
        && r.client_id
            .as_deref()
            .is_none_or(|c| req.client_id == Some(c))
}

#[cfg(test)]
mod tests;
