//! The rows of `cilium_table` against the compiled policy (the same rows run
//! through `weir policy explain` in `tests/tests/cli.rs`).

use std::net::IpAddr;

use weir_policy::identity::IdentityAllocator;
use weir_policy::model::{Cidr, ClusterConfig};
use weir_policy::{CompiledPolicy, Environment, Protocol, parse_endpoints_file, parse_policies};

mod cilium_table;
use cilium_table::*;

fn cluster() -> ClusterConfig {
    let mut c = ClusterConfig::default();
    for pair in CLUSTER_ARGS.chunks(2) {
        match pair[0] {
            "--cluster-cidr" => c.cluster_cidrs.push(pair[1].parse::<Cidr>().unwrap()),
            "--remote-node-cidr" => c.remote_node_cidrs.push(pair[1].parse::<Cidr>().unwrap()),
            "--kube-apiserver" => c.kube_apiserver.push(pair[1].parse().unwrap()),
            other => panic!("unknown flag {other}"),
        }
    }
    c
}

fn compile(policy: &str) -> CompiledPolicy {
    let p = parse_policies(policy, "p.yaml").unwrap();
    let f = parse_endpoints_file(ENDPOINTS, "e.yaml").unwrap();
    let env = Environment {
        services: f.services,
        cluster: cluster(),
        host_addresses: Vec::new(),
    };
    CompiledPolicy::compile_in(&p, &f.endpoints, &env, &mut IdentityAllocator::default()).unwrap()
}

fn addr(cp: &CompiledPolicy, who: &str) -> IpAddr {
    who.parse().unwrap_or_else(|_| {
        cp.endpoint_by_name(who)
            .unwrap_or_else(|| panic!("no endpoint {who}"))
            .endpoint
            .ips[0]
    })
}

#[test]
fn every_row_decides_as_cilium_does() {
    let mut failures = Vec::new();
    for row in ROWS {
        let cp = compile(row.policy);
        let v = cp
            .connection(
                addr(&cp, row.from),
                addr(&cp, row.to),
                Protocol::Tcp,
                row.port,
            )
            .l4_verdict();
        if v.allowed != row.allowed || v.reason() != row.reason {
            failures.push(format!(
                "{}: {} -> {}:{}: got {} `{}`, want {} `{}`",
                row.what,
                row.from,
                row.to,
                row.port,
                v.allowed,
                v.reason(),
                row.allowed,
                row.reason
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_refusal_names_field_and_position() {
    for r in REFUSALS {
        let e = parse_policies(r.policy, "p.yaml").unwrap_err();
        let lines: Vec<String> = e.0.iter().map(ToString::to_string).collect();
        assert_eq!(lines, vec![r.error.to_string()], "{}", r.what);
    }
}

/// Namespaces change identities: the same labels in two namespaces are two
/// identities, and the IPv6 address of a namespaced endpoint decides the same.
#[test]
fn same_labels_in_two_namespaces_are_two_identities() {
    let cp = compile(ROWS[0].policy);
    let id = |n: &str| cp.endpoint_by_name(n).unwrap().identity;
    assert_ne!(id("prod-api"), id("dev-api"));
    assert_ne!(id("prod-frontend"), id("dev-frontend"));
    let v6 = cp.connection(
        "fd00:1::2".parse().unwrap(),
        "fd00:1::1".parse().unwrap(),
        Protocol::Tcp,
        80,
    );
    assert!(v6.l4_allowed());
}

/// The CIDR identities the kernel's ipcache gets: reserved ranges carry their
/// reserved identities, so the datapath decides what the proxy decides.
#[test]
fn reserved_ranges_reach_the_ipcache() {
    let cp = compile(FROM_CLUSTER_FOR_IPCACHE);
    let find = |s: &str| {
        let c: Cidr = s.parse().unwrap();
        cp.cidr_identities()
            .iter()
            .find(|ci| ci.cidr == c)
            .unwrap_or_else(|| panic!("{s} not in the ipcache"))
            .identity
    };
    assert_eq!(
        find("172.16.0.1/32"),
        weir_policy::identity::IDENTITY_KUBE_APISERVER
    );
    assert_eq!(
        find("192.168.50.0/24"),
        weir_policy::identity::IDENTITY_REMOTE_NODE
    );
    let pods = find("10.96.0.0/12");
    assert!(pods >= 256);
    assert_eq!(cp.peer_info(REMOTE_POD.parse().unwrap()).identity, pods);
}

const FROM_CLUSTER_FOR_IPCACHE: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: c, namespace: prod}
spec:
  endpointSelector: {}
  ingress:
  - fromEntities: [cluster]
";

/// What selects nothing only for want of a flag or a listed service is named.
#[test]
fn unresolved_references_are_named() {
    let p = parse_policies(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: x, namespace: prod}
spec:
  endpointSelector: {}
  egress:
  - toEntities: [kube-apiserver, remote-node]
  - toServices: [{k8sService: {serviceName: nope, namespace: prod}}, {k8sService: {serviceName: api}}]
",
        "p.yaml",
    )
    .unwrap();
    let f = parse_endpoints_file(ENDPOINTS, "e.yaml").unwrap();
    let bare = Environment {
        services: f.services.clone(),
        cluster: ClusterConfig::default(),
        host_addresses: Vec::new(),
    };
    assert_eq!(
        weir_policy::unresolved_references(&p, &bare),
        vec![
            "prod/x spec.egress[0]: entity `kube-apiserver` selects no address: --kube-apiserver is not set",
            "prod/x spec.egress[0]: entity `remote-node` selects no address: --remote-node-cidr is not set",
            "prod/x spec.egress[1]: toServices k8sService prod/nope names no service of the endpoints file; it selects nothing",
        ]
    );
    let full = Environment {
        services: f.services,
        cluster: cluster(),
        host_addresses: Vec::new(),
    };
    assert_eq!(
        weir_policy::unresolved_references(&p, &full),
        vec![
            "prod/x spec.egress[1]: toServices k8sService prod/nope names no service of the endpoints file; it selects nothing"
        ]
    );
}

/// An API server on the node itself is `host`, and `kube-apiserver` selects the
/// host then (Cilium labels the host identity with `kube-apiserver`).
#[test]
fn an_apiserver_on_the_node_is_the_host() {
    let p = parse_policies(TO_APISERVER_FOR_HOST, "p.yaml").unwrap();
    let f = parse_endpoints_file(ENDPOINTS, "e.yaml").unwrap();
    let node: IpAddr = "192.168.50.2".parse().unwrap();
    let compile = |apiserver: &str| {
        let mut cluster = cluster();
        cluster.kube_apiserver = vec![apiserver.parse().unwrap()];
        let env = Environment {
            services: f.services.clone(),
            cluster,
            host_addresses: vec![node],
        };
        CompiledPolicy::compile_in(&p, &f.endpoints, &env, &mut IdentityAllocator::default())
            .unwrap()
    };
    let api = "10.1.0.1".parse().unwrap();
    let on_node = compile("192.168.50.2");
    assert_eq!(
        on_node.peer_info(node).identity,
        weir_policy::identity::IDENTITY_HOST
    );
    assert!(
        on_node
            .connection(api, node, Protocol::Tcp, 6443)
            .l4_allowed()
    );
    let elsewhere = compile("172.16.0.1");
    assert!(
        !elsewhere
            .connection(api, node, Protocol::Tcp, 6443)
            .l4_allowed()
    );
    assert!(
        elsewhere
            .connection(api, "172.16.0.1".parse().unwrap(), Protocol::Tcp, 6443)
            .l4_allowed()
    );
}

const TO_APISERVER_FOR_HOST: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: k, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  egress:
  - toEntities: [kube-apiserver]
";
