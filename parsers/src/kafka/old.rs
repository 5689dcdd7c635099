//! The request versions Kafka 4 removed and the `kafka-protocol` crate therefore cannot
//! decode — Produce v0–2, Fetch v0–3, ListOffsets v0, OffsetCommit v0–1, OffsetFetch v0 —
//! read and answered by hand. They are what clients pinned to old brokers send
//! (librdkafka 2.16 with `api.version.request=false` and
//! `broker.version.fallback=0.9.0`: Metadata v0, Produce v1, ListOffsets v0), and
//! brokers that still speak them serve those clients; without this a topic rule could
//! only refuse them, and a denial could not be answered (the connection closed, the
//! client retried until its timeout).
//!
//! All of them are non-flexible: fixed-width integers, `i16`-prefixed strings,
//! `i32`-prefixed arrays and byte blocks; their responses use header v0 (the
//! correlation id alone). Counts are checked against the bytes left before anything
//! is kept, so a lying count costs nothing.

use bytes::{BufMut, Bytes, BytesMut};

use super::deny::TOPIC_AUTHORIZATION_FAILED;
use super::request::{BodyFacts, TopicRef, Topics};

/// One topic of a request and the partitions it names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Topic {
    name: String,
    partitions: Vec<i32>,
}

/// What an old request says that policy and its denial need.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OldRequest {
    acks: Option<i16>,
    topics: Vec<Topic>,
}

/// Whether (key, version) is one this module reads.
pub(super) fn handles(api_key: i16, version: i16) -> bool {
    matches!(
        (api_key, version),
        (0, 0..=2) | (1, 0..=3) | (2, 0) | (8, 0..=1) | (9, 0)
    )
}

/// The facts of an old body; `None` when (key, version) is not one this module reads,
/// `Some(Err(reason))` when the body is malformed.
pub(super) fn facts(api_key: i16, version: i16, body: &[u8]) -> Option<Result<BodyFacts, String>> {
    if !handles(api_key, version) {
        return None;
    }
    Some(decode(api_key, version, body).map(|r| {
        BodyFacts {
            topics: Topics::Listed(
                r.topics
                    .into_iter()
                    .map(|t| TopicRef::Name(t.name))
                    .collect(),
            ),
            acks: r.acks,
            fetch_session: None,
        }
    }))
}

/// The denial of an old request as a whole frame (length prefix, header v0, body):
/// TOPIC_AUTHORIZATION_FAILED on every partition it named. `None` when (key, version)
/// is not one this module reads; `Some(Ok(None))` for a Produce with `acks=0` (no
/// response); `Some(Err(reason))` for a malformed body.
pub(super) fn denial(
    api_key: i16,
    version: i16,
    correlation_id: i32,
    body: &[u8],
) -> Option<Result<Option<Bytes>, String>> {
    if !handles(api_key, version) {
        return None;
    }
    let req = match decode(api_key, version, body) {
        Ok(r) => r,
        Err(e) => return Some(Err(e)),
    };
    if req.acks == Some(0) {
        return Some(Ok(None));
    }
    let mut out = BytesMut::new();
    out.put_i32(0);
    out.put_i32(correlation_id);
    // Fetch v1+ starts with throttle_time_ms.
    if api_key == 1 && version >= 1 {
        out.put_i32(0);
    }
    put_len(&mut out, req.topics.len());
    for t in &req.topics {
        put_str(&mut out, &t.name);
        put_len(&mut out, t.partitions.len());
        for &p in &t.partitions {
            out.put_i32(p);
            match api_key {
                // Produce: error, base_offset (v2: log_append_time).
                0 => {
                    out.put_i16(TOPIC_AUTHORIZATION_FAILED);
                    out.put_i64(-1);
                    if version >= 2 {
                        out.put_i64(-1);
                    }
                }
                // Fetch: error, high_watermark, no records.
                1 => {
                    out.put_i16(TOPIC_AUTHORIZATION_FAILED);
                    out.put_i64(-1);
                    out.put_i32(0);
                }
                // ListOffsets v0: error, no offsets.
                2 => {
                    out.put_i16(TOPIC_AUTHORIZATION_FAILED);
                    out.put_i32(0);
                }
                // OffsetCommit: error.
                8 => out.put_i16(TOPIC_AUTHORIZATION_FAILED),
                // OffsetFetch v0: offset, metadata, error.
                _ => {
                    out.put_i64(-1);
                    put_str(&mut out, "");
                    out.put_i16(TOPIC_AUTHORIZATION_FAILED);
                }
            }
        }
    }
    // Produce v1+ ends with throttle_time_ms.
    if api_key == 0 && version >= 1 {
        out.put_i32(0);
    }
    let Ok(len) = i32::try_from(out.len() - 4) else {
        return Some(Err("denial too large".into()));
    };
    out[..4].copy_from_slice(&len.to_be_bytes());
    Some(Ok(Some(out.freeze())))
}

fn put_len(out: &mut BytesMut, n: usize) {
    // Counts come from a decoded frame (at most --kafka-max-frame bytes), so they fit.
    out.put_i32(i32::try_from(n).unwrap_or(i32::MAX));
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_i16(i16::try_from(s.len()).unwrap_or(i16::MAX));
    out.put_slice(s.as_bytes());
}

fn decode(api_key: i16, version: i16, body: &[u8]) -> Result<OldRequest, String> {
    let mut r = Reader(body);
    let mut acks = None;
    match api_key {
        0 => {
            acks = Some(r.i16()?);
            r.skip(4)?; // timeout_ms
        }
        1 => r.skip(if version >= 3 { 16 } else { 12 })?, // replica, max_wait, min_bytes (v3: max_bytes)
        2 => r.skip(4)?,                                  // replica_id
        8 => {
            r.string()?; // group_id
            if version >= 1 {
                r.skip(4)?; // generation_id
                r.string()?; // member_id
            }
        }
        _ => {
            r.string()?; // group_id
        }
    }
    let n = r.count(2 + 4)?;
    let mut topics = Vec::new();
    for _ in 0..n {
        let name = r.string()?.unwrap_or_default();
        let m = r.count(4)?;
        let mut partitions = Vec::new();
        for _ in 0..m {
            partitions.push(r.i32()?);
            match api_key {
                0 => r.bytes()?,  // records
                1 => r.skip(12)?, // fetch_offset, partition_max_bytes
                2 => r.skip(12)?, // timestamp, max_num_offsets
                8 => {
                    r.skip(if version >= 1 { 16 } else { 8 })?; // offset (v1: timestamp)
                    r.string()?; // metadata
                }
                _ => {} // OffsetFetch v0: partition indexes only
            }
        }
        topics.push(Topic { name, partitions });
    }
    if !r.0.is_empty() {
        return Err(format!("{} bytes after the body", r.0.len()));
    }
    Ok(OldRequest { acks, topics })
}

/// A bounds-checked cursor.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn skip(&mut self, n: usize) -> Result<(), String> {
        self.take(n).map(|_| ())
    }

    fn i16(&mut self) -> Result<i16, String> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, String> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A nullable string (`None` for length -1).
    fn string(&mut self) -> Result<Option<String>, String> {
        let n = self.i16()?;
        if n == -1 {
            return Ok(None);
        }
        let n = usize::try_from(n).map_err(|_| format!("string length {n}"))?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| "string is not UTF-8".to_string())
    }

    /// A nullable byte block (records), skipped.
    fn bytes(&mut self) -> Result<(), String> {
        let n = self.i32()?;
        if n == -1 {
            return Ok(());
        }
        let n = usize::try_from(n).map_err(|_| format!("bytes length {n}"))?;
        self.skip(n)
    }

    /// An array count whose elements take at least `min` bytes each: more than the
    /// bytes left can hold is malformed (nothing is allocated for it).
    fn count(&mut self, min: usize) -> Result<usize, String> {
        let n = self.i32()?;
        let n = usize::try_from(n).map_err(|_| format!("array length {n}"))?;
        if n.saturating_mul(min) > self.0.len() {
            return Err(format!(
                "array of {n} does not fit in {} bytes",
                self.0.len()
            ));
        }
        // The same per-request entry budget as the crate's decoders (see
        // `request_facts_bounded`).
        kafka_protocol::protocol::types::take_decode_budget(n).map_err(|e| e.to_string())?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as i16).to_be_bytes());
        out.extend(v.as_bytes());
    }

    /// Produce v`version` body: acks, timeout, topics with one partition each.
    fn produce(acks: i16, topics: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(acks.to_be_bytes());
        b.extend(1000i32.to_be_bytes());
        b.extend((topics.len() as i32).to_be_bytes());
        for t in topics {
            s(&mut b, t);
            b.extend(1i32.to_be_bytes());
            b.extend(0i32.to_be_bytes());
            b.extend(3i32.to_be_bytes());
            b.extend([1, 2, 3]);
        }
        b
    }

    fn names(f: &BodyFacts) -> Vec<String> {
        match &f.topics {
            Topics::Listed(l) => l
                .iter()
                .map(|t| match t {
                    TopicRef::Name(n) => n.clone(),
                    TopicRef::Id(_) => "id".into(),
                })
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn produce_v0_to_v2_names_its_topics_and_acks() {
        for v in 0..=2 {
            let f = facts(0, v, &produce(1, &["a", "b"]))
                .expect("handled")
                .expect("ok");
            assert_eq!(names(&f), ["a", "b"]);
            assert_eq!(f.acks, Some(1));
        }
        assert_eq!(facts(0, 3, &produce(1, &["a"])), None);
    }

    #[test]
    fn produce_denials_decode_per_version() {
        let body = produce(-1, &["secret"]);
        // v0: [name, [index, error, base_offset]]
        let d = denial(0, 0, 77, &body).unwrap().unwrap().unwrap();
        let mut want = Vec::new();
        want.extend(77i32.to_be_bytes());
        want.extend(1i32.to_be_bytes());
        s(&mut want, "secret");
        want.extend(1i32.to_be_bytes());
        want.extend(0i32.to_be_bytes());
        want.extend(29i16.to_be_bytes());
        want.extend((-1i64).to_be_bytes());
        let mut framed = (want.len() as i32).to_be_bytes().to_vec();
        framed.extend(&want);
        assert_eq!(&d[..], &framed[..]);
        // v2: log_append_time after base_offset, throttle at the end.
        let d = denial(0, 2, 77, &body).unwrap().unwrap().unwrap();
        assert_eq!(d.len(), framed.len() + 8 + 4);
        assert_eq!(&d[d.len() - 4..], &[0, 0, 0, 0]);
        // acks=0: no response.
        assert_eq!(denial(0, 2, 1, &produce(0, &["x"])), Some(Ok(None)));
    }

    #[test]
    fn fetch_list_offsets_offset_commit_and_fetch_name_their_topics() {
        // Fetch v2: replica, max_wait, min_bytes, [topic, [partition, offset, max_bytes]]
        let mut b = Vec::new();
        b.extend([0u8; 12]);
        b.extend(1i32.to_be_bytes());
        s(&mut b, "t");
        b.extend(2i32.to_be_bytes());
        b.extend([0u8; 16]);
        b.extend([0u8; 16]);
        let f = facts(1, 2, &b).unwrap().unwrap();
        assert_eq!(names(&f), ["t"]);
        // v3 has max_bytes too: the v2 body is four bytes short.
        assert!(facts(1, 3, &b).unwrap().is_err());
        let d = denial(1, 2, 5, &b).unwrap().unwrap().unwrap();
        // len, corr, throttle, 1 topic "t", 2 partitions of (i32, i16, i64, i32).
        assert_eq!(d.len(), 4 + 4 + 4 + 4 + 3 + 4 + 2 * 18);

        // ListOffsets v0: replica, [name, [partition, timestamp, max_num]]
        let mut b = Vec::new();
        b.extend([0u8; 4]);
        b.extend(1i32.to_be_bytes());
        s(&mut b, "lo");
        b.extend(1i32.to_be_bytes());
        b.extend([0u8; 16]);
        assert_eq!(names(&facts(2, 0, &b).unwrap().unwrap()), ["lo"]);

        // OffsetCommit v1: group, generation, member, [name, [p, offset, ts, meta]]
        let mut b = Vec::new();
        s(&mut b, "g");
        b.extend(3i32.to_be_bytes());
        s(&mut b, "m");
        b.extend(1i32.to_be_bytes());
        s(&mut b, "oc");
        b.extend(1i32.to_be_bytes());
        b.extend([0u8; 20]);
        b.extend((-1i16).to_be_bytes());
        assert_eq!(names(&facts(8, 1, &b).unwrap().unwrap()), ["oc"]);

        // OffsetFetch v0: group, [name, [p]]
        let mut b = Vec::new();
        s(&mut b, "g");
        b.extend(1i32.to_be_bytes());
        s(&mut b, "of");
        b.extend(1i32.to_be_bytes());
        b.extend(0i32.to_be_bytes());
        assert_eq!(names(&facts(9, 0, &b).unwrap().unwrap()), ["of"]);
        assert!(denial(9, 0, 1, &b).unwrap().unwrap().is_some());
    }

    #[test]
    fn lies_are_malformed_and_allocate_nothing() {
        // A count of two billion topics in a few bytes.
        let mut b = Vec::new();
        b.extend(1i16.to_be_bytes());
        b.extend(0i32.to_be_bytes());
        b.extend(i32::MAX.to_be_bytes());
        assert!(facts(0, 2, &b).unwrap().is_err());
        // Negative counts and lengths, truncation, trailing bytes.
        let mut neg = produce(1, &[]);
        neg[6..10].copy_from_slice(&(-2i32).to_be_bytes());
        assert!(facts(0, 1, &neg).unwrap().is_err());
        let good = produce(1, &["a"]);
        for cut in 0..good.len() {
            assert!(facts(0, 1, &good[..cut]).unwrap().is_err(), "cut {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(facts(0, 1, &long).unwrap().is_err());
    }
}
