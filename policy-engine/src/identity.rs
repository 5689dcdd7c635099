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

/// Label-derived identities live in [FIRST, FIRST + SPAN).
const FIRST: u32 = 256;
const SPAN: u32 = 1 << 24;

pub type Labels = BTreeMap<String, String>;

/// Canonical text of a label set: `k=v` pairs, sorted, comma separated.
pub fn canonical(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
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
    fn earlier_assignments_win() {
        let l = labels(&[("a", "b")]);
        let mut a = IdentityAllocator::with_assignments([(canonical(&l), 4242)]);
        assert_eq!(a.identity(&l), 4242);
    }
}
