//! The topic id → name map, per broker address (one per proxy, in [`crate::Shared`]).
//! Clients learn ids from Metadata on one connection and use them on another (Produce
//! v13, Fetch v13+), so the map outlives connections. It is keyed by who answered: a
//! Metadata response teaches ids only for the broker address (IP and port) that sent
//! it. Not by identity: a CIDR identity covers every address in the prefix, so any
//! Kafka-speaking host in the brokers' CIDR could teach that an id of a denied topic
//! names an allowed one (found by review). An id learned from one broker of a cluster
//! and used on another is asked of that broker (`ask`) before the request is decided.
//! Bounded per broker and in all: a broker that invents ids forgets its own first
//! (an id it forgot is unknown again, which denies rather than allows); names that
//! are not topic names are not learned.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

/// Far more topics than a cluster has; a bound against a broker that invents ids.
/// Names are at most 249 bytes, so the map stays under ~30 MB.
const MAX_IDS: usize = 100_000;
/// One broker's share: a broker that invents ids cannot take the whole map.
const MAX_IDS_PER_BROKER: usize = 50_000;

/// Whose answers an id was learned from: the broker's address.
pub type Scope = SocketAddr;

#[derive(Default)]
struct Ids {
    by_broker: HashMap<Scope, HashMap<[u8; 16], String>>,
    total: usize,
}

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
    /// Remember what a Metadata response from the broker at `scope` said.
    pub fn learn(&self, scope: Scope, pairs: Vec<([u8; 16], String)>) {
        // One answer teaches at most one broker's share (the rest of it is
        // unknown, so denied when used).
        let pairs: Vec<_> = pairs
            .into_iter()
            .filter(|(_, n)| is_topic_name(n))
            .take(MAX_IDS_PER_BROKER)
            .collect();
        if pairs.is_empty() {
            return;
        }
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let Ids { by_broker, total } = &mut *ids;
        // Only ids this broker has not taught yet count against the bounds: a
        // full Metadata answer repeats every id it knows (counting those wiped
        // a broker of more than half its share on every full answer, and cut
        // new ids for room the known ones did not need; found by review).
        let held = |id: &[u8; 16]| by_broker.get(&scope).is_some_and(|m| m.contains_key(id));
        let new = pairs.iter().filter(|(id, _)| !held(id)).count();
        let mine = by_broker.get(&scope).map_or(0, HashMap::len);
        // Over its share, or over the whole with this broker the largest: this
        // broker starts over, and nobody else loses anything.
        let largest = by_broker.values().map(HashMap::len).max().unwrap_or(0);
        if mine + new > MAX_IDS_PER_BROKER || (*total + new > MAX_IDS && mine >= largest) {
            *total -= mine;
            by_broker.remove(&scope);
        } else if *total + new > MAX_IDS {
            // Another broker holds more: it starts over.
            if let Some((&big, _)) = by_broker.iter().max_by_key(|(_, m)| m.len()) {
                *total -= by_broker.remove(&big).map_or(0, |m| m.len());
            }
        }
        // Whatever the above freed, the whole stays bounded: new ids that do not
        // fit are not learned (others keep theirs; it happened with several
        // brokers near their share and one answer larger than what its broker
        // forgot). Known ids take no room: they are renamed in place.
        let mut room = MAX_IDS.saturating_sub(*total);
        let map = by_broker.entry(scope).or_default();
        let before = map.len();
        for (id, name) in pairs {
            match map.get_mut(&id) {
                Some(known) => *known = name,
                None if room > 0 => {
                    room -= 1;
                    map.insert(id, name);
                }
                None => {}
            }
        }
        *total += map.len() - before;
    }

    /// The name of topic `id` for the broker at `scope`, if a Metadata response from
    /// it named it.
    pub fn resolve(&self, scope: Scope, id: &[u8; 16]) -> Option<String> {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_broker
            .get(&scope)
            .and_then(|m| m.get(id))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_means_a_name_only_for_the_broker_that_taught_it() {
        let broker: Scope = "10.0.0.1:9092".parse().unwrap();
        // The same CIDR, even the same host on another port: another scope.
        let neighbour: Scope = "10.0.0.3:9092".parse().unwrap();
        let other_port: Scope = "10.0.0.1:9093".parse().unwrap();
        let ids = TopicIds::default();
        let id = [7u8; 16];
        ids.learn(broker, vec![(id, "orders".into())]);
        assert_eq!(ids.resolve(broker, &id).as_deref(), Some("orders"));
        for s in [neighbour, other_port] {
            assert_eq!(ids.resolve(s, &id), None);
            ids.learn(s, vec![(id, "public".into())]);
            assert_eq!(ids.resolve(s, &id).as_deref(), Some("public"));
        }
        assert_eq!(ids.resolve(broker, &id).as_deref(), Some("orders"));
        // Not a topic name: not learned.
        let other = [8u8; 16];
        ids.learn(
            broker,
            vec![(other, "x".repeat(250)), ([9; 16], "a/b".into())],
        );
        assert_eq!(ids.resolve(broker, &other), None);
        assert_eq!(ids.resolve(broker, &[9; 16]), None);
    }

    fn invented(n: usize, salt: u8) -> Vec<([u8; 16], String)> {
        (0..n)
            .map(|i| {
                let mut id = [salt; 16];
                id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                (id, format!("t{i}"))
            })
            .collect()
    }

    #[test]
    fn a_broker_that_invents_ids_forgets_its_own_not_the_others() {
        let good: Scope = "10.0.0.1:9092".parse().unwrap();
        let bad: Scope = "10.0.0.3:9092".parse().unwrap();
        let ids = TopicIds::default();
        ids.learn(good, vec![([1; 16], "orders".into())]);
        for _ in 0..5 {
            ids.learn(bad, invented(MAX_IDS_PER_BROKER / 2 + 1, 2));
            ids.learn(bad, invented(MAX_IDS_PER_BROKER / 2 + 1, 3));
        }
        assert_eq!(ids.resolve(good, &[1; 16]).as_deref(), Some("orders"));
        // Many brokers filling the whole map: the largest starts over.
        let ids = TopicIds::default();
        ids.learn(good, vec![([1; 16], "orders".into())]);
        for (i, salt) in (10u8..14).enumerate() {
            let s: Scope = format!("10.0.1.{i}:9092").parse().unwrap();
            ids.learn(s, invented(MAX_IDS_PER_BROKER - 1, salt));
        }
        assert!(ids.ids.lock().unwrap().total <= MAX_IDS);
        assert_eq!(ids.resolve(good, &[1; 16]).as_deref(), Some("orders"));
    }

    /// Ids a broker taught already take no room again: a full Metadata answer
    /// repeats them all.
    #[test]
    fn known_ids_count_against_no_bound() {
        // A broker of 40 000 topics (over half its share) answers in full twice:
        // it keeps them all, and a partial answer after (20 000 of them) takes nothing away.
        let big: Scope = "10.9.0.9:9092".parse().unwrap();
        let ids = TopicIds::default();
        ids.learn(big, invented(40_000, 5));
        ids.learn(big, invented(40_000, 5));
        ids.learn(big, invented(20_000, 5));
        assert_eq!(ids.ids.lock().unwrap().by_broker[&big].len(), 40_000);
        // The whole is full; a broker's answer repeats its 10 000 ids and brings
        // 30 000 new: one other broker starts over, and all 30 000 fit.
        let x: Scope = "10.9.0.1:9092".parse().unwrap();
        let ids = TopicIds::default();
        for (k, s) in ["10.9.0.2:9092", "10.9.0.3:9092", "10.9.0.4:9092"]
            .iter()
            .enumerate()
        {
            ids.learn(s.parse().unwrap(), invented(30_000, 20 + k as u8));
        }
        ids.learn(x, invented(10_000, 1));
        assert_eq!(ids.ids.lock().unwrap().total, MAX_IDS);
        ids.learn(x, invented(40_000, 1));
        let (largest, total, counted) = sizes(&ids);
        assert_eq!(ids.ids.lock().unwrap().by_broker[&x].len(), 40_000);
        assert!(largest <= MAX_IDS_PER_BROKER && total <= MAX_IDS && total == counted);
    }

    fn sizes(ids: &TopicIds) -> (usize, usize, usize) {
        let ids = ids.ids.lock().unwrap();
        let largest = ids.by_broker.values().map(HashMap::len).max().unwrap_or(0);
        let counted: usize = ids.by_broker.values().map(HashMap::len).sum();
        (largest, ids.total, counted)
    }

    /// The bounds hold for any one answer, however large: one Metadata
    /// response (up to `kafka_max_frame`) could carry millions of ids.
    #[test]
    fn no_answer_takes_the_map_past_its_bounds() {
        let bad: Scope = "10.0.0.3:9092".parse().unwrap();
        let ids = TopicIds::default();
        ids.learn(bad, invented(MAX_IDS * 2, 2));
        let (largest, total, counted) = sizes(&ids);
        assert!(largest <= MAX_IDS_PER_BROKER, "one broker holds {largest}");
        assert!(total <= MAX_IDS && total == counted, "{total} / {counted}");
        // Three brokers near the whole; the largest learns an answer bigger
        // than what it forgets: the others keep theirs, the total holds.
        let ids = TopicIds::default();
        let (a, b, c): (Scope, Scope, Scope) = (
            "10.0.1.1:9092".parse().unwrap(),
            "10.0.1.2:9092".parse().unwrap(),
            "10.0.1.3:9092".parse().unwrap(),
        );
        ids.learn(a, invented(33_000, 10));
        ids.learn(b, invented(33_000, 11));
        ids.learn(c, invented(34_000, 12));
        ids.learn(c, invented(MAX_IDS_PER_BROKER, 13));
        let (largest, total, counted) = sizes(&ids);
        assert!(largest <= MAX_IDS_PER_BROKER, "one broker holds {largest}");
        assert!(total <= MAX_IDS && total == counted, "{total} / {counted}");
        assert_eq!(ids.resolve(a, &invented(1, 10)[0].0).as_deref(), Some("t0"));
        assert_eq!(ids.resolve(b, &invented(1, 11)[0].0).as_deref(), Some("t0"));
    }
}
