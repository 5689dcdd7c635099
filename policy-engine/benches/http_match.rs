//! Per-request policy cost as the rule count grows: 10 → 10 000 HTTP rules on one
//! port should cost about the same, since paths go through one RegexSet and the
//! L4 lookup is a hash probe.

use std::fmt::Write;
use std::hint::black_box;
use std::net::IpAddr;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use weir_parsers::http::{RequestFacts, request_facts};
use weir_policy::identity::IdentityAllocator;
use weir_policy::{CompiledPolicy, Protocol, parse_endpoints, parse_policies};

const ENDPOINTS: &str = "endpoints:
  - {name: api, ips: [10.0.0.10], labels: {app: api}}
  - {name: client, ips: [10.0.0.20], labels: {app: client}}
";

/// `n` HTTP rules, like a large API surface: distinct paths with an id segment.
fn policy(n: usize) -> String {
    let mut p = String::from(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: big}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules:
        http:
",
    );
    for i in 0..n {
        let method = ["GET", "POST", "PUT", "DELETE"][i % 4];
        writeln!(
            p,
            "        - {{method: {method}, path: '/api/v{}/resource{i}/[0-9]+'}}",
            i % 3
        )
        .unwrap();
    }
    p
}

fn compile(n: usize) -> CompiledPolicy {
    let p = parse_policies(&policy(n), "bench.yaml").unwrap();
    let e = parse_endpoints(ENDPOINTS, "e.yaml").unwrap();
    CompiledPolicy::compile(&p, &e, &mut IdentityAllocator::default()).unwrap()
}

fn bench(c: &mut Criterion) {
    let src: IpAddr = "10.0.0.20".parse().unwrap();
    let dst: IpAddr = "10.0.0.10".parse().unwrap();
    let headers = HeaderMap::new();
    let mut group = c.benchmark_group("http_verdict");
    for n in [10usize, 100, 1_000, 10_000] {
        let cp = compile(n);
        let last = n - 1;
        let hit = RequestFacts {
            method: ["GET", "POST", "PUT", "DELETE"][last % 4].into(),
            path: format!("/api/v{}/resource{last}/12345", last % 3),
            host: None,
        };
        let miss = RequestFacts {
            method: "GET".into(),
            path: "/api/v9/nothing/here".into(),
            host: None,
        };
        group.bench_with_input(BenchmarkId::new("allow_last_rule", n), &n, |b, _| {
            b.iter(|| {
                let cv = cp.connection(src, dst, Protocol::Tcp, 80);
                let v = cv.http_verdict(&cp, black_box(&hit), &headers);
                assert!(v.allowed);
            })
        });
        group.bench_with_input(BenchmarkId::new("deny_no_match", n), &n, |b, _| {
            b.iter(|| {
                let cv = cp.connection(src, dst, Protocol::Tcp, 80);
                let v = cv.http_verdict(&cp, black_box(&miss), &headers);
                assert!(!v.allowed);
            })
        });
    }
    group.finish();

    // The request-head checks every request pays before policy.
    let method = http::Method::POST;
    let uri: http::Uri = "/v1/request-landing?x=1".parse().unwrap();
    let mut h = HeaderMap::new();
    h.insert(http::header::HOST, "deathstar".parse().unwrap());
    h.insert(http::header::CONTENT_LENGTH, "12".parse().unwrap());
    c.bench_function("request_facts", |b| {
        b.iter(|| request_facts(black_box(&method), black_box(&uri), &h, false).unwrap())
    });

    let mut compile_group = c.benchmark_group("compile");
    compile_group.sample_size(10);
    for n in [10usize, 10_000] {
        compile_group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, n| {
            b.iter(|| compile(*n))
        });
    }
    compile_group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
