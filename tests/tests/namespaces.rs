//! Namespaces end to end (real curl, real nginx, netns): a CiliumNetworkPolicy in
//! `prod` neither admits `dev`'s pods nor selects `dev`'s api, while the same
//! rule as a clusterwide policy does both — so every denial below is a probe
//! that was seen to pass with the same client and the same listening server.
//! `dev`'s api is registered over the API (`weir endpoint add --namespace dev`),
//! the others come from the endpoints file.

use std::process::Output;

use weir_tests::{DEATHSTAR4, DEATHSTAR6, Scenario, text};

/// deathstar = prod's api, tiefighter = prod's frontend, xwing = dev's frontend.
const ENDPOINTS: &str = "endpoints:
  - {name: deathstar, namespace: prod, ips: [10.200.0.10, 'fd00:200::10'], labels: {app: api}}
  - {name: tiefighter, namespace: prod, ips: [10.200.0.20, 'fd00:200::20'], labels: {app: frontend}}
  - {name: xwing, namespace: dev, ips: [10.200.0.30, 'fd00:200::30'], labels: {app: frontend}}
";

const DEVAPI4: &str = "10.200.0.40";
const DEVAPI6: &str = "fd00:200::40";
/// A client that is no endpoint (`world`): allowed nowhere by this policy, so it
/// shows whether an endpoint is selected at all. (The deathstar would show it
/// too under the eBPF datapath, but with nft steering an ingress-selected
/// endpoint's own outbound connections are not supported: their replies are
/// steered to the proxy.)
const OUTSIDER4: &str = "10.200.0.50";
const OUTSIDER6: &str = "fd00:200::50";

const SPEC: &str = "spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules:
        http: [{method: GET, path: '/.*'}]
";

fn clusterwide() -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: api}}\n{SPEC}"
    )
}

fn in_prod() -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: api, namespace: prod}}\n{SPEC}"
    )
}

fn url(ip: &str) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]/")
    } else {
        format!("http://{ip}/")
    }
}

fn weir_endpoint(s: &Scenario, args: &[&str]) -> Output {
    s.lab
        .node
        .command(weir_tests::weir_bin().to_str().unwrap())
        .arg("endpoint")
        .args(args)
        .arg("--api-socket")
        .arg(s.path("weir.sock"))
        .output()
        .expect("run weir endpoint")
}

/// `denied` is what curl sees for a denied peer: `000` where the kernel drops
/// it, `403` where the proxy answers for it (nft steering).
fn a_namespaced_policy_stays_in_its_namespace(test: &str, steering: &str, denied: &str) {
    let Some(mut s) = Scenario::star_wars(test) else {
        return;
    };
    s.lab
        .add_workload("devapi", DEVAPI4.parse().unwrap(), DEVAPI6.parse().unwrap())
        .unwrap();
    s.lab
        .add_workload(
            "outsider",
            OUTSIDER4.parse().unwrap(),
            OUTSIDER6.parse().unwrap(),
        )
        .unwrap();
    std::fs::write(s.path("endpoints.yaml"), ENDPOINTS).unwrap();
    s.start_deathstar(&[]);
    s.start_nginx_in("devapi");
    s.start_weir(&clusterwide(), &["--steering", steering]);
    let ns = s.lab.workload("devapi").ns.name().to_string();
    let added = weir_endpoint(
        &s,
        &[
            "add",
            "--netns",
            &ns,
            "--name",
            "devapi",
            "--labels",
            "app=api",
            "--namespace",
            "dev",
        ],
    );
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let listed: Vec<serde_json::Value> =
        serde_json::from_slice(&weir_endpoint(&s, &["list", "--json"]).stdout).unwrap();
    let ns_of = |name: &str| {
        listed
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["namespace"].clone())
    };
    assert_eq!(ns_of("devapi"), Some("dev".into()), "{listed:?}");
    assert_eq!(ns_of("deathstar"), Some("prod".into()), "{listed:?}");
    let table = text(&weir_endpoint(&s, &["list"]));
    assert!(
        table.lines().next().unwrap().starts_with("NAME  ")
            && table.lines().next().unwrap().contains("NAMESPACE")
            && table
                .lines()
                .any(|l| l.starts_with("devapi") && l.contains(" dev ")),
        "{table}"
    );

    let get = |s: &Scenario, from: &str, ip: &str| s.status(from, "GET", &url(ip));
    // Clusterwide: dev's frontend is admitted to prod's api, and dev's api is
    // selected (the outsider, not a frontend, may not reach it).
    for (ip, dev_ip) in [(DEATHSTAR4, DEVAPI4), (DEATHSTAR6, DEVAPI6)] {
        assert_eq!(
            get(&s, "xwing", ip),
            "200",
            "clusterwide admits dev's frontend"
        );
        assert_eq!(get(&s, "tiefighter", ip), "200");
        assert_eq!(
            get(&s, "deathstar", dev_ip),
            denied,
            "clusterwide selects dev's api"
        );
        assert_eq!(get(&s, "xwing", dev_ip), "200");
    }
    let prod_seen = s.access_log().len();

    // The same rule in namespace prod.
    s.reload(&in_prod());
    for (ip, dev_ip) in [(DEATHSTAR4, DEVAPI4), (DEATHSTAR6, DEVAPI6)] {
        assert_eq!(
            get(&s, "tiefighter", ip),
            "200",
            "prod's frontend still admitted"
        );
        assert_eq!(
            get(&s, "xwing", ip),
            denied,
            "dev's frontend has the labels but not the namespace"
        );
        assert_eq!(
            get(&s, "outsider", dev_ip),
            "200",
            "dev's api is not selected by prod's policy"
        );
    }
    // nginx on prod's api saw the two tiefighter requests, none of the xwing's.
    let log = s.access_log();
    let new: Vec<&String> = log[prod_seen..].iter().collect();
    assert_eq!(new.len(), 2, "{new:?}");
    assert!(
        new.iter()
            .all(|l| l.contains("10.200.0.20") || l.contains("fd00:200::20")),
        "{new:?}"
    );
    // The flow records name the namespaces of both ends.
    let flows = s.flows();
    assert!(
        flows.iter().any(|f| f["verdict"] == "DROPPED"
            && f["source"]["pod_name"] == "xwing"
            && f["source"]["namespace"] == "dev"
            && f["destination"]["namespace"] == "prod"
            && f["source"]["labels"]
                .as_array()
                .is_some_and(|l| l.iter().any(|l| l == "k8s:io.kubernetes.pod.namespace=dev"))
            && f["destination"]["pod_name"] == "deathstar"),
        "{flows:#?}"
    );
}

#[test]
fn a_namespaced_policy_stays_in_its_namespace_in_the_kernel() {
    a_namespaced_policy_stays_in_its_namespace("ns-ebpf", "ebpf", "000");
}

#[test]
fn a_namespaced_policy_stays_in_its_namespace_in_the_proxy() {
    a_namespaced_policy_stays_in_its_namespace("ns-nft", "nft", "403");
}
