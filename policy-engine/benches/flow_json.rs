//! Rendering one flow record as its JSON line: weir's field-by-field writer
//! against serde's derived `Serialize` (the reference the writer's tests compare
//! with), for the records a proxy writes most: an HTTP/2 gRPC response and a
//! DNS answer. The flow writer thread renders every record once.

use std::borrow::Cow;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use weir_parsers::dns::DnsFlow;
use weir_policy::Verdict;
use weir_policy::flow::{Endpoint, Flow, FlowPeers, Grpc, Http, L7Type, RenderedEndpoint};

fn peers() -> FlowPeers {
    let ep = |id: u32, name: &str| {
        Arc::new(RenderedEndpoint::new(Endpoint {
            id: Some(id),
            identity: id,
            labels: vec![
                "k8s:app=".to_string() + name,
                "k8s:io.kubernetes.pod.namespace=default".to_string(),
            ],
            namespace: Some("default".into()),
            pod_name: Some(name.into()),
        }))
    };
    FlowPeers {
        source: ep(1201, "client"),
        destination: ep(1202, "server"),
        node_name: Arc::from("node-1"),
    }
}

fn records() -> [(&'static str, Flow); 2] {
    let verdict = Verdict {
        allowed: true,
        rules: Vec::new(),
        denied_in: None,
        l7: true,
    };
    let base = |dport| {
        let mut f = Flow::with_peers(
            &peers(),
            ("10.200.0.20".parse().expect("ip"), 41_234),
            ("10.200.0.10".parse().expect("ip"), dport),
            &verdict,
        );
        f.policy = "grpc-rules spec.ingress[0].toPorts[0].rules.http[99]".into();
        f
    };
    let grpc = base(50051).with_http(
        L7Type::Response,
        183_000,
        Http {
            code: 200,
            method: Cow::Borrowed("POST"),
            url: "http://10.200.0.10:50051/bench.Echo/Unary".into(),
            protocol: Cow::Borrowed("HTTP/2"),
            grpc: Some(Grpc {
                service: "bench.Echo".into(),
                method: "Unary".into(),
                status: Some(0),
                message: None,
            }),
            ..Http::default()
        },
    );
    let dns = base(53).over_udp().with_dns(
        L7Type::Response,
        91_000,
        DnsFlow {
            query: "h042.zone7.bench.".into(),
            ips: vec![std::net::IpAddr::from([10, 202, 7, 43])],
            ttl: 300,
            observation_source: "proxy".into(),
            qtypes: vec!["A".into()],
            rrtypes: vec!["A".into()],
            ..DnsFlow::default()
        },
    );
    [("grpc_response", grpc), ("dns_answer", dns)]
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("flow_json");
    for (what, flow) in records() {
        let mut out = String::with_capacity(2048);
        group.bench_function(format!("{what}/weir"), |b| {
            b.iter(|| {
                out.clear();
                black_box(&flow).write_json(&mut out);
                black_box(out.len())
            })
        });
        let mut bytes = Vec::with_capacity(2048);
        group.bench_function(format!("{what}/serde"), |b| {
            b.iter(|| {
                bytes.clear();
                serde_json::to_writer(&mut bytes, black_box(&flow)).expect("serialise");
                black_box(bytes.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
