//! Positioned YAML tree → policy model. Every field is either understood, or an
//! error that names it and its position: nothing is silently ignored.

use std::collections::BTreeMap;

use crate::error::Diagnostics;
use crate::labels::{DEFAULT_NAMESPACE, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, check_namespace};
use crate::model::*;
use crate::yaml::{Node, Pos, Value};

/// Cilium fields that weir knows of but does not enforce yet. Naming them apart
/// from typos tells the operator the policy is valid Cilium, just not for weir.
const NOT_YET: &[&str] = &[
    "fromRequires",
    "toRequires",
    "fromNodes",
    "toNodes",
    "authentication",
    "terminatingTLS",
    "originatingTLS",
    "serverNames",
    "listener",
    "l7proto",
    "l7",
];

/// A mapping whose keys are looked up by name; whatever is left over when the
/// decoder is done is reported.
pub(crate) struct Fields<'n> {
    pos: Pos,
    entries: Vec<(&'n str, &'n Node, Pos, bool)>,
}

impl<'n> Fields<'n> {
    pub fn of(node: &'n Node, what: &str, d: &mut Diagnostics) -> Option<Self> {
        match &node.value {
            Value::Map(entries) => {
                let mut out = Vec::with_capacity(entries.len());
                for (k, v) in entries {
                    match &k.value {
                        Value::Scalar { text, .. } => {
                            if out.iter().any(|(n, _, _, _)| *n == text.as_str()) {
                                d.error(k.pos, format!("duplicate field `{text}` in {what}"));
                            }
                            out.push((text.as_str(), v, k.pos, false));
                        }
                        _ => d.error(k.pos, format!("{what} keys must be plain strings")),
                    }
                }
                Some(Fields {
                    pos: node.pos,
                    entries: out,
                })
            }
            Value::Null => Some(Fields {
                pos: node.pos,
                entries: Vec::new(),
            }),
            _ => {
                d.error(
                    node.pos,
                    format!("{what} must be a mapping, found a {}", node.kind()),
                );
                None
            }
        }
    }

    pub fn take(&mut self, name: &str) -> Option<&'n Node> {
        for e in &mut self.entries {
            if e.0 == name && !e.3 {
                e.3 = true;
                return Some(e.1);
            }
        }
        None
    }

    pub fn pos(&self) -> Pos {
        self.pos
    }

    /// Reports every field nobody took.
    pub fn finish(self, what: &str, d: &mut Diagnostics) {
        for (name, _, pos, taken) in self.entries {
            if taken {
                continue;
            }
            if NOT_YET.contains(&name) {
                d.error(
                    pos,
                    format!("field `{name}` in {what} is not supported by weir yet"),
                );
            } else {
                d.error(pos, format!("unknown field `{name}` in {what}"));
            }
        }
    }

    /// Marks everything as understood (for free-form maps such as metadata).
    pub fn ignore_rest(mut self) {
        for e in &mut self.entries {
            e.3 = true;
        }
    }
}

pub(crate) fn scalar<'n>(node: &'n Node, what: &str, d: &mut Diagnostics) -> Option<&'n str> {
    match &node.value {
        Value::Scalar { text, .. } => Some(text.as_str()),
        _ => {
            d.error(
                node.pos,
                format!("{what} must be a string, found a {}", node.kind()),
            );
            None
        }
    }
}

pub(crate) fn seq<'n>(node: &'n Node, what: &str, d: &mut Diagnostics) -> Option<&'n [Node]> {
    match &node.value {
        Value::Seq(items) => Some(items),
        Value::Null => Some(&[]),
        _ => {
            d.error(
                node.pos,
                format!("{what} must be a list, found a {}", node.kind()),
            );
            None
        }
    }
}

pub(crate) fn string_map(node: &Node, what: &str, d: &mut Diagnostics) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match &node.value {
        Value::Map(entries) => {
            for (k, v) in entries {
                let (Some(k), Some(v)) = (scalar(k, "label key", d), scalar(v, "label value", d))
                else {
                    continue;
                };
                out.insert(strip_label_source(k).to_string(), v.to_string());
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

/// Decodes one YAML document into a policy. Returns `None` when the document is
/// empty (a stray `---`).
pub(crate) fn policy(doc: &Node, file: &str, d: &mut Diagnostics) -> Option<Policy> {
    if doc.value == Value::Null {
        return None;
    }
    let mut f = Fields::of(doc, "policy", d)?;
    let api = f
        .take("apiVersion")
        .and_then(|n| scalar(n, "apiVersion", d).map(|s| (s, n.pos)));
    match api {
        Some(("cilium.io/v2", _)) => {}
        Some((other, pos)) => d.error(
            pos,
            format!("unsupported apiVersion `{other}` (expected `cilium.io/v2`)"),
        ),
        None => d.error(f.pos(), "missing field `apiVersion`"),
    }
    let kind = match f.take("kind").map(|n| (scalar(n, "kind", d), n.pos)) {
        Some((Some("CiliumNetworkPolicy"), _)) => PolicyKind::Namespaced,
        Some((Some("CiliumClusterwideNetworkPolicy"), _)) => PolicyKind::Clusterwide,
        Some((Some(other), pos)) => {
            d.error(
                pos,
                format!(
                    "unsupported kind `{other}` (expected CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy)"
                ),
            );
            PolicyKind::Namespaced
        }
        Some((None, _)) => PolicyKind::Namespaced,
        None => {
            d.error(f.pos(), "missing field `kind`");
            PolicyKind::Namespaced
        }
    };
    let (mut name, mut namespace, mut pos) = (String::new(), None, doc.pos);
    match f.take("metadata") {
        Some(meta) => {
            if let Some(mut m) = Fields::of(meta, "metadata", d) {
                let name_node = m.take("name");
                if let Some(n) = name_node {
                    pos = n.pos;
                }
                match name_node.and_then(|n| scalar(n, "metadata.name", d)) {
                    Some(n) if !n.is_empty() => name = n.to_string(),
                    _ => d.error(m.pos(), "missing field `metadata.name`"),
                }
                namespace = m.take("namespace").and_then(|n| {
                    let ns = scalar(n, "metadata.namespace", d)?;
                    if let Err(e) = check_namespace(ns) {
                        d.error(n.pos, e);
                    }
                    Some(ns.to_string())
                });
                // Other metadata (labels, annotations, uid, ...) does not change enforcement.
                m.ignore_rest();
            }
        }
        None => d.error(f.pos(), "missing field `metadata`"),
    }
    // A clusterwide policy has no namespace (Kubernetes ignores one). A
    // CiliumNetworkPolicy without one is confined to `default`, where `kubectl
    // apply` would put it (its name stays unqualified, as written).
    let confined_to: Option<String> = match kind {
        PolicyKind::Clusterwide => {
            namespace = None;
            None
        }
        PolicyKind::Namespaced => Some(
            namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string()),
        ),
    };
    let mut rules = Vec::new();
    let spec = f.take("spec");
    let specs = f.take("specs");
    if spec.is_none() && specs.is_none() {
        d.error(f.pos(), "policy has neither `spec` nor `specs`");
    }
    if let Some(s) = spec {
        rules.extend(rule(s, "spec".to_string(), kind, confined_to.as_deref(), d));
    }
    if let Some(list) = specs {
        for (i, s) in seq(list, "specs", d).unwrap_or(&[]).iter().enumerate() {
            rules.extend(rule(
                s,
                format!("specs[{i}]"),
                kind,
                confined_to.as_deref(),
                d,
            ));
        }
    }
    // `status` is written by Kubernetes, never by the policy author; a top-level
    // `description` (beside `metadata`, as some of Cilium's own examples write
    // it) is not in the CRD's schema, so the API server drops it: Cilium loads
    // such a policy, and so does weir.
    let _ = f.take("status");
    let _ = f.take("description");
    f.finish("policy", d);
    Some(Policy {
        kind,
        name,
        namespace,
        file: file.to_string(),
        rules,
        pos,
    })
}

/// Confines a namespaced policy's peer selector to its namespace, as Cilium does:
/// unless the selector names `io.kubernetes.pod.namespace` itself, it only
/// selects endpoints of the policy's namespace (`{}` = every endpoint there). A
/// clusterwide policy's selectors are not confined.
fn confine_peer_selector(sel: &mut Selector, namespace: Option<&str>) {
    let Some(ns) = namespace else { return };
    // Cilium: a selector on the namespace or on namespace labels
    // (`io.cilium.k8s.namespace.labels.*`) picks its namespaces itself.
    let names_namespace = sel
        .match_labels
        .keys()
        .chain(sel.match_expressions.iter().map(|e| &e.key))
        .any(|k| k == NAMESPACE_LABEL || k.starts_with(NAMESPACE_LABELS_PREFIX));
    if !names_namespace {
        sel.match_labels
            .insert(NAMESPACE_LABEL.to_string(), ns.to_string());
    }
}

/// `enableDefaultDeny: {ingress: bool, egress: bool}`.
fn default_deny(node: &Node, d: &mut Diagnostics) -> DefaultDeny {
    let mut out = DefaultDeny::default();
    let Some(mut f) = Fields::of(node, "enableDefaultDeny", d) else {
        return out;
    };
    for (field, slot) in [("ingress", &mut out.ingress), ("egress", &mut out.egress)] {
        if let Some(n) = f.take(field) {
            match scalar(n, field, d) {
                Some("true") => *slot = Some(true),
                Some("false") => *slot = Some(false),
                Some(other) => d.error(
                    n.pos,
                    format!("enableDefaultDeny.{field} must be true or false, found `{other}`"),
                ),
                None => {}
            }
        }
    }
    f.finish("enableDefaultDeny", d);
    out
}

fn rule(
    node: &Node,
    label: String,
    kind: PolicyKind,
    namespace: Option<&str>,
    d: &mut Diagnostics,
) -> Option<Rule> {
    let mut f = Fields::of(node, "spec", d)?;
    let es = f.take("endpointSelector");
    let ns = f.take("nodeSelector");
    let subject = match (es, ns) {
        (Some(s), None) => selector(s, "endpointSelector", d).map(|mut sel| {
            // A namespaced policy's endpointSelector always applies in its own
            // namespace (Cilium drops a match on another one with a warning;
            // weir refuses it, so the policy never means something else than
            // it says).
            if let Some(ns) = namespace {
                if let Some(other) = sel.match_labels.get(NAMESPACE_LABEL)
                    && other != ns
                {
                    d.error(
                        s.pos,
                        format!(
                            "endpointSelector names namespace `{other}`, but a CiliumNetworkPolicy in namespace `{ns}` only selects endpoints of `{ns}` (use a CiliumClusterwideNetworkPolicy)"
                        ),
                    );
                }
                sel.match_labels
                    .insert(NAMESPACE_LABEL.to_string(), ns.to_string());
            }
            sel
        }),
        (None, Some(s)) => {
            if kind == PolicyKind::Namespaced {
                d.error(
                    s.pos,
                    "`nodeSelector` is only valid in a CiliumClusterwideNetworkPolicy",
                );
            } else {
                // Matched against workloads, a host policy would lock down the
                // endpoints instead of the node: refused, never reinterpreted.
                d.error(
                    s.pos,
                    "field `nodeSelector` (a host policy) is not supported by weir yet: weir enforces policy for workload endpoints, not for the node's own traffic",
                );
            }
            None
        }
        (Some(_), Some(s)) => {
            d.error(
                s.pos,
                "a rule takes either `endpointSelector` or `nodeSelector`, not both",
            );
            None
        }
        (None, None) => {
            d.error(f.pos(), "rule needs `endpointSelector` or `nodeSelector`");
            None
        }
    };
    let ingress = f
        .take("ingress")
        .map(|n| peer_rules(n, "ingress", "from", false, namespace, d));
    let egress = f
        .take("egress")
        .map(|n| peer_rules(n, "egress", "to", false, namespace, d));
    let ingress_deny = f
        .take("ingressDeny")
        .map(|n| peer_rules(n, "ingressDeny", "from", true, namespace, d));
    let egress_deny = f
        .take("egressDeny")
        .map(|n| peer_rules(n, "egressDeny", "to", true, namespace, d));
    let default_deny = f
        .take("enableDefaultDeny")
        .map(|n| default_deny(n, d))
        .unwrap_or_default();
    let _ = f.take("description");
    let _ = f.take("labels");
    let pos = f.pos();
    f.finish("spec", d);
    Some(Rule {
        label,
        subject: subject?,
        ingress,
        egress,
        ingress_deny,
        egress_deny,
        default_deny,
        pos,
    })
}

/// One `toServices` entry: `k8sService: {serviceName, namespace}` or
/// `k8sServiceSelector: {selector, namespace}`.
fn service_ref(node: &Node, d: &mut Diagnostics) -> Option<ServiceRef> {
    let mut f = Fields::of(node, "toServices entry", d)?;
    let pos = f.pos();
    let named = f.take("k8sService");
    let selected = f.take("k8sServiceSelector");
    f.finish("toServices entry", d);
    let ns_of = |f: &mut Fields<'_>, d: &mut Diagnostics| {
        f.take("namespace").and_then(|n| {
            let ns = scalar(n, "namespace", d)?;
            if let Err(e) = check_namespace(ns) {
                d.error(n.pos, e);
            }
            Some(ns.to_string())
        })
    };
    match (named, selected) {
        (Some(n), None) => {
            let mut sf = Fields::of(n, "k8sService", d)?;
            let name = sf
                .take("serviceName")
                .and_then(|v| scalar(v, "serviceName", d))
                .map(str::to_string);
            let namespace = ns_of(&mut sf, d);
            let spos = sf.pos();
            sf.finish("k8sService", d);
            match name {
                Some(name) if !name.is_empty() => Some(ServiceRef::Named { name, namespace }),
                _ => {
                    d.error(spos, "k8sService needs `serviceName`");
                    None
                }
            }
        }
        (None, Some(n)) => {
            let mut sf = Fields::of(n, "k8sServiceSelector", d)?;
            let sel = sf.take("selector").and_then(|v| selector(v, "selector", d));
            let namespace = ns_of(&mut sf, d);
            let spos = sf.pos();
            sf.finish("k8sServiceSelector", d);
            match sel {
                Some(selector) => Some(ServiceRef::Selected {
                    selector,
                    namespace,
                }),
                None => {
                    d.error(spos, "k8sServiceSelector needs `selector`");
                    None
                }
            }
        }
        (Some(_), Some(n)) => {
            d.error(
                n.pos,
                "a toServices entry takes either `k8sService` or `k8sServiceSelector`, not both",
            );
            None
        }
        (None, None) => {
            d.error(
                pos,
                "toServices entry needs `k8sService` or `k8sServiceSelector`",
            );
            None
        }
    }
}

fn entity(e: &Node, d: &mut Diagnostics) -> Option<Entity> {
    let text = scalar(e, "entity", d)?;
    let refuse = |d: &mut Diagnostics, why: &str| {
        d.error(
            e.pos,
            format!("entity `{text}` is not supported by weir: {why}"),
        );
        None
    };
    match text {
        "world" => Some(Entity::World),
        "host" => Some(Entity::Host),
        "all" => Some(Entity::All),
        "cluster" => Some(Entity::Cluster),
        "remote-node" => Some(Entity::RemoteNode),
        "health" => Some(Entity::Health),
        "init" => Some(Entity::Init),
        "kube-apiserver" => Some(Entity::KubeApiserver),
        "none" => Some(Entity::None),
        "unmanaged" => refuse(
            d,
            "weir cannot tell a pod it does not manage from any other address (such peers are `world`, or `cluster` inside --cluster-cidr)",
        ),
        "ingress" => refuse(
            d,
            "it stands for Cilium's own Ingress/Gateway proxy, which weir does not run",
        ),
        "world-ipv4" | "world-ipv6" => refuse(
            d,
            "weir has one `world` for both families; use `world` with `toCIDR`/`fromCIDR` 0.0.0.0/0 or ::/0",
        ),
        other => {
            d.error(e.pos, format!("unknown entity `{other}`"));
            None
        }
    }
}

fn peer_rules(
    node: &Node,
    dir: &str,
    prefix: &str,
    deny: bool,
    namespace: Option<&str>,
    d: &mut Diagnostics,
) -> Vec<PeerRule> {
    let mut out = Vec::new();
    let endpoints_field = format!("{prefix}Endpoints");
    let cidr_field = format!("{prefix}CIDR");
    let cidr_set_field = format!("{prefix}CIDRSet");
    let entities_field = format!("{prefix}Entities");
    for item in seq(node, dir, d).unwrap_or(&[]) {
        let Some(mut f) = Fields::of(item, dir, d) else {
            continue;
        };
        let peers = f.take(&endpoints_field).map(|n| {
            seq(n, &endpoints_field, d)
                .unwrap_or(&[])
                .iter()
                .filter_map(|s| selector(s, &endpoints_field, d))
                .map(|mut s| {
                    confine_peer_selector(&mut s, namespace);
                    s
                })
                .collect::<Vec<_>>()
        });
        let groups_field = format!("{prefix}Groups");
        if let Some(n) = f.take(&groups_field) {
            d.error(
                n.pos,
                format!(
                    "field `{groups_field}` in {dir} rule is cloud-provider specific (AWS security groups) and not supported by weir: a node-local proxy has no cloud API to resolve it; list the addresses with `{prefix}CIDRSet`"
                ),
            );
        }
        let services = if prefix == "to" {
            f.take("toServices").map(|n| {
                seq(n, "toServices", d)
                    .unwrap_or(&[])
                    .iter()
                    .filter_map(|s| service_ref(s, d))
                    .collect::<Vec<_>>()
            })
        } else {
            None
        };
        let fqdns = if prefix == "to" {
            f.take("toFQDNs").and_then(|n| {
                if deny {
                    d.error(
                        n.pos,
                        format!(
                            "field `toFQDNs` is not allowed in {dir}: Cilium's deny rules have no toFQDNs (a name's addresses are only known after a lookup, so a deny by name cannot be enforced); deny the addresses with `toCIDRSet`"
                        ),
                    );
                    return None;
                }
                Some(
                    seq(n, "toFQDNs", d)
                        .unwrap_or(&[])
                        .iter()
                        .filter_map(|s| fqdn_selector(s, "toFQDNs entry", d))
                        .collect::<Vec<_>>(),
                )
            })
        } else {
            None
        };
        let fqdn_pos = fqdns.as_ref().map(|_| f.pos());
        let mut cidrs: Option<Vec<CidrRule>> = None;
        if let Some(n) = f.take(&cidr_field) {
            let list = cidrs.get_or_insert_with(Vec::new);
            for c in seq(n, &cidr_field, d).unwrap_or(&[]) {
                if let Some(cidr) = cidr_value(c, d) {
                    list.push(CidrRule {
                        cidr,
                        except: vec![],
                    });
                }
            }
        }
        if let Some(n) = f.take(&cidr_set_field) {
            let list = cidrs.get_or_insert_with(Vec::new);
            for c in seq(n, &cidr_set_field, d).unwrap_or(&[]) {
                let Some(mut cf) = Fields::of(c, &cidr_set_field, d) else {
                    continue;
                };
                let cidr = match (cf.take("cidr"), cf.take("cidrGroupRef")) {
                    (_, Some(g)) => {
                        d.error(
                            g.pos,
                            "field `cidrGroupRef` is not supported by weir yet: it names a CiliumCIDRGroup, which weir has no source for; list the prefixes with `cidr`",
                        );
                        None
                    }
                    (Some(v), None) => cidr_value(v, d),
                    (None, None) => {
                        d.error(cf.pos(), format!("{cidr_set_field} entry needs `cidr`"));
                        None
                    }
                };
                let mut except = Vec::new();
                if let Some(ex) = cf.take("except") {
                    for e in seq(ex, "except", d).unwrap_or(&[]) {
                        if let Some(ec) = cidr_value(e, d) {
                            if let Some(c) = &cidr
                                && !c.covers(&ec)
                            {
                                d.error(e.pos, format!("except {ec} is not inside {c}"));
                            }
                            except.push(ec);
                        }
                    }
                }
                cf.finish(&format!("{cidr_set_field} entry"), d);
                if let Some(cidr) = cidr {
                    list.push(CidrRule { cidr, except });
                }
            }
        }
        let entities = f.take(&entities_field).map(|n| {
            seq(n, &entities_field, d)
                .unwrap_or(&[])
                .iter()
                .filter_map(|e| entity(e, d))
                .collect::<Vec<_>>()
        });
        let to_ports: Vec<PortRule> = f
            .take("toPorts")
            .map(|n| {
                seq(n, "toPorts", d)
                    .unwrap_or(&[])
                    .iter()
                    .filter_map(|p| port_rule(p, d))
                    .collect()
            })
            .unwrap_or_default();
        let icmps = f
            .take("icmps")
            .map(|n| icmp_rules(n, d))
            .unwrap_or_default();
        if let (Some(first), false) = (icmps.first(), to_ports.is_empty()) {
            d.error(
                first.pos,
                "`icmps` may only be present without `toPorts` (as in Cilium): define a separate rule for the ports",
            );
        }
        if let Some(fpos) = fqdn_pos {
            // Cilium: "combining ToFQDNs and ToEndpoints is not supported yet".
            let others = [
                (peers.is_some(), endpoints_field.as_str()),
                (cidrs.is_some(), "toCIDR/toCIDRSet"),
                (entities.is_some(), entities_field.as_str()),
                (services.is_some(), "toServices"),
            ];
            for (present, other) in others {
                if present {
                    d.error(
                        fpos,
                        format!("combining `toFQDNs` and `{other}` in one rule is not supported (Cilium refuses it too): write two rules"),
                    );
                }
            }
        }
        for tp in &to_ports {
            if let (Some(first), "ingress") = (tp.dns.as_ref().and_then(|v| v.first()), dir) {
                d.error(first.pos, "`dns` rules are not allowed on ingress (as in Cilium): DNS rules apply to a workload's own lookups");
            }
        }
        if deny {
            for tp in &to_ports {
                if tp.http.is_some() || tp.dns.is_some() || tp.kafka.is_some() {
                    d.error(
                        tp.pos,
                        format!("{dir} rules cannot have L7 `rules`; deny is L3/L4 only"),
                    );
                }
            }
        }
        let pos = f.pos();
        f.finish(&format!("{dir} rule"), d);
        out.push(PeerRule {
            peers,
            cidrs,
            entities,
            services,
            fqdns,
            to_ports,
            icmps,
            pos,
        });
    }
    out
}

/// `{matchName: NAME}` or `{matchPattern: PATTERN}` (a `toFQDNs` entry or a
/// `rules.dns` rule), checked as Cilium checks them.
fn fqdn_selector(node: &Node, what: &str, d: &mut Diagnostics) -> Option<Located<DnsSelector>> {
    let mut f = Fields::of(node, what, d)?;
    let pos = f.pos();
    let name = f.take("matchName");
    let pattern = f.take("matchPattern");
    f.finish(what, d);
    let check = |n: &Node, d: &mut Diagnostics, field: &str| -> Option<String> {
        let text = scalar(n, field, d)?;
        let r = if field == "matchName" {
            crate::dns_match::validate_name(text)
        } else {
            crate::dns_match::validate_pattern(text)
        };
        match r {
            Ok(()) => Some(text.to_string()),
            Err(e) => {
                d.error(n.pos, e.to_string());
                None
            }
        }
    };
    let value = match (name, pattern) {
        (Some(n), None) => DnsSelector::MatchName(check(n, d, "matchName")?),
        (None, Some(p)) => DnsSelector::MatchPattern(check(p, d, "matchPattern")?),
        (Some(_), Some(p)) => {
            d.error(
                p.pos,
                format!(
                    "a {what} takes either `matchName` or `matchPattern`, not both (as in Cilium)"
                ),
            );
            return None;
        }
        (None, None) => {
            d.error(pos, format!("{what} needs `matchName` or `matchPattern`"));
            return None;
        }
    };
    Some(Located { value, pos })
}

fn cidr_value(node: &Node, d: &mut Diagnostics) -> Option<Cidr> {
    let text = scalar(node, "CIDR", d)?;
    match text.parse::<Cidr>() {
        Ok(c) => Some(c),
        Err(e) => {
            d.error(node.pos, e);
            None
        }
    }
}

/// Selector keys no weir endpoint can carry are refused rather than left to
/// match nothing (which would silently weaken a deny rule): labels of other
/// sources (`reserved:host`: use the entities). `reserved:init` and
/// `reserved:health` are kept: they select Cilium's initializing and health
/// endpoints, which weir never has, so selecting nothing is exactly right.
fn check_selector_key(key: &str, pos: Pos, d: &mut Diagnostics) {
    let k = strip_label_source(key);
    if matches!(k, "reserved:init" | "reserved:health") {
        return;
    }
    if let Some((source, _)) = k.split_once(':') {
        d.error(
            pos,
            format!(
                "selector key `{key}`: `{source}:` labels are not supported in selectors by weir; use `fromEntities`/`toEntities` for reserved peers"
            ),
        );
    }
}

pub(crate) fn selector(node: &Node, what: &str, d: &mut Diagnostics) -> Option<Selector> {
    let mut f = Fields::of(node, what, d)?;
    let mut sel = Selector::default();
    if let Some(ml) = f.take("matchLabels") {
        if let Value::Map(entries) = &ml.value {
            for (k, _) in entries {
                if let Value::Scalar { text, .. } = &k.value {
                    check_selector_key(text, k.pos, d);
                }
            }
        }
        sel.match_labels = string_map(ml, "matchLabels", d);
    }
    if let Some(me) = f.take("matchExpressions") {
        for e in seq(me, "matchExpressions", d).unwrap_or(&[]) {
            let Some(mut ef) = Fields::of(e, "matchExpressions entry", d) else {
                continue;
            };
            let key = ef.take("key").and_then(|n| {
                let k = scalar(n, "key", d)?;
                check_selector_key(k, n.pos, d);
                Some(k)
            });
            let op_node = ef.take("operator");
            let op = op_node.and_then(|n| match scalar(n, "operator", d)? {
                "In" => Some(SelectorOp::In),
                "NotIn" => Some(SelectorOp::NotIn),
                "Exists" => Some(SelectorOp::Exists),
                "DoesNotExist" => Some(SelectorOp::DoesNotExist),
                other => {
                    d.error(
                        n.pos,
                        format!(
                            "unknown operator `{other}` (expected In, NotIn, Exists or DoesNotExist)"
                        ),
                    );
                    None
                }
            });
            let values_node = ef.take("values");
            let values: Vec<String> = values_node
                .map(|n| {
                    seq(n, "values", d)
                        .unwrap_or(&[])
                        .iter()
                        .filter_map(|v| scalar(v, "value", d).map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let epos = ef.pos();
            ef.finish("matchExpressions entry", d);
            if key.is_none() {
                d.error(epos, "matchExpressions entry needs `key`");
            }
            if op_node.is_none() {
                d.error(epos, "matchExpressions entry needs `operator`");
            }
            let (Some(key), Some(op)) = (key, op) else {
                continue;
            };
            match op {
                SelectorOp::In | SelectorOp::NotIn if values.is_empty() => d.error(
                    epos,
                    format!("operator {op:?} needs a non-empty `values` list"),
                ),
                SelectorOp::Exists | SelectorOp::DoesNotExist if values_node.is_some() => {
                    d.error(epos, format!("operator {op:?} takes no `values`"))
                }
                _ => {}
            }
            sel.match_expressions.push(SelectorExpr {
                key: strip_label_source(key).to_string(),
                op,
                values,
            });
        }
    }
    f.finish(what, d);
    Some(sel)
}

/// `icmps: [{fields: [{type: 8, family: IPv4}, ...]}, ...]`; `type` is a number
/// or one of Cilium's names for the common messages, `family` IPv4 (default) or
/// IPv6.
fn icmp_rules(node: &Node, d: &mut Diagnostics) -> Vec<IcmpType> {
    let mut out = Vec::new();
    for (entry, e) in seq(node, "icmps", d).unwrap_or(&[]).iter().enumerate() {
        let Some(mut ef) = Fields::of(e, "icmps entry", d) else {
            continue;
        };
        match ef.take("fields") {
            Some(list) => {
                for fl in seq(list, "fields", d).unwrap_or(&[]) {
                    let Some(mut ff) = Fields::of(fl, "icmps field", d) else {
                        continue;
                    };
                    let family = match ff.take("family").map(|n| (n.pos, scalar(n, "family", d))) {
                        None | Some((_, Some("IPv4"))) => Some(Protocol::Icmp4),
                        Some((_, Some("IPv6"))) => Some(Protocol::Icmp6),
                        Some((pos, Some(other))) => {
                            d.error(pos, format!("unknown ICMP family `{other}` (IPv4 or IPv6)"));
                            None
                        }
                        Some((_, None)) => None,
                    };
                    let icmp_type = match ff.take("type") {
                        Some(t) => icmp_type(t, family.unwrap_or(Protocol::Icmp4), d),
                        None => {
                            d.error(ff.pos(), "icmps field needs `type`");
                            None
                        }
                    };
                    let pos = ff.pos();
                    ff.finish("icmps field", d);
                    if let (Some(family), Some(icmp_type)) = (family, icmp_type) {
                        out.push(IcmpType {
                            family,
                            icmp_type,
                            entry,
                            pos,
                        });
                    }
                }
            }
            None => d.error(ef.pos(), "icmps entry needs `fields`"),
        }
        ef.finish("icmps entry", d);
    }
    out
}

/// An ICMP type by number (0-255) or by Cilium's name for it in that family.
fn icmp_type(node: &Node, family: Protocol, d: &mut Diagnostics) -> Option<u8> {
    let text = scalar(node, "ICMP type", d)?;
    if let Ok(n) = text.parse::<u8>() {
        return Some(n);
    }
    let v4: &[(&str, u8)] = &[
        ("EchoReply", 0),
        ("DestinationUnreachable", 3),
        ("Redirect", 5),
        ("Echo", 8),
        ("EchoRequest", 8),
        ("RouterAdvertisement", 9),
        ("RouterSelection", 10),
        ("TimeExceeded", 11),
        ("ParameterProblem", 12),
        ("Timestamp", 13),
        ("TimestampReply", 14),
    ];
    let v6: &[(&str, u8)] = &[
        ("DestinationUnreachable", 1),
        ("PacketTooBig", 2),
        ("TimeExceeded", 3),
        ("ParameterProblem", 4),
        ("EchoRequest", 128),
        ("EchoReply", 129),
        ("RouterSolicitation", 133),
        ("RouterAdvertisement", 134),
        ("NeighborSolicitation", 135),
        ("NeighborAdvertisement", 136),
        ("RedirectMessage", 137),
    ];
    let names = if family == Protocol::Icmp6 { v6 } else { v4 };
    match names.iter().find(|(n, _)| *n == text) {
        Some((_, t)) => Some(*t),
        None => {
            d.error(
                node.pos,
                format!("`{text}` is not an ICMP type of this family (a number 0-255 or a name such as EchoRequest)"),
            );
            None
        }
    }
}

fn port_rule(node: &Node, d: &mut Diagnostics) -> Option<PortRule> {
    let mut f = Fields::of(node, "toPorts entry", d)?;
    let pos = f.pos();
    let mut ports = Vec::new();
    match f.take("ports") {
        Some(list) => {
            for p in seq(list, "ports", d).unwrap_or(&[]) {
                ports.extend(port_protocol(p, d));
            }
        }
        None => d.error(pos, "toPorts entry needs `ports`"),
    }
    let mut http = None;
    let mut dns = None;
    let mut dns_pos = None;
    let mut kafka = None;
    let mut kafka_pos = None;
    if let Some(rules) = f.take("rules")
        && let Some(mut rf) = Fields::of(rules, "rules", d)
    {
        if let Some(h) = rf.take("http") {
            http = Some(
                seq(h, "http", d)
                    .unwrap_or(&[])
                    .iter()
                    .filter_map(|r| http_rule(r, d))
                    .collect(),
            );
        }
        if let Some(n) = rf.take("dns") {
            if http.is_some() {
                d.error(
                    n.pos,
                    "`dns` and `http` rules in one toPorts entry: multiple L7 protocol rule types specified in single rule (Cilium refuses it too)",
                );
            }
            dns = Some(
                seq(n, "dns", d)
                    .unwrap_or(&[])
                    .iter()
                    .filter_map(|r| fqdn_selector(r, "dns rule", d))
                    .collect::<Vec<_>>(),
            );
            dns_pos = Some(n.pos);
        }
        if let Some(n) = rf.take("kafka") {
            if http.is_some() || dns.is_some() {
                d.error(
                    n.pos,
                    "`kafka` and other L7 rules in one toPorts entry: multiple L7 protocol rule types specified in single rule (Cilium refuses it too)",
                );
            }
            kafka = Some(
                seq(n, "kafka", d)
                    .unwrap_or(&[])
                    .iter()
                    .filter_map(|r| kafka_rule(r, d))
                    .collect::<Vec<_>>(),
            );
            kafka_pos = Some(n.pos);
        }
        rf.finish("rules", d);
    }
    f.finish("toPorts entry", d);
    if let Some(dpos) = dns_pos {
        // Cilium: DNS rules need explicit ports, and L7 rules never apply to
        // port 0 (every port); the DNS proxy takes no port ranges.
        if ports.is_empty() {
            d.error(dpos, "`dns` rules need a port (53) in `ports`");
        }
        for p in &ports {
            if p.port == PortSpec::Number(0) {
                d.error(
                    p.pos,
                    "L7 `dns` rules cannot be used with port 0 (every port); name port 53",
                );
            }
            if p.end_port.is_some() {
                d.error(
                    p.pos,
                    "`dns` rules do not apply to port ranges (`endPort`), as in Cilium",
                );
            }
        }
    }
    if let Some(kpos) = kafka_pos {
        if ports.is_empty() {
            d.error(kpos, "`kafka` rules need a port (e.g. 9092) in `ports`");
        }
        for p in &ports {
            if p.port == PortSpec::Number(0) {
                d.error(
                    p.pos,
                    "L7 `kafka` rules cannot be used with port 0 (every port); name the broker's port",
                );
            }
            if p.protocol == Protocol::Udp {
                d.error(p.pos, "`kafka` rules need TCP, not UDP");
            }
            if p.end_port.is_some() {
                d.error(
                    p.pos,
                    "`kafka` rules do not apply to port ranges (`endPort`), as in Cilium",
                );
            }
        }
    }
    Some(PortRule {
        ports,
        http,
        dns,
        kafka,
        pos,
    })
}

/// One `rules.kafka` entry, checked as Cilium checks it (plus Kafka's own topic
/// name rule).
fn kafka_rule(node: &Node, d: &mut Diagnostics) -> Option<KafkaRule> {
    use crate::kafka_match::{parse_api_key, parse_api_version, role_keys, validate_topic};
    let mut f = Fields::of(node, "kafka rule", d)?;
    let pos = f.pos();
    let mut ok = true;
    let mut check = |n: &Node, what: &str, d: &mut Diagnostics| -> Option<String> {
        let text = scalar(n, what, d);
        if text.is_none() {
            ok = false;
        }
        text.map(str::to_string)
    };
    let role = f.take("role").map(|n| (n.pos, check(n, "role", d)));
    let api_key = f.take("apiKey").map(|n| (n.pos, check(n, "apiKey", d)));
    let api_version = f
        .take("apiVersion")
        .map(|n| (n.pos, check(n, "apiVersion", d)));
    let client_id = f.take("clientID").map(|n| (n.pos, check(n, "clientID", d)));
    let topic = f.take("topic").map(|n| (n.pos, check(n, "topic", d)));
    f.finish("kafka rule", d);
    let mut api_keys = None;
    if let (Some((rpos, _)), Some(_)) = (&role, &api_key) {
        d.error(
            *rpos,
            "a kafka rule takes `role` or `apiKey`, not both (Cilium refuses it too)",
        );
        ok = false;
    }
    if let Some((p, Some(r))) = &role {
        match role_keys(r) {
            Ok(keys) => api_keys = Some(keys.to_vec()),
            Err(e) => {
                d.error(*p, e.to_string());
                ok = false;
            }
        }
    }
    if let Some((p, Some(k))) = &api_key {
        match parse_api_key(k) {
            Ok(key) => api_keys = Some(vec![key]),
            Err(e) => {
                d.error(*p, e.to_string());
                ok = false;
            }
        }
    }
    let api_version = match api_version {
        Some((p, Some(v))) => match parse_api_version(&v) {
            Ok(v) => Some(v),
            Err(e) => {
                d.error(p, e.to_string());
                ok = false;
                None
            }
        },
        _ => None,
    };
    let topic = match topic {
        Some((p, Some(t))) => {
            if let Err(e) = validate_topic(&t) {
                d.error(p, e.to_string());
                ok = false;
            }
            Some(t)
        }
        _ => None,
    };
    let client_id = client_id.and_then(|(_, c)| c);
    if let Some(keys) = &mut api_keys {
        keys.sort_unstable();
        keys.dedup();
    }
    ok.then_some(KafkaRule {
        api_keys,
        api_version,
        client_id,
        topic,
        pos,
    })
}

fn port_number(node: &Node, what: &str, d: &mut Diagnostics) -> Option<u32> {
    let text = scalar(node, what, d)?;
    match text.parse::<u32>() {
        Ok(n) if n <= 65535 => Some(n),
        Ok(n) => {
            d.error(node.pos, format!("{what} {n} is out of range (0-65535)"));
            None
        }
        Err(_) => None,
    }
}

fn port_protocol(node: &Node, d: &mut Diagnostics) -> Option<PortProtocol> {
    let mut f = Fields::of(node, "ports entry", d)?;
    let pos = f.pos();
    let port = match f.take("port") {
        Some(n) => {
            let text = scalar(n, "port", d);
            match text {
                Some(t) if t.bytes().all(|b| b.is_ascii_digit()) && !t.is_empty() => {
                    port_number(n, "port", d).map(|p| PortSpec::Number(p as u16))
                }
                Some(t) if valid_port_name(t) => Some(PortSpec::Named(t.to_string())),
                Some(t) => {
                    d.error(
                        n.pos,
                        format!("port `{t}` is neither a number (0-65535) nor a port name"),
                    );
                    None
                }
                None => None,
            }
        }
        None => Some(PortSpec::Number(0)),
    };
    let end_port = match f.take("endPort") {
        Some(n) => match port_number(n, "endPort", d) {
            Some(e) => {
                match &port {
                    Some(PortSpec::Number(p)) if u32::from(*p) > e => {
                        d.error(n.pos, format!("endPort {e} is lower than port {p}"))
                    }
                    Some(PortSpec::Named(_)) => {
                        d.error(n.pos, "endPort cannot be used with a named port")
                    }
                    _ => {}
                }
                Some(e as u16)
            }
            None => {
                if let Value::Scalar { text, .. } = &n.value
                    && text.parse::<u32>().is_err()
                {
                    d.error(n.pos, format!("endPort `{text}` is not a number"));
                }
                None
            }
        },
        None => None,
    };
    let protocol = match f.take("protocol") {
        Some(n) => match scalar(n, "protocol", d) {
            Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("ANY") => Protocol::Any,
            Some(other @ "SCTP") => {
                d.error(
                    n.pos,
                    format!("protocol {other} is not supported by weir yet"),
                );
                Protocol::Any
            }
            Some(other) => {
                d.error(
                    n.pos,
                    format!("unknown protocol `{other}` (expected TCP, UDP or ANY)"),
                );
                Protocol::Any
            }
            None => Protocol::Any,
        },
        None => Protocol::Any,
    };
    f.finish("ports entry", d);
    Some(PortProtocol {
        port: port?,
        end_port,
        protocol,
        pos,
    })
}

/// IANA service names: 1-15 chars, lower-case letters, digits and inner hyphens,
/// at least one letter.
fn valid_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn regex_field(node: &Node, what: &str, d: &mut Diagnostics) -> Option<Located<String>> {
    let text = scalar(node, what, d)?;
    if let Err(e) = regex::Regex::new(&crate::http_match::anchored(text)) {
        let msg = e.to_string();
        let short = msg.lines().last().unwrap_or(&msg).trim();
        d.error(node.pos, format!("invalid {what} regex `{text}`: {short}"));
        return None;
    }
    Some(Located {
        value: text.to_string(),
        pos: node.pos,
    })
}

fn http_rule(node: &Node, d: &mut Diagnostics) -> Option<HttpRule> {
    let mut f = Fields::of(node, "http rule", d)?;
    let pos = f.pos();
    let method = f.take("method").and_then(|n| regex_field(n, "method", d));
    let path = f.take("path").and_then(|n| regex_field(n, "path", d));
    let host = f.take("host").and_then(|n| regex_field(n, "host", d));
    let mut headers = Vec::new();
    if let Some(h) = f.take("headers") {
        for item in seq(h, "headers", d).unwrap_or(&[]) {
            let Some(text) = scalar(item, "header", d) else {
                continue;
            };
            match header_entry(text) {
                Ok(rule) => headers.push(Located {
                    value: rule,
                    pos: item.pos,
                }),
                Err(e) => d.error(item.pos, e),
            }
        }
    }
    if let Some(h) = f.take("headerMatches") {
        for item in seq(h, "headerMatches", d).unwrap_or(&[]) {
            if let Some(rule) = header_match(item, d) {
                headers.push(Located {
                    value: rule,
                    pos: item.pos,
                });
            }
        }
    }
    f.finish("http rule", d);
    Some(HttpRule {
        method,
        path,
        host,
        headers,
        pos,
    })
}

/// A `headers` entry as Cilium reads it: split at the first space; the name loses
/// trailing colons and the rest is the exact value (`X-A: v` and `X-A v` both
/// require `v`); without a space the header need only be present.
pub(crate) fn header_entry(text: &str) -> Result<HeaderRule, String> {
    let (raw_name, value) = match text.split_once(' ') {
        Some((n, v)) => (n.trim_end_matches(':'), Some(v)),
        None => (text, None),
    };
    if raw_name.contains(':') && !raw_name.starts_with(':') {
        return Err(format!(
            "header entry `{text}`: `{raw_name}` is not a header name (Cilium splits an entry at the first space: write `Name: value`, `Name value` or `Name`)"
        ));
    }
    let name = header_name(raw_name)?;
    let value = value.map(|v| header_value(&name, v)).transpose()?;
    Ok(HeaderRule {
        name,
        value,
        mismatch: None,
    })
}

fn header_name(name: &str) -> Result<String, String> {
    if name.starts_with(':') {
        return Err(format!(
            "`{name}`: pseudo-headers cannot be matched as headers (use `method`, `path` or `host`)"
        ));
    }
    if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(format!("`{name}` is not a valid header name"));
    }
    Ok(name.to_ascii_lowercase())
}

fn header_value(name: &str, value: &str) -> Result<String, String> {
    if value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']) {
        // Field values arrive without surrounding whitespace: such a rule could
        // never match (Cilium would silently deny everything it guards).
        return Err(format!(
            "value {value:?} for header `{name}` has surrounding whitespace and could never match"
        ));
    }
    if http::HeaderValue::from_str(value).is_err() {
        return Err(format!(
            "value {value:?} for header `{name}` is not a valid header value"
        ));
    }
    Ok(value.to_string())
}

/// Headers whose change would alter the message's framing or routing after the
/// policy check; a `mismatch` action may not touch them.
const UNMODIFIABLE: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// One `headerMatches` entry: `name`, `value` (exact; absent: presence) and an
/// optional `mismatch` action. `secret` needs a secret store weir does not have.
fn header_match(node: &Node, d: &mut Diagnostics) -> Option<HeaderRule> {
    let mut f = Fields::of(node, "headerMatches entry", d)?;
    let epos = f.pos();
    let name = match f.take("name") {
        Some(n) => scalar(n, "name", d).and_then(|t| match header_name(t) {
            Ok(v) => Some(v),
            Err(e) => {
                d.error(n.pos, e);
                None
            }
        }),
        None => {
            d.error(epos, "headerMatches entry needs `name`");
            None
        }
    };
    let value = match f.take("value") {
        Some(n) => scalar(n, "value", d).and_then(|t| {
            match header_value(name.as_deref().unwrap_or("?"), t) {
                Ok(v) => Some(v),
                Err(e) => {
                    d.error(n.pos, e);
                    None
                }
            }
        }),
        None => None,
    };
    if let Some(s) = f.take("secret") {
        d.error(
            s.pos,
            "headerMatches `secret` is not supported: weir has no Kubernetes secret store (put the value in `value`)",
        );
    }
    let mismatch = match f.take("mismatch") {
        Some(n) => {
            match scalar(n, "mismatch", d) {
                None | Some("") => None,
                Some("LOG") => Some(MismatchAction::Log),
                Some("ADD") => Some(MismatchAction::Add),
                Some("DELETE") => Some(MismatchAction::Delete),
                Some("REPLACE") => Some(MismatchAction::Replace),
                Some(other) => {
                    d.error(
                    n.pos,
                    format!("unknown mismatch action `{other}` (expected LOG, ADD, DELETE or REPLACE)"),
                );
                    None
                }
            }
        }
        None => None,
    };
    f.finish("headerMatches entry", d);
    let name = name?;
    if let Some(action) = mismatch
        && action != MismatchAction::Log
        && UNMODIFIABLE.contains(&name.as_str())
    {
        d.error(
            epos,
            format!(
                "mismatch action {action} may not change `{name}` (it frames or routes the request)"
            ),
        );
        return None;
    }
    Some(HeaderRule {
        name,
        value,
        mismatch,
    })
}
