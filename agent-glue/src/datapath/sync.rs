//! Bringing the kernel maps in line with a compiled policy.
//!
//! Two ideas, kept apart: [`Desired`] is what the maps should hold for a policy
//! (pure, from the compiled policy and the interface indexes); [`write`] changes
//! the maps to it in an order where no packet is judged by half of a change, and
//! undoes everything it wrote when any step fails, so the previous generation
//! stays in force.
//!
//! Order: new and changed policy entries, then ipcache entries, then endpoints
//! (an endpoint appears only once its entries are there; its id is stable, so it
//! never meets another endpoint's entries), then stale endpoints, ipcache and
//! policy entries go, in that order.

use std::collections::HashMap;
use std::net::IpAddr;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::{Ebpf, Pod};
use weir_policy::{CompiledPolicy, Direction};

use super::links::Link;
use super::maps::*;
use super::policy_map::PolicyEntry;
use super::{DatapathError, lpm_key, map_err, policy_kv};

/// An ipcache entry's key: (prefix length incl. the 32 family bits, address words, family).
pub type IpcacheKeyParts = (u32, [u32; 4], u32);
/// A policy entry's LPM key: (prefix length, key data).
pub type PolicyKeyParts = (u32, [u8; 16]);

/// What the maps hold (or should hold).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    pub endpoints: HashMap<EndpointKey, EndpointInfo>,
    pub ipcache: HashMap<IpcacheKeyParts, u32>,
    pub policy: HashMap<PolicyKeyParts, PolicyValue>,
}

impl Desired {
    /// The maps' contents for `policy`. `ids` are the endpoints' kernel ids (by
    /// position); `ifaces` holds each endpoint address's checked interface.
    pub fn new(
        policy: &CompiledPolicy,
        entries: &[PolicyEntry],
        ids: &[u32],
        ifaces: &HashMap<IpAddr, Link>,
    ) -> Result<Desired, DatapathError> {
        let mut d = Desired::default();
        for (i, ep) in policy.endpoints().iter().enumerate() {
            let mut flags = 0;
            if policy.is_selected(i, Direction::Ingress) {
                flags |= EP_INGRESS_ENFORCED;
            }
            if policy.is_selected(i, Direction::Egress) {
                flags |= EP_EGRESS_ENFORCED;
            }
            for ip in &ep.endpoint.ips {
                let (w, fam) = ip_words(*ip);
                // Each address with the interface its packets must arrive on.
                let ifindex =
                    ifaces
                        .get(ip)
                        .map(|l| l.index)
                        .ok_or_else(|| DatapathError::Interface {
                            endpoint: ep.endpoint.name.clone(),
                            ip: *ip,
                            detail: "no checked host-side interface".into(),
                        })?;
                d.endpoints.insert(
                    EndpointKey { ip: w, family: fam },
                    EndpointInfo {
                        identity: ep.identity,
                        endpoint_id: ids[i],
                        flags,
                        ifindex,
                    },
                );
            }
        }
        // Every prefix a policy mentions, with its identity; the node's own
        // addresses are the host, whatever CIDR contains them.
        for c in policy.cidr_identities() {
            let (w, fam) = ip_words(c.cidr.addr);
            d.ipcache
                .insert((32 + u32::from(c.cidr.len), w, fam), c.identity);
        }
        for ip in policy.host_addresses() {
            let (w, fam) = ip_words(*ip);
            let bits = if fam == 4 { 32 } else { 128 };
            d.ipcache
                .insert((32 + bits, w, fam), weir_policy::identity::IDENTITY_HOST);
        }
        // Addresses learned from DNS answers (toFQDNs), after the CIDR prefixes:
        // a learned /32 or /128 carries its own identity whatever prefix holds it.
        for (ip, learned) in policy.learned_fqdn_ips() {
            d.ipcache.insert(host_key(ip), learned.identity);
        }
        for e in entries {
            let (k, v) = policy_kv(e);
            let lk = lpm_key(&k);
            d.policy.insert((lk.prefix_len(), lk.data()), v);
        }
        Ok(d)
    }
}

/// What the ipcache holds for exactly `ip` (/32 or /128) when it is not
/// learned, as [`Desired::new`] computes it: the host identity for a node
/// address, the identity of a policy's CIDR that is exactly this address, or
/// nothing (a learned /32 may shadow either).
pub fn unlearned_ipcache(policy: &CompiledPolicy, ip: IpAddr) -> Option<u32> {
    let ip = weir_policy::canonical_ip(ip);
    let key = host_key(ip);
    if policy.host_addresses().contains(&ip) {
        return Some(weir_policy::identity::IDENTITY_HOST);
    }
    policy.cidr_identities().iter().find_map(|c| {
        let (w, fam) = ip_words(c.cidr.addr);
        ((32 + u32::from(c.cidr.len), w, fam) == key).then_some(c.identity)
    })
}

/// The ipcache key of one address (/32 or /128).
pub fn host_key(ip: IpAddr) -> IpcacheKeyParts {
    let (w, fam) = ip_words(ip);
    let bits = if fam == 4 { 32 } else { 128 };
    (32 + bits, w, fam)
}

fn ipcache_key(k: &IpcacheKeyParts) -> Key<[u32; 5]> {
    Key::new(k.0, [k.2, k.1[0], k.1[1], k.1[2], k.1[3]])
}

fn ipcache_value(id: u32) -> IpcacheValue {
    IpcacheValue {
        identity: id,
        pad: 0,
    }
}

/// One map write, and how to take it back.
enum Undo {
    Endpoint(EndpointKey, Option<EndpointInfo>),
    Ipcache(IpcacheKeyParts, Option<u32>),
    Policy(PolicyKeyParts, Option<PolicyValue>),
}

/// The three maps, opened for writing.
struct Maps<'a> {
    endpoints: BpfHashMap<&'a mut MapData, EndpointKey, EndpointInfo>,
    ipcache: LpmTrie<&'a mut MapData, [u32; 5], IpcacheValue>,
    policy: LpmTrie<&'a mut MapData, [u8; 16], PolicyValue>,
}

fn open(ebpf: &mut Ebpf) -> Result<Maps<'_>, DatapathError> {
    let mut endpoints = None;
    let mut ipcache = None;
    let mut policy = None;
    for (name, map) in ebpf.maps_mut() {
        match name {
            "weir_endpoints" => endpoints = Some(map),
            "weir_ipcache" => ipcache = Some(map),
            "weir_policy" => policy = Some(map),
            _ => {}
        }
    }
    let missing = |map: &'static str| DatapathError::Map {
        map,
        detail: "missing from the object".into(),
    };
    Ok(Maps {
        endpoints: BpfHashMap::try_from(endpoints.ok_or_else(|| missing("weir_endpoints"))?)
            .map_err(map_err("weir_endpoints"))?,
        ipcache: LpmTrie::try_from(ipcache.ok_or_else(|| missing("weir_ipcache"))?)
            .map_err(map_err("weir_ipcache"))?,
        policy: LpmTrie::try_from(policy.ok_or_else(|| missing("weir_policy"))?)
            .map_err(map_err("weir_policy"))?,
    })
}

impl Maps<'_> {
    fn set_endpoint(
        &mut self,
        k: &EndpointKey,
        v: Option<&EndpointInfo>,
    ) -> Result<(), DatapathError> {
        match v {
            Some(v) => self.endpoints.insert(k, v, 0),
            None => self.endpoints.remove(k),
        }
        .map_err(map_err("weir_endpoints"))
    }

    fn set_ipcache(&mut self, k: &IpcacheKeyParts, v: Option<u32>) -> Result<(), DatapathError> {
        let key = ipcache_key(k);
        match v {
            Some(id) => self.ipcache.insert(&key, ipcache_value(id), 0),
            None => self.ipcache.remove(&key),
        }
        .map_err(map_err("weir_ipcache"))
    }

    fn set_policy(
        &mut self,
        k: &PolicyKeyParts,
        v: Option<&PolicyValue>,
    ) -> Result<(), DatapathError> {
        let key = Key::new(k.0, k.1);
        match v {
            Some(v) => self.policy.insert(&key, v, 0),
            None => self.policy.remove(&key),
        }
        .map_err(map_err("weir_policy"))
    }

    fn undo(&mut self, journal: Vec<Undo>) {
        for step in journal.into_iter().rev() {
            let _ = match step {
                Undo::Endpoint(k, old) => self.set_endpoint(&k, old.as_ref()),
                Undo::Ipcache(k, old) => self.set_ipcache(&k, old),
                Undo::Policy(k, old) => self.set_policy(&k, old.as_ref()),
            };
        }
    }
}

/// The keys of `from` whose value in `to` is missing or different (to write), and
/// the keys of `from` not in `to` (to delete), each sorted for a stable order.
fn changes<K: Clone + Ord + std::hash::Hash + Eq, V: PartialEq>(
    installed: &HashMap<K, V>,
    desired: &HashMap<K, V>,
) -> (Vec<K>, Vec<K>) {
    let mut upserts: Vec<K> = desired
        .iter()
        .filter(|(k, v)| installed.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    let mut stale: Vec<K> = installed
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    upserts.sort();
    stale.sort();
    (upserts, stale)
}

/// Changes the maps from `installed` to `desired` (see the module notes for the
/// order). On any failure every write is undone and the error returned; the
/// caller keeps `installed` as it was.
pub fn write(ebpf: &mut Ebpf, installed: &Desired, desired: &Desired) -> Result<(), DatapathError> {
    let mut maps = open(ebpf)?;
    let mut journal = Vec::new();
    let result = write_ordered(&mut maps, installed, desired, &mut journal);
    if result.is_err() {
        maps.undo(journal);
    }
    result
}

fn write_ordered(
    maps: &mut Maps<'_>,
    installed: &Desired,
    desired: &Desired,
    journal: &mut Vec<Undo>,
) -> Result<(), DatapathError> {
    let (pol_up, pol_stale) = changes(&installed.policy, &desired.policy);
    let (ipc_up, ipc_stale) = changes(&installed.ipcache, &desired.ipcache);
    let (ep_up, ep_stale) = changes(&installed.endpoints, &desired.endpoints);
    for k in &pol_up {
        maps.set_policy(k, desired.policy.get(k))?;
        journal.push(Undo::Policy(*k, installed.policy.get(k).copied()));
    }
    for k in &ipc_up {
        maps.set_ipcache(k, desired.ipcache.get(k).copied())?;
        journal.push(Undo::Ipcache(*k, installed.ipcache.get(k).copied()));
    }
    for k in &ep_up {
        maps.set_endpoint(k, desired.endpoints.get(k))?;
        journal.push(Undo::Endpoint(*k, installed.endpoints.get(k).copied()));
    }
    for k in &ep_stale {
        maps.set_endpoint(k, None)?;
        journal.push(Undo::Endpoint(*k, installed.endpoints.get(k).copied()));
    }
    for k in &ipc_stale {
        maps.set_ipcache(k, None)?;
        journal.push(Undo::Ipcache(*k, installed.ipcache.get(k).copied()));
    }
    for k in &pol_stale {
        maps.set_policy(k, None)?;
        journal.push(Undo::Policy(*k, installed.policy.get(k).copied()));
    }
    Ok(())
}

/// Writes (or with `None` removes) single ipcache entries, recording each in
/// `installed`; on failure every write is undone and `installed` is unchanged.
pub fn write_ipcache(
    ebpf: &mut Ebpf,
    installed: &mut Desired,
    changes: &[(IpcacheKeyParts, Option<u32>)],
) -> Result<(), DatapathError> {
    let mut maps = open(ebpf)?;
    let mut journal = Vec::new();
    for (k, v) in changes {
        let old = installed.ipcache.get(k).copied();
        if old == *v {
            continue;
        }
        if let Err(e) = maps.set_ipcache(k, *v) {
            maps.undo(journal);
            return Err(e);
        }
        journal.push(Undo::Ipcache(*k, old));
    }
    for (k, v) in changes {
        match v {
            Some(id) => installed.ipcache.insert(*k, *id),
            None => installed.ipcache.remove(k),
        };
    }
    Ok(())
}

/// Reads what pinned maps from an earlier run hold.
pub fn read_installed(ebpf: &Ebpf) -> Result<Desired, DatapathError> {
    let mut d = Desired::default();
    let get = |name: &'static str| {
        ebpf.map(name).ok_or_else(|| DatapathError::Map {
            map: name,
            detail: "missing from the object".into(),
        })
    };
    let eps: BpfHashMap<&MapData, EndpointKey, EndpointInfo> =
        BpfHashMap::try_from(get("weir_endpoints")?).map_err(map_err("weir_endpoints"))?;
    d.endpoints = eps.iter().filter_map(Result::ok).collect();
    let ipc: LpmTrie<&MapData, [u32; 5], IpcacheValue> =
        LpmTrie::try_from(get("weir_ipcache")?).map_err(map_err("weir_ipcache"))?;
    d.ipcache = ipc
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| {
            let w = k.data();
            ((k.prefix_len(), [w[1], w[2], w[3], w[4]], w[0]), v.identity)
        })
        .collect();
    let pol: LpmTrie<&MapData, [u8; 16], PolicyValue> =
        LpmTrie::try_from(get("weir_policy")?).map_err(map_err("weir_policy"))?;
    d.policy = pol
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| ((k.prefix_len(), k.data()), v))
        .collect();
    Ok(d)
}

/// Kernel endpoint ids, stable across policy changes and restarts: derived from
/// the endpoint's name (never 0), collisions settled by probing in name order.
/// Positions in a list would hand one endpoint's id to another when an endpoint
/// before it goes away.
pub fn endpoint_ids(policy: &CompiledPolicy) -> Vec<u32> {
    let eps = policy.endpoints();
    let mut order: Vec<usize> = (0..eps.len()).collect();
    order.sort_by(|a, b| eps[*a].endpoint.name.cmp(&eps[*b].endpoint.name));
    let mut taken = std::collections::HashSet::new();
    let mut ids = vec![0; eps.len()];
    for i in order {
        let mut id = name_hash(&eps[i].endpoint.name);
        while id == 0 || !taken.insert(id) {
            id = id.wrapping_add(1);
        }
        ids[i] = id;
    }
    ids
}

fn name_hash(name: &str) -> u32 {
    // FNV-1a: stable across builds and machines.
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

// Keeps the Pod bound visible to readers: every value written here is a Pod.
const _: fn() = || {
    fn is_pod<T: Pod>() {}
    is_pod::<EndpointInfo>();
    is_pod::<PolicyValue>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_lists_new_changed_and_stale_keys() {
        let installed: HashMap<u32, u32> = [(1, 10), (2, 20), (3, 30)].into();
        let desired: HashMap<u32, u32> = [(2, 20), (3, 31), (4, 40)].into();
        let (up, stale) = changes(&installed, &desired);
        assert_eq!(up, [3, 4]);
        assert_eq!(stale, [1]);
    }

    fn compile(endpoints: &str) -> CompiledPolicy {
        let e = weir_policy::parse_endpoints(endpoints, "e.yaml").unwrap();
        CompiledPolicy::compile(
            &[],
            &e,
            &mut weir_policy::identity::IdentityAllocator::default(),
        )
        .unwrap()
    }

    #[test]
    fn endpoint_ids_do_not_move_when_another_endpoint_goes() {
        let three = compile(
            "endpoints:\n  - {name: a, ips: [10.0.0.1], labels: {x: a}}\n  - {name: b, ips: [10.0.0.2], labels: {x: b}}\n  - {name: c, ips: [10.0.0.3], labels: {x: c}}\n",
        );
        let two = compile(
            "endpoints:\n  - {name: b, ips: [10.0.0.2], labels: {x: b}}\n  - {name: c, ips: [10.0.0.3], labels: {x: c}}\n",
        );
        let (ids3, ids2) = (endpoint_ids(&three), endpoint_ids(&two));
        assert_eq!(ids3[1..], ids2[..]);
        assert!(ids3.iter().all(|i| *i != 0));
        let mut unique = ids3.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 3);
    }
}
