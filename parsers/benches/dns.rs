//! Per-message cost of DNS inspection on the proxy's hot path: a query with EDNS
//! (what dig and glibc send) and a typical CDN answer (two CNAMEs, four A records).

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{Criterion, criterion_group, criterion_main};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::{A, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use weir_parsers::dns::{DenyRcode, inspect_answer, inspect_query, refused};

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("bench name")
}

fn messages() -> (Vec<u8>, Vec<u8>) {
    let mut q = Message::new(0x4242, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(name("WwW.ExAmPlE.CoM."), RecordType::A));
    q.set_edns(Edns::new());
    let query = q.to_vec().expect("encode query");
    let mut r = q.clone();
    r.metadata.message_type = MessageType::Response;
    r.metadata.recursion_available = true;
    r.add_answer(Record::from_rdata(
        name("www.example.com."),
        300,
        RData::CNAME(CNAME(name("www.example.com.cdn.example.net."))),
    ));
    r.add_answer(Record::from_rdata(
        name("www.example.com.cdn.example.net."),
        60,
        RData::CNAME(CNAME(name("e1234.a.cdn.example.net."))),
    ));
    for i in 1..=4 {
        r.add_answer(Record::from_rdata(
            name("e1234.a.cdn.example.net."),
            20,
            RData::A(A(Ipv4Addr::new(192, 0, 2, i))),
        ));
    }
    let answer = r.to_vec().expect("encode answer");
    (query, answer)
}

fn bench(c: &mut Criterion) {
    let (query, answer) = messages();
    let facts = inspect_query(&query).expect("query inspects");
    c.bench_function("dns/inspect_query", |b| {
        b.iter(|| inspect_query(black_box(&query)))
    });
    c.bench_function("dns/inspect_answer", |b| {
        b.iter(|| inspect_answer(black_box(&answer), black_box(&facts)))
    });
    c.bench_function("dns/refused", |b| {
        b.iter(|| refused(black_box(&query), DenyRcode::Refused))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
