//! Accept loop: original destination, source endpoint, L3/L4 verdict, dispatch.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};
use weir_policy::canonical_ip;
use weir_policy::flow::FlowVerdict;

use crate::context::{ConnContext, is_unspecified_or_local};
use crate::detect::{self, Detected, Replay, Undecided};
use crate::flows::metrics::ConnProtocol;
use crate::socket::UpstreamSource;
use crate::{Shared, http, socket, tcp};

/// Binds the transparent listeners: IPv4 always, IPv6 when the host has it.
pub fn bind(port: u16) -> io::Result<Vec<TcpListener>> {
    let v4 = socket::transparent_tcp_listener(
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
        1024,
    )?;
    let mut out = vec![v4];
    match socket::transparent_tcp_listener(
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
        1024,
    ) {
        Ok(v6) => out.push(v6),
        Err(e) => warn!(error = %e, "no IPv6 transparent listener; IPv6 flows cannot be proxied"),
    }
    Ok(out)
}

/// Serves connections from all listeners until the task is dropped.
pub async fn serve(shared: Arc<Shared>, listeners: Vec<TcpListener>) {
    let mut tasks = JoinSet::new();
    for l in listeners {
        tasks.spawn(accept_loop(shared.clone(), l));
    }
    while tasks.join_next().await.is_some() {}
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let accepted = tokio::time::Instant::now();
                let Some(slot) = ConnSlot::take(&shared) else {
                    // Closed at once: the proxy never holds more than it may.
                    drop(stream);
                    warn_full(&shared, peer);
                    continue;
                };
                let orig_dst = match stream.local_addr() {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, %peer, "no original destination; closing");
                        continue;
                    }
                };
                let span = info_span!("conn", client = %peer, dst = %orig_dst);
                let shared = shared.clone();
                tokio::spawn(
                    async move {
                        handle(shared, stream, peer, orig_dst, accepted).await;
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One of `max_connections` client connections, given back on drop.
struct ConnSlot(Arc<Shared>);

impl ConnSlot {
    fn take(shared: &Arc<Shared>) -> Option<ConnSlot> {
        let held = shared.client_conns.fetch_add(1, Ordering::Relaxed);
        if held >= shared.config.max_connections {
            shared.client_conns.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnSlot(shared.clone()))
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.client_conns.fetch_sub(1, Ordering::Relaxed);
    }
}

/// "Too many connections", at most once a second.
fn warn_full(shared: &Shared, peer: SocketAddr) {
    let now = u64::try_from(shared.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let next = shared.next_full_warning_ms.load(Ordering::Relaxed);
    if now >= next
        && shared
            .next_full_warning_ms
            .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        warn!(
            %peer,
            max = shared.config.max_connections,
            "too many client connections; new connections are closed at once"
        );
    }
}

async fn handle(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    client: SocketAddr,
    accepted_on: SocketAddr,
    accepted: Instant,
) {
    let client = canonical(client);
    let orig_dst = canonical(accepted_on);
    let mut ctx = ConnContext::new(shared, client, orig_dst);
    // IPv6 link-local addresses are only local with their interface.
    let scoped_dst = match (orig_dst, accepted_on) {
        (SocketAddr::V6(d), SocketAddr::V6(a)) => {
            SocketAddr::V6(SocketAddrV6::new(*d.ip(), d.port(), 0, a.scope_id()))
        }
        _ => orig_dst,
    };
    if orig_dst.port() == ctx.shared.config.proxy_port
        && (is_unspecified_or_local(orig_dst.ip()) || socket::is_local_address(scoped_dst))
    {
        refuse_loop(&ctx);
        return;
    }
    let d = ctx.decide();
    // A destination on the node itself is reached from the node's address: its
    // replies would not come back to a socket bound to the client's.
    if matches!(ctx.upstream_source, UpstreamSource::Client(..))
        && d.verdict.dst.endpoint.is_none()
        && socket::is_local_address(scoped_dst)
    {
        ctx.upstream_source = UpstreamSource::Node;
    }
    let deadline = accepted + ctx.shared.config.request_head_timeout;
    let _ = stream.set_nodelay(true);
    let ctx = Arc::new(ctx);
    let cv = &d.verdict;
    if !cv.l4_allowed() {
        let verdict = cv.l4_verdict();
        info!(reason = %verdict.reason(), "denied at L3/L4");
        match detect::detect(&mut stream, deadline).await {
            // HTTP clients get a 403 per request, which says more than a reset.
            Ok((kind @ (Detected::Http1 | Detected::Http2), head)) => {
                let _open = conn_metrics(&ctx).open(ConnProtocol::Http);
                http::serve(ctx, Replay::new(head, stream), kind, deadline).await;
            }
            other => {
                drop(conn_metrics(&ctx).open(ConnProtocol::Tcp));
                ctx.shared.flows.emit(ctx.flow(&d, &verdict));
                debug!(detected = ?other.map(|(k, _)| k), "closing denied non-HTTP connection");
            }
        }
        return;
    }
    if cv.needs_dns() {
        let _open = conn_metrics(&ctx).open(ConnProtocol::Dns);
        crate::dns::tcp::serve(ctx, stream).await;
        return;
    }
    if cv.needs_kafka() {
        let _open = conn_metrics(&ctx).open(ConnProtocol::Kafka);
        crate::kafka::serve(ctx, stream).await;
        return;
    }
    if cv.needs_l7() {
        match detect::detect(&mut stream, deadline).await {
            // Not HTTP at all: hyper answers 400.
            Ok((kind, head)) => {
                let _open = conn_metrics(&ctx).open(ConnProtocol::Http);
                http::serve(ctx, Replay::new(head, stream), kind, deadline).await
            }
            Err(Undecided::Timeout) => {
                debug!("no request head by the request-head deadline; closing");
            }
            Err(Undecided::Closed) => debug!("client closed before sending anything"),
            Err(Undecided::Io(e)) => debug!(error = %e, "client connection failed"),
        }
    } else {
        let verdict = cv.l4_verdict();
        ctx.shared.flows.emit(ctx.flow(&d, &verdict));
        let _open = conn_metrics(&ctx).open(ConnProtocol::Tcp);
        tcp::splice(&ctx, stream).await;
    }
}

/// The connection counters (moved here, not from the flow records: a
/// connection's records come per request, or not at all).
fn conn_metrics(ctx: &ConnContext) -> &crate::flows::metrics::ConnMetrics {
    &ctx.shared.flows.bus().metrics().conns
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(a.ip()), a.port())
}

/// A connection to the proxy port on one of the node's own addresses was not
/// steered here: it is addressed to the proxy itself, and forwarding it would
/// connect to the proxy again, and again.
fn refuse_loop(ctx: &ConnContext) {
    const WHY: &str = "addressed to the proxy port on a node address; forwarding would loop";
    info!("connection {WHY}: closing");
    let d = ctx.decide();
    let mut f = ctx.flow(&d, &d.verdict.l4_verdict());
    f.verdict = FlowVerdict::Dropped;
    f.drop_reason_desc = Some("PROXY_LOOP".into());
    f.policy = WHY.into();
    ctx.shared.flows.emit(f);
}
