//! Cilium's policy semantics as a table: namespaces, entities, enableDefaultDeny
//! and toServices. Each row is one decision with the rule that must make it.
//! `policy-engine/tests/cilium_semantics.rs` checks every row against the
//! compiled policy, and `tests/tests/cli.rs` runs every row through `weir policy
//! explain` (this file is shared by `#[path]`), so the CLI shows exactly these
//! decisions.

/// Two namespaces with the same apps (`prod` and `dev`), kube-dns, and services.
pub const ENDPOINTS: &str = "
endpoints:
  - {name: prod-api, namespace: prod, ips: [10.1.0.1, 'fd00:1::1'], labels: {app: api}}
  - {name: prod-frontend, namespace: prod, ips: [10.1.0.2, 'fd00:1::2'], labels: {app: frontend}}
  - {name: dev-api, namespace: dev, ips: [10.2.0.1], labels: {app: api, io.cilium.k8s.namespace.labels.team: blue}}
  - {name: dev-frontend, ips: [10.2.0.2], labels: {app: frontend, 'k8s:io.kubernetes.pod.namespace': dev, io.cilium.k8s.namespace.labels.team: blue}}
  - {name: dns, namespace: kube-system, ips: [10.3.0.10], labels: {k8s-app: kube-dns}}
services:
  - {name: api, namespace: prod, labels: {expose: public}, selector: {app: api}}
  - {name: db, namespace: prod, labels: {expose: internal}, backends: [192.0.2.50]}
";

/// The cluster around the node, as `weir run`/`weir policy explain` flags.
pub const CLUSTER_ARGS: &[&str] = &[
    "--cluster-cidr",
    "10.96.0.0/12",
    "--remote-node-cidr",
    "192.168.50.0/24",
    "--kube-apiserver",
    "172.16.0.1",
];

/// A pod of another node, a remote node, the API server, the world.
pub const REMOTE_POD: &str = "10.96.5.5";
pub const REMOTE_NODE: &str = "192.168.50.7";
pub const APISERVER: &str = "172.16.0.1";
pub const WORLD: &str = "198.51.100.7";

pub struct Row {
    /// What the row shows (from Cilium's semantics).
    pub what: &'static str,
    pub policy: &'static str,
    /// Endpoint names or addresses.
    pub from: &'static str,
    pub to: &'static str,
    pub port: u16,
    pub allowed: bool,
    /// `Verdict::reason()`: the deciding rule, or why nothing allowed it.
    pub reason: &'static str,
}

const PROD_API_FROM_FRONTEND: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
";

const PROD_API_FROM_MY_NAMESPACE: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: same-ns, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{}]
";

const PROD_API_FROM_DEV_FRONTEND: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-dev, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {'k8s:io.kubernetes.pod.namespace': dev, app: frontend}}]
";

const PROD_API_FROM_NAMESPACES_EXPR: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-system, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchExpressions: [{key: io.kubernetes.pod.namespace, operator: In, values: [kube-system]}]}]
";

const PROD_API_FROM_TEAM_BLUE: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-blue, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {'k8s:io.cilium.k8s.namespace.labels.team': blue}}]
";

const CLUSTERWIDE_API_FROM_FRONTEND: &str = "apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cw-api}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
";

const CLUSTERWIDE_API_FROM_ALL_PODS: &str = "apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cw-pods}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{}]
";

const CLUSTERWIDE_DEV_ONLY: &str = "apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cw-dev}
spec:
  endpointSelector: {matchLabels: {'any:io.kubernetes.pod.namespace': dev}}
  ingress:
  - fromEndpoints: [{matchLabels: {'k8s:io.kubernetes.pod.namespace': dev}}]
";

const PROD_FRONTEND_EGRESS_TO_API: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fe-out, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toEndpoints: [{matchLabels: {app: api}}]
";

const FROM_CLUSTER: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cluster-in, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEntities: [cluster]
";

const FROM_WORLD: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: world-in, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEntities: [world]
";

const FROM_REMOTE_NODE: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: nodes-in, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEntities: [remote-node]
";

const FROM_HEALTH_INIT_NONE: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: health-in, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEntities: [health, init, none]
";

const TO_APISERVER: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: apiserver-out, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  egress:
  - toEntities: [kube-apiserver]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
";

const TO_APISERVER_AND_CIDR: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: apiserver-cidr, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  egress:
  - toEntities: [kube-apiserver]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  - toCIDR: [172.16.0.0/16]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
";

const FROM_CIDRS: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cidr-in, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromCIDR: [10.96.0.0/12, 198.51.100.0/24, 172.16.0.0/16]
";

const DEFAULT_ALLOW: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: visibility, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  enableDefaultDeny: {ingress: false}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {'k8s:io.kubernetes.pod.namespace': dev}}]
";

const DEFAULT_ALLOW_PLUS_DEFAULT_DENY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: visibility, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  enableDefaultDeny: {ingress: false, egress: false}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-only, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {'k8s:io.kubernetes.pod.namespace': kube-system}}]
";

const TO_SERVICE_BY_NAME: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: svc-out, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toServices: [{k8sService: {serviceName: api, namespace: prod}}]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
";

const TO_SERVICE_WITHOUT_SELECTOR: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-out, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toServices: [{k8sService: {serviceName: db}}]
";

const TO_SERVICE_BY_SELECTOR: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: public-out, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toServices: [{k8sServiceSelector: {selector: {matchLabels: {expose: public}}}}]
";

const TO_SERVICE_OTHER_NAMESPACE: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dev-svc-out, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toServices: [{k8sService: {serviceName: api, namespace: dev}}]
";

const DENIED_L4: &str = "no rule matched (ingress, L3/L4)";
const DENIED_L4_EGRESS: &str = "no rule matched (egress, L3/L4)";
const NOT_SELECTED: &str = "no policy selects these endpoints (default allow)";

pub const ROWS: &[Row] = &[
    // Namespaces.
    Row {
        what: "a namespaced policy admits its own namespace's frontend",
        policy: PROD_API_FROM_FRONTEND,
        from: "prod-frontend",
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/api spec.ingress[0].toPorts[0]",
    },
    Row {
        what: "... but not another namespace's pod with the same labels",
        policy: PROD_API_FROM_FRONTEND,
        from: "dev-frontend",
        to: "prod-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "... and does not select another namespace's api",
        policy: PROD_API_FROM_FRONTEND,
        from: "dns",
        to: "dev-api",
        port: 80,
        allowed: true,
        reason: NOT_SELECTED,
    },
    Row {
        what: "fromEndpoints: [{}] in a namespaced policy: every pod of its namespace",
        policy: PROD_API_FROM_MY_NAMESPACE,
        from: "prod-frontend",
        to: "prod-api",
        port: 8080,
        allowed: true,
        reason: "prod/same-ns spec.ingress[0]",
    },
    Row {
        what: "fromEndpoints: [{}] does not reach into other namespaces",
        policy: PROD_API_FROM_MY_NAMESPACE,
        from: "dev-frontend",
        to: "prod-api",
        port: 8080,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "fromEndpoints: [{}] is not the world",
        policy: PROD_API_FROM_MY_NAMESPACE,
        from: WORLD,
        to: "prod-api",
        port: 8080,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "a selector that names another namespace selects there",
        policy: PROD_API_FROM_DEV_FRONTEND,
        from: "dev-frontend",
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/from-dev spec.ingress[0]",
    },
    Row {
        what: "... and only there",
        policy: PROD_API_FROM_DEV_FRONTEND,
        from: "prod-frontend",
        to: "prod-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "a matchExpression on the namespace label also lifts the confinement",
        policy: PROD_API_FROM_NAMESPACES_EXPR,
        from: "dns",
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/from-system spec.ingress[0]",
    },
    Row {
        what: "... and replaces it",
        policy: PROD_API_FROM_NAMESPACES_EXPR,
        from: "prod-frontend",
        to: "prod-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "a selector on namespace labels is not confined either",
        policy: PROD_API_FROM_TEAM_BLUE,
        from: "dev-frontend",
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/from-blue spec.ingress[0]",
    },
    Row {
        what: "... and selects only namespaces with those labels",
        policy: PROD_API_FROM_TEAM_BLUE,
        from: "prod-frontend",
        to: "prod-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "a clusterwide policy selects in every namespace",
        policy: CLUSTERWIDE_API_FROM_FRONTEND,
        from: "dns",
        to: "dev-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "... and admits from every namespace",
        policy: CLUSTERWIDE_API_FROM_FRONTEND,
        from: "dev-frontend",
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "cw-api spec.ingress[0]",
    },
    Row {
        what: "clusterwide fromEndpoints: [{}]: every pod of the cluster",
        policy: CLUSTERWIDE_API_FROM_ALL_PODS,
        from: "dns",
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "cw-pods spec.ingress[0]",
    },
    Row {
        what: "... but not the world",
        policy: CLUSTERWIDE_API_FROM_ALL_PODS,
        from: WORLD,
        to: "prod-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "a clusterwide policy may select one namespace by its label",
        policy: CLUSTERWIDE_DEV_ONLY,
        from: "prod-frontend",
        to: "dev-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "... and admit that namespace's pods",
        policy: CLUSTERWIDE_DEV_ONLY,
        from: "dev-frontend",
        to: "dev-api",
        port: 80,
        allowed: true,
        reason: "cw-dev spec.ingress[0]",
    },
    Row {
        what: "... leaving the other namespaces unselected",
        policy: CLUSTERWIDE_DEV_ONLY,
        from: "dev-frontend",
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: NOT_SELECTED,
    },
    Row {
        what: "toEndpoints is confined like fromEndpoints",
        policy: PROD_FRONTEND_EGRESS_TO_API,
        from: "prod-frontend",
        to: "dev-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4_EGRESS,
    },
    Row {
        what: "... to its own namespace",
        policy: PROD_FRONTEND_EGRESS_TO_API,
        from: "prod-frontend",
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/fe-out spec.egress[0]",
    },
    // Entities.
    Row {
        what: "cluster: local endpoints of any namespace",
        policy: FROM_CLUSTER,
        from: "dev-frontend",
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/cluster-in spec.ingress[0]",
    },
    Row {
        what: "cluster: pods of other nodes (--cluster-cidr)",
        policy: FROM_CLUSTER,
        from: REMOTE_POD,
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/cluster-in spec.ingress[0]",
    },
    Row {
        what: "cluster: remote nodes",
        policy: FROM_CLUSTER,
        from: REMOTE_NODE,
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/cluster-in spec.ingress[0]",
    },
    Row {
        what: "cluster is not the world",
        policy: FROM_CLUSTER,
        from: WORLD,
        to: "prod-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "world: outside the cluster",
        policy: FROM_WORLD,
        from: WORLD,
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/world-in spec.ingress[0]",
    },
    Row {
        what: "an API server outside the cluster ranges is also world (as in Cilium)",
        policy: FROM_WORLD,
        from: APISERVER,
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/world-in spec.ingress[0]",
    },
    Row {
        what: "world is not a pod of the cluster range",
        policy: FROM_WORLD,
        from: REMOTE_POD,
        to: "prod-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "world is not a remote node",
        policy: FROM_WORLD,
        from: REMOTE_NODE,
        to: "prod-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "remote-node: the --remote-node-cidr ranges",
        policy: FROM_REMOTE_NODE,
        from: REMOTE_NODE,
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/nodes-in spec.ingress[0]",
    },
    Row {
        what: "remote-node is not a pod",
        policy: FROM_REMOTE_NODE,
        from: REMOTE_POD,
        to: "prod-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "health, init and none select no peer weir has (the endpoint is still selected)",
        policy: FROM_HEALTH_INIT_NONE,
        from: "prod-frontend",
        to: "prod-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "kube-apiserver: the --kube-apiserver addresses",
        policy: TO_APISERVER,
        from: "prod-api",
        to: APISERVER,
        port: 443,
        allowed: true,
        reason: "prod/apiserver-out spec.egress[0].toPorts[0]",
    },
    Row {
        what: "kube-apiserver is no other node",
        policy: TO_APISERVER,
        from: "prod-api",
        to: REMOTE_NODE,
        port: 443,
        allowed: false,
        reason: DENIED_L4_EGRESS,
    },
    Row {
        what: "CIDR rules select outside the cluster",
        policy: FROM_CIDRS,
        from: WORLD,
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/cidr-in spec.ingress[0]",
    },
    Row {
        what: "CIDR rules select an API server outside the cluster (Cilium gives it CIDR labels)",
        policy: FROM_CIDRS,
        from: APISERVER,
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/cidr-in spec.ingress[0]",
    },
    Row {
        what: "... and kube-apiserver still selects it when a policy names its prefix",
        policy: TO_APISERVER_AND_CIDR,
        from: "prod-api",
        to: APISERVER,
        port: 443,
        allowed: true,
        reason: "prod/apiserver-cidr spec.egress[0].toPorts[0]",
    },
    Row {
        what: "CIDR rules do not select pods of the cluster range (as in Cilium)",
        policy: FROM_CIDRS,
        from: REMOTE_POD,
        to: "prod-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4,
    },
    // enableDefaultDeny.
    Row {
        what: "enableDefaultDeny.ingress false: what no rule allows still passes",
        policy: DEFAULT_ALLOW,
        from: WORLD,
        to: "prod-api",
        port: 22,
        allowed: true,
        reason: "prod/visibility spec.enableDefaultDeny.ingress",
    },
    Row {
        what: "... its allows still apply",
        policy: DEFAULT_ALLOW,
        from: "prod-frontend",
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/visibility spec.ingress[0].toPorts[0]",
    },
    Row {
        what: "... and deny rules still deny",
        policy: DEFAULT_ALLOW,
        from: "dev-frontend",
        to: "prod-api",
        port: 80,
        allowed: false,
        reason: "denied by prod/visibility spec.ingressDeny[0]",
    },
    Row {
        what: "another policy that enables default deny wins: unmatched traffic is denied",
        policy: DEFAULT_ALLOW_PLUS_DEFAULT_DENY,
        from: WORLD,
        to: "prod-api",
        port: 22,
        allowed: false,
        reason: DENIED_L4,
    },
    Row {
        what: "... and the default-allow policy's allows add to it",
        policy: DEFAULT_ALLOW_PLUS_DEFAULT_DENY,
        from: "prod-frontend",
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/visibility spec.ingress[0].toPorts[0]",
    },
    Row {
        what: "enableDefaultDeny.egress false alone does not select for egress",
        policy: DEFAULT_ALLOW_PLUS_DEFAULT_DENY,
        from: "prod-api",
        to: WORLD,
        port: 443,
        allowed: true,
        reason: NOT_SELECTED,
    },
    // toServices.
    Row {
        what: "k8sService: a selector-backed service's backends are the pods it selects",
        policy: TO_SERVICE_BY_NAME,
        from: "prod-frontend",
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/svc-out spec.egress[0].toPorts[0]",
    },
    Row {
        what: "... in its namespace only",
        policy: TO_SERVICE_BY_NAME,
        from: "prod-frontend",
        to: "dev-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4_EGRESS,
    },
    Row {
        what: "... and on the rule's ports only",
        policy: TO_SERVICE_BY_NAME,
        from: "prod-frontend",
        to: "prod-api",
        port: 81,
        allowed: false,
        reason: DENIED_L4_EGRESS,
    },
    Row {
        what: "k8sService without a selector: its listed backend addresses",
        policy: TO_SERVICE_WITHOUT_SELECTOR,
        from: "prod-frontend",
        to: "192.0.2.50",
        port: 5432,
        allowed: true,
        reason: "prod/db-out spec.egress[0]",
    },
    Row {
        what: "... and no other address",
        policy: TO_SERVICE_WITHOUT_SELECTOR,
        from: "prod-frontend",
        to: "192.0.2.51",
        port: 5432,
        allowed: false,
        reason: DENIED_L4_EGRESS,
    },
    Row {
        what: "k8sServiceSelector: services by their own labels",
        policy: TO_SERVICE_BY_SELECTOR,
        from: "prod-frontend",
        to: "prod-api",
        port: 80,
        allowed: true,
        reason: "prod/public-out spec.egress[0]",
    },
    Row {
        what: "... not services with other labels",
        policy: TO_SERVICE_BY_SELECTOR,
        from: "prod-frontend",
        to: "192.0.2.50",
        port: 5432,
        allowed: false,
        reason: DENIED_L4_EGRESS,
    },
    Row {
        what: "a service named in another namespace is not this one",
        policy: TO_SERVICE_OTHER_NAMESPACE,
        from: "prod-frontend",
        to: "prod-api",
        port: 80,
        allowed: false,
        reason: DENIED_L4_EGRESS,
    },
];

/// Policies Cilium accepts that weir refuses, each with the error line
/// (`p.yaml:LINE:COL: message`) it must produce.
pub struct Refusal {
    pub what: &'static str,
    pub policy: &'static str,
    pub error: &'static str,
}

pub const REFUSALS: &[Refusal] = &[
    Refusal {
        what: "toGroups is cloud-specific",
        policy: "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: g, namespace: prod}
spec:
  endpointSelector: {}
  egress:
  - toGroups: [{aws: {securityGroupsIds: [sg-1]}}]
",
        error: "p.yaml:7:15: field `toGroups` in egress rule is cloud-provider specific (AWS security groups) and not supported by weir: a node-local proxy has no cloud API to resolve it; list the addresses with `toCIDRSet`",
    },
    Refusal {
        what: "unmanaged cannot be told apart",
        policy: "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: u, namespace: prod}
spec:
  endpointSelector: {}
  ingress:
  - fromEntities: [unmanaged]
",
        error: "p.yaml:7:20: entity `unmanaged` is not supported by weir: weir cannot tell a pod it does not manage from any other address (such peers are `world`, or `cluster` inside --cluster-cidr)",
    },
    Refusal {
        what: "a namespaced endpointSelector cannot reach into another namespace",
        policy: "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: x, namespace: prod}
spec:
  endpointSelector: {matchLabels: {'k8s:io.kubernetes.pod.namespace': dev}}
  ingress:
  - {}
",
        error: "p.yaml:5:21: endpointSelector names namespace `dev`, but a CiliumNetworkPolicy in namespace `prod` only selects endpoints of `prod` (use a CiliumClusterwideNetworkPolicy)",
    },
    Refusal {
        what: "reserved labels in selectors: use the entities",
        policy: "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: r, namespace: prod}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{matchLabels: {'reserved:host': ''}}]
",
        error: "p.yaml:7:36: selector key `reserved:host`: `reserved:` labels are not supported in selectors by weir; use `fromEntities`/`toEntities` for reserved peers",
    },
    Refusal {
        what: "enableDefaultDeny takes booleans",
        policy: "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: d, namespace: prod}
spec:
  endpointSelector: {}
  enableDefaultDeny: {ingress: maybe}
  ingress:
  - {}
",
        error: "p.yaml:6:32: enableDefaultDeny.ingress must be true or false, found `maybe`",
    },
    Refusal {
        what: "toServices entries name a service",
        policy: "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: s, namespace: prod}
spec:
  endpointSelector: {}
  egress:
  - toServices: [{k8sService: {namespace: prod}}]
",
        error: "p.yaml:7:31: k8sService needs `serviceName`",
    },
];
