//! The FQDN learner against the real eBPF maps (root): a learned address gets
//! its ipcache entry and its identity's policy entries; a restart with the
//! cache file keeps them through the first sync; expiry removes them unless a
//! live connection (conntrack) still uses the address.
//!
//! The DNS end-to-end (dig + curl by name through the proxy) drives the same
//! `FqdnState::learn` through the proxy's `LearnerHandle`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use weir_agent::datapath::maps::{
    CT_SEEN_REPLY, CtKey, CtValue, IpcacheValue, PolicyValue, ip_words, kernel_enum,
};
use weir_agent::datapath::{Datapath, DatapathConfig, Devices, pins};
use weir_agent::fqdn::{FqdnState, Limits, now_ms};
use weir_agent::state;
use weir_policy::CompiledPolicy;
use weir_proxy::fqdn::LearnRequest;
use weir_tests::{Lab, ScratchDir, lab, require_root};

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toFQDNs: [{matchName: api.example.com}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
"#;

const ENDPOINTS: &str =
    "endpoints:\n  - {name: client, ips: [10.210.0.20, 'fd00:210::20'], labels: {app: client}}\n";

/// Removes the test's pins, also when it panics.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = pins::remove_tree(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn compile(state_dir: &Path) -> Arc<CompiledPolicy> {
    compile_policy(state_dir, POLICY)
}

fn compile_policy(state_dir: &Path, policy: &str) -> Arc<CompiledPolicy> {
    // As `Sources::compile`: the identities go through the state dir.
    let mut ids = state::load_identities(state_dir);
    let p = weir_policy::parse_policies(policy, "p.yaml").unwrap();
    let e = weir_policy::parse_endpoints(ENDPOINTS, "e.yaml").unwrap();
    let c = CompiledPolicy::compile(&p, &e, &mut ids).unwrap();
    state::save_identities(state_dir, &ids).unwrap();
    Arc::new(c)
}

fn map(root: &Path, name: &str) -> MapData {
    MapData::from_pin(pins::maps_dir(root).join(name)).unwrap()
}

/// The kernel's ipcache entry for exactly `ip`.
fn ipcache(root: &Path, ip: IpAddr) -> Option<u32> {
    let trie: LpmTrie<MapData, [u32; 5], IpcacheValue> =
        LpmTrie::try_from(Map::LpmTrie(map(root, "weir_ipcache"))).unwrap();
    let (w, fam) = ip_words(ip);
    let bits = if fam == 4 { 32 } else { 128 };
    trie.iter().filter_map(Result::ok).find_map(|(k, v)| {
        (k.prefix_len() == 32 + bits && k.data() == [fam, w[0], w[1], w[2], w[3]])
            .then_some(v.identity)
    })
}

/// How many policy entries name `identity` as their peer.
fn policy_entries_for(root: &Path, identity: u32) -> usize {
    let trie: LpmTrie<MapData, [u8; 16], PolicyValue> =
        LpmTrie::try_from(Map::LpmTrie(map(root, "weir_policy"))).unwrap();
    trie.iter()
        .filter_map(Result::ok)
        .filter(|(k, _): &(Key<[u8; 16]>, PolicyValue)| {
            k.data()[8..12] == identity.to_be().to_ne_bytes()
        })
        .count()
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An established connection from the client to `dst:443` in the kernel's conntrack.
fn ct_key(dst: IpAddr) -> CtKey {
    let (saddr, _) = ip_words("10.210.0.20".parse().unwrap());
    let (daddr, fam) = ip_words(dst);
    CtKey {
        saddr,
        daddr,
        sport: 40000u16.to_be(),
        dport: 443u16.to_be(),
        protocol: libc::IPPROTO_TCP as u8,
        family: fam as u8,
        leg: kernel_enum::WEIR_LEG_CLIENT,
        pad: 0,
    }
}

fn set_ct(root: &Path, dst: IpAddr, live: bool) {
    let mut ct: BpfHashMap<MapData, CtKey, CtValue> =
        BpfHashMap::try_from(Map::LruHashMap(map(root, "weir_ct"))).unwrap();
    if live {
        let v = CtValue {
            verdict: kernel_enum::WEIR_ALLOW,
            last_seen_ns: monotonic_ns(),
            flags: CT_SEEN_REPLY,
            ..Default::default()
        };
        ct.insert(ct_key(dst), v, 0).unwrap();
    } else {
        ct.remove(&ct_key(dst)).unwrap();
    }
}

fn config(root: &Path) -> DatapathConfig {
    DatapathConfig {
        proxy_port: 15001,
        mark: 0x7700,
        upstream_mark: 0x7800,
        bpf_root: Some(root.to_path_buf()),
        tc_attach: Default::default(),
        devices: Devices::Named(vec![]),
        allow_localhost: true,
    }
}

/// A node namespace with one workload and a BPF pin directory, all removed at
/// the end; runs `body(pin root, state dir)` on a thread inside the node's
/// namespace (the datapath reads the node's routes).
fn in_node_namespace(tag: &str, body: impl FnOnce(&Path, &Path) + Send + 'static) {
    let dir = ScratchDir::new(tag);
    let mut lab = Lab::new(&lab::unique_prefix("wf")).expect("node namespace");
    lab.add_workload(
        "client",
        "10.210.0.20".parse().unwrap(),
        "fd00:210::20".parse().unwrap(),
    )
    .expect("workload");
    let root = PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        lab::unique_prefix(&format!("weir-test-{tag}"))
    ));
    let _pins = Pins(root.clone());
    let node = lab.node.path();
    let state_dir = dir.0.join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let thread = std::thread::spawn(move || {
        let ns = std::fs::File::open(&node).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace file we hold open; this thread only.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        body(&root, &state_dir);
    });
    if let Err(p) = thread.join() {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn learned_addresses_reach_the_maps_survive_a_restart_and_expire() {
    if !require_root("learned_addresses_reach_the_maps_survive_a_restart_and_expire") {
        return;
    }
    in_node_namespace("fqdn-dp", scenario);
}

fn scenario(root: &Path, state_dir: &Path) {
    let v4: IpAddr = "203.0.113.7".parse().unwrap();
    let v6: IpAddr = "2001:db8::7".parse().unwrap();
    let policy = compile(state_dir);
    let mut fqdn = FqdnState::load(state_dir, Limits::default());
    fqdn.learn_all_into(&policy);
    let mut dp = Datapath::load(config(root)).expect("load the datapath");
    dp.sync(&policy).expect("first sync");
    assert_eq!(ipcache(root, v4), None);

    let req = LearnRequest {
        names: vec!["api.example.com.".into()],
        addresses: vec![(v4, 30), (v6, 30)],
        policy: policy.clone(),
        client: weir_proxy::fqdn::DnsClient::new(std::net::IpAddr::from([10, 0, 0, 1])),
    };
    fqdn.learn(&req, &policy, Some(&mut dp), now_ms())
        .expect("learn");
    let id4 = policy.learned_fqdn_ip(v4).unwrap().identity;
    let id6 = policy.learned_fqdn_ip(v6).unwrap().identity;
    assert_eq!(ipcache(root, v4), Some(id4));
    assert_eq!(ipcache(root, v6), Some(id6));
    assert!(
        policy_entries_for(root, id4) > 0,
        "the toFQDNs rule's entries"
    );

    // A restart (as after kill -9: the pins stay, the cache file is read back).
    fqdn.persist_if_due(true);
    drop(dp);
    drop(fqdn);
    let policy = compile(state_dir);
    let mut fqdn = FqdnState::load(state_dir, Limits::default());
    fqdn.learn_all_into(&policy);
    let mut dp = Datapath::load(config(root)).expect("reload the datapath");
    dp.sync(&policy).expect("first sync after the restart");
    assert_eq!(ipcache(root, v4), Some(id4), "kept across the restart");
    assert_eq!(ipcache(root, v6), Some(id6));
    assert!(policy_entries_for(root, id4) > 0);

    // The TTL runs out; a live connection keeps the IPv4 address.
    set_ct(root, v4, true);
    fqdn.tick(&policy, Some(&mut dp), now_ms() + 60_000);
    assert_eq!(ipcache(root, v4), Some(id4), "kept: connection alive");
    assert_eq!(ipcache(root, v6), None, "expired");
    assert!(policy.learned_fqdn_ip(v6).is_none());
    // The connection ends: the address goes (its ipcache entry at once; the
    // identity's policy entries, which nothing names now, at the next sync).
    set_ct(root, v4, false);
    fqdn.tick(&policy, Some(&mut dp), now_ms() + 66_000);
    assert_eq!(ipcache(root, v4), None);
    assert!(policy.learned_fqdn_ips().is_empty());
    dp.sync(&policy).expect("sync");
    assert_eq!(policy_entries_for(root, id4), 0);
}

const CIDR_AND_FQDN: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toFQDNs: [{matchName: api.example.com}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  - toCIDR: [203.0.113.8/32]
    toPorts: [{ports: [{port: '22', protocol: TCP}]}]
"#;

/// A learned address that is also a policy's /32 CIDR: while learned its
/// ipcache entry is the learned identity; after expiry the CIDR identity is
/// back, written without a full sync (which fails here: the endpoint's
/// interface is gone).
#[test]
fn expiry_restores_a_cidr_entry_without_a_full_sync() {
    if !require_root("expiry_restores_a_cidr_entry_without_a_full_sync") {
        return;
    }
    in_node_namespace("fqdn-cidr", |root, state_dir| {
        let ip: IpAddr = "203.0.113.8".parse().unwrap();
        let policy = compile_policy(state_dir, CIDR_AND_FQDN);
        let mut fqdn = FqdnState::load(state_dir, Limits::default());
        fqdn.learn_all_into(&policy);
        let mut dp = Datapath::load(config(root)).expect("load the datapath");
        dp.sync(&policy).expect("first sync");
        let cidr = ipcache(root, ip).expect("the /32 CIDR's entry");
        let req = LearnRequest {
            names: vec!["api.example.com.".into()],
            addresses: vec![(ip, 30)],
            policy: policy.clone(),
            client: weir_proxy::fqdn::DnsClient::new(std::net::IpAddr::from([10, 0, 0, 1])),
        };
        fqdn.learn(&req, &policy, Some(&mut dp), now_ms())
            .expect("learn");
        let learned = policy.learned_fqdn_ip(ip).unwrap();
        assert_eq!(learned.base, cidr);
        assert_eq!(ipcache(root, ip), Some(learned.identity));
        // The endpoint's interface goes: a full sync fails from now on.
        let del = std::process::Command::new("ip")
            .args(["link", "del", "weirv0"])
            .status()
            .unwrap();
        assert!(del.success());
        assert!(dp.sync(&policy).is_err(), "a full sync needs the interface");
        fqdn.tick(&policy, Some(&mut dp), now_ms() + 60_000);
        assert!(policy.learned_fqdn_ip(ip).is_none());
        assert_eq!(ipcache(root, ip), Some(cidr), "the CIDR identity is back");
    });
}

const STAR_WARS_FQDN: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tiefighter-fqdn}
spec:
  endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
  - toFQDNs: [{matchName: api.example.com}, {matchPattern: '*.example.com'}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
"#;

/// `weir fqdn list --json` of the scenario's weir.
fn fqdn_list(s: &weir_tests::Scenario) -> Vec<serde_json::Value> {
    let out = s
        .lab
        .node
        .command(weir_tests::weir_bin().to_str().unwrap())
        .args(["fqdn", "list", "--json", "--api-socket"])
        .arg(s.path("weir.sock"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", weir_tests::text(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

/// `weir run` reads the cache a crashed weir left: its first sync keeps the
/// learned address in the pinned ipcache, `weir fqdn list` shows it, and so
/// does the weir after a `kill -9`.
#[test]
fn weir_run_keeps_learned_addresses_across_kill_9() {
    let Some(mut s) = weir_tests::Scenario::star_wars("fqdn-kill9") else {
        return;
    };
    std::fs::create_dir_all(&s.state_dir).unwrap();
    let now = now_ms();
    std::fs::write(
        s.state_dir.join("fqdn-cache.json"),
        serde_json::json!({
            "version": 1,
            "names": {"api.example.com.": {"203.0.113.9": {
                "expires_ms": now + 600_000, "learned_ms": now}}}
        })
        .to_string(),
    )
    .unwrap();
    let ip: IpAddr = "203.0.113.9".parse().unwrap();
    let check = |s: &weir_tests::Scenario| {
        let names = fqdn_list(s);
        assert_eq!(names.len(), 1, "{names:?}");
        let a = &names[0]["addresses"][0];
        assert_eq!(a["ip"], "203.0.113.9");
        let id = a["identity"].as_u64().unwrap() as u32;
        assert!(id != 0, "learned: {names:?}");
        assert_eq!(
            a["selectors"].as_array().unwrap().len(),
            2,
            "both selectors select the name: {names:?}"
        );
        assert!(a["expires_in_secs"].as_u64().unwrap() > 500);
        assert_eq!(ipcache(&s.bpf_root, ip), Some(id), "in the pinned ipcache");
        assert!(policy_entries_for(&s.bpf_root, id) > 0);
        id
    };
    s.start_weir(STAR_WARS_FQDN, &["--steering", "ebpf"]);
    let id = check(&s);
    s.weir()
        .stop_with(libc::SIGKILL, std::time::Duration::from_secs(1));
    s.lab.processes.retain(|p| p.name != "weir");
    assert_eq!(
        ipcache(&s.bpf_root, ip),
        Some(id),
        "the pins outlive the process"
    );
    let _ = std::fs::remove_file(s.state_dir.join("ready"));
    s.start_weir(STAR_WARS_FQDN, &["--steering", "ebpf"]);
    assert_eq!(check(&s), id, "the same identity after the restart");
}
