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
    rules: Arc<arc_swap::ArcSwap<Vec<RuleRef>>>,
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
    loop {
        tokio::select! {
            ready = fd.readable_mut() => match ready {
                Ok(mut guard) => {
                    read_all(guard.get_inner_mut(), &shared, &rules, &mut batch);
                    guard.clear_ready();
                }
                Err(e) => {
                    error!(error = %e, "eBPF event ring buffer failed");
                    return;
                }
            },
            _ = tick.tick() => read_all(fd.get_mut(), &shared, &rules, &mut batch),
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

fn read_all(
    ring: &mut RingBuf<MapData>,
    shared: &Shared,
    rules: &arc_swap::ArcSwap<Vec<RuleRef>>,
    out: &mut Vec<Flow>,
) {
    let policy = shared.policy.load();
    let rules = rules.load();
    while let Some(item) = ring.next() {
        out.extend(event_flow(&item, &policy, &rules, &shared.node_name));
    }
}

/// Turns one kernel event into a flow record.
pub fn event_flow(
    raw: &[u8],
    policy: &CompiledPolicy,
    rules: &[RuleRef],
    node_name: &Arc<str>,
) -> Option<Flow> {
    let Some(e) = Event::from_bytes(raw) else {
        warn!(len = raw.len(), "short verdict event");
        return None;
    };
    // The identities the kernel decided with: an address that claims an endpoint
    // from the wrong interface is not that endpoint, and the node is the host.
    let peer = |words, identity| {
        let p = policy.peer_info(ip_from_words(words, e.family));
        if p.identity == identity {
            p
        } else {
            weir_policy::PeerInfo {
                ip: p.ip,
                identity,
                endpoint: None,
            }
        }
    };
    let src = peer(e.saddr, e.src_identity);
    let dst = peer(e.daddr, e.dst_identity);
    let peers = FlowPeers::new(policy, &src, &dst, node_name.clone());
    let rule = rules.get(e.rule_id as usize).cloned();
    let verdict = match e.kind {
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
    if e.kind == WEIR_EVENT_DROPPED
        && let Some(reason) = drop_reason(e.reason)
    {
        flow.drop_reason_desc = Some(reason.into());
        flow.summary = format!("dropped: {reason}");
    }
    if e.kind == WEIR_EVENT_REDIRECTED {
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
