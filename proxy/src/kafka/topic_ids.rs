//! The node-wide topic id → name map. Clients learn ids from Metadata on one connection
//! and use them on another (Produce v13, Fetch v13+), so every Metadata response the
//! proxy relays feeds one map for all connections. Bounded: when full it starts over
//! (an id it forgot is unknown again, which denies rather than allows).

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

/// Far more topics than a cluster has; a bound against a broker that invents ids.
const MAX_IDS: usize = 100_000;

static IDS: LazyLock<Mutex<HashMap<[u8; 16], String>>> = LazyLock::new(Default::default);

/// Remember what a Metadata response said.
pub fn learn(pairs: Vec<([u8; 16], String)>) {
    if pairs.is_empty() {
        return;
    }
    let mut ids = IDS.lock().unwrap_or_else(|p| p.into_inner());
    if ids.len() + pairs.len() > MAX_IDS {
        ids.clear();
    }
    ids.extend(pairs);
}

/// The name of topic `id`, if some Metadata response named it.
pub fn resolve(id: &[u8; 16]) -> Option<String> {
    IDS.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(id)
        .cloned()
}
