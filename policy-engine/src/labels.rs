//! What a user label may be, and the label weir adds itself (the namespace).
//!
//! Identities are derived from the canonical text of a label set
//! ([`crate::identity::canonical`]); the labels weir derives itself (the pod
//! namespace, `reserved:` and `cidr:` labels of reserved and CIDR identities) must
//! never be forgeable from an endpoints file or the API, or two different
//! workloads could share an identity. Both refuse the same labels through
//! [`check_user_label`].

/// The label every endpoint carries with its namespace (Cilium's
/// `k8s:io.kubernetes.pod.namespace`; weir drops the `k8s:` source prefix).
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// The namespace of an endpoint that names none (as in Kubernetes).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Cilium's prefix for namespace labels (`io.cilium.k8s.namespace.labels.*`) and
/// its other policy labels (`io.cilium.k8s.policy.*`): weir never derives them, so
/// nobody may set them.
pub const CILIUM_RESERVED_KEY_PREFIX: &str = "io.cilium.k8s.";

/// A Kubernetes namespace name: an RFC 1123 label (1-63 characters of a-z, 0-9 and
/// `-`, starting and ending with a letter or digit).
pub fn check_namespace(ns: &str) -> Result<(), String> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "namespace `{ns}` is not a valid namespace name (1-63 characters of a-z, 0-9 and `-`, starting and ending with a letter or digit)"
        ))
    }
}

/// Checks one user label, its key already without a `k8s:`/`any:`/`container:`
/// source prefix. Refused: an empty key; `=` or `,` in the key and `,` in the
/// value (the separators of the canonical text and of `--labels k=v,k2=v2`); a
/// key with any other source prefix (`reserved:`, `cidr:`, ... — a `:` at all,
/// which Kubernetes label keys never contain); the namespace label (set
/// `namespace:` instead); Cilium's own `io.cilium.k8s.` keys.
pub fn check_user_label(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err(format!("label `{key}={value}`: the key is empty"));
    }
    if key.contains(['=', ',']) || value.contains(',') {
        return Err(format!(
            "label `{key}={value}`: keys must be non-empty, without `=` or `,`, and values without `,`"
        ));
    }
    if key.contains(':') {
        return Err(format!(
            "label `{key}`: a source prefix such as `reserved:` or `cidr:` names labels weir derives itself; user labels may only carry `k8s:`, `any:` or `container:`"
        ));
    }
    if key == NAMESPACE_LABEL {
        return Err(format!(
            "label `{key}` is derived from the endpoint's namespace: set `namespace` instead"
        ));
    }
    if key.starts_with(CILIUM_RESERVED_KEY_PREFIX) {
        return Err(format!(
            "label `{key}`: keys starting with `{CILIUM_RESERVED_KEY_PREFIX}` are Cilium's own (namespace and policy labels) and cannot be set on an endpoint"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_labels_cannot_forge_derived_ones() {
        assert!(check_user_label("app", "web").is_ok());
        assert!(check_user_label("app.kubernetes.io/name", "a=b").is_ok());
        for (k, v) in [
            ("", "x"),
            ("a=b", "c"),
            ("a,b", "c"),
            ("a", "b,c"),
            ("reserved:host", ""),
            ("cidr:10.0.0.0/8", ""),
            (NAMESPACE_LABEL, "prod"),
            ("io.cilium.k8s.namespace.labels.team", "x"),
        ] {
            assert!(check_user_label(k, v).is_err(), "{k}={v}");
        }
    }

    #[test]
    fn namespaces_are_dns_labels() {
        assert!(check_namespace("prod").is_ok());
        assert!(check_namespace("kube-system").is_ok());
        for bad in ["", "Prod", "-a", "a-", "a.b", &"x".repeat(64)] {
            assert!(check_namespace(bad).is_err(), "{bad}");
        }
    }
}
