//! Plain TCP forwarding for flows that policy allows without L7 rules.
//!
//! A splice ends when either side has closed, when no byte has moved either way
//! for `tcp_idle_timeout`, or when a new policy no longer allows the connection
//! (it is decided again at every policy change): then both sides are closed.

use tokio::io::copy_bidirectional;
use tokio::net::TcpStream;
use tracing::{debug, info};
use weir_policy::flow::FlowVerdict;

use crate::context::ConnContext;
use crate::idle::{ActiveIo, Activity};

pub async fn splice(ctx: &ConnContext, client: TcpStream) {
    let timeout = ctx.shared.config.upstream_connect_timeout;
    // Subscribed before connecting: a policy change from now on is seen.
    let mut policy_changes = ctx.shared.policy_changes();
    // From the client's own address when steering brings the replies back.
    let connecting = crate::socket::connect_upstream_tcp(ctx.upstream_source, ctx.orig_dst);
    let upstream = tokio::time::timeout(timeout, connecting).await;
    let mut upstream = match upstream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(error = %e, "upstream connect failed; closing client");
            return;
        }
        Err(_) => {
            info!(?timeout, "upstream connect timed out; closing client");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    // Every byte either way is read from or written to the client side.
    let activity = Activity::new();
    let mut client = ActiveIo::new(client, activity.clone());
    let idle = ctx.shared.config.tcp_idle_timeout;
    let copy = copy_bidirectional(&mut client, &mut upstream);
    let mut copy = std::pin::pin!(copy);
    let mut check_at = activity.last() + idle;
    // The policy may have changed since the connection was decided (the check is
    // cheap when it has not: the decision is cached per policy).
    let mut changed = true;
    loop {
        if changed {
            changed = false;
            if let Some(why) = no_longer_allowed(ctx) {
                info!(reason = %why, "policy no longer allows this spliced connection; closing both sides");
                return;
            }
        }
        tokio::select! {
            r = copy.as_mut() => {
                match r {
                    Ok((up, down)) => debug!(bytes_up = up, bytes_down = down, "spliced connection closed"),
                    Err(e) => debug!(error = %e, "spliced connection ended with an error"),
                }
                return;
            }
            r = policy_changes.changed() => {
                // The sender lives as long as `Shared`; an error means shutdown.
                if r.is_err() {
                    return;
                }
                changed = true;
            }
            () = tokio::time::sleep_until(check_at) => {
                let quiet_until = activity.last() + idle;
                if quiet_until > tokio::time::Instant::now() {
                    check_at = quiet_until;
                } else {
                    info!(?idle, "spliced connection idle; closing both sides");
                    return;
                }
            }
        }
    }
}

/// Decides the connection again under the current policy. `Some(reason)` when it
/// is no longer allowed as a splice (denied at L3/L4, or its port now has L7
/// rules that a splice cannot apply); the DROPPED flow record is written here.
fn no_longer_allowed(ctx: &ConnContext) -> Option<String> {
    let d = ctx.decide();
    let cv = &d.verdict;
    if cv.l4_allowed() && !cv.needs_l7() {
        return None;
    }
    let mut f = ctx.flow(&d, &cv.l4_verdict());
    if cv.l4_allowed() {
        // Allowed at L3/L4 but now only with L7 rules: its requests were never
        // checked, so it does not go on unchecked.
        f.verdict = FlowVerdict::Dropped;
        f.drop_reason_desc = Some("POLICY_DENIED".into());
        f.policy = format!(
            "policy change: L7 rules now apply to this connection ({})",
            f.policy
        );
    } else {
        f.policy = format!("policy change: {}", f.policy);
    }
    f.summary = "spliced connection closed: the new policy no longer allows it".into();
    let why = f.policy.clone();
    ctx.shared.flows.emit(f);
    Some(why)
}
