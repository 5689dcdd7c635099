//! Kafka: framing and request facts (sans-I/O).
//!
//! [`FrameSplitter`] cuts the byte stream of either direction into length-prefixed frames.
//! [`request_facts`] reads what policy needs from a request frame: API key, version,
//! correlation id and client id from the header (always, for every key and version), and
//! from the body the topics it names (by name, or by topic id where the version uses ids)
//! and Produce's `acks`.
//!
//! Bodies are decoded with the `kafka-protocol` crate (0.18, vendored with bounded
//! allocations, see `third_party/kafka-protocol/WEIR-PATCH.md`). It decodes the API keys
//! and versions of Kafka 4.x, among them Produce v3–13, Fetch v4–18, ListOffsets v1–10,
//! Metadata v0–13, OffsetCommit v2–9, OffsetFetch v1–9, FindCoordinator v0–6,
//! JoinGroup v0–9, Heartbeat v0–4, LeaveGroup v0–5, SyncGroup v0–5, ApiVersions v0–4,
//! InitProducerId v0–5, OffsetForLeaderEpoch v2–4, ConsumerGroupHeartbeat v0–1,
//! ConsumerGroupDescribe v0–1 ([`apis::request_versions`] is the exact table). The
//! versions Kafka 4 removed (Produce v0–2, Fetch v0–3, ListOffsets v0, OffsetCommit v0–1,
//! OffsetFetch v0: what clients pinned to Kafka 0.10 send) are read and denied by hand
//! (`old`). Newer versions and API keys the crate does not know (4–7, the old
//! inter-broker APIs) still yield the header; their body is [`BodyError::Unsupported`]. Nothing here panics on input or re-encodes a request.

pub mod apis;
mod deny;
mod fetch_session;
mod frame;
mod header;
mod metadata;
mod old;
mod request;

pub use deny::{
    CLUSTER_AUTHORIZATION_FAILED, DenyError, GROUP_AUTHORIZATION_FAILED,
    TOPIC_AUTHORIZATION_FAILED, TRANSACTIONAL_ID_AUTHORIZATION_FAILED, UNSUPPORTED_VERSION,
    deny_response, non_topic_error,
};
pub use fetch_session::fetch_response_session_id;
pub use frame::{DEFAULT_MAX_FRAME, Frame, FrameError, FrameSplitter};
pub use header::{HeaderError, RequestHeader, decode_request_header, request_header_version};
pub use metadata::{
    METADATA_BY_ID_VERSION, MetadataFilterError, filter_metadata_response,
    metadata_request_for_ids, metadata_topic_ids,
};
pub use request::{
    BodyError, BodyFacts, DEFAULT_MAX_REQUEST_ENTRIES, FetchSession, RequestFacts, TopicRef,
    Topics, body_decodable, request_facts, request_facts_bounded,
};

#[cfg(test)]
mod deny_tests;
#[cfg(test)]
mod tests;
