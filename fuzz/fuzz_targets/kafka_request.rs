//! Request fact extraction on arbitrary payloads (a frame without its length prefix):
//! never a panic or an unbounded allocation, and the header facts are the bytes at the
//! front of the payload.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use weir_parsers::kafka::{BodyError, body_decodable, request_facts};

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);
    let Ok(facts) = request_facts(&payload) else {
        return;
    };
    let h = &facts.header;
    assert_eq!(h.api_key.to_be_bytes(), [data[0], data[1]]);
    assert_eq!(h.api_version.to_be_bytes(), [data[2], data[3]]);
    assert_eq!(
        h.correlation_id.to_be_bytes(),
        [data[4], data[5], data[6], data[7]]
    );
    match &facts.body {
        Ok(_) | Err(BodyError::Malformed { .. }) => {
            assert!(body_decodable(h.api_key, h.api_version));
        }
        Err(BodyError::Unsupported { .. }) => {
            assert!(!body_decodable(h.api_key, h.api_version));
        }
    }
});
