//! weir's eBPF datapath: loads `redirect-ebpf`, keeps its maps in step with the
//! compiled policy, attaches to each endpoint's host-side interface (TCX), and
//! turns the kernel's verdict events into flow records.
//!
//! Policy changes are applied incrementally: new entries are written before stale
//! ones are deleted, so traffic that both the old and the new policy allow never
//! drops mid-update. Each change bumps a policy generation; a tracked connection
//! whose entry carries an older generation is decided again on its next packet, so
//! removing a rule also stops established flows it allowed.

pub mod attach;
pub mod events;
pub mod maps;
pub mod pins;
pub mod policy_map;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf, lpm_trie::Key, lpm_trie::LpmTrie};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use thiserror::Error;
use tracing::info;
use weir_policy::{CompiledPolicy, Direction, RuleRef};

use maps::*;
use policy_map::{PolicyEntry, endpoint_id, policy_entries};

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("loading the redirect eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program `{program}` was rejected: {detail}")]
    Program {
        program: &'static str,
        detail: String,
    },
    #[error("eBPF map `{map}`: {detail}")]
    Map { map: &'static str, detail: String },
    #[error("attaching `{program}` to {iface}: {detail}")]
    Attach {
        program: &'static str,
        iface: String,
        detail: String,
    },
    #[error("finding the host interface of endpoint {endpoint} ({ip}): {detail}")]
    Interface {
        endpoint: String,
        ip: IpAddr,
        detail: String,
    },
}

pub const FROM_ENDPOINT: &str = "weir_from_endpoint";
pub const TO_ENDPOINT: &str = "weir_to_endpoint";

#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub proxy_port: u16,
    pub mark: u32,
    /// SO_MARK of the proxy's upstream sockets (0: the proxy does not connect
    /// from the client's address).
    pub upstream_mark: u32,
    /// Where maps and links are pinned (`--bpf-root`); `None` pins nothing and the
    /// datapath goes away with the process.
    pub bpf_root: Option<std::path::PathBuf>,
    /// TCX links, or clsact/netlink filters where TCX is missing.
    pub tc_attach: attach::TcAttach,
}

const MAPS: [&str; 8] = [
    "weir_counters",
    "weir_endpoints",
    "weir_ipcache",
    "weir_policy",
    "weir_ct",
    "weir_config",
    "weir_events",
    "weir_event_layout",
];

pub struct Datapath {
    ebpf: Ebpf,
    config: DatapathConfig,
    generation: u32,
    installed_policy: HashSet<(u32, [u8; 16])>,
    installed_endpoints: HashSet<EndpointKey>,
    installed_ipcache: HashSet<(u32, [u32; 4], u32)>,
    /// Interfaces with our programs, and the links this process holds for them
    /// (adopted pinned links, or every link when nothing is pinned).
    attached: HashMap<String, Vec<(&'static str, TcAttachType, &'static str, attach::Attached)>>,
    rules: Arc<arc_swap::ArcSwap<Vec<RuleRef>>>,
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |e| DatapathError::Map {
        map,
        detail: format!("{e:#}"),
    }
}

impl Datapath {
    /// Loads the embedded object and its programs (the verifier runs here).
    pub fn load(config: DatapathConfig) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        let map_dir = config.bpf_root.as_deref().map(pins::maps_dir);
        if let (Some(root), Some(dir)) = (&config.bpf_root, &map_dir) {
            pins::prepare(root).map_err(|e| DatapathError::Map {
                map: "(pins)",
                detail: format!("{}: {e}", root.display()),
            })?;
            for m in MAPS {
                loader.map_pin_path(m, dir.join(m));
            }
        }
        let mut ebpf = loader.load(weir_redirect_ebpf::OBJECT)?;
        for name in [FROM_ENDPOINT, TO_ENDPOINT] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| DatapathError::Program {
                    program: name,
                    detail: "missing from the object".into(),
                })?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| DatapathError::Program {
                    program: name,
                    detail: e.to_string(),
                })?;
            prog.load().map_err(|e| DatapathError::Program {
                program: name,
                detail: format!("{e:#}"),
            })?;
        }
        let mut dp = Datapath {
            ebpf,
            config,
            generation: 0,
            installed_policy: HashSet::new(),
            installed_endpoints: HashSet::new(),
            installed_ipcache: HashSet::new(),
            attached: HashMap::new(),
            rules: Arc::new(arc_swap::ArcSwap::from_pointee(Vec::new())),
        };
        dp.adopt()?;
        dp.write_config()?;
        Ok(dp)
    }

    /// Learns what pinned maps from an earlier run already hold, so the first
    /// `sync` removes what no longer applies, and continues its generation count.
    fn adopt(&mut self) -> Result<(), DatapathError> {
        {
            let m: BpfHashMap<&MapData, EndpointKey, EndpointInfo> = BpfHashMap::try_from(
                self.ebpf
                    .map("weir_endpoints")
                    .expect("object has weir_endpoints"),
            )
            .map_err(map_err("weir_endpoints"))?;
            self.installed_endpoints = m.keys().filter_map(Result::ok).collect();
        }
        {
            let m: LpmTrie<&MapData, [u8; 16], PolicyValue> = LpmTrie::try_from(
                self.ebpf
                    .map("weir_policy")
                    .expect("object has weir_policy"),
            )
            .map_err(map_err("weir_policy"))?;
            self.installed_policy = m
                .keys()
                .filter_map(Result::ok)
                .map(|k| (k.prefix_len(), k.data()))
                .collect();
        }
        {
            let m: LpmTrie<&MapData, [u32; 5], IpcacheValue> = LpmTrie::try_from(
                self.ebpf
                    .map("weir_ipcache")
                    .expect("object has weir_ipcache"),
            )
            .map_err(map_err("weir_ipcache"))?;
            self.installed_ipcache = m
                .keys()
                .filter_map(Result::ok)
                .map(|k| {
                    let d = k.data();
                    (k.prefix_len(), [d[1], d[2], d[3], d[4]], d[0])
                })
                .collect();
        }
        let cfg: Array<&MapData, Config> = Array::try_from(
            self.ebpf
                .map("weir_config")
                .expect("object has weir_config"),
        )
        .map_err(map_err("weir_config"))?;
        self.generation = cfg.get(&0, 0).map(|c| c.policy_generation).unwrap_or(0);
        if !self.installed_policy.is_empty() {
            info!(
                endpoints = self.installed_endpoints.len(),
                policy_entries = self.installed_policy.len(),
                generation = self.generation,
                "adopted pinned eBPF state from an earlier run"
            );
        }
        Ok(())
    }

    fn write_config(&mut self) -> Result<(), DatapathError> {
        let mut cfg: Array<&mut MapData, Config> =
            Array::try_from(self.ebpf.map_mut("weir_config").ok_or_else(|| {
                map_err("weir_config")(aya::maps::MapError::InvalidName {
                    name: "weir_config".into(),
                })
            })?)
            .map_err(map_err("weir_config"))?;
        cfg.set(
            0,
            Config {
                proxy_port: u32::from(self.config.proxy_port),
                mark: self.config.mark,
                policy_generation: self.generation,
                upstream_mark: self.config.upstream_mark,
            },
            0,
        )
        .map_err(map_err("weir_config"))
    }

    /// The rule table that event `rule_id`s index, updated by every `sync`.
    pub fn rules_handle(&self) -> Arc<arc_swap::ArcSwap<Vec<RuleRef>>> {
        self.rules.clone()
    }

    /// Brings the maps in line with `policy` (add first, then remove), then bumps
    /// the policy generation.
    pub fn sync(&mut self, policy: &CompiledPolicy) -> Result<(), DatapathError> {
        let (entries, table) = policy_entries(policy);
        // Endpoints.
        let mut eps: HashMap<EndpointKey, EndpointInfo> = HashMap::new();
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
                eps.insert(
                    EndpointKey { ip: w, family: fam },
                    EndpointInfo {
                        identity: ep.identity,
                        endpoint_id: endpoint_id(i),
                        flags,
                        ifindex: 0,
                    },
                );
            }
        }
        {
            let mut m: BpfHashMap<&mut MapData, EndpointKey, EndpointInfo> = BpfHashMap::try_from(
                self.ebpf
                    .map_mut("weir_endpoints")
                    .expect("object has weir_endpoints"),
            )
            .map_err(map_err("weir_endpoints"))?;
            for (k, v) in &eps {
                m.insert(k, v, 0).map_err(map_err("weir_endpoints"))?;
            }
            for stale in self
                .installed_endpoints
                .iter()
                .filter(|k| !eps.contains_key(k))
            {
                let _ = m.remove(stale);
            }
        }
        self.installed_endpoints = eps.keys().copied().collect();
        // ipcache: every prefix a policy mentions, with its identity.
        let mut cache: HashMap<(u32, [u32; 4], u32), u32> = HashMap::new();
        for c in policy.cidr_identities() {
            let (w, fam) = ip_words(c.cidr.addr);
            cache.insert((32 + u32::from(c.cidr.len), w, fam), c.identity);
        }
        {
            let mut m: LpmTrie<&mut MapData, [u32; 5], IpcacheValue> = LpmTrie::try_from(
                self.ebpf
                    .map_mut("weir_ipcache")
                    .expect("object has weir_ipcache"),
            )
            .map_err(map_err("weir_ipcache"))?;
            for ((len, w, fam), id) in &cache {
                let key = Key::new(*len, [*fam, w[0], w[1], w[2], w[3]]);
                m.insert(
                    &key,
                    IpcacheValue {
                        identity: *id,
                        pad: 0,
                    },
                    0,
                )
                .map_err(map_err("weir_ipcache"))?;
            }
            for stale in self
                .installed_ipcache
                .iter()
                .filter(|k| !cache.contains_key(k))
            {
                let key = Key::new(
                    stale.0,
                    [stale.2, stale.1[0], stale.1[1], stale.1[2], stale.1[3]],
                );
                let _ = m.remove(&key);
            }
        }
        self.installed_ipcache = cache.keys().copied().collect();
        // Policy.
        let keyed: Vec<(PolicyKey, PolicyValue)> = entries.iter().map(policy_kv).collect();
        let new_keys: HashSet<(u32, [u8; 16])> = keyed
            .iter()
            .map(|(k, _)| {
                let lk = lpm_key(k);
                (lk.prefix_len(), lk.data())
            })
            .collect();
        {
            let mut m: LpmTrie<&mut MapData, [u8; 16], PolicyValue> = LpmTrie::try_from(
                self.ebpf
                    .map_mut("weir_policy")
                    .expect("object has weir_policy"),
            )
            .map_err(map_err("weir_policy"))?;
            for (k, v) in &keyed {
                m.insert(&lpm_key(k), v, 0)
                    .map_err(map_err("weir_policy"))?;
            }
            for stale in self
                .installed_policy
                .iter()
                .filter(|k| !new_keys.contains(k))
            {
                let _ = m.remove(&Key::new(stale.0, stale.1));
            }
        }
        self.installed_policy = new_keys;
        self.rules.store(Arc::new(table));
        self.generation = self.generation.wrapping_add(1);
        self.write_config()?;
        info!(
            endpoints = self.installed_endpoints.len(),
            policy_entries = self.installed_policy.len(),
            generation = self.generation,
            "eBPF maps updated"
        );
        Ok(())
    }

    /// Attaches to the host-side interface of every endpoint not yet attached.
    pub fn attach_endpoints(&mut self, policy: &CompiledPolicy) -> Result<(), DatapathError> {
        let mut ifaces = Vec::new();
        for ep in policy.endpoints() {
            for ip in &ep.endpoint.ips {
                let iface = host_interface(*ip).map_err(|detail| DatapathError::Interface {
                    endpoint: ep.endpoint.name.clone(),
                    ip: *ip,
                    detail,
                })?;
                if !ifaces.contains(&iface) {
                    ifaces.push(iface);
                }
            }
        }
        for iface in ifaces {
            if self.attached.contains_key(&iface) {
                continue;
            }
            let mut held = Vec::new();
            for (name, at, dir) in [
                (FROM_ENDPOINT, TcAttachType::Ingress, "ingress"),
                (TO_ENDPOINT, TcAttachType::Egress, "egress"),
            ] {
                let pin = self
                    .config
                    .bpf_root
                    .as_deref()
                    .map(|r| pins::link_pin(r, &iface, dir));
                let mode = self.config.tc_attach;
                let prog = self.program(name)?;
                let how = attach::attach(prog, name, &iface, at, pin.as_deref(), mode).map_err(
                    |detail| DatapathError::Attach {
                        program: name,
                        iface: iface.clone(),
                        detail,
                    },
                )?;
                held.push((name, at, dir, how));
            }
            info!(%iface, "attached tc programs");
            self.attached.insert(iface, held);
        }
        Ok(())
    }

    fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(name)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .ok_or(DatapathError::Program {
                program: name,
                detail: "missing from the object".into(),
            })
    }

    /// Detaches from interfaces that no endpoint of `policy` uses any more (an
    /// endpoint was removed): its pinned links are unpinned and released.
    pub fn detach_unused(&mut self, policy: &CompiledPolicy) {
        let in_use: HashSet<String> = policy
            .endpoints()
            .iter()
            .flat_map(|ep| ep.endpoint.ips.iter())
            .filter_map(|ip| host_interface(*ip).ok())
            .collect();
        let stale: Vec<String> = self
            .attached
            .keys()
            .filter(|i| !in_use.contains(*i))
            .cloned()
            .collect();
        for iface in stale {
            let held = self.attached.remove(&iface).unwrap_or_default();
            for (name, at, dir, how) in held {
                let pin = self
                    .config
                    .bpf_root
                    .as_deref()
                    .map(|r| pins::link_pin(r, &iface, dir));
                let prog = self.program(name).ok();
                attach::detach(prog, name, &iface, at, how, pin.as_deref());
            }
            info!(%iface, "detached tc programs (no endpoint uses this interface now)");
        }
    }

    /// The verdict-event ring buffer (taken once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.ebpf
            .take_map("weir_events")
            .and_then(|m| RingBuf::try_from(m).ok())
    }
}

fn policy_kv(e: &PolicyEntry) -> (PolicyKey, PolicyValue) {
    let port_mask = if e.port_bits == 0 {
        0
    } else {
        u16::MAX << (16 - e.port_bits)
    };
    (
        PolicyKey {
            prefixlen: 96 + u32::from(e.port_bits),
            endpoint_id: e.endpoint_id.to_be(),
            direction: e.direction,
            protocol: e.protocol,
            pad: 0,
            identity: e.identity.to_be(),
            dport: (e.port & port_mask).to_be(),
            pad2: 0,
        },
        PolicyValue {
            verdict: e.verdict.kernel_value(),
            rule_id: e.rule_id,
        },
    )
}

/// aya's LPM key is (prefix length, data); the data is the C key after `prefixlen`.
fn lpm_key(k: &PolicyKey) -> Key<[u8; 16]> {
    let mut data = [0u8; 16];
    data[0..4].copy_from_slice(&k.endpoint_id.to_ne_bytes());
    data[4] = k.direction;
    data[5] = k.protocol;
    data[6..8].copy_from_slice(&k.pad.to_ne_bytes());
    data[8..12].copy_from_slice(&k.identity.to_ne_bytes());
    data[12..14].copy_from_slice(&k.dport.to_ne_bytes());
    data[14..16].copy_from_slice(&k.pad2.to_ne_bytes());
    Key::new(k.prefixlen, data)
}

/// The interface the node routes `ip` through (the endpoint's host-side veth).
pub fn host_interface(ip: IpAddr) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["-j", "route", "get", &ip.to_string()])
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("unexpected `ip -j` output: {e}"))?;
    v.get(0)
        .and_then(|r| r.get("dev"))
        .and_then(|d| d.as_str())
        .filter(|d| *d != "lo")
        .map(str::to_string)
        .ok_or_else(|| "no route through a network interface".into())
}

/// Interfaces of this network namespace, sorted. Through netlink (`ip`), not
/// /sys/class/net: nsenter keeps the old namespace's /sys.
pub fn interfaces() -> Vec<String> {
    let listed = Command::new("ip").args(["-j", "link", "show"]).output();
    let mut ifaces: Vec<String> = listed
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect();
    ifaces.sort();
    ifaces
}

/// What is attached to each interface of this network namespace, TCX programs
/// and cls_bpf filters on clsact alike: `(interface, "ingress" | "egress",
/// program name)` (TCX names are the kernel's, cut to 15 bytes).
pub fn attached_programs() -> Vec<(String, &'static str, String)> {
    let mut out = Vec::new();
    for iface in interfaces() {
        for (at, name) in [
            (TcAttachType::Ingress, "ingress"),
            (TcAttachType::Egress, "egress"),
        ] {
            if let Ok((_, progs)) = SchedClassifier::query_tcx(&iface, at) {
                for p in progs {
                    out.push((
                        iface.clone(),
                        name,
                        p.name_as_str().unwrap_or("?").to_string(),
                    ));
                }
            }
        }
        for (dir, name) in attach::netlink_filters(&iface) {
            out.push((iface.clone(), dir, name));
        }
    }
    out
}
