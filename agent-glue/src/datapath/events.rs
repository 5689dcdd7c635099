//! The kernel's verdict events (ring buffer) → flow records.

use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tracing::{error, warn};
use weir_policy::flow::{Flow, FlowPeers};
use weir_policy::{CompiledPolicy, Direction, RuleRef, Verdict};
use weir_proxy::Shared;

use super::maps::{Event, ip_from_words};

/// Drains the ring buffer into the flow log until the process ends.
pub async fn drain(
    ring: RingBuf<MapData>,
    shared: Arc<Shared>,
    rules: Arc<arc_swap::ArcSwap<Vec<RuleRef>>>,
) {
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
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                error!(error = %e, "eBPF event ring buffer failed");
                return;
            }
        };
        let policy = shared.policy.load();
        let rules = rules.load();
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if let Some(flow) = event_flow(&item, &policy, &rules, &shared.node_name) {
                shared.flows.emit(&flow);
            }
        }
        guard.clear_ready();
    }
}

/// Turns one kernel event into a flow record.
pub fn event_flow(
    raw: &[u8],
    policy: &CompiledPolicy,
    rules: &[RuleRef],
    node_name: &Arc<str>,
) -> Option<Flow> {
    if raw.len() < std::mem::size_of::<Event>() {
        warn!(len = raw.len(), "short verdict event");
        return None;
    }
    // SAFETY: the length was checked above, `Event` is a repr(C) struct of integers
    // (any byte pattern is valid), and read_unaligned copes with any alignment.
    let e: Event = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast::<Event>()) };
    let src = policy.peer_info(ip_from_words(e.saddr, e.family));
    let dst = policy.peer_info(ip_from_words(e.daddr, e.family));
    let peers = FlowPeers::new(policy, &src, &dst, node_name.clone());
    let rule = rules.get(e.rule_id as usize).cloned();
    let verdict = match e.kind {
        // A drop names its rule only when a deny rule decided it.
        2 => Verdict {
            allowed: false,
            rules: rule.into_iter().collect(),
            denied_in: match e.reason {
                1 => Some(Direction::Egress),
                2 => Some(Direction::Ingress),
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
    if e.protocol == 17 {
        flow.l4 = weir_policy::flow::L4::Udp(weir_policy::flow::Ports {
            source_port: u16::from_be(e.sport),
            destination_port: u16::from_be(e.dport),
        });
    }
    match (e.kind, e.reason) {
        (2, 3) => flow.drop_reason_desc = Some("PROXY_UNAVAILABLE".into()),
        (2, 4) => flow.drop_reason_desc = Some("UNSUPPORTED_L4_PROTOCOL".into()),
        (3, _) => flow.summary = "redirected to proxy".into(),
        _ => {}
    }
    Some(flow)
}
