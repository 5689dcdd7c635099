//! The kernel's verdict events (ring buffer) → flow records.

use std::sync::Arc;

use aya::maps::{MapData, PerCpuArray, RingBuf};
use tokio::io::unix::AsyncFd;
use tracing::{error, warn};
use weir_policy::flow::{Flow, FlowPeers};
use weir_policy::{CompiledPolicy, Direction, RuleRef, Verdict};
use weir_proxy::Shared;

use super::maps::kernel_enum::*;
use super::maps::{Event, WeirCounter, ip_from_words};

/// Drains the ring buffer into the flow log until the process ends, and says
/// (at most every few seconds) how many events the kernel could not queue.
pub async fn drain(
    ring: RingBuf<MapData>,
    counters: Option<PerCpuArray<MapData, WeirCounter>>,
    shared: Arc<Shared>,
    rules: Arc<arc_swap::ArcSwap<Vec<Option<RuleRef>>>>,
) {
    let mut losses = LossReport::new(counters);
    // SAFETY: the RingBuf owns its map's file descriptor for as long as it lives,
    // and it lives inside this AsyncFd, so the fd stays open and unchanged.
    let registered = unsafe { AsyncFd::register(ring) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            error!(error = %e, "cannot watch the eBPF event ring buffer; no L3/L4 flow records");
            return;
        }
    };
    // The kernel wakes us only when a batch is waiting; the tick picks up the rest.
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::new();
    let mut recent = RecentPolicies::default();
    loop {
        tokio::select! {
            ready = fd.readable_mut() => match ready {
                Ok(mut guard) => {
                    read_all(guard.get_inner_mut(), &shared, &rules, &mut recent, &mut batch);
                    guard.clear_ready();
                }
                Err(e) => {
                    error!(error = %e, "eBPF event ring buffer failed");
                    return;
                }
            },
            _ = tick.tick() => read_all(fd.get_mut(), &shared, &rules, &mut recent, &mut batch),
        }
        if !batch.is_empty() {
            shared.flows.emit_all(batch.drain(..));
        }
        losses.check();
    }
}

/// Watches the kernel's count of verdict events the ring buffer had no room for.
struct LossReport {
    counters: Option<PerCpuArray<MapData, WeirCounter>>,
    reported: u64,
    last_check: std::time::Instant,
}

impl LossReport {
    fn new(counters: Option<PerCpuArray<MapData, WeirCounter>>) -> Self {
        LossReport {
            counters,
            reported: 0,
            last_check: std::time::Instant::now(),
        }
    }

    /// Every 5 s at most: warns when more events were lost since the last look.
    fn check(&mut self) {
        if self.last_check.elapsed() < std::time::Duration::from_secs(5) {
            return;
        }
        self.last_check = std::time::Instant::now();
        let Some(counters) = &self.counters else {
            return;
        };
        let lost: u64 = counters
            .get(&WEIR_COUNTER_EVENTS_LOST, 0)
            .map(|per_cpu| per_cpu.iter().map(|c| c.packets).sum())
            .unwrap_or(0);
        if lost > self.reported {
            warn!(
                lost = lost - self.reported,
                total = lost,
                "verdict events lost: the ring buffer was full (their packets were still decided)"
            );
            self.reported = lost;
        }
    }
}

/// How long a verdict event may wait in the ring buffer (see weir_redirect.h).
const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// The policy in force and the one before it: an event read just after a reload
/// was decided under the previous policy, whose endpoints its identities name.
#[derive(Default)]
pub struct RecentPolicies {
    current: Option<Arc<CompiledPolicy>>,
    previous: Option<Arc<CompiledPolicy>>,
}

impl RecentPolicies {
    pub fn observe(&mut self, policy: Arc<CompiledPolicy>) {
        if self
            .current
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &policy))
        {
            return;
        }
        self.previous = self.current.replace(policy);
    }

    /// Newest first.
    fn all(&self) -> impl Iterator<Item = &CompiledPolicy> {
        self.current
            .iter()
            .chain(self.previous.iter())
            .map(|p| &**p)
    }
}

fn read_all(
    ring: &mut RingBuf<MapData>,
    shared: &Shared,
    rules: &arc_swap::ArcSwap<Vec<Option<RuleRef>>>,
    recent: &mut RecentPolicies,
    out: &mut Vec<Flow>,
) {
    recent.observe(shared.policy.load_full());
    let rules = rules.load();
    while let Some(item) = ring.next() {
        out.extend(event_flow(&item, recent, &rules, &shared.node_name));
    }
}

/// Who an event's address was when the kernel decided, by the identity it
/// decided with: an address that claims an endpoint from the wrong interface is
/// not that endpoint, and the node is the host.
fn peer_as_decided(
    policy: &CompiledPolicy,
    ip: std::net::IpAddr,
    identity: u32,
) -> (weir_policy::PeerInfo, bool) {
    let p = policy.peer_info(ip);
    if p.identity == identity {
        (p, true)
    } else {
        let unknown = weir_policy::PeerInfo {
            ip: p.ip,
            identity,
            endpoint: None,
        };
        (unknown, false)
    }
}

/// Turns one kernel event into a flow record, naming its peers after the most
/// recent policy whose identities agree with the kernel's decision.
pub fn event_flow(
    raw: &[u8],
    recent: &RecentPolicies,
    rules: &[Option<RuleRef>],
    node_name: &Arc<str>,
) -> Option<Flow> {
    let Some(e) = Event::from_bytes(raw) else {
        warn!(len = raw.len(), "short verdict event");
        return None;
    };
    let (saddr, daddr) = (
        ip_from_words(e.saddr, e.family),
        ip_from_words(e.daddr, e.family),
    );
    let decided = |policy: &CompiledPolicy| {
        let (src, src_ok) = peer_as_decided(policy, saddr, e.src_identity);
        let (dst, dst_ok) = peer_as_decided(policy, daddr, e.dst_identity);
        (src, dst, src_ok && dst_ok)
    };
    let mut policies = recent.all();
    let newest = policies.next()?;
    let (policy, (src, dst, _)) = std::iter::once(newest)
        .chain(policies)
        .map(|p| (p, decided(p)))
        .find(|(_, (_, _, agree))| *agree)
        .unwrap_or_else(|| (newest, decided(newest)));
    let peers = FlowPeers::new(policy, &src, &dst, node_name.clone());
    let rule = rules.get(e.rule_id as usize).cloned().flatten();
    let (kind, reply) = (
        e.kind & !WEIR_EVENT_F_REPLY,
        e.kind & WEIR_EVENT_F_REPLY != 0,
    );
    let verdict = match kind {
        // A drop names its rule only when a deny rule decided it.
        WEIR_EVENT_DROPPED => Verdict {
            allowed: false,
            rules: rule.into_iter().collect(),
            denied_in: match e.reason {
                WEIR_REASON_POLICY_EGRESS => Some(Direction::Egress),
                WEIR_REASON_POLICY_INGRESS => Some(Direction::Ingress),
                _ => None,
            },
            l7: false,
        },
        _ => Verdict {
            allowed: true,
            rules: rule.into_iter().collect(),
            denied_in: None,
            l7: false,
        },
    };
    let mut flow = Flow::with_peers(
        &peers,
        (src.ip, u16::from_be(e.sport)),
        (dst.ip, u16::from_be(e.dport)),
        &verdict,
    );
    use weir_policy::flow::{Icmp, L4, Ports};
    flow.l4 = match e.protocol {
        17 => L4::Udp(Ports {
            source_port: u16::from_be(e.sport),
            destination_port: u16::from_be(e.dport),
        }),
        1 => L4::Icmpv4(Icmp {
            kind: icmp_type(e.sport, e.dport, 8, 0),
            code: 0,
        }),
        58 => L4::Icmpv6(Icmp {
            kind: icmp_type(e.sport, e.dport, 128, 129),
            code: 0,
        }),
        _ => flow.l4,
    };
    // The kernel reports a flow's first packet, and drops: a dropped reply (its
    // flow revoked) says so; of ICMP, an echo reply says it by its type.
    flow.is_reply = reply
        || matches!(
            flow.l4,
            L4::Icmpv4(Icmp { kind: 0, .. }) | L4::Icmpv6(Icmp { kind: 129, .. })
        );
    if kind == WEIR_EVENT_DROPPED
        && let Some(reason) = drop_reason(e.reason)
    {
        flow.drop_reason_desc = Some(reason.into());
        flow.summary = format!("dropped: {reason}");
    }
    if kind == WEIR_EVENT_REDIRECTED {
        flow.summary = "redirected to proxy".into();
    }
    Some(flow)
}

/// `drop_reason_desc` for the kernel's reasons other than policy (Hubble's names
/// where Hubble has one).
fn drop_reason(reason: u8) -> Option<&'static str> {
    Some(match reason {
        WEIR_REASON_NO_PROXY => "PROXY_UNAVAILABLE",
        WEIR_REASON_UNSUPPORTED_PROTOCOL => "UNSUPPORTED_L4_PROTOCOL",
        WEIR_REASON_SPOOFED_SOURCE => "SPOOFED_SOURCE",
        WEIR_REASON_FRAGMENT_WITHOUT_HEAD => "FRAGMENT_WITHOUT_HEAD",
        WEIR_REASON_ICMP_UNTRACKED => "ICMP_UNTRACKED",
        _ => return None,
    })
}

/// The ICMP type of a kernel event's "ports" (see l4_ports in redirect.bpf.c): a
/// request or other message carries its type in the destination port (an echo
/// request its identifier in the source port), an echo reply carries the
/// request's type in the source port.
fn icmp_type(sport: u16, dport: u16, echo_request: u8, echo_reply: u8) -> u8 {
    let (sport, dport) = (u16::from_be(sport), u16::from_be(dport));
    if sport == u16::from(echo_request) && dport != u16::from(echo_request) {
        echo_reply
    } else {
        u8::try_from(dport).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};
    use std::net::IpAddr;

    use weir_policy::identity::IdentityAllocator;

    use super::super::maps::ip_words;
    use super::*;

    const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: alliance-only}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: alliance}}]
";

    fn compile(endpoints: &str) -> Arc<CompiledPolicy> {
        let policies = weir_policy::parse_policies(POLICY, "p.yaml").unwrap();
        let eps = weir_policy::parse_endpoints(endpoints, "e.yaml").unwrap();
        Arc::new(
            CompiledPolicy::compile(&policies, &eps, &mut IdentityAllocator::default()).unwrap(),
        )
    }

    fn event(src: IpAddr, src_id: u32, dst: IpAddr, dst_id: u32, rule_id: u32) -> Vec<u8> {
        let mut raw = vec![0u8; size_of::<Event>()];
        let (s, family) = ip_words(src);
        let (d, _) = ip_words(dst);
        for (i, w) in s.iter().enumerate() {
            raw[offset_of!(Event, saddr) + 4 * i..][..4].copy_from_slice(&w.to_ne_bytes());
        }
        for (i, w) in d.iter().enumerate() {
            raw[offset_of!(Event, daddr) + 4 * i..][..4].copy_from_slice(&w.to_ne_bytes());
        }
        raw[offset_of!(Event, family)] = family as u8;
        raw[offset_of!(Event, protocol)] = 6;
        raw[offset_of!(Event, kind)] = WEIR_EVENT_ALLOWED;
        raw[offset_of!(Event, src_identity)..][..4].copy_from_slice(&src_id.to_ne_bytes());
        raw[offset_of!(Event, dst_identity)..][..4].copy_from_slice(&dst_id.to_ne_bytes());
        raw[offset_of!(Event, rule_id)..][..4].copy_from_slice(&rule_id.to_ne_bytes());
        raw
    }

    #[test]
    fn an_event_read_after_a_reload_names_the_peers_and_rule_that_decided_it() {
        let before = compile(
            "endpoints:
  - {name: deathstar, ips: [10.0.0.1], labels: {class: deathstar}}
  - {name: xwing, ips: [10.0.0.3], labels: {org: alliance, class: xwing}}
",
        );
        // The reload gives the xwing's address to a rebel of another org.
        let after = compile(
            "endpoints:
  - {name: deathstar, ips: [10.0.0.1], labels: {class: deathstar}}
  - {name: ywing, ips: [10.0.0.3], labels: {org: rebels, class: ywing}}
",
        );
        let xwing = before.endpoint_by_name("xwing").unwrap().identity;
        let deathstar = before.endpoint_by_name("deathstar").unwrap().identity;
        let (src, dst) = ("10.0.0.3".parse().unwrap(), "10.0.0.1".parse().unwrap());
        let rules = vec![
            None,
            Some(RuleRef {
                policy: "alliance-only".into(),
                rule: "spec.ingress[0]".into(),
            }),
        ];
        let node: Arc<str> = Arc::from("node");
        let mut recent = RecentPolicies::default();
        recent.observe(before.clone());
        recent.observe(after.clone());
        let flow = event_flow(
            &event(src, xwing, dst, deathstar, 1),
            &recent,
            &rules,
            &node,
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&flow.to_json_line()).unwrap();
        assert_eq!(json["source"]["pod_name"], "xwing", "{json}");
        assert_eq!(json["source"]["identity"], xwing);
        assert_eq!(json["policy"], "alliance-only spec.ingress[0]", "{json}");
        // A flow the new policy decided is named after the new one.
        let ywing = after.endpoint_by_name("ywing").unwrap().identity;
        let flow = event_flow(
            &event(src, ywing, dst, deathstar, 0),
            &recent,
            &rules,
            &node,
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&flow.to_json_line()).unwrap();
        assert_eq!(json["source"]["pod_name"], "ywing", "{json}");
        // Neither policy knows this identity at that address: no name is made up.
        let flow =
            event_flow(&event(src, 4242, dst, deathstar, 0), &recent, &rules, &node).unwrap();
        let json: serde_json::Value = serde_json::from_str(&flow.to_json_line()).unwrap();
        assert!(json["source"]["pod_name"].is_null(), "{json}");
        assert_eq!(json["source"]["identity"], 4242);
    }

    /// Kernel records carry Hubble's traffic_direction (the deciding rule's,
    /// else the local endpoint's side) and is_reply (an ICMP echo reply, or a
    /// reply the kernel dropped).
    #[test]
    fn kernel_records_carry_direction_and_reply() {
        let policy = compile(
            "endpoints:
  - {name: deathstar, ips: [10.0.0.1], labels: {class: deathstar}}
  - {name: xwing, ips: [10.0.0.3], labels: {org: alliance, class: xwing}}
",
        );
        let xwing = policy.endpoint_by_name("xwing").unwrap().identity;
        let deathstar = policy.endpoint_by_name("deathstar").unwrap().identity;
        let (x, d): (IpAddr, IpAddr) = ("10.0.0.3".parse().unwrap(), "10.0.0.1".parse().unwrap());
        let rules = vec![
            None,
            Some(RuleRef {
                policy: "alliance-only".into(),
                rule: "spec.ingress[0]".into(),
            }),
        ];
        let node: Arc<str> = Arc::from("node");
        let mut recent = RecentPolicies::default();
        recent.observe(policy);
        let json = |raw: Vec<u8>| -> serde_json::Value {
            let f = event_flow(&raw, &recent, &rules, &node).unwrap();
            serde_json::from_str(&f.to_json_line()).unwrap()
        };
        let allowed = json(event(x, xwing, d, deathstar, 1));
        assert_eq!(allowed["traffic_direction"], "INGRESS", "{allowed}");
        assert_eq!(allowed["is_reply"], false);
        // From the deathstar to the world, no rule: the source's egress.
        let out = json(event(d, deathstar, "192.0.2.1".parse().unwrap(), 2, 0));
        assert_eq!(out["traffic_direction"], "EGRESS", "{out}");
        // An echo reply (type 0; the request's type 8 in the source port).
        let mut reply = event(d, deathstar, x, xwing, 0);
        reply[offset_of!(Event, protocol)] = 1;
        reply[offset_of!(Event, sport)..][..2].copy_from_slice(&8u16.to_be_bytes());
        reply[offset_of!(Event, dport)..][..2].copy_from_slice(&77u16.to_be_bytes());
        let reply = json(reply);
        assert_eq!(reply["l4"]["ICMPv4"]["type"], 0, "{reply}");
        assert_eq!(reply["is_reply"], true, "{reply}");
        // A reply the kernel dropped (its flow revoked): the flag in the kind.
        let mut dropped = event(d, deathstar, x, xwing, 0);
        dropped[offset_of!(Event, kind)] = WEIR_EVENT_DROPPED | WEIR_EVENT_F_REPLY;
        dropped[offset_of!(Event, reason)] = WEIR_REASON_POLICY_INGRESS;
        let dropped = json(dropped);
        assert_eq!(dropped["verdict"], "DROPPED", "{dropped}");
        assert_eq!(dropped["is_reply"], true, "{dropped}");
        assert_eq!(allowed["is_reply"], false);
    }
}
