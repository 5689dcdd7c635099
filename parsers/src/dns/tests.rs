use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use proptest::prelude::*;

use super::*;

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("test name")
}

fn query_msg(id: u16, qname: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name(qname), qtype));
    m
}

fn bytes(m: &Message) -> Vec<u8> {
    m.to_vec().expect("encode")
}

fn response_to(q: &Message) -> Message {
    let mut r = q.clone();
    r.metadata.message_type = MessageType::Response;
    r.metadata.recursion_available = true;
    r.edns = None;
    r
}

fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
}

fn cname(owner: &str, ttl: u32, target: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
}

fn facts(q: &Message) -> QueryFacts {
    inspect_query(&bytes(q)).expect("query inspects")
}

// --- queries ---------------------------------------------------------------

#[test]
fn plain_query_facts() {
    let q = query_msg(0x1234, "WwW.ExAmple.COM.", RecordType::AAAA);
    let f = facts(&q);
    assert_eq!(f.id, 0x1234);
    assert_eq!(f.opcode, OPCODE_QUERY);
    assert_eq!(f.name, "www.example.com.");
    assert_eq!(f.qtype, 28);
    assert_eq!(f.qtype_name(), "AAAA");
    assert_eq!(f.qclass, 1);
    assert!(f.recursion_desired);
    assert!(!f.has_edns());
    // the wire question keeps the client's case
    assert!(f.question_wire.windows(3).any(|w| w == b"WwW"));
}

#[test]
fn relative_name_gets_trailing_dot_and_root_is_dot() {
    let mut q = query_msg(1, "example.com", RecordType::A);
    assert_eq!(facts(&q).name, "example.com.");
    q.queries.clear();
    q.add_query(Query::query(Name::root(), RecordType::NS));
    assert_eq!(facts(&q).name, ".");
}

#[test]
fn odd_bytes_in_names_are_escaped_not_confusable() {
    // a label "a.b" (with a literal dot) must not read as two labels
    let raw = [
        0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'a', b'.', b'b', 3, b'c', b'o', b'm', 0, 0, 1, 0, 1,
    ];
    let f = inspect_query(&raw).expect("valid");
    assert_eq!(f.name, "a\\.b.com.");
    let raw = [
        0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 5, 0x00, b' ', 0xff, b'*', b'A', 0, 0, 1, 0, 1,
    ];
    let f = inspect_query(&raw).expect("valid");
    // presentation escapes: a literal `*` is `\*`, never a wildcard to a
    // pattern; other bytes are `\DDD`, decimal (RFC 1035; hickory writes octal)
    assert_eq!(f.name, r"\000\032\255\*a.");
}

#[test]
fn names_read_as_cilium_writes_them() {
    // hickory writes `\-foo`; policy compares `-foo`, as Cilium does
    let q = |labels: &[&[u8]]| {
        let mut raw = vec![0u8, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in labels {
            raw.push(l.len() as u8);
            raw.extend_from_slice(l);
        }
        raw.extend_from_slice(&[0, 0, 1, 0, 1]);
        inspect_query(&raw).expect("valid").name
    };
    assert_eq!(q(&[b"-Foo", b"example", b"com"]), "-foo.example.com.");
    assert_eq!(q(&[b"a-", b"-", b"b"]), "a-.-.b.");
    // other escapes stay: a literal backslash before a dash, a dot, a star
    assert_eq!(q(&[b"\\-x", b"com"]), r"\\-x.com.");
    assert_eq!(q(&[b"a\\", b"-b"]), r"a\\.-b.");
    assert_eq!(q(&[b"-.", b"a*"]), r"-\..a\*.");
    assert_eq!(q(&[b"\x10\\123", b"\x7f-"]), r"\016\\123.\127-.");
    // the answer's names read the same way (CNAME target with a leading dash;
    // hickory's parser refuses such names, its wire decoder does not)
    let raw = |first: &str| {
        let labels: [&[u8]; 3] = [first.as_bytes(), b"example", b"com"];
        let mut n = Name::from_labels(labels).expect("raw labels");
        n.set_fqdn(true);
        n
    };
    let mut query = Message::new(7, MessageType::Query, OpCode::Query);
    query.add_query(Query::query(raw("-a"), RecordType::A));
    let mut r = response_to(&query);
    r.add_answer(Record::from_rdata(
        raw("-a"),
        60,
        RData::CNAME(CNAME(raw("-b"))),
    ));
    r.add_answer(Record::from_rdata(
        raw("-b"),
        60,
        RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
    ));
    let f = inspect_answer(&bytes(&r), &facts(&query)).expect("accepted");
    assert_eq!(
        f.names().collect::<Vec<_>>(),
        ["-a.example.com.", "-b.example.com."]
    );
    assert_eq!(f.addresses.len(), 1);
}

#[test]
fn edns_with_options_is_seen() {
    let mut q = query_msg(7, "example.com.", RecordType::A);
    let mut e = Edns::new();
    e.set_max_payload(4096);
    e.set_dnssec_ok(true);
    e.options_mut()
        .insert(EdnsOption::Unknown(u16::from(EdnsCode::Cookie), vec![1; 8]));
    q.set_edns(e);
    let f = facts(&q);
    let edns = f.edns.expect("edns");
    assert_eq!(edns.udp_payload, 4096);
    assert!(edns.dnssec_ok);
    assert_eq!(edns.version, 0);
}

#[test]
fn response_is_not_a_query() {
    let q = response_to(&query_msg(9, "a.example.", RecordType::A));
    assert_eq!(
        inspect_query(&bytes(&q)),
        Err(QueryReject::NotAQuery { id: 9 })
    );
    assert_eq!(QueryReject::NotAQuery { id: 9 }.response(&bytes(&q)), None);
}

#[test]
fn update_and_notify_are_refused() {
    for op in [OpCode::Update, OpCode::Notify, OpCode::Status] {
        let mut q = query_msg(11, "zone.example.", RecordType::SOA);
        q.metadata.op_code = op;
        let raw = bytes(&q);
        let rej = inspect_query(&raw).expect_err("not QUERY");
        assert_eq!(rej, QueryReject::Opcode(u8::from(op)));
        assert_eq!(rej.response_rcode(), Some(rcode::REFUSED));
        let resp = rej.response(&raw).expect("answered");
        let m = Message::from_vec(&resp).expect("decodes");
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert_eq!(m.metadata.op_code, op);
        assert_eq!(m.metadata.id, 11);
    }
}

#[test]
fn zero_and_two_questions_are_formerr() {
    let mut q = query_msg(21, "a.example.", RecordType::A);
    q.add_query(Query::query(name("b.example."), RecordType::A));
    let raw = bytes(&q);
    let rej = inspect_query(&raw).expect_err("two questions");
    assert_eq!(rej, QueryReject::QuestionCount { id: 21, count: 2 });
    let resp = rej.response(&raw).expect("formerr");
    let m = Message::from_vec(&resp).expect("decodes");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(m.metadata.id, 21);
    assert!(m.queries.is_empty());

    let zero = [0, 22, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        inspect_query(&zero),
        Err(QueryReject::QuestionCount { id: 22, count: 0 })
    );
}

#[test]
fn short_and_truncated_messages() {
    for n in 0..HEADER_LEN {
        let rej = inspect_query(&[0u8; 12][..n]).expect_err("short");
        assert!(matches!(rej, QueryReject::Malformed { id: None, .. }));
        assert_eq!(rej.response(&[0u8; 12][..n]), None, "dropped");
    }
    let raw = bytes(&query_msg(5, "www.example.com.", RecordType::A));
    for cut in HEADER_LEN..raw.len() {
        let rej = inspect_query(&raw[..cut]).expect_err("cut");
        assert!(
            matches!(rej, QueryReject::Malformed { id: Some(5), .. }),
            "{cut}: {rej:?}"
        );
        let resp = rej.response(&raw[..cut]).expect("formerr");
        let m = Message::from_vec(&resp).expect("decodes");
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(m.metadata.id, 5);
    }
}

#[test]
fn trailing_bytes_tc_and_records_in_query_are_malformed() {
    let mut raw = bytes(&query_msg(5, "example.com.", RecordType::A));
    raw.push(0);
    assert!(matches!(
        inspect_query(&raw),
        Err(QueryReject::Malformed {
            id: Some(5),
            reason: MalformedReason::TrailingBytes(1)
        })
    ));
    let mut q = query_msg(6, "example.com.", RecordType::A);
    q.metadata.truncation = true;
    assert!(matches!(
        inspect_query(&bytes(&q)),
        Err(QueryReject::Malformed {
            reason: MalformedReason::TruncatedQuery,
            ..
        })
    ));
    let mut q = query_msg(7, "example.com.", RecordType::A);
    q.add_answer(a("example.com.", 1, [1, 2, 3, 4]));
    assert!(matches!(
        inspect_query(&bytes(&q)),
        Err(QueryReject::Malformed {
            reason: MalformedReason::RecordsInQuery { .. },
            ..
        })
    ));
}

#[test]
fn compression_pointer_in_question_is_refused() {
    // the question name is a pointer to offset 0 (the header)
    let raw = [0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x00, 0, 1, 0, 1];
    assert!(matches!(
        inspect_query(&raw),
        Err(QueryReject::Malformed {
            reason: MalformedReason::PointerInQuestion,
            ..
        })
    ));
    // a pointer to itself (a loop)
    let raw = [0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c, 0, 1, 0, 1];
    assert!(inspect_query(&raw).is_err());
}

#[test]
fn huge_counts_are_refused_before_decoding() {
    // qdcount 1, arcount 65535, no records: hickory would reserve memory first
    let mut raw = bytes(&query_msg(3, "a.", RecordType::A));
    raw[10] = 0xff;
    raw[11] = 0xff;
    assert!(matches!(
        inspect_query(&raw),
        Err(QueryReject::Malformed {
            reason: MalformedReason::CountsExceedLength { .. },
            ..
        })
    ));
}

#[test]
fn duplicate_opt_is_formerr() {
    let q = {
        let mut q = query_msg(8, "example.com.", RecordType::A);
        q.set_edns(Edns::new());
        bytes(&q)
    };
    // append a second copy of the OPT record and bump arcount
    let opt = q[q.len() - 11..].to_vec();
    let mut raw = q.clone();
    raw.extend_from_slice(&opt);
    raw[11] = 2;
    let rej = inspect_query(&raw).expect_err("two OPT");
    assert_eq!(rej.response_rcode(), Some(rcode::FORMERR));
}

// --- responses weir builds --------------------------------------------------

#[test]
fn refused_keeps_id_question_case_rd_and_edns() {
    let mut q = query_msg(0xbeef, "MiXeD.CaSe.example.", RecordType::A);
    let mut e = Edns::new();
    e.set_max_payload(4096);
    e.set_dnssec_ok(true);
    e.options_mut()
        .insert(EdnsOption::Unknown(u16::from(EdnsCode::Cookie), vec![7; 8]));
    q.set_edns(e);
    let raw = bytes(&q);
    let f = inspect_query(&raw).expect("valid");
    for (deny, rc) in [
        (DenyRcode::Refused, ResponseCode::Refused),
        (DenyRcode::NxDomain, ResponseCode::NXDomain),
    ] {
        let resp = refused(&raw, deny).expect("built");
        let m = Message::from_vec(&resp).expect("decodes");
        assert_eq!(m.metadata.id, 0xbeef);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, rc);
        assert!(m.metadata.recursion_desired);
        assert!(m.metadata.recursion_available);
        assert!(!m.metadata.truncation);
        assert_eq!(m.queries.len(), 1);
        assert!(m.queries[0].name().eq_case(&name("MiXeD.CaSe.example.")));
        assert_eq!(&resp[12..12 + f.question_wire.len()], &f.question_wire[..]);
        let edns = m.edns.expect("OPT echoed");
        assert_eq!(edns.max_payload(), EDNS_UDP_PAYLOAD);
        assert!(edns.flags().dnssec_ok);
        assert!(edns.options().as_ref().is_empty(), "options not echoed");
    }
}

#[test]
fn servfail_and_no_edns() {
    let mut q = query_msg(77, "example.com.", RecordType::MX);
    q.metadata.recursion_desired = false;
    q.metadata.checking_disabled = true;
    let raw = bytes(&q);
    let resp = servfail(&raw).expect("built");
    let m = Message::from_vec(&resp).expect("decodes");
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(!m.metadata.recursion_desired);
    assert!(!m.metadata.recursion_available);
    assert!(m.metadata.checking_disabled);
    assert!(m.edns.is_none());
    assert_eq!(m.queries[0].query_type(), RecordType::MX);
}

/// SERVFAIL built from a query's facts is the SERVFAIL built from its bytes
/// (the proxy keeps only the facts of an outstanding query); a padded query's
/// padding is not needed for it.
#[test]
fn servfail_from_facts_equals_servfail_from_bytes() {
    let mut padded = query_msg(0xbeef, "MiXeD.example.", RecordType::AAAA);
    let mut e = Edns::new();
    e.set_dnssec_ok(true);
    e.options_mut()
        .insert(EdnsOption::Unknown(12, vec![0; 8000]));
    padded.set_edns(e);
    let mut plain = query_msg(77, "example.com.", RecordType::MX);
    plain.metadata.recursion_desired = false;
    plain.metadata.checking_disabled = true;
    for q in [padded, plain] {
        let raw = bytes(&q);
        let f = inspect_query(&raw).expect("valid");
        let resp = servfail_for(&f);
        assert_eq!(Some(resp.clone()), servfail(&raw));
        assert!(resp.len() < 100, "{} bytes", resp.len());
    }
}

#[test]
fn deny_rcode_parses() {
    assert_eq!(DenyRcode::from_str("NXDOMAIN"), Ok(DenyRcode::NxDomain));
    assert_eq!(DenyRcode::from_str("refused"), Ok(DenyRcode::Refused));
    assert!(DenyRcode::from_str("servfail").is_err());
    assert_eq!(DenyRcode::default().rcode(), rcode::REFUSED);
}

// --- answers ---------------------------------------------------------------

#[test]
fn answer_with_chain_and_addresses() {
    let q = query_msg(100, "WWW.example.com.", RecordType::A);
    let f = facts(&q);
    let mut r = response_to(&q);
    // out of order on purpose: the chain is followed by owner, not position
    r.add_answer(a("edge.cdn.example.net.", 60, [192, 0, 2, 1]));
    r.add_answer(cname("www.example.com.", 300, "web.example.com."));
    r.add_answer(a("edge.cdn.example.net.", 30, [192, 0, 2, 2]));
    r.add_answer(cname("web.example.com.", 120, "Edge.CDN.example.net."));
    let ans = inspect_answer(&bytes(&r), &f).expect("valid");
    assert_eq!(ans.id, 100);
    assert_eq!(ans.rcode, rcode::NOERROR);
    assert!(!ans.truncated);
    assert_eq!(
        ans.cnames,
        vec!["web.example.com.", "edge.cdn.example.net."]
    );
    assert_eq!(
        ans.addresses,
        vec![
            AnswerAddress {
                ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                ttl: 60
            },
            AnswerAddress {
                ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
                ttl: 30
            },
        ]
    );
    assert_eq!(ans.min_ttl, Some(30));
    assert_eq!(ans.ignored_records, 0);
    assert_eq!(
        ans.names().collect::<Vec<_>>(),
        vec![
            "www.example.com.",
            "web.example.com.",
            "edge.cdn.example.net."
        ]
    );
    assert_eq!(ans.rrtype_names(), vec!["A", "CNAME"]);
}

#[test]
fn chain_ttl_caps_address_ttl() {
    let q = query_msg(1, "a.example.", RecordType::AAAA);
    let mut r = response_to(&q);
    r.add_answer(cname("a.example.", 5, "b.example."));
    r.add_answer(Record::from_rdata(
        name("b.example."),
        3600,
        RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
    ));
    let ans = inspect_answer(&bytes(&r), &facts(&q)).expect("valid");
    assert_eq!(ans.addresses[0].ttl, 5);
    assert_eq!(ans.min_ttl, Some(5));
}

#[test]
fn unrelated_records_are_not_learned() {
    let q = query_msg(2, "ads.example.", RecordType::A);
    let mut r = response_to(&q);
    r.add_answer(a("ads.example.", 60, [198, 51, 100, 1]));
    r.add_answer(a("bank.example.", 60, [203, 0, 113, 66]));
    r.add_answer(cname("other.example.", 60, "bank.example."));
    r.add_additional(a("ads.example.", 60, [203, 0, 113, 77]));
    let ans = inspect_answer(&bytes(&r), &facts(&q)).expect("valid");
    assert_eq!(
        ans.addresses.iter().map(|x| x.ip).collect::<Vec<_>>(),
        vec![IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))]
    );
    assert!(ans.cnames.is_empty());
    assert_eq!(ans.ignored_records, 2);
}

#[test]
fn addresses_of_an_alias_name_itself_are_not_learned() {
    // a name with a CNAME cannot have other data (RFC 1034 §3.6.2)
    let q = query_msg(2, "alias.example.", RecordType::A);
    let mut r = response_to(&q);
    r.add_answer(a("alias.example.", 60, [203, 0, 113, 9]));
    r.add_answer(cname("alias.example.", 60, "real.example."));
    r.add_answer(a("real.example.", 60, [198, 51, 100, 9]));
    let ans = inspect_answer(&bytes(&r), &facts(&q)).expect("valid");
    assert_eq!(ans.addresses.len(), 1);
    assert_eq!(
        ans.addresses[0].ip,
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9))
    );
}

#[test]
fn cname_loop_and_long_chain_and_ambiguity() {
    let q = query_msg(3, "a.example.", RecordType::A);
    let f = facts(&q);
    let mut r = response_to(&q);
    r.add_answer(cname("a.example.", 60, "b.example."));
    r.add_answer(cname("b.example.", 60, "A.example."));
    assert_eq!(
        inspect_answer(&bytes(&r), &f),
        Err(AnswerReject::CnameLoop("a.example.".into()))
    );

    let mut r = response_to(&q);
    r.add_answer(cname("a.example.", 60, "a.example."));
    assert!(matches!(
        inspect_answer(&bytes(&r), &f),
        Err(AnswerReject::CnameLoop(_))
    ));

    let mut r = response_to(&q);
    let mut prev = "a.example.".to_string();
    for i in 0..=MAX_CNAME_CHAIN {
        let next = format!("c{i}.example.");
        r.add_answer(cname(&prev, 60, &next));
        prev = next;
    }
    assert_eq!(
        inspect_answer(&bytes(&r), &f),
        Err(AnswerReject::CnameChainTooLong)
    );

    let mut r = response_to(&q);
    r.add_answer(cname("a.example.", 60, "b.example."));
    r.add_answer(cname("a.example.", 60, "c.example."));
    assert_eq!(
        inspect_answer(&bytes(&r), &f),
        Err(AnswerReject::AmbiguousCname("a.example.".into()))
    );
}

#[test]
fn id_question_and_qr_mismatches() {
    let q = query_msg(10, "a.example.", RecordType::A);
    let f = facts(&q);
    let mut r = response_to(&q);
    r.metadata.id = 11;
    assert_eq!(
        inspect_answer(&bytes(&r), &f),
        Err(AnswerReject::IdMismatch {
            expected: 10,
            got: 11
        })
    );
    assert_eq!(
        inspect_answer(&bytes(&q), &f),
        Err(AnswerReject::NotAResponse)
    );
    let other = response_to(&query_msg(10, "b.example.", RecordType::A));
    assert!(matches!(
        inspect_answer(&bytes(&other), &f),
        Err(AnswerReject::QuestionMismatch(_))
    ));
    let other = response_to(&query_msg(10, "a.example.", RecordType::AAAA));
    assert!(matches!(
        inspect_answer(&bytes(&other), &f),
        Err(AnswerReject::QuestionMismatch(_))
    ));
    // NOERROR with no question is not an answer to this query
    let mut r = response_to(&q);
    r.queries.clear();
    assert!(matches!(
        inspect_answer(&bytes(&r), &f),
        Err(AnswerReject::QuestionMismatch(_))
    ));
    // but a header-only FORMERR is
    r.metadata.response_code = ResponseCode::FormErr;
    assert_eq!(
        inspect_answer(&bytes(&r), &f).map(|x| x.rcode),
        Ok(rcode::FORMERR)
    );
}

/// An answer whose question differs from the query's only in case is the
/// query's answer, and a client comparing names as DNS does uses it: its
/// addresses are learned (and so gated), as for the exact case. Review finding:
/// they were released unlearned, and the datapath then dropped the connection.
#[test]
fn answer_question_case_may_differ_and_is_learned() {
    let q = query_msg(12, "WwW.Example.", RecordType::A);
    let mut r = response_to(&query_msg(12, "www.example.", RecordType::A));
    r.add_answer(a("www.example.", 60, [192, 0, 2, 7]));
    let ans = inspect_answer(&bytes(&r), &facts(&q)).expect("case-insensitive");
    assert_eq!(ans.addresses.len(), 1);
    assert_eq!(ans.ignored_records, 0);
    // The same case as sent: learned.
    let mut r = response_to(&q);
    r.add_answer(a("www.example.", 60, [192, 0, 2, 7]));
    let ans = inspect_answer(&bytes(&r), &facts(&q)).expect("exact");
    assert_eq!(ans.addresses.len(), 1);
}

/// Only a NOERROR answer's addresses are learned.
#[test]
fn error_answers_learn_nothing() {
    let q = query_msg(16, "a.example.", RecordType::A);
    for rc in [
        ResponseCode::NXDomain,
        ResponseCode::ServFail,
        ResponseCode::Refused,
    ] {
        let mut r = response_to(&q);
        r.metadata.response_code = rc;
        r.add_answer(a("a.example.", 60, [192, 0, 2, 1]));
        let ans = inspect_answer(&bytes(&r), &facts(&q)).expect("valid");
        assert_eq!(ans.rcode, u16::from(rc));
        assert!(ans.addresses.is_empty(), "{rc:?}");
    }
}

/// A records are learned for qtype A, AAAA for AAAA, both for ANY; nothing
/// for other types.
#[test]
fn only_the_address_type_asked_for_is_learned() {
    let v6 = Record::from_rdata(
        name("a.example."),
        60,
        RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
    );
    for (qtype, want) in [
        (RecordType::A, vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))]),
        (RecordType::AAAA, vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]),
        (
            RecordType::ANY,
            vec![
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
        ),
        (RecordType::MX, vec![]),
        (RecordType::AXFR, vec![]),
    ] {
        let q = query_msg(17, "a.example.", qtype);
        let mut r = response_to(&q);
        r.add_answer(a("a.example.", 60, [192, 0, 2, 1]));
        r.add_answer(v6.clone());
        let ans = inspect_answer(&bytes(&r), &facts(&q)).expect("valid");
        let got: Vec<IpAddr> = ans.addresses.iter().map(|x| x.ip).collect();
        assert_eq!(got, want, "{qtype:?}");
        assert_eq!(ans.ignored_records, 2 - want.len(), "{qtype:?}");
    }
}

#[test]
fn question_bytes_match_case_insensitively_type_and_class_exactly() {
    let f = facts(&query_msg(12, "WwW.Example.", RecordType::A));
    let same = bytes(&response_to(&query_msg(12, "www.EXAMPLE.", RecordType::A)));
    assert!(question_matches(&same, &f.question_wire));
    for other in [
        query_msg(12, "www.example.com.", RecordType::A),
        query_msg(12, "www.exampla.", RecordType::A),
        query_msg(12, "www.example.", RecordType::AAAA),
    ] {
        assert!(!question_matches(
            &bytes(&response_to(&other)),
            &f.question_wire
        ));
    }
    assert!(!question_matches(&same[..same.len() - 1], &f.question_wire));
    assert!(!question_matches(&[], &f.question_wire));
}

#[test]
fn truncated_answer_reports_tc() {
    let q = query_msg(13, "big.example.", RecordType::TXT);
    let f = facts(&q);
    let mut r = response_to(&q);
    r.metadata.truncation = true;
    r.add_answer(Record::from_rdata(
        name("big.example."),
        60,
        RData::TXT(TXT::new(vec!["x".repeat(200)])),
    ));
    let full = bytes(&r);
    let ans = inspect_answer(&full, &f).expect("tc answer");
    assert!(ans.truncated);
    assert!(ans.decoded);
    assert!(ans.addresses.is_empty());
    // cut in the middle of the record: still accepted as truncated, but not
    // decoded (the proxy must not release it as it is)
    let cut = &full[..full.len() - 50];
    let ans = inspect_answer(cut, &f).expect("cut tc answer");
    assert!(ans.truncated);
    assert!(!ans.decoded);
    assert_eq!(ans.rcode, rcode::NOERROR);
    // the same cut without TC is malformed
    let mut no_tc = cut.to_vec();
    no_tc[2] &= !0x02;
    assert!(matches!(
        inspect_answer(&no_tc, &f),
        Err(AnswerReject::Malformed(_))
    ));
    // a truncated answer to another question is still rejected
    let mut other = cut.to_vec();
    other[13] = b'c';
    assert!(matches!(
        inspect_answer(&other, &f),
        Err(AnswerReject::QuestionMismatch(_))
    ));
}

#[test]
fn extended_rcode_is_merged() {
    let mut q = query_msg(14, "example.", RecordType::A);
    q.set_edns(Edns::new());
    let f = facts(&q);
    let mut r = response_to(&q);
    r.set_edns(Edns::new());
    r.metadata.response_code = ResponseCode::BADVERS;
    let ans = inspect_answer(&bytes(&r), &f).expect("valid");
    assert_eq!(ans.rcode, 16);
}

#[test]
fn zone_transfer_continuation_without_question() {
    let q = query_msg(15, "zone.example.", RecordType::AXFR);
    let f = facts(&q);
    assert!(f.is_zone_transfer());
    let mut r = response_to(&q);
    r.queries.clear();
    r.add_answer(a("host.zone.example.", 60, [192, 0, 2, 3]));
    let ans = inspect_answer(&bytes(&r), &f).expect("continuation");
    assert!(ans.addresses.is_empty());
    assert_eq!(ans.ignored_records, 1);
}

#[test]
fn hand_written_answer_with_compression_pointers() {
    // query: id 0x0abc, RD, www.example.com A IN
    let query: Vec<u8> = [
        &[0x0a, 0xbc, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0][..],
        b"\x03www\x07example\x03com\x00",
        &[0, 1, 0, 1],
    ]
    .concat();
    let f = inspect_query(&query).expect("valid");
    // answer: CNAME www -> cdn.example.com (target compressed to offset 16,
    // "example.com"), then A for cdn (owner is a pointer to the CNAME target).
    let mut ans = vec![0x0a, 0xbc, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
    ans.extend_from_slice(b"\x03www\x07example\x03com\x00\x00\x01\x00\x01");
    let cname_rdata_at = ans.len() + 12; // owner ptr(2) type(2) class(2) ttl(4) rdlen(2)
    ans.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 6]);
    ans.extend_from_slice(&[3, b'c', b'd', b'n', 0xc0, 16]);
    ans.extend_from_slice(&[0xc0, cname_rdata_at as u8, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
    ans.extend_from_slice(&[203, 0, 113, 5]);
    let facts = inspect_answer(&ans, &f).expect("valid");
    assert_eq!(facts.cnames, vec!["cdn.example.com."]);
    assert_eq!(
        facts.addresses,
        vec![AnswerAddress {
            ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)),
            ttl: 30
        }]
    );
    // a pointer loop in a record's owner name: rejected, no hang
    let mut looped = ans.clone();
    let owner_at = 12 + 17 + 4; // after header and question
    looped[owner_at] = 0xc0;
    looped[owner_at + 1] = owner_at as u8;
    assert!(matches!(
        inspect_answer(&looped, &f),
        Err(AnswerReject::Malformed(_))
    ));
}

#[test]
fn zero_length_rdata_is_rejected_by_hickory() {
    // Documented surprise: hickory refuses any non-OPT record with RDLENGTH 0
    // outside UPDATE (it decodes it as an UPDATE "empty" record), even for types
    // where empty RDATA is legal (NULL, unknown types per RFC 3597).
    let q = query_msg(16, "e.example.", RecordType::NULL);
    let f = facts(&q);
    let mut raw = bytes(&response_to(&q));
    raw[7] = 1;
    raw.extend_from_slice(&[0xc0, 12, 0, 10, 0, 1, 0, 0, 0, 60, 0, 0]);
    assert!(matches!(
        inspect_answer(&raw, &f),
        Err(AnswerReject::Malformed(MalformedReason::Decode(_)))
    ));
}

// --- flow -----------------------------------------------------------------

#[test]
fn flow_has_hubble_field_names() {
    let q = query_msg(1, "www.example.com.", RecordType::A);
    let f = facts(&q);
    let mut r = response_to(&q);
    r.add_answer(cname("www.example.com.", 300, "web.example.com."));
    r.add_answer(a("web.example.com.", 60, [192, 0, 2, 1]));
    let ans = inspect_answer(&bytes(&r), &f).expect("valid");
    let flow = DnsFlow::from_answer(&f, &ans);
    let json = serde_json::to_value(&flow).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "query": "www.example.com.",
            "ips": ["192.0.2.1"],
            "ttl": 60,
            "cnames": ["web.example.com."],
            "observation_source": "proxy",
            "qtypes": ["A"],
            "rrtypes": ["CNAME", "A"],
        })
    );
    let denied = DnsFlow::from_rcode(&f, rcode::REFUSED);
    let json = serde_json::to_value(&denied).expect("json");
    assert_eq!(json["rcode"], 5);
    assert!(json.get("ips").is_none());
    assert_eq!(rr_type_name(65280), "TYPE65280");
}

// --- TCP framing ------------------------------------------------------------

#[test]
fn framer_pipelined_and_split() {
    let m1 = bytes(&query_msg(1, "a.example.", RecordType::A));
    let m2 = bytes(&query_msg(2, "b.example.", RecordType::AAAA));
    let mut stream = tcp_frame(&m1).expect("frame");
    stream.extend(tcp_frame(&m2).expect("frame"));
    // byte by byte
    let mut fr = TcpDnsFramer::default();
    let mut out = Vec::new();
    for b in &stream {
        fr.push(std::slice::from_ref(b));
        while let Some(m) = fr.next_message().expect("ok") {
            out.push(m);
        }
    }
    assert_eq!(out, vec![m1.clone(), m2.clone()]);
    assert_eq!(fr.buffered(), 0);
    // all at once
    let mut fr = TcpDnsFramer::default();
    fr.push(&stream);
    assert_eq!(fr.next_message(), Ok(Some(m1)));
    assert_eq!(fr.next_message(), Ok(Some(m2)));
    assert_eq!(fr.next_message(), Ok(None));
}

#[test]
fn framer_limits() {
    let mut fr = TcpDnsFramer::new(512);
    fr.push(&[0x02, 0x01]);
    assert_eq!(
        fr.next_message(),
        Err(FrameError::TooLarge { len: 513, max: 512 })
    );
    let mut fr = TcpDnsFramer::default();
    fr.push(&[0, 3, 1, 2, 3]);
    assert_eq!(fr.next_message(), Err(FrameError::TooShort(3)));
    assert!(tcp_frame(&vec![0; 65_536]).is_err());
    let max = vec![0u8; 65_535];
    let framed = tcp_frame(&max).expect("max fits");
    let mut fr = TcpDnsFramer::default();
    fr.push(&framed);
    assert_eq!(
        fr.next_message().expect("ok").map(|m| m.len()),
        Some(65_535)
    );
}

#[test]
fn framer_compacts_long_streams() {
    let m = bytes(&query_msg(1, "a.example.", RecordType::A));
    let framed = tcp_frame(&m).expect("frame");
    let mut fr = TcpDnsFramer::default();
    for _ in 0..1000 {
        fr.push(&framed);
        fr.push(&framed[..3]);
        assert_eq!(fr.next_message().expect("ok").as_ref(), Some(&m));
        fr.push(&framed[3..]);
        assert_eq!(fr.next_message().expect("ok").as_ref(), Some(&m));
        assert_eq!(fr.next_message(), Ok(None));
    }
    assert!(fr.buf.capacity() < 64 * 1024, "{}", fr.buf.capacity());
}

// --- properties -------------------------------------------------------------

fn arb_label() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_]([a-zA-Z0-9-]{0,18}[a-zA-Z0-9])?"
}

fn arb_name() -> impl Strategy<Value = String> {
    prop::collection::vec(arb_label(), 1..5).prop_map(|l| format!("{}.", l.join(".")))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..600)) {
        let q = inspect_query(&data);
        if let Err(rej) = &q {
            let _ = rej.response(&data);
        }
        let _ = refused(&data, DenyRcode::NxDomain);
        let _ = servfail(&data);
        let _ = formerr(&data);
        if let Ok(f) = &q {
            let _ = inspect_answer(&data, f);
            prop_assert_eq!(Some(servfail_for(f)), servfail(&data));
        }
        let f = inspect_query(&bytes(&query_msg(
            u16::from_be_bytes([data.first().copied().unwrap_or(0), data.get(1).copied().unwrap_or(0)]),
            "a.example.", RecordType::A))).expect("valid");
        let _ = inspect_answer(&data, &f);
        let mut fr = TcpDnsFramer::default();
        fr.push(&data);
        while let Ok(Some(_)) = fr.next_message() {}
    }

    #[test]
    fn random_header_with_valid_body_never_panics(
        header in prop::collection::vec(any::<u8>(), 12),
        qname in arb_name(),
    ) {
        let mut raw = bytes(&query_msg(1, &qname, RecordType::A));
        raw[..12].copy_from_slice(&header);
        let _ = inspect_query(&raw).map_err(|r| r.response(&raw));
    }

    #[test]
    fn encode_inspect_round_trip(
        id in any::<u16>(),
        qname in arb_name(),
        qtype in prop::sample::select(vec![RecordType::A, RecordType::AAAA, RecordType::MX,
            RecordType::TXT, RecordType::SRV, RecordType::HTTPS, RecordType::Unknown(65280)]),
        rd in any::<bool>(),
        edns in any::<bool>(),
        ips in prop::collection::vec(any::<[u8; 4]>(), 0..6),
        ttl in any::<u32>(),
        deny_nx in any::<bool>(),
    ) {
        let mut q = query_msg(id, &qname, qtype);
        q.metadata.recursion_desired = rd;
        if edns { q.set_edns(Edns::new()); }
        let raw = bytes(&q);
        let f = inspect_query(&raw).expect("encoded query inspects");
        prop_assert_eq!(f.id, id);
        prop_assert_eq!(&f.name, &qname.to_ascii_lowercase());
        prop_assert_eq!(f.qtype, u16::from(qtype));
        prop_assert_eq!(f.recursion_desired, rd);
        prop_assert_eq!(f.has_edns(), edns);

        let deny = if deny_nx { DenyRcode::NxDomain } else { DenyRcode::Refused };
        let resp = refused(&raw, deny).expect("built");
        let m = Message::from_vec(&resp).expect("decodes");
        prop_assert_eq!(m.metadata.id, id);
        prop_assert_eq!(u16::from(m.metadata.response_code), deny.rcode());
        prop_assert!(m.queries[0].name().eq_case(q.queries[0].name()));
        prop_assert_eq!(m.edns.is_some(), edns);
        // weir's own answers are answers to the query
        let back = inspect_answer(&resp, &f).expect("own refusal inspects");
        prop_assert_eq!(back.rcode, deny.rcode());

        let mut r = response_to(&q);
        for ip in &ips {
            r.add_answer(a(&qname, ttl, *ip));
        }
        let ans = inspect_answer(&bytes(&r), &f).expect("answer inspects");
        let mut want: Vec<IpAddr> = Vec::new();
        // A records are learned for qtype A only
        let ips = if qtype == RecordType::A { ips } else { Vec::new() };
        for ip in &ips {
            let ip = IpAddr::V4(Ipv4Addr::from(*ip));
            if !want.contains(&ip) { want.push(ip); }
        }
        prop_assert_eq!(ans.addresses.iter().map(|x| x.ip).collect::<Vec<_>>(), want);
        prop_assert_eq!(ans.min_ttl, if ips.is_empty() { None } else { Some(ttl) });
    }
}

#[test]
fn record_class_must_match() {
    let q = query_msg(1, "a.example.", RecordType::A);
    let mut r = response_to(&q);
    let mut rec = a("a.example.", 60, [192, 0, 2, 1]);
    rec.dns_class = DNSClass::CH;
    r.add_answer(rec);
    let ans = inspect_answer(&bytes(&r), &facts(&q)).expect("valid");
    assert!(ans.addresses.is_empty());
    assert_eq!(ans.ignored_records, 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Whatever the order of the records and whatever unrelated records sit among
    /// them, the chain is found in order and only the last name's addresses are
    /// learned, with TTLs capped by the chain.
    #[test]
    fn chain_found_in_any_order_and_only_its_end_learned(
        chain_len in 0usize..6,
        ttls in prop::collection::vec(1u32..100_000, 6),
        end_ips in prop::collection::vec(any::<[u8; 4]>(), 1..4),
        end_ttl in 1u32..100_000,
        noise in prop::collection::vec((arb_name(), any::<[u8; 4]>()), 0..5),
        order in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        let qname = "start.example.";
        let q = query_msg(42, qname, RecordType::A);
        let f = facts(&q);
        let names: Vec<String> = std::iter::once(qname.to_string())
            .chain((0..chain_len).map(|i| format!("hop{i}.chain.example.")))
            .collect();
        let mut records = Vec::new();
        for (i, pair) in names.windows(2).enumerate() {
            records.push(cname(&pair[0], ttls[i], &pair[1]));
        }
        let end = names.last().cloned().unwrap_or_default();
        for ip in &end_ips {
            records.push(a(&end, end_ttl, *ip));
        }
        for (n, ip) in &noise {
            // unrelated names only (never one of the chain's)
            if names.iter().any(|c| c.eq_ignore_ascii_case(n)) { continue; }
            records.push(a(n, 1, *ip));
        }
        // deterministic shuffle from the seed
        let mut s = seed | 1;
        for i in (1..records.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            let j = (s % (i as u64 + 1)) as usize;
            records.swap(i, j);
        }
        if !records.is_empty() {
            let k = order.index(records.len());
            records.rotate_left(k);
        }
        let mut r = response_to(&q);
        for rec in records { r.add_answer(rec); }
        let ans = inspect_answer(&bytes(&r), &f).expect("valid answer");
        prop_assert_eq!(&ans.cnames, &names[1..].to_vec());
        let chain_min = ttls[..chain_len].iter().copied().min();
        let want_ttl = chain_min.map_or(end_ttl, |c| c.min(end_ttl));
        let mut want: Vec<IpAddr> = Vec::new();
        for ip in &end_ips {
            let ip = IpAddr::V4(Ipv4Addr::from(*ip));
            if !want.contains(&ip) { want.push(ip); }
        }
        let mut got: Vec<IpAddr> = ans.addresses.iter().map(|x| x.ip).collect();
        got.sort();
        want.sort();
        prop_assert_eq!(got, want);
        prop_assert!(ans.addresses.iter().all(|x| x.ttl == want_ttl));
        prop_assert_eq!(ans.min_ttl, Some(want_ttl));
    }
}

/// What hickory-proto 0.26 accepts on its own, and why weir checks first. If a
/// hickory upgrade tightens one of these, the guard stays (it is cheap) but this
/// test will say so.
#[test]
fn hickory_leniencies_we_guard_against() {
    // a question name that is a pointer into the header (offset 5: qdcount's low
    // byte reads as a 1-byte label holding ancount's high byte)
    let raw = [0u8, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x05, 0, 1, 0, 1];
    let m = Message::from_vec(&raw).expect("hickory follows it");
    assert_eq!(m.queries[0].name().to_ascii(), r"\000.");
    assert!(inspect_query(&raw).is_err());
    // trailing garbage after the last record
    let mut raw = bytes(&query_msg(1, "a.", RecordType::A));
    raw.extend_from_slice(b"garbage");
    assert!(Message::from_vec(&raw).is_ok());
    assert!(inspect_query(&raw).is_err());
    // a question for a wildcard label is the literal `*`, unescaped
    let raw = [
        0u8, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'*', 1, b'a', 0, 0, 1, 0, 1,
    ];
    assert_eq!(inspect_query(&raw).map(|f| f.name), Ok("*.a.".to_string()));
}

// ---- dns-review reproducers (branch `dns-review`): each asserts what an
// attacker / a real client gets TODAY; a fix flips the marked assertion. ----

/// An RFC 1995 IXFR query carries the client's SOA in the authority section
/// (NSCOUNT = 1). Review finding: every authority record was refused, so every
/// conformant IXFR got FORMERR.
#[test]
fn an_ixfr_query_carries_one_soa_of_its_zone() {
    use hickory_proto::rr::rdata::SOA;
    let mut q = query_msg(0x1f, "example.", RecordType::IXFR);
    q.metadata.recursion_desired = false;
    q.add_authority(Record::from_rdata(
        name("example."),
        0,
        RData::SOA(SOA::new(
            name("ns.example."),
            name("hostmaster.example."),
            2026112301,
            3600,
            600,
            86400,
            60,
        )),
    ));
    let wire = bytes(&q);
    let f = inspect_query(&wire).expect("RFC 1995 IXFR");
    assert_eq!(f.qtype, u16::from(RecordType::IXFR));
    assert_eq!(f.name, "example.");
    // Not for another type, nor another zone's SOA, nor two of them.
    let mut axfr = q.clone();
    axfr.queries[0].set_query_type(RecordType::A);
    assert!(inspect_query(&bytes(&axfr)).is_err());
    let mut other = q.clone();
    other.authorities[0].name = name("other.");
    assert!(inspect_query(&bytes(&other)).is_err());
    let mut two = q.clone();
    let again = two.authorities[0].clone();
    two.add_authority(again);
    assert!(inspect_query(&bytes(&two)).is_err());
}

/// What replaces a truncated answer that did not decode: a response to the
/// query (same ID, RD, CD, question and OPT) with TC set and no records, which
/// hickory reads back as such.
#[test]
fn truncated_for_is_the_question_with_tc_and_no_records() {
    let mut q = query_msg(31, "big.example.", RecordType::TXT);
    q.set_edns(Edns::new());
    q.metadata.checking_disabled = true;
    let f = facts(&q);
    let r = truncated_for(&f, rcode::NOERROR);
    let m = Message::from_vec(&r).expect("decodes");
    assert_eq!(m.metadata.id, 31);
    assert!(m.metadata.truncation);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert!(m.metadata.recursion_desired && m.metadata.checking_disabled);
    assert_eq!(m.queries.len(), 1);
    assert_eq!(m.queries[0].name(), &name("big.example."));
    assert!(m.answers.is_empty() && m.authorities.is_empty());
    assert!(m.edns.is_some());
    // The answer's rcode is kept.
    let r = truncated_for(&f, rcode::SERVFAIL);
    assert_eq!(r[3] & 0x0f, 2);
}

/// What `policy_name` was before it wrote the wire labels itself (hickory's
/// lower-cased text, its escapes rewritten): the reference it must equal.
fn policy_name_via_hickory(name: &Name) -> String {
    let mut s = name.to_lowercase().to_ascii();
    if s.contains('\\') {
        s = as_zone_files_write_it(&s);
    }
    if !s.ends_with('.') {
        s.push('.');
    }
    s
}

/// hickory's presentation form, made the one zone files and Cilium (miekg/dns)
/// use. hickory escapes a label's leading `-` (`\-foo`), which they write bare
/// — and Cilium's patterns' `*` (`[-a-zA-Z0-9_]*`) matches it, so
/// `*.example.com` selects `-foo.example.com.`; and hickory writes `\DDD` in
/// octal (byte 16 as `\020`, which RFC 1035 reads as byte 20), they in
/// decimal. `-` is no special character of the form, so writing it bare
/// confuses no two names; every other escape (`\\`, `\.`, `\*`) stays.
fn as_zone_files_write_it(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let escaped = &rest[at + 1..];
        let octal = escaped
            .get(..3)
            .filter(|d| d.bytes().all(|c| (b'0'..=b'7').contains(&c)))
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        if let Some(byte) = octal {
            let _ = write!(out, "\\{byte:03}");
            rest = &escaped[3..];
        } else if let Some(c) = escaped.chars().next() {
            if c != '-' {
                out.push('\\');
            }
            out.push(c);
            rest = &escaped[c.len_utf8()..];
        } else {
            out.push('\\');
            rest = "";
        }
    }
    out.push_str(rest);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20000))]
    /// Any labels (every byte value, empty name included): the direct form is
    /// hickory's text with zone-file escapes, byte for byte.
    #[test]
    fn policy_name_equals_hickorys_text_rewritten(
        labels in proptest::collection::vec(
            proptest::collection::vec(
                prop_oneof![
                    4 => proptest::sample::select(b"aZ09-_*.\\ ".to_vec()),
                    1 => any::<u8>(),
                ],
                1..8,
            ),
            0..5,
        )
    ) {
        let name = Name::from_labels(labels).expect("labels fit");
        prop_assert_eq!(policy_name(&name), policy_name_via_hickory(&name));
    }
}

#[test]
fn policy_name_of_escapes_and_the_root() {
    for (labels, want) in [
        (vec![b"-Foo".to_vec(), b"Example".to_vec()], "-foo.example."),
        (vec![b"*".to_vec(), b"a*b".to_vec()], "*.a\\*b."),
        (vec![b"a.b".to_vec(), b"c\\d".to_vec()], "a\\.b.c\\\\d."),
        (vec![vec![16, b' ', 0xff]], "\\016\\032\\255."),
        (vec![], "."),
    ] {
        let name = Name::from_labels(labels).expect("labels fit");
        assert_eq!(policy_name(&name), want);
        assert_eq!(policy_name_via_hickory(&name), want);
    }
}
