//! Numeric security identities: one per distinct label set, stable across restarts.
//!
//! The identity is derived from a hash of the sorted label set, so two weir
//! processes (or one before and after a restart) agree without shared state. A
//! collision between two label sets is resolved by probing upwards in the order
//! of the label sets' canonical text, which is also deterministic; the allocator
//! can be seeded with earlier assignments so an existing identity never moves.

use std::collections::{BTreeMap, HashMap};

/// Reserved identities, as in Cilium.
pub const IDENTITY_HOST: u32 = 1;
pub const IDENTITY_WORLD: u32 = 2;
/// Cilium's health endpoints; weir runs none, so no peer ever has it.
pub const IDENTITY_HEALTH: u32 = 4;
/// Endpoints whose labels are not known yet; a weir endpoint has its labels
/// from the moment it exists, so no peer ever has it.
pub const IDENTITY_INIT: u32 = 5;
/// Addresses in `--remote-node-cidr`: the cluster's other nodes.
pub const IDENTITY_REMOTE_NODE: u32 = 6;
/// The `--kube-apiserver` addresses.
pub const IDENTITY_KUBE_APISERVER: u32 = 7;

/// Label-derived identities live in [FIRST, FIRST + SPAN).
const FIRST: u32 = 256;
const SPAN: u32 = 1 << 24;

pub type Labels = BTreeMap<String, String>;

/// Canonical text of a label set: `k=v` pairs, sorted, comma separated, with
/// `\`, `,` and `=` inside keys and values escaped by a backslash. The text is
/// therefore unambiguous: two different label sets never share it (and so never
/// share an identity), whatever characters their labels contain. Label sets
/// without those characters keep the text (and identity) they always had.
pub fn canonical(labels: &Labels) -> String {
    let mut out = String::new();
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        escape_into(&mut out, k);
        out.push('=');
        escape_into(&mut out, v);
    }
    out
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        if matches!(c, '\\' | ',' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
}

fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[derive(Debug, Default, Clone)]
pub struct IdentityAllocator {
    by_labels: HashMap<String, u32>,
    taken: HashMap<u32, String>,
}

impl IdentityAllocator {
    /// Starts from earlier assignments (`canonical label text → identity`).
    pub fn with_assignments(earlier: impl IntoIterator<Item = (String, u32)>) -> Self {
        let mut a = Self::default();
        for (labels, id) in earlier {
            if (FIRST..FIRST + SPAN).contains(&id) && !a.taken.contains_key(&id) {
                a.taken.insert(id, labels.clone());
                a.by_labels.insert(labels, id);
            }
        }
        a
    }

    pub fn identity(&mut self, labels: &Labels) -> u32 {
        let key = canonical(labels);
        if let Some(id) = self.by_labels.get(&key) {
            return *id;
        }
        let mut id = FIRST + (fnv1a(&key) % u64::from(SPAN)) as u32;
        while self.taken.contains_key(&id) {
            id = FIRST + ((id - FIRST + 1) % SPAN);
        }
        self.taken.insert(id, key.clone());
        self.by_labels.insert(key, id);
        id
    }

    pub fn assignments(&self) -> impl Iterator<Item = (&str, u32)> {
        self.by_labels.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn same_labels_same_identity_across_allocators() {
        let l = labels(&[("org", "empire"), ("class", "deathstar")]);
        let a = IdentityAllocator::default().identity(&l);
        let mut other = IdentityAllocator::default();
        other.identity(&labels(&[("x", "y")]));
        assert_eq!(other.identity(&l), a);
        assert!(a >= FIRST);
    }

    #[test]
    fn separators_inside_labels_cannot_alias() {
        // Without escaping these two would both read `a=b,c=d`.
        let one = labels(&[("a", "b,c=d")]);
        let two = labels(&[("a", "b"), ("c", "d")]);
        assert_ne!(canonical(&one), canonical(&two));
        let mut ids = IdentityAllocator::default();
        assert_ne!(ids.identity(&one), ids.identity(&two));
        assert_eq!(
            canonical(&two),
            "a=b,c=d",
            "plain label sets keep their text"
        );
    }

    proptest::proptest! {
        /// Two different label sets never share canonical text or identity, even
        /// built from the separators themselves.
        #[test]
        fn different_label_sets_never_share_an_identity(
            a in proptest::collection::btree_map("[a=,\\\\:]{0,4}", "[b=,\\\\]{0,4}", 0..4),
            b in proptest::collection::btree_map("[a=,\\\\:]{0,4}", "[b=,\\\\]{0,4}", 0..4),
        ) {
            let mut ids = IdentityAllocator::default();
            let (ia, ib) = (ids.identity(&a), ids.identity(&b));
            if a == b {
                proptest::prop_assert_eq!(ia, ib);
            } else {
                proptest::prop_assert_ne!(canonical(&a), canonical(&b));
                proptest::prop_assert_ne!(ia, ib);
            }
        }
    }

    #[test]
    fn earlier_assignments_win() {
        let l = labels(&[("a", "b")]);
        let mut a = IdentityAllocator::with_assignments([(canonical(&l), 4242)]);
        assert_eq!(a.identity(&l), 4242);
    }
}
