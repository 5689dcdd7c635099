//! The topic id → name map, per broker scope (one per proxy, in [`crate::Shared`]).
//! Clients learn ids from Metadata on one connection and use them on another (Produce
//! v13, Fetch v13+), often to another broker of the same cluster, so the map outlives
//! connections. It is scoped by who
//! answered: a Metadata response teaches ids only for brokers of the same scope — the
//! destination's security identity (brokers of one cluster share their labels, or
//! their CIDR), or the destination address when it is only `world` — so a broker
//! somewhere else cannot make an id mean another topic's name here.
//! Bounded: when full it starts over (an id it forgot is unknown again, which denies
//! rather than allows); names that are not topic names are not learned.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Far more topics than a cluster has; a bound against a broker that invents ids.
/// Names are at most 249 bytes, so the map stays under ~30 MB.
const MAX_IDS: usize = 100_000;

/// Whose answers an id was learned from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// A destination with an identity of its own (an endpoint's, a CIDR's).
    Identity(u32),
    /// A destination that is only `world`: its address.
    Address(IpAddr),
}

impl Scope {
    /// The scope of a destination with `identity` at `ip`.
    pub fn of(identity: u32, ip: IpAddr) -> Scope {
        if identity == weir_policy::identity::IDENTITY_WORLD {
            Scope::Address(ip)
        } else {
            Scope::Identity(identity)
        }
    }
}

type Ids = HashMap<(Scope, [u8; 16]), String>;

/// The map (see the module's documentation).
#[derive(Default)]
pub struct TopicIds {
    ids: Mutex<Ids>,
}

/// What a topic name may be (Kafka's rule): anything else is not learned.
fn is_topic_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 249
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl TopicIds {
    /// Remember what a Metadata response from a broker in `scope` said.
    pub fn learn(&self, scope: Scope, pairs: Vec<([u8; 16], String)>) {
        let pairs: Vec<_> = pairs
            .into_iter()
            .filter(|(_, n)| is_topic_name(n))
            .collect();
        if pairs.is_empty() {
            return;
        }
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if ids.len() + pairs.len() > MAX_IDS {
            ids.clear();
        }
        ids.extend(pairs.into_iter().map(|(id, n)| ((scope, id), n)));
    }

    /// The name of topic `id` for brokers in `scope`, if a Metadata response from one
    /// of them named it.
    pub fn resolve(&self, scope: Scope, id: &[u8; 16]) -> Option<String> {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(scope, *id))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_means_a_name_only_for_brokers_of_the_scope_that_taught_it() {
        let cluster = Scope::Identity(4242);
        let elsewhere = Scope::Address("192.0.2.9".parse().unwrap());
        let ids = TopicIds::default();
        let (learn, resolve) = (
            |s, p| ids.learn(s, p),
            |s, id: &[u8; 16]| ids.resolve(s, id),
        );
        let id = [7u8; 16];
        learn(cluster, vec![(id, "orders".into())]);
        assert_eq!(resolve(cluster, &id).as_deref(), Some("orders"));
        // Another "broker" teaches the same id as another name: only for itself.
        learn(elsewhere, vec![(id, "public".into())]);
        assert_eq!(resolve(cluster, &id).as_deref(), Some("orders"));
        assert_eq!(resolve(elsewhere, &id).as_deref(), Some("public"));
        // Not a topic name: not learned.
        let other = [8u8; 16];
        learn(
            cluster,
            vec![(other, "x".repeat(250)), ([9; 16], "a/b".into())],
        );
        assert_eq!(resolve(cluster, &other), None);
        assert_eq!(resolve(cluster, &[9; 16]), None);
        // world destinations are scoped by address.
        assert_eq!(
            Scope::of(
                weir_policy::identity::IDENTITY_WORLD,
                "192.0.2.9".parse().unwrap()
            ),
            elsewhere
        );
        assert_eq!(Scope::of(4242, "10.0.0.1".parse().unwrap()), cluster);
    }
}
