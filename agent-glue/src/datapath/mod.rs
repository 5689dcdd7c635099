//! weir's eBPF datapath: loads `redirect-ebpf`, keeps its maps in step with the
//! compiled policy, attaches to each endpoint's host-side interface and to every
//! other interface of the node (the devices where the world, CIDR peers and other
//! nodes come in), and turns the kernel's verdict events into flow records.
//!
//! Policy changes are applied incrementally: new entries are written before stale
//! ones are deleted, so traffic that both the old and the new policy allow never
//! drops mid-update. Each change bumps a policy generation; a tracked connection
//! whose entry carries an older generation is decided again on its next packet, so
//! removing a rule also stops established flows it allowed.

pub mod attach;
pub mod counters;
pub mod events;
pub mod links;
pub mod maps;
pub mod pins;
pub mod policy_map;
pub mod rule_ids;
pub mod sync;

use std::collections::HashMap;
use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;

use aya::maps::{Array, MapData, RingBuf, lpm_trie::Key};
use aya::programs::{SchedClassifier, SkLookup, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use thiserror::Error;
use tracing::{info, warn};
use weir_policy::{CompiledPolicy, RuleRef};

use maps::*;
use policy_map::{PolicyEntry, policy_entries};

pub use links::{interface_indexes, interfaces, route_interface};

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
    #[error("listing the node's interfaces: {detail}")]
    Links { detail: String },
    #[error("endpoint {endpoint} ({ip}) is refused: {detail}")]
    Interface {
        endpoint: String,
        ip: IpAddr,
        detail: String,
    },
}

pub const FROM_ENDPOINT: &str = "weir_from_endpoint";
pub const TO_ENDPOINT: &str = "weir_to_endpoint";
pub const FROM_NETDEV: &str = "weir_from_netdev";
pub const TO_NETDEV: &str = "weir_to_netdev";
/// Every tc program weir attaches.
pub const PROGRAMS: [&str; 4] = [FROM_ENDPOINT, TO_ENDPOINT, FROM_NETDEV, TO_NETDEV];
/// The namespace's socket-lookup program (listener lookups of proxied flows).
pub const SK_LOOKUP: &str = "weir_sk_lookup";

/// What an interface is to weir, and so which programs it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// An endpoint's host-side veth: its packets carry that endpoint's identity.
    Endpoint,
    /// Any other device of the node: peers behind it are not local endpoints.
    Netdev,
}

impl Role {
    /// (program, tc direction, pin suffix) pairs.
    fn programs(self) -> [(&'static str, TcAttachType, &'static str); 2] {
        match self {
            Role::Endpoint => [
                (FROM_ENDPOINT, TcAttachType::Ingress, "endpoint-ingress"),
                (TO_ENDPOINT, TcAttachType::Egress, "endpoint-egress"),
            ],
            Role::Netdev => [
                (FROM_NETDEV, TcAttachType::Ingress, "netdev-ingress"),
                (TO_NETDEV, TcAttachType::Egress, "netdev-egress"),
            ],
        }
    }
}

/// Which devices get the netdev programs (`--devices`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Devices {
    /// Every interface of the node's namespace that is not `lo` and not an
    /// endpoint's, found again at each policy change.
    #[default]
    Auto,
    /// Exactly these.
    Named(Vec<String>),
}

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
    /// Where peers that are not local endpoints come in.
    pub devices: Devices,
    /// The node may reach every local endpoint whatever the policy (`--allow-localhost always`).
    pub allow_localhost: bool,
}

const MAPS: [&str; 11] = [
    "weir_counters",
    "weir_endpoints",
    "weir_ipcache",
    "weir_policy",
    "weir_ct",
    "weir_config",
    "weir_events",
    "weir_event_layout",
    "weir_frags",
    "weir_enum_layout",
    "weir_devices",
];

/// One program attached to one interface direction.
type Held = (&'static str, TcAttachType, &'static str, attach::Attached);

pub struct Datapath {
    ebpf: Ebpf,
    config: DatapathConfig,
    generation: u32,
    /// What the endpoint, ipcache and policy maps hold now.
    installed: sync::Desired,
    /// Pins of other layout versions are removed once this one is attached.
    other_layouts_removed: bool,
    /// Interfaces with our programs (by role), and the links this process holds
    /// for them (adopted pinned links, or every link when nothing is pinned).
    attached: HashMap<(String, Role), Vec<Held>>,
    rules: Arc<arc_swap::ArcSwap<Vec<Option<RuleRef>>>>,
    rule_ids: rule_ids::RuleIds,
    /// The learned (toFQDNs) identities the installed policy entries were
    /// computed with: an address learned with one of them needs only its
    /// ipcache entry.
    synced_fqdn_identities: std::collections::HashSet<u32>,
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
        for name in PROGRAMS {
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
        let lookup: &mut SkLookup = ebpf
            .program_mut(SK_LOOKUP)
            .ok_or_else(|| DatapathError::Program {
                program: SK_LOOKUP,
                detail: "missing from the object".into(),
            })?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| DatapathError::Program {
                program: SK_LOOKUP,
                detail: e.to_string(),
            })?;
        lookup.load().map_err(|e| DatapathError::Program {
            program: SK_LOOKUP,
            detail: format!("{e:#}"),
        })?;
        let mut dp = Datapath {
            ebpf,
            config,
            generation: 0,
            installed: sync::Desired::default(),
            other_layouts_removed: false,
            attached: HashMap::new(),
            rules: Arc::new(arc_swap::ArcSwap::from_pointee(Vec::new())),
            rule_ids: rule_ids::RuleIds::default(),
            synced_fqdn_identities: Default::default(),
        };
        dp.adopt()?;
        dp.write_config()?;
        if let Some(root) = &dp.config.bpf_root
            && !pins::visible_outside(root)
            && dp.config.tc_attach != attach::TcAttach::Netlink
        {
            warn!(
                bpf_root = %root.display(),
                "the pins are in a bpffs that only this mount namespace sees (e.g. under `ip netns exec`): enforcement ends when weir stops; run weir with `nsenter --net=` to keep it"
            );
        }
        Ok(dp)
    }

    /// Learns what pinned maps from an earlier run already hold, so the first
    /// `sync` removes what no longer applies, and continues its generation count.
    /// Reads the maps' contents and configuration from the kernel again, so the
    /// next [`Datapath::sync`] undoes whatever another weir wrote meanwhile (a
    /// takeover that did not complete).
    pub fn readopt(&mut self) -> Result<(), DatapathError> {
        self.adopt()?;
        self.write_config()
    }

    fn adopt(&mut self) -> Result<(), DatapathError> {
        self.installed = sync::read_installed(&self.ebpf)?;
        let cfg: Array<&MapData, Config> = Array::try_from(
            self.ebpf
                .map("weir_config")
                .expect("object has weir_config"),
        )
        .map_err(map_err("weir_config"))?;
        self.generation = cfg.get(&0, 0).map(|c| c.policy_generation).unwrap_or(0);
        if !self.installed.policy.is_empty() {
            info!(
                endpoints = self.installed.endpoints.len(),
                policy_entries = self.installed.policy.len(),
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
                flags: if self.config.allow_localhost {
                    CFG_ALLOW_LOCALHOST
                } else {
                    0
                },
                pad: 0,
            },
            0,
        )
        .map_err(map_err("weir_config"))
    }

    /// What each event `rule_id` names (see `rule_ids.rs`), updated by every `sync`.
    pub fn rules_handle(&self) -> Arc<arc_swap::ArcSwap<Vec<Option<RuleRef>>>> {
        self.rules.clone()
    }

    /// Brings the maps in line with `policy` (see `sync.rs` for the order), then
    /// bumps the policy generation. On any failure the maps are put back as they
    /// were and the previous generation stays in force.
    pub fn sync(&mut self, policy: &CompiledPolicy) -> Result<(), DatapathError> {
        let ids = sync::endpoint_ids(policy);
        // The learned identities the entries below are computed with (read
        // first, so an identity in this set always has its entries).
        let fqdn_ids: std::collections::HashSet<u32> = policy
            .learned_fqdn_ips()
            .into_iter()
            .map(|(_, l)| l.identity)
            .collect();
        self.rule_ids.begin_sync();
        let entries = policy_entries(policy, &ids, &mut self.rule_ids);
        // Published before the maps change: an event may carry a new id as soon
        // as the first entry is written.
        self.rules.store(Arc::new(self.rule_ids.names()));
        let ifaces = links::endpoint_interfaces(policy)?;
        let desired = sync::Desired::new(policy, &entries, &ids, &ifaces)?;
        sync::write(&mut self.ebpf, &self.installed, &desired)?;
        let previous = std::mem::replace(&mut self.installed, desired);
        self.generation = self.generation.wrapping_add(1);
        if let Err(e) = self.write_config() {
            self.generation = self.generation.wrapping_sub(1);
            let _ = sync::write(&mut self.ebpf, &self.installed, &previous);
            self.installed = previous;
            return Err(e);
        }
        self.synced_fqdn_identities = fqdn_ids;
        self.rule_ids.collect();
        self.rules.store(Arc::new(self.rule_ids.names()));
        info!(
            endpoints = self.installed.endpoints.len(),
            policy_entries = self.installed.policy.len(),
            generation = self.generation,
            "eBPF maps updated"
        );
        Ok(())
    }

    /// Whether the installed policy entries already know the learned identity
    /// `id` (so learning an address with it needs only its ipcache entry).
    /// An identity's entries depend on its selectors and on its base (CIDR
    /// rules list it under its base); both are in its labels, so one identity
    /// of one policy always has the same entries.
    pub fn has_fqdn_identity(&self, id: u32) -> bool {
        self.synced_fqdn_identities.contains(&id)
    }

    /// Writes the ipcache entries of learned addresses, without touching the
    /// policy entries or the generation; all or nothing. `None`: no longer
    /// learned, so the entry becomes what `policy` gives the address (removed,
    /// or the host's or an exact CIDR's identity back). This never reads the
    /// interfaces, so expiry works while an endpoint's interface is gone.
    /// Policy entries of identities no address uses any more stay until the
    /// next full sync: no ipcache entry names them, so they match nothing.
    pub fn write_learned(
        &mut self,
        policy: &CompiledPolicy,
        ips: &[(IpAddr, Option<u32>)],
    ) -> Result<(), DatapathError> {
        let changes: Vec<(sync::IpcacheKeyParts, Option<u32>)> = ips
            .iter()
            .map(|(ip, id)| {
                (
                    sync::host_key(*ip),
                    id.or_else(|| sync::unlearned_ipcache(policy, *ip)),
                )
            })
            .collect();
        sync::write_ipcache(&mut self.ebpf, &mut self.installed, &changes)
    }

    /// The identity the ipcache holds for exactly `ip` (/32 or /128), if any.
    pub fn ipcache_entry(&self, ip: IpAddr) -> Option<u32> {
        self.installed.ipcache.get(&sync::host_key(ip)).copied()
    }

    /// Destination addresses of live connections in the kernel's conntrack
    /// (either leg, not closing, seen within their lifetime): a learned address
    /// whose TTL ran out stays while one of these uses it.
    pub fn live_destinations(&self) -> Result<std::collections::HashSet<IpAddr>, DatapathError> {
        let ct: aya::maps::HashMap<&MapData, CtKey, CtValue> =
            aya::maps::HashMap::try_from(self.ebpf.map("weir_ct").ok_or_else(|| {
                DatapathError::Map {
                    map: "weir_ct",
                    detail: "missing from the object".into(),
                }
            })?)
            .map_err(map_err("weir_ct"))?;
        let now = monotonic_ns();
        Ok(ct
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| ct_live(k, v, now))
            .map(|(k, _)| ip_from_words(k.daddr, k.family))
            .collect())
    }

    /// The interfaces weir's programs belong on: every endpoint's host-side
    /// interface, and the node's other devices.
    pub fn wanted_interfaces(
        &self,
        policy: &CompiledPolicy,
    ) -> Result<HashMap<String, Role>, DatapathError> {
        let mut wanted: HashMap<String, Role> = links::endpoint_interfaces(policy)?
            .into_values()
            .map(|l| (l.name, Role::Endpoint))
            .collect();
        let devices = match &self.config.devices {
            Devices::Named(names) => names.clone(),
            Devices::Auto => interfaces().into_iter().filter(|i| i != "lo").collect(),
        };
        for dev in devices {
            wanted.entry(dev).or_insert(Role::Netdev);
        }
        Ok(wanted)
    }

    /// Attaches the programs each interface's role calls for, then takes weir's
    /// programs off interfaces that no longer need them (or now have the other
    /// role): new attachments first, so an interface is never left unguarded.
    pub fn attach_interfaces(&mut self, policy: &CompiledPolicy) -> Result<(), DatapathError> {
        let wanted = self.wanted_interfaces(policy)?;
        let mut order: Vec<(&String, &Role)> = wanted.iter().collect();
        order.sort();
        for (iface, role) in order {
            let key = (iface.clone(), *role);
            if self.attached.contains_key(&key) {
                continue;
            }
            let mut held = Vec::new();
            for (name, at, pin_name) in role.programs() {
                let pin = self
                    .config
                    .bpf_root
                    .as_deref()
                    .map(|r| pins::link_pin(r, iface, pin_name));
                let mode = self.config.tc_attach;
                let prog = self.program(name)?;
                let how = attach::attach(prog, name, iface, at, pin.as_deref(), mode).map_err(
                    |detail| DatapathError::Attach {
                        program: name,
                        iface: iface.clone(),
                        detail,
                    },
                )?;
                held.push((name, at, pin_name, how));
            }
            info!(%iface, ?role, "attached tc programs");
            self.attached.insert(key, held);
        }
        let stale: Vec<(String, Role)> = self
            .attached
            .keys()
            .filter(|(iface, role)| wanted.get(iface) != Some(role))
            .cloned()
            .collect();
        // The device map names the interfaces whose ingress program decides: an
        // interface leaves it before its programs go.
        let index = interface_indexes();
        let devices: HashMap<u32, u32> = wanted
            .iter()
            .filter(|(iface, role)| self.attached.contains_key(&((*iface).clone(), **role)))
            .filter_map(|(iface, role)| {
                let kind = match role {
                    Role::Endpoint => maps::DEVICE_ENDPOINT,
                    Role::Netdev => maps::DEVICE_NETDEV,
                };
                index.get(iface).map(|i| (*i, kind))
            })
            .collect();
        self.write_devices(&devices)?;
        for key in stale {
            let held = self.attached.remove(&key).unwrap_or_default();
            self.detach(&key.0, held);
            info!(iface = %key.0, role = ?key.1, "detached tc programs (this interface no longer has that role)");
        }
        // Only now that this layout's programs guard every interface may an older
        // layout's go.
        if !self.other_layouts_removed {
            if let Some(root) = &self.config.bpf_root
                && let Err(e) = pins::remove_other_layouts(root)
            {
                warn!(error = %e, "could not remove the pins of another layout version");
            }
            self.other_layouts_removed = true;
        }
        Ok(())
    }

    /// Makes `weir_devices` hold exactly `devices` (ifindex → kind).
    fn write_devices(&mut self, devices: &HashMap<u32, u32>) -> Result<(), DatapathError> {
        let mut m: aya::maps::HashMap<&mut MapData, u32, u32> =
            aya::maps::HashMap::try_from(self.ebpf.map_mut("weir_devices").ok_or_else(|| {
                DatapathError::Map {
                    map: "weir_devices",
                    detail: "missing from the object".into(),
                }
            })?)
            .map_err(map_err("weir_devices"))?;
        let present: Vec<u32> = m.keys().filter_map(Result::ok).collect();
        for k in present.iter().filter(|k| !devices.contains_key(k)) {
            m.remove(k).map_err(map_err("weir_devices"))?;
        }
        for (k, v) in devices {
            m.insert(k, v, 0).map_err(map_err("weir_devices"))?;
        }
        Ok(())
    }

    /// The interfaces weir attached its programs to, with their roles.
    pub fn interface_roles(&self) -> Vec<(String, Role)> {
        let mut v: Vec<(String, Role)> = self.attached.keys().cloned().collect();
        v.sort();
        v
    }

    /// The maps `weir status` reports: what weir wrote into them (known without
    /// reading the kernel: the installed record) and their capacity (from the
    /// kernel's map info). Connection tracking and fragments are the kernel's
    /// own LRU maps: counting them would walk up to 262 144 entries, so they
    /// show their capacity only.
    pub fn map_fill(&self) -> Vec<MapFill> {
        let devices = self.attached.keys().filter(|(i, _)| !i.is_empty()).count();
        [
            ("weir_endpoints", Some(self.installed.endpoints.len())),
            ("weir_ipcache", Some(self.installed.ipcache.len())),
            ("weir_policy", Some(self.installed.policy.len())),
            ("weir_devices", Some(devices)),
            ("weir_ct", None),
            ("weir_frags", None),
        ]
        .into_iter()
        .map(|(name, entries)| MapFill {
            name,
            entries: entries.map(|n| n as u64),
            max_entries: self
                .ebpf
                .map(name)
                .and_then(map_data)
                .and_then(|m| m.info().ok())
                .map(|i| u64::from(i.max_entries())),
        })
        .collect()
    }

    /// Whether enforcement outlives this process: cls_bpf filters always do;
    /// pinned TCX links only where the pins are visible outside this mount
    /// namespace.
    pub fn outlives_process(&self) -> bool {
        let all_netlink = self
            .attached
            .values()
            .flatten()
            .all(|(_, _, _, how)| matches!(how, attach::Attached::Netlink));
        match &self.config.bpf_root {
            None => all_netlink && !self.attached.is_empty(),
            Some(root) => all_netlink || pins::visible_outside(root),
        }
    }

    fn detach(&mut self, iface: &str, held: Vec<Held>) {
        for (name, at, pin_name, how) in held {
            let pin = self
                .config
                .bpf_root
                .as_deref()
                .map(|r| pins::link_pin(r, iface, pin_name));
            let prog = self.program(name).ok();
            attach::detach(prog, name, iface, at, how, pin.as_deref());
        }
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

    /// Gives the proxy's listeners to the namespace's socket lookup, for
    /// packets of proxied flows that reach the socket lookup without a socket
    /// assigned: a new SYN that meets the TIME_WAIT socket of an earlier
    /// proxied connection on the same tuple, and a UDP datagram reassembled
    /// from fragments (reassembly drops the assignment; the first datagram of
    /// a flow has no session socket the ports would find). Without it both
    /// are lost. The program stays attached while this process runs.
    pub fn attach_sk_lookup(
        &mut self,
        tcp: &[&tokio::net::TcpListener],
        udp: &[&tokio::net::UdpSocket],
    ) -> Result<(), DatapathError> {
        let mut map: aya::maps::SockMap<&mut MapData> =
            aya::maps::SockMap::try_from(self.ebpf.map_mut("weir_listeners").ok_or_else(|| {
                DatapathError::Map {
                    map: "weir_listeners",
                    detail: "missing from the object".into(),
                }
            })?)
            .map_err(map_err("weir_listeners"))?;
        // Indexes as in redirect.bpf.c: TCP 0/1, UDP 2/3 (IPv4/IPv6).
        let index = |a: std::io::Result<std::net::SocketAddr>, base: u32| {
            a.ok().map(|a| base + u32::from(a.is_ipv6()))
        };
        for l in tcp {
            if let Some(i) = index(l.local_addr(), 0) {
                map.set(i, *l, 0).map_err(map_err("weir_listeners"))?;
            }
        }
        for u in udp {
            if let Some(i) = index(u.local_addr(), 2) {
                map.set(i, *u, 0).map_err(map_err("weir_listeners"))?;
            }
        }
        let netns =
            std::fs::File::open("/proc/self/ns/net").map_err(|e| DatapathError::Attach {
                program: SK_LOOKUP,
                iface: "(network namespace)".into(),
                detail: e.to_string(),
            })?;
        let prog: &mut SkLookup = self
            .ebpf
            .program_mut(SK_LOOKUP)
            .and_then(|p| <&mut SkLookup>::try_from(p).ok())
            .ok_or(DatapathError::Program {
                program: SK_LOOKUP,
                detail: "missing from the object".into(),
            })?;
        prog.attach(netns).map_err(|e| DatapathError::Attach {
            program: SK_LOOKUP,
            iface: "(network namespace)".into(),
            detail: format!("{e:#}"),
        })?;
        Ok(())
    }

    /// The per-CPU packet counters (taken once).
    pub fn take_counters(&mut self) -> Option<aya::maps::PerCpuArray<MapData, WeirCounter>> {
        self.ebpf
            .take_map("weir_counters")
            .and_then(|m| aya::maps::PerCpuArray::try_from(m).ok())
    }

    /// A second handle on the per-CPU packet counters (a duplicated fd), for
    /// `/metrics` to read at each scrape on the admin thread.
    pub fn counters_reader(&self) -> Option<aya::maps::PerCpuArray<MapData, WeirCounter>> {
        use std::os::fd::AsFd;
        let aya::maps::Map::PerCpuArray(data) = self.ebpf.map("weir_counters")? else {
            return None;
        };
        let fd = data.fd().as_fd().try_clone_to_owned().ok()?;
        let dup = MapData::from_fd(fd).ok()?;
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(dup)).ok()
    }

    /// The verdict-event ring buffer (taken once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.ebpf
            .take_map("weir_events")
            .and_then(|m| RingBuf::try_from(m).ok())
    }
}

/// The clock of `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Whether a conntrack entry is a connection still in use, as the programs'
/// `ct_lookup` would judge it (see `lifetime_ns` in the C source).
fn ct_live(k: &CtKey, v: &CtValue, now_ns: u64) -> bool {
    if v.verdict == kernel_enum::WEIR_DROP || v.flags & (CT_CLOSING | CT_REVOKED) != 0 {
        return false;
    }
    let lifetime = if k.protocol != libc::IPPROTO_TCP as u8 {
        CT_OTHER_LIFETIME
    } else if v.flags & CT_SEEN_REPLY == 0 {
        CT_TCP_SYN_LIFETIME
    } else {
        CT_TCP_LIFETIME
    };
    now_ns.saturating_sub(v.last_seen_ns) <= lifetime * 1_000_000_000
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

/// One map's fill for `weir status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapFill {
    pub name: &'static str,
    /// `None`: not counted (see [`Datapath::map_fill`]).
    pub entries: Option<u64>,
    /// `None`: the kernel did not say.
    pub max_entries: Option<u64>,
}

/// The map behind aya's enum, for the kinds weir's status reports.
fn map_data(m: &aya::maps::Map) -> Option<&MapData> {
    use aya::maps::Map;
    match m {
        Map::HashMap(d) | Map::LpmTrie(d) | Map::LruHashMap(d) | Map::Array(d) => Some(d),
        _ => None,
    }
}

/// The addresses of this network namespace's own interfaces (the `host`
/// identity), loopback excepted.
pub fn node_addresses() -> Vec<IpAddr> {
    let listed = Command::new("ip").args(["-j", "addr", "show"]).output();
    let links = listed
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let mut ips: Vec<IpAddr> = links
        .iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok()))
        .filter(|ip| !ip.is_loopback())
        .collect();
    ips.sort();
    ips.dedup();
    ips
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

#[cfg(test)]
mod fqdn_tests {
    use super::*;

    #[test]
    fn a_connection_is_live_until_it_closes_or_its_lifetime_passes() {
        let k = CtKey {
            protocol: libc::IPPROTO_TCP as u8,
            ..Default::default()
        };
        let sec = 1_000_000_000;
        let v = CtValue {
            verdict: kernel_enum::WEIR_ALLOW,
            last_seen_ns: 100 * sec,
            flags: CT_SEEN_REPLY,
            ..Default::default()
        };
        assert!(ct_live(&k, &v, 100 * sec + CT_TCP_LIFETIME * sec));
        assert!(!ct_live(&k, &v, 101 * sec + CT_TCP_LIFETIME * sec));
        let syn = CtValue { flags: 0, ..v };
        assert!(!ct_live(&k, &syn, 101 * sec + CT_TCP_SYN_LIFETIME * sec));
        let closing = CtValue {
            flags: CT_SEEN_REPLY | CT_CLOSING,
            ..v
        };
        assert!(!ct_live(&k, &closing, 100 * sec));
        let dropped = CtValue {
            verdict: kernel_enum::WEIR_DROP,
            ..v
        };
        assert!(!ct_live(&k, &dropped, 100 * sec));
        let udp = CtKey {
            protocol: libc::IPPROTO_UDP as u8,
            ..k
        };
        assert!(!ct_live(&udp, &v, 101 * sec + CT_OTHER_LIFETIME * sec));
        assert!(ct_live(&udp, &v, 100 * sec + CT_OTHER_LIFETIME * sec));
    }
}
