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

/// Cilium's prefix for the labels of a pod's namespace
/// (`io.cilium.k8s.namespace.labels.team: a`). weir does not read namespaces, so
/// an endpoint carries them as given (like its service account,
/// `io.cilium.k8s.policy.serviceaccount`); a selector naming one is not confined
/// to its policy's namespace (as in Cilium).
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// The namespace an endpoint's labels and its `namespace` field give together:
/// the namespace label (`io.kubernetes.pod.namespace`, with any source prefix
/// already dropped) is taken out of `labels` and must agree with `namespace` when
/// both are given; neither gives `default`.
pub fn take_namespace(
    labels: &mut std::collections::BTreeMap<String, String>,
    namespace: Option<&str>,
) -> Result<String, String> {
    let from_label = labels.remove(NAMESPACE_LABEL);
    let ns = match (namespace, from_label.as_deref()) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "namespace `{a}` and label `{NAMESPACE_LABEL}: {b}` disagree"
            ));
        }
        (Some(a), _) => a.to_string(),
        (None, Some(b)) => b.to_string(),
        (None, None) => DEFAULT_NAMESPACE.to_string(),
    };
    check_namespace(&ns)?;
    Ok(ns)
}

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
/// which Kubernetes label keys never contain). The namespace label is checked
/// by [`take_namespace`].
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
        ] {
            assert!(check_user_label(k, v).is_err(), "{k}={v}");
        }
        assert!(check_user_label("io.cilium.k8s.policy.serviceaccount", "leia").is_ok());
    }

    #[test]
    fn the_namespace_comes_from_the_field_or_the_label() {
        let mut l: std::collections::BTreeMap<String, String> =
            [(NAMESPACE_LABEL.to_string(), "prod".to_string())].into();
        assert_eq!(take_namespace(&mut l.clone(), None).unwrap(), "prod");
        assert_eq!(
            take_namespace(&mut l.clone(), Some("prod")).unwrap(),
            "prod"
        );
        assert!(take_namespace(&mut l.clone(), Some("dev")).is_err());
        assert_eq!(take_namespace(&mut l, None).unwrap(), "prod");
        assert!(l.is_empty(), "the label is taken out");
        assert_eq!(take_namespace(&mut l, None).unwrap(), "default");
        assert!(take_namespace(&mut l, Some("Prod")).is_err());
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
