//! The one field weir reads from a Fetch response: the session id the broker gave a
//! Fetch that opened a session (KIP-227), so later incremental Fetch requests on the
//! connection can be checked against the topics the session holds.

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ResponseHeader};
use kafka_protocol::protocol::Decodable;

/// The session id of a Fetch response (v7+) without a top-level error, when it is
/// not 0 (0: the broker opened no session). Only the header and the first three
/// fields are read; the records are not touched.
pub fn fetch_response_session_id(payload: &Bytes, version: i16) -> Option<i32> {
    if version < 7 {
        return None;
    }
    let mut body = payload.clone();
    ResponseHeader::decode(&mut body, ApiKey::Fetch.response_header_version(version)).ok()?;
    // throttle_time_ms (int32), error_code (int16), session_id (int32).
    let head: &[u8; 10] = body.first_chunk()?;
    let error_code = i16::from_be_bytes([head[4], head[5]]);
    let session_id = i32::from_be_bytes([head[6], head[7], head[8], head[9]]);
    (error_code == 0 && session_id != 0).then_some(session_id)
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use kafka_protocol::messages::FetchResponse;
    use kafka_protocol::protocol::Encodable;

    use super::*;

    fn response(version: i16, error_code: i16, session_id: i32) -> Bytes {
        let mut b = BytesMut::new();
        ResponseHeader::default()
            .with_correlation_id(4)
            .encode(&mut b, ApiKey::Fetch.response_header_version(version))
            .expect("header");
        FetchResponse::default()
            .with_error_code(error_code)
            .with_session_id(session_id)
            .encode(&mut b, version)
            .expect("body");
        b.freeze()
    }

    #[test]
    fn the_session_id_of_every_version_with_sessions() {
        for v in 7..=18 {
            assert_eq!(
                fetch_response_session_id(&response(v, 0, 991), v),
                Some(991),
                "v{v}"
            );
            assert_eq!(
                fetch_response_session_id(&response(v, 0, 0), v),
                None,
                "v{v}"
            );
            // FETCH_SESSION_ID_NOT_FOUND: no session.
            assert_eq!(
                fetch_response_session_id(&response(v, 70, 991), v),
                None,
                "v{v}"
            );
        }
        assert_eq!(fetch_response_session_id(&response(6, 0, 0), 6), None);
        assert_eq!(
            fetch_response_session_id(&Bytes::from_static(&[0, 0]), 12),
            None
        );
    }
}
