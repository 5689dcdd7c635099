//! The cluster around the node, in the kernel (eBPF datapath, real curl and
//! nginx, IPv4 and IPv6): `--remote-node-cidr`, `--cluster-cidr` and
//! `--kube-apiserver` give peers that are no endpoint the identities Cilium's
//! entities select; `enableDefaultDeny: false` and `toServices` decide there too.
//! Each peer is seen allowed in one phase and denied in another, same client,
//! same listening server.

use weir_tests::{DEATHSTAR4, DEATHSTAR6, ENDPOINTS, Scenario};

/// Peers that are no endpoint: another node, a pod of another node, the API
/// server (outside the cluster ranges), and the world.
const NODE2: (&str, &str) = ("10.201.0.5", "fd00:201::5");
const POD2: (&str, &str) = ("10.202.0.5", "fd00:202::5");
const APISERVER: (&str, &str) = ("10.203.0.5", "fd00:203::5");
const WORLD: (&str, &str) = ("10.204.0.5", "fd00:204::5");

const FLAGS: &[&str] = &[
    "--steering",
    "ebpf",
    "--remote-node-cidr",
    "10.201.0.0/24,fd00:201::/64",
    "--cluster-cidr",
    "10.202.0.0/16,fd00:202::/64",
    "--kube-apiserver",
    "10.203.0.5,fd00:203::5",
];

const SERVICES: &str = "services:
  - {name: db, namespace: default, backends: [10.201.0.5, 'fd00:201::5']}
  - {name: deathstar, labels: {tier: empire}, selector: {class: deathstar}}
";

fn ingress(from: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: in}}
spec:
  endpointSelector: {{matchLabels: {{class: deathstar}}}}
  ingress:
  - {from}
    toPorts: [{{ports: [{{port: '80', protocol: TCP}}]}}]
"
    )
}

fn egress(to: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: out}}
spec:
  endpointSelector: {{matchLabels: {{class: tiefighter}}}}
  egress:
  - {to}
"
    )
}

const DEFAULT_ALLOW: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: visibility}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  enableDefaultDeny: {ingress: false}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
  ingressDeny:
  - fromEntities: [remote-node]
";

fn url(ip: &str) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]/")
    } else {
        format!("http://{ip}/")
    }
}

/// `(client, server address, expected status)` for both families.
fn check(s: &Scenario, phase: &str, probes: &[(&str, (&str, &str), &str)]) {
    for (from, (v4, v6), want) in probes {
        for ip in [v4, v6] {
            assert_eq!(
                s.status(from, "GET", &url(ip)),
                *want,
                "{phase}: {from} -> {ip}"
            );
        }
    }
}

#[test]
fn cluster_entities_enable_default_deny_and_to_services_in_the_kernel() {
    let Some(mut s) = Scenario::star_wars("cluster-entities") else {
        return;
    };
    std::fs::write(s.path("endpoints.yaml"), format!("{ENDPOINTS}{SERVICES}")).unwrap();
    for (name, (v4, v6)) in [
        ("node2", NODE2),
        ("pod2", POD2),
        ("apiserver", APISERVER),
        ("world", WORLD),
    ] {
        s.lab
            .add_workload(name, v4.parse().unwrap(), v6.parse().unwrap())
            .unwrap();
        s.start_nginx_in(name);
    }
    s.start_deathstar(&[]);
    let ds = (DEATHSTAR4, DEATHSTAR6);

    s.start_weir(&ingress("fromEntities: [world]"), FLAGS);
    check(
        &s,
        "world",
        &[
            ("world", ds, "200"),
            ("node2", ds, "000"),
            ("pod2", ds, "000"),
            // An API server outside the cluster ranges is world too (Cilium).
            ("apiserver", ds, "200"),
        ],
    );
    s.reload(&ingress("fromEntities: [remote-node]"));
    check(
        &s,
        "remote-node",
        &[
            ("node2", ds, "200"),
            ("pod2", ds, "000"),
            ("world", ds, "000"),
        ],
    );
    s.reload(&ingress("fromEntities: [cluster]"));
    check(
        &s,
        "cluster",
        &[
            ("pod2", ds, "200"),
            ("node2", ds, "200"),
            ("xwing", ds, "200"),
            ("world", ds, "000"),
            ("apiserver", ds, "000"),
        ],
    );
    s.reload(&ingress("fromEntities: [kube-apiserver]"));
    check(
        &s,
        "kube-apiserver",
        &[
            ("apiserver", ds, "200"),
            ("world", ds, "000"),
            ("node2", ds, "000"),
        ],
    );
    s.reload(&ingress("fromCIDR: [10.0.0.0/8, 'fd00::/8']"));
    check(
        &s,
        "CIDR rules select outside the cluster only",
        &[
            ("world", ds, "200"),
            ("pod2", ds, "000"),
            ("node2", ds, "000"),
        ],
    );
    s.reload(DEFAULT_ALLOW);
    check(
        &s,
        "enableDefaultDeny: false",
        &[
            ("world", ds, "200"),
            ("xwing", ds, "200"),
            ("node2", ds, "000"),
        ],
    );
    s.reload(&egress("toEntities: [kube-apiserver]"));
    check(
        &s,
        "egress to the API server",
        &[
            ("tiefighter", APISERVER, "200"),
            ("tiefighter", POD2, "000"),
        ],
    );
    s.reload(&egress("toEntities: [cluster]"));
    check(
        &s,
        "egress to the cluster",
        &[
            ("tiefighter", POD2, "200"),
            ("tiefighter", ds, "200"),
            ("tiefighter", APISERVER, "000"),
        ],
    );
    s.reload(&egress("toServices: [{k8sService: {serviceName: db}}]"));
    check(
        &s,
        "a service without a selector",
        &[
            ("tiefighter", NODE2, "200"),
            ("tiefighter", POD2, "000"),
            ("tiefighter", ds, "000"),
        ],
    );
    s.reload(&egress(
        "toServices: [{k8sServiceSelector: {selector: {matchLabels: {tier: empire}}}}]",
    ));
    check(
        &s,
        "a service selected by its labels",
        &[("tiefighter", ds, "200"), ("tiefighter", NODE2, "000")],
    );
}
