//! The one response weir re-encodes: a Metadata response to a request for every topic
//! (a null or empty topic list), cut down to the topics the client may see. Cilium
//! passed it through whole, telling a client limited to one topic the name and layout
//! of every other.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, MetadataResponse, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetadataFilterError {
    #[error("Metadata v{version} response does not decode: {reason}")]
    Decode { version: i16, reason: String },
    #[error("Metadata v{version} response does not encode: {reason}")]
    Encode { version: i16, reason: String },
}

/// Filter the Metadata response `payload` (a frame without its length prefix) of
/// version `version` to the topics `keep` accepts by name (a topic without a name is
/// dropped: policy cannot tell whether it may be seen), and return the whole new frame.
/// Brokers, cluster id and controller are kept.
pub fn filter_metadata_response(
    payload: &Bytes,
    version: i16,
    keep: impl Fn(&str) -> bool,
) -> Result<Bytes, MetadataFilterError> {
    let decode = |reason: String| MetadataFilterError::Decode { version, reason };
    let encode = |reason: String| MetadataFilterError::Encode { version, reason };
    let header_version = ApiKey::Metadata.response_header_version(version);
    let mut buf = payload.clone();
    let header =
        ResponseHeader::decode(&mut buf, header_version).map_err(|e| decode(e.to_string()))?;
    let mut resp =
        MetadataResponse::decode(&mut buf, version).map_err(|e| decode(e.to_string()))?;
    if buf.has_remaining() {
        return Err(decode(format!("{} bytes after the body", buf.remaining())));
    }
    resp.topics
        .retain(|t| t.name.as_ref().is_some_and(|n| keep(n.as_str())));
    let mut out = BytesMut::new();
    out.put_i32(0);
    header
        .encode(&mut out, header_version)
        .map_err(|e| encode(e.to_string()))?;
    resp.encode(&mut out, version)
        .map_err(|e| encode(e.to_string()))?;
    let len = i32::try_from(out.len() - 4).map_err(|_| encode("too large".into()))?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out.freeze())
}

/// The Metadata version weir asks a broker for topic ids with: v12 is the first that
/// looks topics up by id (Kafka 3.1, as old as the first Fetch and Produce by id).
pub const METADATA_BY_ID_VERSION: i16 = 12;

/// A whole Metadata v12 request frame (length prefix included) asking the broker for
/// the topics with these ids, from client id `weir`; its response goes to
/// [`metadata_topic_ids`].
pub fn metadata_request_for_ids(
    ids: &[[u8; 16]],
    correlation_id: i32,
) -> Result<Bytes, MetadataFilterError> {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::{MetadataRequest, RequestHeader};
    let version = METADATA_BY_ID_VERSION;
    let encode = |reason: String| MetadataFilterError::Encode { version, reason };
    let mut out = BytesMut::new();
    out.put_i32(0);
    RequestHeader::default()
        .with_request_api_key(ApiKey::Metadata as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(kafka_protocol::protocol::StrBytes::from_static_str(
            "weir",
        )))
        .encode(&mut out, ApiKey::Metadata.request_header_version(version))
        .map_err(|e| encode(e.to_string()))?;
    MetadataRequest::default()
        .with_topics(Some(
            ids.iter()
                .map(|id| {
                    MetadataRequestTopic::default().with_topic_id(uuid::Uuid::from_bytes(*id))
                })
                .collect(),
        ))
        .with_allow_auto_topic_creation(false)
        .encode(&mut out, version)
        .map_err(|e| encode(e.to_string()))?;
    let len = i32::try_from(out.len() - 4).map_err(|_| encode("too large".into()))?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out.freeze())
}

/// The (topic id, name) pairs a Metadata response (a frame's payload) of version
/// `version` reveals: topics with both a name and a non-zero id (v10+).
pub fn metadata_topic_ids(
    payload: &Bytes,
    version: i16,
) -> Result<Vec<([u8; 16], String)>, MetadataFilterError> {
    let decode = |reason: String| MetadataFilterError::Decode { version, reason };
    let mut buf = payload.clone();
    ResponseHeader::decode(&mut buf, ApiKey::Metadata.response_header_version(version))
        .map_err(|e| decode(e.to_string()))?;
    let resp = MetadataResponse::decode(&mut buf, version).map_err(|e| decode(e.to_string()))?;
    Ok(resp
        .topics
        .iter()
        .filter_map(|t| {
            let id = *t.topic_id.as_bytes();
            let name = t.name.as_ref()?;
            (id != [0; 16]).then(|| (id, name.as_str().to_owned()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::metadata_response::{
        MetadataResponseBroker, MetadataResponseTopic,
    };
    use kafka_protocol::messages::{BrokerId, TopicName};
    use kafka_protocol::protocol::StrBytes;

    use super::*;

    #[test]
    fn weirs_metadata_request_asks_for_exactly_the_ids() {
        use kafka_protocol::messages::{MetadataRequest, RequestHeader};
        let ids = [[1u8; 16], [2u8; 16]];
        let frame = metadata_request_for_ids(&ids, 99).expect("encodes");
        let mut b = frame.slice(4..);
        assert_eq!(frame.len() - 4, b.len());
        let h = RequestHeader::decode(&mut b, ApiKey::Metadata.request_header_version(12))
            .expect("header");
        assert_eq!((h.request_api_key, h.request_api_version), (3, 12));
        assert_eq!(h.correlation_id, 99);
        let r = MetadataRequest::decode(&mut b, 12).expect("body");
        let asked: Vec<[u8; 16]> = r
            .topics
            .expect("a list")
            .iter()
            .map(|t| *t.topic_id.as_bytes())
            .collect();
        assert_eq!(asked, ids);
        assert!(!r.allow_auto_topic_creation);
        assert!(!b.has_remaining());
    }
    use crate::kafka::apis::response_versions;

    #[test]
    fn every_version_keeps_only_the_allowed_topics() {
        let range = response_versions(ApiKey::Metadata);
        for v in range.min..=range.max {
            let topic = |n: &'static str| {
                MetadataResponseTopic::default()
                    .with_name(Some(TopicName(StrBytes::from_static_str(n))))
            };
            let resp = MetadataResponse::default()
                .with_brokers(vec![
                    MetadataResponseBroker::default()
                        .with_node_id(BrokerId(1))
                        .with_host(StrBytes::from_static_str("b1"))
                        .with_port(9092),
                ])
                .with_topics(vec![topic("allowed"), topic("secret"), topic("other")]);
            let hv = ApiKey::Metadata.response_header_version(v);
            let mut p = BytesMut::new();
            ResponseHeader::default()
                .with_correlation_id(77)
                .encode(&mut p, hv)
                .expect("header");
            resp.encode(&mut p, v).expect("body");
            let out = filter_metadata_response(&p.freeze(), v, |n| n == "allowed" || n == "other")
                .expect("filters");
            let mut b = out.slice(4..);
            assert_eq!(
                usize::try_from(out.slice(..4).get_i32()).ok(),
                Some(b.len())
            );
            assert_eq!(
                ResponseHeader::decode(&mut b, hv)
                    .expect("header")
                    .correlation_id,
                77
            );
            let got = MetadataResponse::decode(&mut b, v).expect("body");
            let names: Vec<&str> = got
                .topics
                .iter()
                .filter_map(|t| t.name.as_ref().map(|n| n.as_str()))
                .collect();
            assert_eq!(names, vec!["allowed", "other"], "v{v}");
            assert_eq!(got.brokers.len(), 1);
        }
        assert!(filter_metadata_response(&Bytes::from_static(&[0, 0]), 12, |_| true).is_err());
    }

    #[test]
    fn topic_ids_are_learned_from_v10_on() {
        let id = [9u8; 16];
        for v in [9i16, 10, 12, 13] {
            let resp = MetadataResponse::default().with_topics(vec![
                MetadataResponseTopic::default()
                    .with_name(Some(TopicName(StrBytes::from_static_str("orders"))))
                    .with_topic_id(uuid::Uuid::from_bytes(id)),
                MetadataResponseTopic::default()
                    .with_name(Some(TopicName(StrBytes::from_static_str("noid")))),
            ]);
            let mut p = BytesMut::new();
            ResponseHeader::default()
                .encode(&mut p, ApiKey::Metadata.response_header_version(v))
                .expect("header");
            resp.encode(&mut p, v).expect("body");
            let got = metadata_topic_ids(&p.freeze(), v).expect("decodes");
            // Before v10 responses carry no ids (the encoder leaves them out).
            let want = if v >= 10 {
                vec![(id, "orders".to_string())]
            } else {
                vec![]
            };
            assert_eq!(got, want, "v{v}");
        }
    }
}
