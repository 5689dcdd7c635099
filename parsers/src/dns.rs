//! DNS message inspection: the facts policy matches on (one question of a QUERY),
//! the facts the allowlist learns from (addresses of the question name and its
//! CNAME chain), and the small responses weir sends itself (REFUSED/NXDOMAIN,
//! FORMERR, SERVFAIL). Sans-I/O: bytes in, typed facts or a typed rejection out.
//!
//! Decoding is done by `hickory-proto`, framed by checks of our own that make it
//! fail closed where hickory is lenient (see the module notes in `README.md`):
//! a question name with a compression pointer (in a query it can only point into
//! the header), trailing bytes after the last record, section counts that cannot
//! fit in the message (hickory would pre-allocate for them), TC set in a query.

mod answer;
mod flow;
mod response;
mod tcp;

#[cfg(test)]
mod tests;

pub use answer::{
    AnswerAddress, AnswerFacts, AnswerReject, MAX_CNAME_CHAIN, inspect_answer, question_matches,
};
pub use flow::{DnsFlow, OBSERVATION_SOURCE_PROXY};
pub use response::{
    DenyRcode, EDNS_UDP_PAYLOAD, formerr, refused, servfail, servfail_for, truncated_for,
};
pub use tcp::{FrameError, MAX_TCP_MESSAGE, TcpDnsFramer, tcp_frame};

use hickory_proto::op::{Message, OpCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use thiserror::Error;

/// Length of the fixed DNS header.
pub const HEADER_LEN: usize = 12;

/// Opcode QUERY, the only one policy matches.
pub const OPCODE_QUERY: u8 = 0;

/// Response codes weir reads or writes (RFC 1035 §4.1.1, RFC 6895).
pub mod rcode {
    pub const NOERROR: u16 = 0;
    pub const FORMERR: u16 = 1;
    pub const SERVFAIL: u16 = 2;
    pub const NXDOMAIN: u16 = 3;
    pub const NOTIMP: u16 = 4;
    pub const REFUSED: u16 = 5;
}

/// The fixed header, read straight from the wire (no validation beyond length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader {
    pub id: u16,
    pub qr: bool,
    pub opcode: u8,
    pub aa: bool,
    pub tc: bool,
    pub rd: bool,
    pub ra: bool,
    pub ad: bool,
    pub cd: bool,
    /// The low 4 bits of the rcode (the header's own field).
    pub rcode: u8,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl RawHeader {
    /// The header of `bytes`, or `None` if there are fewer than 12 bytes.
    pub fn read(bytes: &[u8]) -> Option<Self> {
        let h: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
        let u16_at = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        let (b2, b3) = (h[2], h[3]);
        Some(Self {
            id: u16_at(0),
            qr: b2 & 0x80 != 0,
            opcode: (b2 >> 3) & 0x0f,
            aa: b2 & 0x04 != 0,
            tc: b2 & 0x02 != 0,
            rd: b2 & 0x01 != 0,
            ra: b3 & 0x80 != 0,
            ad: b3 & 0x20 != 0,
            cd: b3 & 0x10 != 0,
            rcode: b3 & 0x0f,
            qdcount: u16_at(4),
            ancount: u16_at(6),
            nscount: u16_at(8),
            arcount: u16_at(10),
        })
    }

    /// Whether the section counts can possibly fit in a message of `len` bytes:
    /// a question takes at least 5 bytes (root name + type + class), a record at
    /// least 11. Checked before hickory decodes, because hickory reserves memory
    /// for the announced number of questions before reading any of them.
    fn counts_fit(&self, len: usize) -> bool {
        let records =
            usize::from(self.ancount) + usize::from(self.nscount) + usize::from(self.arcount);
        let min = HEADER_LEN + usize::from(self.qdcount) * 5 + records * 11;
        min <= len
    }
}

/// The EDNS(0) OPT record of a query, as far as weir cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdnsFacts {
    /// Requestor's UDP payload size (hickory raises values below 512 to 512).
    pub udp_payload: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

/// What policy sees of one DNS query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryFacts {
    pub id: u16,
    /// Always [`OPCODE_QUERY`] for facts returned by [`inspect_query`].
    pub opcode: u8,
    /// Lower-cased, with a trailing dot, as policy compares (`www.example.com.`).
    /// Special and non-printable bytes are escaped the way zone files write them
    /// (`a\.b`, `\*`, `\000`), so no name can pass itself off as another and a
    /// literal `*` never reads as a pattern's wildcard.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<EdnsFacts>,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// The question section exactly as the client sent it (0x20 case kept).
    pub question_wire: Vec<u8>,
}

impl QueryFacts {
    pub fn has_edns(&self) -> bool {
        self.edns.is_some()
    }

    /// The qtype as a mnemonic (`A`, `AAAA`, `TYPE65280` for unknown ones).
    pub fn qtype_name(&self) -> std::borrow::Cow<'static, str> {
        rr_type_name(self.qtype)
    }

    /// AXFR or IXFR: the answer may come as several messages (TCP only).
    pub fn is_zone_transfer(&self) -> bool {
        matches!(
            RecordType::from(self.qtype),
            RecordType::AXFR | RecordType::IXFR
        )
    }
}

/// Why a query was not matched against policy, and what weir answers.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QueryReject {
    /// QR is set: a response arrived where a query was expected. Dropped silently
    /// (answering a response invites reflection loops).
    #[error("message is a response (QR set), not a query")]
    NotAQuery { id: u16 },
    /// An opcode other than QUERY (UPDATE, NOTIFY, STATUS, ...). Answered REFUSED,
    /// never sent upstream.
    #[error("opcode {0} is not QUERY")]
    Opcode(u8),
    /// Not exactly one question. Answered FORMERR like unbound (`worker.c`:
    /// "request wrong nr qd") and BIND (`query.c`) do.
    #[error("query has {count} questions, expected exactly 1")]
    QuestionCount { id: u16, count: u16 },
    /// Cannot be decoded. With a readable header (`id` is `Some`) the answer is
    /// FORMERR with that id; without one the datagram is dropped and only the flow
    /// record says why.
    #[error("malformed query: {reason}")]
    Malformed {
        id: Option<u16>,
        reason: MalformedReason,
    },
}

impl QueryReject {
    /// The rcode weir answers with, or `None` when the message is dropped.
    pub fn response_rcode(&self) -> Option<u16> {
        match self {
            Self::NotAQuery { .. } => None,
            Self::Opcode(_) => Some(rcode::REFUSED),
            Self::QuestionCount { .. } => Some(rcode::FORMERR),
            Self::Malformed { id: Some(_), .. } => Some(rcode::FORMERR),
            Self::Malformed { id: None, .. } => None,
        }
    }

    /// The response bytes for this rejection, built from the query it came from;
    /// `None` means drop.
    pub fn response(&self, query: &[u8]) -> Option<Vec<u8>> {
        match self.response_rcode()? {
            rcode::REFUSED => refused(query, DenyRcode::Refused),
            _ => formerr(query),
        }
    }

    /// A short machine-readable reason for flow records and metrics labels.
    pub fn reason_code(&self) -> &'static str {
        match self {
            Self::NotAQuery { .. } => "not_a_query",
            Self::Opcode(_) => "opcode",
            Self::QuestionCount { .. } => "question_count",
            Self::Malformed { reason, .. } => reason.code(),
        }
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MalformedReason {
    #[error("shorter than the 12-byte header ({0} bytes)")]
    ShortHeader(usize),
    #[error("section counts do not fit in {len} bytes")]
    CountsExceedLength { len: usize },
    #[error("TC set in a query")]
    TruncatedQuery,
    #[error("query carries {answers} answer and {authorities} authority records")]
    RecordsInQuery { answers: u16, authorities: u16 },
    #[error("question name uses a compression pointer")]
    PointerInQuestion,
    #[error("{0} bytes after the last record")]
    TrailingBytes(usize),
    #[error("{0}")]
    Decode(String),
}

impl MalformedReason {
    pub fn code(&self) -> &'static str {
        match self {
            Self::ShortHeader(_) => "short_header",
            Self::CountsExceedLength { .. } => "counts_exceed_length",
            Self::TruncatedQuery => "tc_in_query",
            Self::RecordsInQuery { .. } => "records_in_query",
            Self::PointerInQuestion => "pointer_in_question",
            Self::TrailingBytes(_) => "trailing_bytes",
            Self::Decode(_) => "decode",
        }
    }
}

/// Decode a whole message with hickory, refusing trailing bytes and counts that
/// cannot fit.
pub(crate) fn decode_message(bytes: &[u8], header: &RawHeader) -> Result<Message, MalformedReason> {
    if !header.counts_fit(bytes.len()) {
        return Err(MalformedReason::CountsExceedLength { len: bytes.len() });
    }
    let mut decoder = BinDecoder::new(bytes);
    let msg = Message::read(&mut decoder).map_err(|e| MalformedReason::Decode(e.to_string()))?;
    let rest = decoder.len();
    if rest != 0 {
        return Err(MalformedReason::TrailingBytes(rest));
    }
    Ok(msg)
}

/// The span of the first question (name + type + class) when its name is written
/// without compression pointers; `Err` if it has a pointer or runs past the end.
pub(crate) fn first_question_span(bytes: &[u8]) -> Result<std::ops::Range<usize>, MalformedReason> {
    let mut i = HEADER_LEN;
    loop {
        let len = *bytes
            .get(i)
            .ok_or_else(|| MalformedReason::Decode("question name runs past the end".into()))?;
        match len {
            0 => {
                i += 1;
                break;
            }
            l if l & 0xc0 == 0xc0 => return Err(MalformedReason::PointerInQuestion),
            l if l & 0xc0 != 0 => {
                return Err(MalformedReason::Decode(format!(
                    "reserved label type {l:#04x}"
                )));
            }
            l => i += 1 + usize::from(l),
        }
    }
    let end = i + 4;
    if end > bytes.len() {
        return Err(MalformedReason::Decode("question runs past the end".into()));
    }
    Ok(HEADER_LEN..end)
}

/// Lower-cased presentation form with a trailing dot, as policy compares, in
/// the form zone files and Cilium (miekg/dns) write: letters, digits, `_` and
/// `-` bare (hickory writes a label's leading `-` as `\-`; Cilium's patterns'
/// `*`, `[-a-zA-Z0-9_]*`, matches it bare, so `*.example.com` selects
/// `-foo.example.com.`), a label's leading `*` bare (the wildcard), other
/// printable bytes after a backslash (`\.`, `\\`, `\*`), the rest as `\DDD`
/// in decimal (RFC 1035; hickory writes octal). Written straight from the
/// wire labels: hickory's lower-cased copy of the name and its text (a string
/// per escape) were 3.2 % of weir's samples under `tests/perf/dns.sh`'s
/// `PROFILE=1`. Names here come off the wire, so they are fully qualified:
/// the text always ends in the root's `.`.
pub(crate) fn policy_name(name: &Name) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    for label in name.iter() {
        for (i, byte) in label.iter().map(u8::to_ascii_lowercase).enumerate() {
            match byte {
                b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' => out.push(char::from(byte)),
                b'*' if i == 0 => out.push('*'),
                0x21..=0x7e => {
                    out.push('\\');
                    out.push(char::from(byte));
                }
                _ => {
                    out.push('\\');
                    out.push(char::from(b'0' + byte / 100));
                    out.push(char::from(b'0' + byte / 10 % 10));
                    out.push(char::from(b'0' + byte % 10));
                }
            }
        }
        out.push('.');
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// `NoError`, `Refused`, ... as Hubble prints rcodes, or the number.
pub fn rcode_name(rcode: u16) -> String {
    match rcode {
        rcode::NOERROR => "NoError".into(),
        rcode::FORMERR => "FormErr".into(),
        rcode::SERVFAIL => "ServFail".into(),
        rcode::NXDOMAIN => "NXDomain".into(),
        rcode::NOTIMP => "NotImp".into(),
        rcode::REFUSED => "Refused".into(),
        other => other.to_string(),
    }
}

/// `A`, `AAAA`, ... or RFC 3597's `TYPEnnn` for types hickory does not name.
pub fn rr_type_name(t: u16) -> std::borrow::Cow<'static, str> {
    match RecordType::from(t) {
        RecordType::Unknown(_) => std::borrow::Cow::Owned(format!("TYPE{t}")),
        known => std::borrow::Cow::Borrowed(known.into()),
    }
}

/// Inspect a query from a client. Only opcode QUERY with exactly one question
/// comes back as facts; everything else is a typed rejection that says what to
/// answer (see [`QueryReject::response`]). Never panics, whatever the bytes.
pub fn inspect_query(bytes: &[u8]) -> Result<QueryFacts, QueryReject> {
    let header = RawHeader::read(bytes).ok_or(QueryReject::Malformed {
        id: None,
        reason: MalformedReason::ShortHeader(bytes.len()),
    })?;
    let malformed = |reason| QueryReject::Malformed {
        id: Some(header.id),
        reason,
    };
    if header.qr {
        return Err(QueryReject::NotAQuery { id: header.id });
    }
    if header.opcode != OPCODE_QUERY {
        return Err(QueryReject::Opcode(header.opcode));
    }
    if header.tc {
        return Err(malformed(MalformedReason::TruncatedQuery));
    }
    if header.qdcount != 1 {
        return Err(QueryReject::QuestionCount {
            id: header.id,
            count: header.qdcount,
        });
    }
    let records_in_query = || {
        malformed(MalformedReason::RecordsInQuery {
            answers: header.ancount,
            authorities: header.nscount,
        })
    };
    // An incremental zone transfer (RFC 1995) carries the client's SOA in the
    // authority section; nothing else may.
    if header.ancount != 0 || header.nscount > 1 {
        return Err(records_in_query());
    }
    let span = first_question_span(bytes).map_err(malformed)?;
    let msg = decode_message(bytes, &header).map_err(malformed)?;
    let [query] = msg.queries.as_slice() else {
        return Err(malformed(MalformedReason::Decode(
            "question count changed while decoding".into(),
        )));
    };
    if header.nscount == 1 {
        let ixfr_soa = query.query_type() == RecordType::IXFR
            // (hickory compares names as DNS does: ignoring case)
            && matches!(msg.authorities.as_slice(), [soa]
                if soa.record_type() == RecordType::SOA && soa.name == *query.name());
        if !ixfr_soa {
            return Err(records_in_query());
        }
    }
    let question_wire = bytes
        .get(span)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| malformed(MalformedReason::Decode("question span".into())))?;
    Ok(QueryFacts {
        id: header.id,
        opcode: u8::from(OpCode::Query),
        name: policy_name(query.name()),
        qtype: u16::from(query.query_type()),
        qclass: u16::from(query.query_class()),
        edns: msg.edns.as_ref().map(|e| EdnsFacts {
            udp_payload: e.max_payload(),
            version: e.version(),
            dnssec_ok: e.flags().dnssec_ok,
        }),
        recursion_desired: header.rd,
        checking_disabled: header.cd,
        question_wire,
    })
}
