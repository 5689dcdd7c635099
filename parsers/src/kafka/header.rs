//! The request header (v0, v1, v2), decoded by hand so it decodes for every API key and
//! version — also those the `kafka-protocol` crate cannot decode a body for. API key and
//! client id rules therefore always apply.

use bytes::{Buf, Bytes};
use kafka_protocol::messages::ApiKey;
use thiserror::Error;

/// What every request starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHeader {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    /// `None` for header v0 and for a null client id.
    pub client_id: Option<String>,
    /// 0, 1 or 2. For an API key the crate does not know, 1 (every request since Kafka 0.9
    /// carries a client id there; v2 only appends tagged fields after it).
    pub header_version: i16,
}

/// Why a request header cannot be read. Fatal for the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    #[error("request header truncated")]
    Truncated,
    #[error("request client id is not UTF-8")]
    ClientIdNotUtf8,
    #[error("request client id length {0} is negative")]
    NegativeClientId(i16),
    #[error("request header tagged fields are malformed")]
    BadTaggedFields,
}

/// The request header version for `api_key`/`api_version`, from the crate's tables.
pub fn request_header_version(api_key: i16, api_version: i16) -> i16 {
    match ApiKey::try_from(api_key) {
        Ok(key) => key.request_header_version(api_version),
        Err(()) => 1,
    }
}

/// Decode the header at the start of `payload` (a frame without its length prefix) and
/// return it with the body that follows.
pub fn decode_request_header(payload: &Bytes) -> Result<(RequestHeader, Bytes), HeaderError> {
    let mut buf = payload.clone();
    let api_key = buf.try_get_i16().map_err(|_| HeaderError::Truncated)?;
    let api_version = buf.try_get_i16().map_err(|_| HeaderError::Truncated)?;
    let correlation_id = buf.try_get_i32().map_err(|_| HeaderError::Truncated)?;
    let header_version = request_header_version(api_key, api_version);
    let mut client_id = None;
    if header_version >= 1 {
        let len = buf.try_get_i16().map_err(|_| HeaderError::Truncated)?;
        if len < -1 {
            return Err(HeaderError::NegativeClientId(len));
        }
        if len >= 0 {
            let len = usize::try_from(len).map_err(|_| HeaderError::Truncated)?;
            if buf.remaining() < len {
                return Err(HeaderError::Truncated);
            }
            let raw = buf.split_to(len);
            let id = std::str::from_utf8(&raw).map_err(|_| HeaderError::ClientIdNotUtf8)?;
            client_id = Some(id.to_owned());
        }
    }
    if header_version >= 2 {
        skip_tagged_fields(&mut buf)?;
    }
    Ok((
        RequestHeader {
            api_key,
            api_version,
            correlation_id,
            client_id,
            header_version,
        },
        buf,
    ))
}

fn skip_tagged_fields(buf: &mut Bytes) -> Result<(), HeaderError> {
    let count = unsigned_varint(buf)?;
    for _ in 0..count {
        let _tag = unsigned_varint(buf)?;
        let size =
            usize::try_from(unsigned_varint(buf)?).map_err(|_| HeaderError::BadTaggedFields)?;
        if buf.remaining() < size {
            return Err(HeaderError::BadTaggedFields);
        }
        buf.advance(size);
    }
    Ok(())
}

fn unsigned_varint(buf: &mut Bytes) -> Result<u32, HeaderError> {
    let mut value: u32 = 0;
    for i in 0..5 {
        let byte = buf.try_get_u8().map_err(|_| HeaderError::BadTaggedFields)?;
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(HeaderError::BadTaggedFields)
}
