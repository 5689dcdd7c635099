//! Per-query DNS matching cost as the rule count grows: 100 → 100 000 patterns
//! (exact names, `*.` and `**.` patterns under many suffixes) should cost about
//! the same, since names go through a hash map and patterns through a
//! reversed-label suffix index.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use weir_policy::dns_match::{DnsMatcher, DnsSelector};

fn selectors(n: usize) -> Vec<DnsSelector> {
    (0..n)
        .map(|i| match i % 4 {
            0 => DnsSelector::MatchName(format!("api{i}.svc{}.example.com", i % 1000)),
            1 => DnsSelector::MatchPattern(format!("*.tenant{i}.example.com")),
            2 => DnsSelector::MatchPattern(format!("**.zone{i}.corp.internal")),
            _ => DnsSelector::MatchPattern(format!("web*-{i}.cdn.example.net")),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("dns_first_match");
    for n in [100usize, 100_000] {
        let m = DnsMatcher::new(&selectors(n)).expect("valid selectors");
        let last = n - 1;
        let queries = [
            ("exact", "api0.svc0.example.com".to_string()),
            ("star", "www.tenant1.example.com".to_string()),
            ("multi", "a.b.c.zone2.corp.internal".to_string()),
            (
                "infix",
                format!("web-edge-{}.cdn.example.net", last - last % 4 + 3),
            ),
            ("miss", "nothing.matches.example.org".to_string()),
        ];
        for (what, q) in &queries {
            group.bench_with_input(BenchmarkId::new(*what, n), q, |b, q| {
                b.iter(|| black_box(m.first_match(black_box(q), |_| true)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
