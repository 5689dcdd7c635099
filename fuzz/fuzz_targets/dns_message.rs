//! DNS inspection on arbitrary bytes: `inspect_query`, the responses built from a
//! query, `inspect_answer` (against the query in the input and against a fixed
//! `example.com. A` query carrying the answer's id, so answers get past the id
//! check), the TC reply that replaces an undecodable truncated answer, and the
//! TCP framer. Nothing panics, and what weir writes itself is
//! always a well-formed answer to the query it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_parsers::dns::{
    DenyRcode, MAX_CNAME_CHAIN, TcpDnsFramer, formerr, inspect_answer, inspect_query,
    question_matches, rcode, refused, servfail, servfail_for, truncated_for,
};

fn fixed_query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(b"\x07example\x03com\x00\x00\x01\x00\x01");
    q
}

/// The labels of a question's uncompressed wire name, lower-cased.
fn wire_labels(question: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&len) = question.get(i) {
        if len == 0 {
            break;
        }
        let label = question.get(i + 1..i + 1 + usize::from(len)).unwrap_or(&[]);
        out.push(label.to_ascii_lowercase());
        i += 1 + usize::from(len);
    }
    out
}

/// The labels a presentation-form name stands for: `\DDD` and `\X` escapes,
/// unescaped dots between labels, `.` alone for the root.
fn labels_of_presentation(name: &str) -> Vec<Vec<u8>> {
    let b = name.as_bytes();
    let (mut out, mut label, mut i) = (Vec::new(), Vec::new(), 0);
    if name == "." {
        return out;
    }
    while i < b.len() {
        match b[i] {
            b'\\'
                if b.get(i + 1..i + 4)
                    .is_some_and(|d| d.iter().all(u8::is_ascii_digit)) =>
            {
                let d = &b[i + 1..i + 4];
                let v = u32::from(d[0] - b'0') * 100
                    + u32::from(d[1] - b'0') * 10
                    + u32::from(d[2] - b'0');
                label.push(u8::try_from(v).expect("escape over 255"));
                i += 4;
            }
            b'\\' => {
                label.push(*b.get(i + 1).expect("dangling escape"));
                i += 2;
            }
            b'.' => {
                out.push(std::mem::take(&mut label));
                i += 1;
            }
            c => {
                label.push(c);
                i += 1;
            }
        }
    }
    assert!(label.is_empty(), "no trailing dot: {name}");
    out
}

fuzz_target!(|data: &[u8]| {
    // [split: u16][query bytes][answer bytes]
    let split = data
        .get(..2)
        .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    let body = data.get(2..).unwrap_or(&[]);
    let (query, answer) = body.split_at(split.min(body.len()));

    match inspect_query(query) {
        Ok(facts) => {
            assert!(facts.name.ends_with('.'));
            assert_eq!(facts.name, facts.name.to_ascii_lowercase());
            // The name policy compares reads back as exactly the question's
            // labels (case folded): no two names look alike to policy.
            assert_eq!(
                labels_of_presentation(&facts.name),
                wire_labels(&facts.question_wire),
                "{}",
                facts.name
            );
            for deny in [DenyRcode::Refused, DenyRcode::NxDomain] {
                let resp = refused(query, deny).expect("query has a header");
                let back = inspect_answer(&resp, &facts).expect("own refusal answers the query");
                assert_eq!(back.rcode, deny.rcode());
                assert!(back.addresses.is_empty());
            }
            let sf = servfail(query).expect("query has a header");
            let back = inspect_answer(&sf, &facts).expect("own SERVFAIL answers the query");
            assert_eq!(back.rcode, rcode::SERVFAIL);
            // The proxy answers from the facts alone: the same bytes.
            assert_eq!(servfail_for(&facts), sf);
            assert!(question_matches(&sf, &facts.question_wire));
            // What replaces an undecodable truncated answer: a complete,
            // truncated answer to the query with nothing to learn.
            let tc = truncated_for(&facts, rcode::NOERROR);
            let back = inspect_answer(&tc, &facts).expect("own TC reply answers the query");
            assert!(back.truncated && back.decoded && back.addresses.is_empty());
            check_answer(answer, &facts);
        }
        Err(rej) => {
            if let Some(resp) = rej.response(query) {
                assert!(resp.len() >= 12);
                assert_eq!(resp.get(..2), query.get(..2));
            }
            let _ = formerr(query);
        }
    }

    let id = answer
        .get(..2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    let fixed = inspect_query(&fixed_query(id)).expect("fixed query is valid");
    check_answer(answer, &fixed);

    let mut framer = TcpDnsFramer::default();
    let (a, b) = body.split_at(split.min(body.len()) / 2);
    framer.push(a);
    framer.push(b);
    let mut seen = 0;
    while let Ok(Some(msg)) = framer.next_message() {
        assert!(msg.len() >= 12);
        seen += msg.len() + 2;
        let _ = inspect_query(&msg);
    }
    assert!(seen <= body.len());
});

fn check_answer(answer: &[u8], facts: &weir_parsers::dns::QueryFacts) {
    if let Ok(a) = inspect_answer(answer, facts) {
        assert_eq!(a.id, facts.id);
        // Only a truncated answer is accepted without decoding, and then
        // nothing is learned from it.
        assert!(a.decoded || (a.truncated && a.addresses.is_empty()));
        assert!(a.cnames.len() <= MAX_CNAME_CHAIN);
        // Addresses only from a NOERROR answer to the question sent (its name
        // compared as DNS compares names; a truncated answer's decoded records
        // count: clients may use them, so they are gated like any others).
        assert!(a.addresses.is_empty() || a.rcode == rcode::NOERROR);
        assert!(a.addresses.is_empty() || question_matches(answer, &facts.question_wire));
        if let Some(min) = a.min_ttl {
            assert!(a.addresses.iter().all(|x| x.ttl >= min));
        }
        // Every answer record is used (an address, a CNAME followed) or
        // counted as ignored, never both (duplicates are used, not listed).
        let ancount = answer
            .get(6..8)
            .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
        assert!(a.addresses.len() + a.cnames.len() + a.ignored_records <= ancount);
    }
}
