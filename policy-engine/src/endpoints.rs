//! The node-local endpoint registry: which workloads exist, their addresses and labels.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::decode::{Fields, scalar, selector, seq};
use crate::error::{Diagnostics, LoadErrors};
use crate::labels::{NAMESPACE_LABEL, check_user_label, take_namespace};
use crate::model::{Selector, strip_label_source};
use crate::yaml::{self, Node, Pos, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// The user's labels (without the namespace label; see [`Endpoint::identity_labels`]).
    pub labels: BTreeMap<String, String>,
    /// Its Kubernetes namespace (`default` unless given).
    pub namespace: String,
    /// The workload's network namespace (a name under /run/netns or a path).
    pub netns: Option<String>,
    /// The workload's cgroup v2 path.
    pub cgroup: Option<String>,
    /// The node-side interface the workload's packets arrive on, when it is not
    /// the host side of a veth pair (which weir finds and checks by itself).
    pub interface: Option<String>,
    /// Named ports, usable in policies as `port: NAME`.
    pub ports: BTreeMap<String, u16>,
}

impl Endpoint {
    /// The labels its identity derives from and selectors match: the user's
    /// labels plus `io.kubernetes.pod.namespace` (Cilium's
    /// `k8s:io.kubernetes.pod.namespace`).
    pub fn identity_labels(&self) -> BTreeMap<String, String> {
        let mut l = self.labels.clone();
        l.insert(NAMESPACE_LABEL.to_string(), self.namespace.clone());
        l
    }
}

/// A Kubernetes service, for `toServices`: its backends are the endpoints its
/// selector matches (in its namespace), or, without a selector, the addresses
/// listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// The service's own labels (what `k8sServiceSelector` matches).
    pub labels: BTreeMap<String, String>,
    /// The pod selector; `None` for a service without one.
    pub selector: Option<Selector>,
    /// Backend addresses of a service without a selector.
    pub backends: Vec<IpAddr>,
    pub pos: Pos,
}

/// Everything an endpoints file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointsFile {
    pub endpoints: Vec<Endpoint>,
    pub services: Vec<Service>,
}

/// Parses an endpoints file and returns its endpoints only; a file with a
/// `services:` section is refused here (use [`parse_endpoints_file`]), so no
/// caller can drop services unnoticed.
pub fn parse_endpoints(text: &str, file: &str) -> Result<Vec<Endpoint>, LoadErrors> {
    let parsed = parse_endpoints_file(text, file)?;
    if let Some(s) = parsed.services.first() {
        let mut d = Diagnostics::new(file);
        d.error(
            s.pos,
            "this reader takes endpoints only; `services` need parse_endpoints_file",
        );
        return Err(LoadErrors(d.errors));
    }
    Ok(parsed.endpoints)
}

/// User labels with their positions: source prefixes `k8s:`/`any:`/`container:`
/// dropped, and every label checked as the API checks it.
fn user_labels(node: &Node, what: &str, d: &mut Diagnostics) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match &node.value {
        Value::Map(entries) => {
            for (k, v) in entries {
                let (Some(kt), Some(vt)) = (scalar(k, "label key", d), scalar(v, "label value", d))
                else {
                    continue;
                };
                let key = strip_label_source(kt);
                if let Err(e) = check_user_label(key, vt) {
                    d.error(k.pos, e);
                    continue;
                }
                if out.insert(key.to_string(), vt.to_string()).is_some() {
                    d.error(
                        k.pos,
                        format!("label `{key}` is given twice (`{kt}` names it again)"),
                    );
                }
            }
        }
        Value::Null => {}
        _ => d.error(
            node.pos,
            format!("{what} must be a mapping, found a {}", node.kind()),
        ),
    }
    out
}

/// The namespace from `namespace:` and/or the label `io.kubernetes.pod.namespace`
/// (taken out of `labels`); they must agree; `default` without either.
fn namespace_field(
    f: &mut Fields<'_>,
    labels: &mut BTreeMap<String, String>,
    d: &mut Diagnostics,
) -> String {
    let node = f.take("namespace");
    let given = node.and_then(|n| scalar(n, "namespace", d));
    match take_namespace(labels, given) {
        Ok(ns) => ns,
        Err(e) => {
            d.error(node.map_or(f.pos(), |n| n.pos), e);
            given.unwrap_or_default().to_string()
        }
    }
}

fn service(item: &Node, d: &mut Diagnostics) -> Option<Service> {
    let mut f = Fields::of(item, "service", d)?;
    let pos = f.pos();
    let name = f
        .take("name")
        .and_then(|n| scalar(n, "name", d))
        .map(str::to_string);
    let labels = f
        .take("labels")
        .map(|n| user_labels(n, "labels", d))
        .unwrap_or_default();
    let namespace = namespace_field(&mut f, &mut BTreeMap::new(), d);
    let selector_node = f.take("selector");
    let sel = selector_node.and_then(|n| {
        // Kubernetes service selectors are plain label maps; Cilium-style
        // `matchLabels`/`matchExpressions` are taken as well.
        if let Value::Map(entries) = &n.value
            && !entries.iter().any(|(k, _)| {
                matches!(&k.value, Value::Scalar { text, .. } if text == "matchLabels" || text == "matchExpressions")
            })
        {
            let match_labels = user_labels(n, "selector", d);
            return Some(Selector {
                match_labels,
                match_expressions: Vec::new(),
            });
        }
        selector(n, "selector", d)
    });
    let mut backends = Vec::new();
    let backends_node = f.take("backends");
    if let Some(list) = backends_node {
        for ip in seq(list, "backends", d).unwrap_or(&[]) {
            if let Some(text) = scalar(ip, "backend", d) {
                match text.parse::<IpAddr>() {
                    Ok(a) => backends.push(a),
                    Err(_) => d.error(ip.pos, format!("`{text}` is not an IP address")),
                }
            }
        }
    }
    f.finish("service", d);
    let Some(name) = name else {
        d.error(pos, "service needs `name`");
        return None;
    };
    match (&selector_node, &backends_node) {
        (Some(_), Some(b)) => d.error(
            b.pos,
            format!("service `{name}` takes either `selector` or `backends`, not both"),
        ),
        (None, None) => d.error(
            pos,
            format!("service `{name}` needs `selector` (its pods) or `backends` (addresses)"),
        ),
        _ => {}
    }
    if let Some(s) = &sel
        && s.match_labels.is_empty()
        && s.match_expressions.is_empty()
        && let Some(n) = selector_node
    {
        // As in Kubernetes, an empty selector selects no pods: say so rather
        // than let it look like "every pod".
        d.error(
            n.pos,
            format!("service `{name}` has an empty selector, which selects no pods"),
        );
    }
    Some(Service {
        name,
        namespace,
        labels,
        selector: sel,
        backends,
        pos,
    })
}

/// Parses an endpoints file:
///
/// ```yaml
/// endpoints:
///   - name: deathstar
///     ips: [10.200.0.10]
///     labels: {org: empire, class: deathstar}
/// ```
pub fn parse_endpoints_file(text: &str, file: &str) -> Result<EndpointsFile, LoadErrors> {
    let mut d = Diagnostics::new(file);
    let docs = match yaml::parse_documents(text) {
        Ok(docs) => docs,
        Err(e) => {
            d.error(e.pos, e.message);
            return Err(LoadErrors(d.errors));
        }
    };
    let mut out: Vec<Endpoint> = Vec::new();
    let mut services: Vec<Service> = Vec::new();
    for doc in docs.iter().filter(|n| n.value != Value::Null) {
        let Some(mut f) = Fields::of(doc, "endpoints file", &mut d) else {
            continue;
        };
        let list = f.take("endpoints");
        let svc_list = f.take("services");
        f.finish("endpoints file", &mut d);
        for item in svc_list
            .and_then(|l| seq(l, "services", &mut d))
            .unwrap_or(&[])
        {
            if let Some(s) = service(item, &mut d) {
                if services
                    .iter()
                    .any(|o| o.name == s.name && o.namespace == s.namespace)
                {
                    d.error(
                        s.pos,
                        format!("duplicate service `{}/{}`", s.namespace, s.name),
                    );
                }
                services.push(s);
            }
        }
        for item in list
            .and_then(|l| seq(l, "endpoints", &mut d))
            .unwrap_or(&[])
        {
            let Some(mut ef) = Fields::of(item, "endpoint", &mut d) else {
                continue;
            };
            let pos = ef.pos();
            let name = ef
                .take("name")
                .and_then(|n| scalar(n, "name", &mut d))
                .map(str::to_string);
            let mut ips = Vec::new();
            if let Some(list) = ef.take("ips") {
                for ip in seq(list, "ips", &mut d).unwrap_or(&[]) {
                    if let Some(text) = scalar(ip, "ip", &mut d) {
                        match text.parse::<IpAddr>() {
                            Ok(a) => ips.push(a),
                            Err(_) => d.error(ip.pos, format!("`{text}` is not an IP address")),
                        }
                    }
                }
            }
            let mut labels = ef
                .take("labels")
                .map(|n| user_labels(n, "labels", &mut d))
                .unwrap_or_default();
            let namespace = namespace_field(&mut ef, &mut labels, &mut d);
            let netns = ef
                .take("netns")
                .and_then(|n| scalar(n, "netns", &mut d))
                .map(str::to_string);
            let cgroup = ef
                .take("cgroup")
                .and_then(|n| scalar(n, "cgroup", &mut d))
                .map(str::to_string);
            let interface = ef
                .take("interface")
                .and_then(|n| scalar(n, "interface", &mut d))
                .map(str::to_string);
            let mut ports = BTreeMap::new();
            if let Some(pm) = ef.take("ports") {
                if let Value::Map(entries) = &pm.value {
                    for (k, v) in entries {
                        let (Some(k), Some(vt)) =
                            (scalar(k, "port name", &mut d), scalar(v, "port", &mut d))
                        else {
                            continue;
                        };
                        match vt.parse::<u16>() {
                            Ok(p) if p > 0 => {
                                ports.insert(k.to_string(), p);
                            }
                            _ => d.error(v.pos, format!("port `{vt}` is out of range (1-65535)")),
                        }
                    }
                } else {
                    d.error(pm.pos, "ports must be a mapping of name to port number");
                }
            }
            ef.finish("endpoint", &mut d);
            let Some(name) = name else {
                d.error(pos, "endpoint needs `name`");
                continue;
            };
            if ips.is_empty() && netns.is_none() {
                d.error(pos, format!("endpoint `{name}` needs `ips` or `netns`"));
            }
            if out.iter().any(|e| e.name == name) {
                d.error(pos, format!("duplicate endpoint name `{name}`"));
            }
            for ip in &ips {
                if let Some(other) = out.iter().find(|e| e.ips.contains(ip)) {
                    d.error(
                        pos,
                        format!("IP {ip} of `{name}` already belongs to `{}`", other.name),
                    );
                }
            }
            out.push(Endpoint {
                name,
                ips,
                labels,
                namespace,
                netns,
                cgroup,
                interface,
                ports,
            });
        }
    }
    if d.errors.is_empty() {
        Ok(EndpointsFile {
            endpoints: out,
            services,
        })
    } else {
        Err(LoadErrors(d.errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_form() {
        let eps = parse_endpoints(
            "endpoints:\n  - name: deathstar\n    ips: [10.200.0.10, 'fd00::10']\n    labels: {org: empire, class: deathstar}\n    ports: {http: 80}\n",
            "e.yaml",
        )
        .unwrap();
        assert_eq!(eps[0].name, "deathstar");
        assert_eq!(eps[0].ips.len(), 2);
        assert_eq!(eps[0].labels["org"], "empire");
        assert_eq!(eps[0].ports["http"], 80);
        assert_eq!(eps[0].namespace, "default");
        assert_eq!(
            eps[0].identity_labels()["io.kubernetes.pod.namespace"],
            "default"
        );
    }

    #[test]
    fn namespaces_and_services() {
        let f = parse_endpoints_file(
            "endpoints:\n  - {name: api, namespace: prod, ips: [10.0.0.1], labels: {app: api}}\nservices:\n  - {name: api, namespace: prod, labels: {tier: be}, selector: {app: api}}\n  - {name: ext, backends: [192.0.2.7]}\n",
            "e.yaml",
        )
        .unwrap();
        assert_eq!(f.endpoints[0].namespace, "prod");
        assert_eq!(
            f.services[0].selector.as_ref().unwrap().match_labels["app"],
            "api"
        );
        assert_eq!(f.services[0].labels["tier"], "be");
        assert_eq!(f.services[1].namespace, "default");
        assert_eq!(
            f.services[1].backends,
            ["192.0.2.7".parse::<IpAddr>().unwrap()]
        );
        // Endpoints only: a reader that would drop the services refuses them.
        assert!(
            parse_endpoints(
                "services:\n  - {name: ext, backends: [192.0.2.7]}\n",
                "e.yaml"
            )
            .is_err()
        );
    }

    proptest::proptest! {
        /// Any two endpoints the file accepts with different namespaces or labels
        /// get different identities: no user label can stand in for the
        /// namespace, nor for the labels of reserved and CIDR identities.
        #[test]
        fn accepted_endpoints_never_share_an_identity(
            a in (proptest::sample::select(vec!["prod", "dev"]),
                  proptest::collection::btree_map("[a-c:=,.]{0,3}", "[a-c:=,]{0,3}", 0..3)),
            b in (proptest::sample::select(vec!["prod", "dev"]),
                  proptest::collection::btree_map("[a-c:=,.]{0,3}", "[a-c:=,]{0,3}", 0..3)),
        ) {
            // Only what the file accepts (the others are refused with an error).
            let accepted = |(ns, labels): &(&str, BTreeMap<String, String>)| {
                let labels: BTreeMap<String, String> = labels
                    .iter()
                    .filter(|(k, v)| check_user_label(k, v).is_ok())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (ns.to_string(), labels)
            };
            let (a, b) = (accepted(&a), accepted(&b));
            let ep = |(ns, labels): &(String, BTreeMap<String, String>)| Endpoint {
                name: "x".into(),
                ips: vec![],
                labels: labels.clone(),
                namespace: ns.clone(),
                netns: None,
                cgroup: None,
                interface: None,
                ports: BTreeMap::new(),
            };
            let mut ids = crate::identity::IdentityAllocator::default();
            // A reserved-looking label set as the CIDR identities use.
            let reserved: BTreeMap<String, String> =
                [("reserved:world".to_string(), String::new())].into();
            let r = ids.identity(&reserved);
            let (ia, ib) = (ids.identity(&ep(&a).identity_labels()), ids.identity(&ep(&b).identity_labels()));
            proptest::prop_assert_ne!(ia, r);
            proptest::prop_assert_ne!(ib, r);
            proptest::prop_assert_eq!(ia == ib, a == b);
        }
    }

    #[test]
    fn labels_are_refused_as_the_api_refuses_them() {
        for (label, why) in [
            ("'a=b': c", "without `=`"),
            ("'a,b': c", "without `=` or `,`"),
            ("a: 'b,c'", "values without `,`"),
            ("'reserved:host': ''", "source prefix"),
            ("'cidr:10.0.0.0/8': ''", "source prefix"),
        ] {
            let text =
                format!("endpoints:\n  - name: a\n    ips: [10.0.0.1]\n    labels: {{{label}}}\n");
            let err = parse_endpoints(&text, "e.yaml").unwrap_err().to_string();
            assert!(err.starts_with("e.yaml:4:14: "), "{label}: {err}");
            assert!(err.contains(why), "{label}: {err}");
        }
        let err = parse_endpoints(
            "endpoints:\n  - {name: a, ips: [10.0.0.1], labels: {app: x, 'k8s:app': y}}\n",
            "e.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("given twice"), "{err}");
        let err = parse_endpoints(
            "endpoints:\n  - {name: a, ips: [10.0.0.1], namespace: Prod}\n",
            "e.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a valid namespace name"), "{err}");
        // The namespace label gives the namespace, as `namespace:` does; both
        // must agree.
        let eps = parse_endpoints(
            "endpoints:\n  - {name: a, ips: [10.0.0.1], labels: {'k8s:io.kubernetes.pod.namespace': prod, io.cilium.k8s.policy.serviceaccount: leia}}\n",
            "e.yaml",
        )
        .unwrap();
        assert_eq!(eps[0].namespace, "prod");
        assert_eq!(
            eps[0].labels.keys().collect::<Vec<_>>(),
            ["io.cilium.k8s.policy.serviceaccount"]
        );
        let err = parse_endpoints(
            "endpoints:\n  - {name: a, ips: [10.0.0.1], namespace: dev, labels: {io.kubernetes.pod.namespace: prod}}\n",
            "e.yaml",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "e.yaml:2:43: namespace `dev` and label `io.kubernetes.pod.namespace: prod` disagree"
        );
    }

    #[test]
    fn errors_point_at_the_value() {
        let err = parse_endpoints(
            "endpoints:\n  - name: a\n    ips: [10.0.0.300]\n    colour: red\n",
            "e.yaml",
        )
        .unwrap_err();
        let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert!(
            lines.contains(&"e.yaml:3:11: `10.0.0.300` is not an IP address".to_string()),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"e.yaml:4:5: unknown field `colour` in endpoint".to_string()),
            "{lines:?}"
        );
    }
}
