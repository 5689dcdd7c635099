//! UDP: the transparent listener and per-flow sessions.
//!
//! The first datagram of a flow (client address and port → original destination)
//! arrives on the listener, which reports where it was going. If policy allows the
//! flow, a session opens two sockets: one bound to the original destination and
//! connected to the client (the steering finds it for the flow's later datagrams,
//! and replies leave from the address the client asked), and one connected to the
//! server from the client's own address (with the upstream mark) so the server
//! sees the real client. The session ends after `udp_idle_timeout` of silence.
//!
//! A flow policy denies is remembered for the same time, so its datagrams are
//! dropped (one flow record, not one per datagram). A flow whose port has DNS
//! rules gets a DNS session ([`crate::dns::udp`]) on the same two sockets, which
//! decides every query; a UDP flow with HTTP rules is refused, never forwarded
//! unchecked.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, debug_span, info, info_span, warn};
use weir_policy::flow::{Flow, FlowVerdict};
use weir_policy::{Protocol, canonical_ip};

use crate::context::{ConnContext, Decision, is_unspecified_or_local};
use crate::udp_socket::UdpSessionSocket;
use crate::{Shared, socket};

/// The largest UDP payload (IPv4 and IPv6 without jumbograms).
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams queued for a session while it is busy; more are dropped, as UDP may.
const SESSION_QUEUE: usize = 64;

/// Binds the transparent UDP listeners: IPv4 always, IPv6 when the host has it.
pub fn bind(port: u16) -> io::Result<Vec<UdpSocket>> {
    let v4 = socket::transparent_udp_listener(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))?;
    let mut out = vec![v4];
    match socket::transparent_udp_listener(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)) {
        Ok(v6) => out.push(v6),
        Err(e) => warn!(error = %e, "no IPv6 UDP listener; IPv6 UDP flows cannot be proxied"),
    }
    Ok(out)
}

type FlowKey = (SocketAddr, SocketAddr);

enum Entry {
    /// An open session (and its number, so that only it removes itself):
    /// datagrams for it go through its queue.
    Open(mpsc::Sender<Vec<u8>>, u64),
    /// This policy denied the flow; drop its datagrams until then (or until the
    /// policy changes).
    Denied(Instant, Arc<weir_policy::CompiledPolicy>),
}

/// Open and recently denied flows of this listener set, with counts kept as they
/// change (a flood of new flows must not cost a scan of the table each).
#[derive(Default)]
struct Flows {
    table: Mutex<FlowTable>,
}

#[derive(Default)]
struct FlowTable {
    entries: HashMap<FlowKey, Entry>,
    open: usize,
    /// Open sessions per client address (see [`client_share`]).
    open_per_client: HashMap<IpAddr, usize>,
    denied: usize,
    /// Expired denials are swept at most once a second (or when the table is full).
    next_sweep: Option<Instant>,
    /// "Too many sessions" is logged at most once a second.
    next_full_warning: Option<Instant>,
    /// Numbers sessions.
    next_id: u64,
}

impl Flows {
    fn lock(&self) -> std::sync::MutexGuard<'_, FlowTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl FlowTable {
    fn insert(&mut self, key: FlowKey, entry: Entry) {
        match &entry {
            Entry::Open(..) => {
                self.open += 1;
                *self.open_per_client.entry(key.0.ip()).or_default() += 1;
            }
            Entry::Denied(..) => self.denied += 1,
        }
        if let Some(old) = self.entries.insert(key, entry) {
            self.forget(&key, &old);
        }
    }

    /// Removes session `id`'s entry (not a newer one for the same flow).
    fn remove_session(&mut self, key: &FlowKey, id: u64) {
        if matches!(self.entries.get(key), Some(Entry::Open(_, i)) if *i == id) {
            self.remove(key);
        }
    }

    fn remove(&mut self, key: &FlowKey) {
        if let Some(old) = self.entries.remove(key) {
            self.forget(key, &old);
        }
    }

    fn forget(&mut self, key: &FlowKey, old: &Entry) {
        match old {
            Entry::Open(..) => {
                self.open -= 1;
                let ip = key.0.ip();
                if let Some(n) = self.open_per_client.get_mut(&ip) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.open_per_client.remove(&ip);
                    }
                }
            }
            Entry::Denied(..) => self.denied -= 1,
        }
    }

    /// Whether a new session from `client` fits: at most `max` in all, and at
    /// most [`client_share`] of them from one client address.
    fn room_for(&self, client: IpAddr, max: usize) -> Result<(), &'static str> {
        if self.open >= max {
            return Err("too many UDP sessions; new flows' datagrams are dropped");
        }
        if self.open_per_client.get(&client).copied().unwrap_or(0) >= client_share(max) {
            return Err(
                "too many UDP sessions from this client address; its new flows' datagrams are dropped",
            );
        }
        Ok(())
    }

    /// Remembers a denial, unless `cap` denials are remembered already.
    fn deny(
        &mut self,
        key: FlowKey,
        until: Instant,
        policy: Arc<weir_policy::CompiledPolicy>,
        cap: usize,
    ) {
        let now = Instant::now();
        if self.next_sweep.is_none_or(|t| now >= t) || self.denied >= cap {
            self.entries
                .retain(|_, e| !matches!(e, Entry::Denied(t, _) if *t <= now));
            self.denied = self.entries.len() - self.open;
            self.next_sweep = Some(now + Duration::from_secs(1));
        }
        if self.denied < cap || matches!(self.entries.get(&key), Some(Entry::Denied(..))) {
            self.insert(key, Entry::Denied(until, policy));
        }
    }

    fn warn_full(&mut self) -> bool {
        let now = Instant::now();
        let due = self.next_full_warning.is_none_or(|t| now >= t);
        if due {
            self.next_full_warning = Some(now + Duration::from_secs(1));
        }
        due
    }
}

/// The sessions one client address may hold: a quarter of `--udp-max-sessions`
/// (at least one), so one pod opening flows as fast as it can leaves room for
/// at least three others. A DNS client using a new port per query at 1 000
/// queries/s holds about 250 sessions (see `dns::udp`), well within a quarter
/// of the default 8 192.
fn client_share(max: usize) -> usize {
    (max / 4).max(1)
}

/// Serves every UDP listener until the task is dropped.
pub async fn serve(shared: Arc<Shared>, sockets: Vec<UdpSocket>) {
    let flows = Arc::new(Flows::default());
    let mut tasks = JoinSet::new();
    for s in sockets {
        tasks.spawn(receive_loop(shared.clone(), flows.clone(), s));
    }
    while tasks.join_next().await.is_some() {}
}

async fn receive_loop(shared: Arc<Shared>, flows: Arc<Flows>, listener: UdpSocket) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let got = listener
            .async_io(Interest::READABLE, || {
                socket::recv_with_orig_dst(&listener, &mut buf)
            })
            .await;
        let r = match got {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "UDP receive failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let client = SocketAddr::new(canonical_ip(r.source.ip()), r.source.port());
        let Some(orig_dst) = r.orig_dst else {
            debug!(%client, "datagram without an original destination; dropped");
            continue;
        };
        let scoped_dst = orig_dst;
        let orig_dst = SocketAddr::new(canonical_ip(orig_dst.ip()), orig_dst.port());
        if r.truncated {
            info!(%client, dst = %orig_dst, "datagram larger than 64 KiB; dropped");
            continue;
        }
        if orig_dst.port() == shared.config.proxy_port
            && (is_unspecified_or_local(orig_dst.ip()) || socket::is_local_address(scoped_dst))
        {
            debug!(%client, dst = %orig_dst, "datagram addressed to the proxy port on a node address; dropped (forwarding would loop)");
            continue;
        }
        dispatch(
            &shared,
            &flows,
            client,
            (orig_dst, scoped_dst),
            buf[..r.len].to_vec(),
        );
    }
}

/// Hands a datagram to its flow's session, opening one if policy allows.
fn dispatch(
    shared: &Arc<Shared>,
    flows: &Arc<Flows>,
    client: SocketAddr,
    (orig_dst, scoped_dst): (SocketAddr, SocketAddr),
    datagram: Vec<u8>,
) {
    let key = (client, orig_dst);
    let mut map = flows.lock();
    match map.entries.get(&key) {
        Some(Entry::Open(queue, _)) => {
            if queue.try_send(datagram).is_err() {
                debug!(%client, dst = %orig_dst, "session queue full; datagram dropped");
            }
            return;
        }
        Some(Entry::Denied(until, policy))
            if *until > Instant::now() && Arc::ptr_eq(policy, &shared.policy.load()) =>
        {
            return;
        }
        _ => {}
    }
    let mut ctx = ConnContext::with_protocol(shared.clone(), client, orig_dst, Protocol::Udp);
    let d = ctx.decide();
    let idle = shared.config.udp_idle_timeout;
    if let Some(flow) = refusal(&ctx, &d) {
        info!(%client, dst = %orig_dst, reason = %flow.policy, "UDP flow denied");
        shared.flows.emit(flow);
        let cap = 2 * shared.config.udp_max_sessions;
        map.deny(key, Instant::now() + idle, d.policy.clone(), cap);
        return;
    }
    if let Err(why) = map.room_for(client.ip(), shared.config.udp_max_sessions) {
        if map.warn_full() {
            warn!(
                %client, dst = %orig_dst, max = shared.config.udp_max_sessions,
                per_client = client_share(shared.config.udp_max_sessions),
                "{why}"
            );
        }
        return;
    }
    // A destination on the node itself answers from the node: its replies would
    // not come back to a socket bound to the client's address.
    if d.verdict.dst.endpoint.is_none() && socket::is_local_address(scoped_dst) {
        ctx.upstream_source = socket::UpstreamSource::Node;
    }
    let dns = d.verdict.needs_dns();
    let session = match Session::open(&ctx, dns) {
        Ok(s) => s,
        Err(e) => {
            warn!(%client, dst = %orig_dst, error = %e, "cannot open UDP session; datagram dropped");
            return;
        }
    };
    // A DNS flow's records are per query (the DNS session writes them).
    if !dns {
        shared.flows.emit(ctx.flow(&d, &d.verdict.l4_verdict()));
    }
    let (tx, rx) = mpsc::channel(SESSION_QUEUE);
    let _ = tx.try_send(datagram);
    map.next_id += 1;
    let id = map.next_id;
    map.insert(key, Entry::Open(tx, id));
    drop(map);
    let slot = SessionSlot {
        flows: flows.clone(),
        key,
        id,
    };
    if dns {
        // At debug level, with the target of the session's events: every
        // event a DNS session logs is a debug one, and an enabled span costs
        // its entry and exit on every poll — 2 % of the CPU per query at
        // 10 000 q/s (tests/perf/dns.sh) for nothing at the default level.
        let span = debug_span!(target: "weir_proxy::dns", "dns-udp", %client, dst = %orig_dst);
        let Session {
            downstream,
            upstream,
            _counted: counted,
        } = session;
        tokio::spawn(
            async move {
                crate::dns::udp::run(downstream, upstream, ctx, rx, slot).await;
                // A draining weir waits for its DNS sessions too.
                drop(counted);
            }
            .instrument(span),
        );
        return;
    }
    let span = info_span!("udp", %client, dst = %orig_dst);
    tokio::spawn(
        async move {
            session.run(ctx, rx, idle, &slot).await;
            drop(slot);
        }
        .instrument(span),
    );
}

/// A session's place in the flow table, given up on drop (or earlier, by
/// [`SessionSlot::close_if_quiet`]).
pub(crate) struct SessionSlot {
    flows: Arc<Flows>,
    key: FlowKey,
    id: u64,
}

impl SessionSlot {
    /// Gives up the session's place if no datagram waits for it (none queued,
    /// none in its socket): a datagram arriving later opens a new session (or,
    /// after a takeover, reaches the new weir) rather than being lost to one that
    /// is closing. Returns whether it did.
    ///
    /// The socket is released first ([`socket::udp_release`]): neither steering
    /// hands datagrams to it any more, so from that instant the flow's go to the listener
    /// (and, while our table entry still stands, back into `queued`). Anything
    /// that arrived before is then in the socket, and the session connects
    /// again and carries on — so no datagram is ever left in a socket that is
    /// about to close.
    pub(crate) fn close_if_quiet(
        &self,
        queued: &mut mpsc::Receiver<Vec<u8>>,
        downstream: &UdpSessionSocket,
    ) -> bool {
        // The table's lock is what `dispatch` holds while it queues.
        let mut map = self.flows.lock();
        if !queued.is_empty() || socket_has_datagram(downstream) {
            return false;
        }
        if socket::udp_release(downstream, self.key.0.is_ipv6()).is_err() {
            // Cannot tell where the next datagram goes: keep the session.
            let _ = socket::udp_reclaim(downstream, self.key.0);
            return false;
        }
        if socket_has_datagram(downstream) || !queued.is_empty() {
            if let Err(e) = socket::udp_reclaim(downstream, self.key.0) {
                // Unconnected, it would answer no one: end it; what it held
                // is the client's to retry.
                warn!(error = %e, client = %self.key.0, dst = %self.key.1, "could not reconnect a UDP session socket; session closed");
                queued.close();
                map.remove_session(&self.key, self.id);
                return true;
            }
            return false;
        }
        queued.close();
        map.remove_session(&self.key, self.id);
        true
    }
}

/// A datagram waits in `socket` (it is non-blocking: an empty queue is `WouldBlock`).
fn socket_has_datagram(socket: &UdpSessionSocket) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    socket2::SockRef::from(socket.get_ref())
        .peek(&mut probe)
        .is_ok()
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.flows.lock().remove_session(&self.key, self.id);
    }
}

struct Session {
    /// Bound to the original destination, connected to the client.
    downstream: UdpSessionSocket,
    /// Connected to the original destination (from the client's address when the
    /// steering returns replies to the proxy).
    upstream: UdpSessionSocket,
    /// Counted in [`Shared::udp_sessions`] while the session lives (a draining
    /// weir waits for it).
    _counted: SessionCount,
}

struct SessionCount(Arc<Shared>);

impl SessionCount {
    fn new(shared: &Arc<Shared>) -> SessionCount {
        shared.udp_sessions.fetch_add(1, Ordering::Relaxed);
        shared.flows.bus().metrics().conns.udp_sessions.inc();
        SessionCount(shared.clone())
    }
}

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.udp_sessions.fetch_sub(1, Ordering::Relaxed);
        self.0.flows.bus().metrics().conns.udp_sessions.dec();
    }
}

impl Session {
    /// The two sockets of a session; a DNS session's upstream socket reports
    /// reassembled datagrams (answers in IP fragments are not trusted: see
    /// `dns::distrust_reassembled`).
    fn open(ctx: &ConnContext, dns: bool) -> io::Result<Session> {
        let downstream =
            UdpSessionSocket::new(socket::udp_session_socket(ctx.orig_dst, ctx.client, None)?)?;
        let upstream = match ctx.upstream_source {
            socket::UpstreamSource::Client(_, mark) => {
                socket::udp_session_socket(ctx.client, ctx.orig_dst, Some(mark))?
            }
            socket::UpstreamSource::Node => {
                let any = if ctx.orig_dst.is_ipv6() {
                    SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0)
                } else {
                    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0)
                };
                let s = std::net::UdpSocket::bind(any)?;
                s.connect(ctx.orig_dst)?;
                s
            }
        };
        if dns {
            socket::report_reassembly(&upstream, ctx.orig_dst.is_ipv6())?;
        }
        let upstream = UdpSessionSocket::new(upstream)?;
        Ok(Session {
            downstream,
            upstream,
            _counted: SessionCount::new(&ctx.shared),
        })
    }

    async fn run(
        self,
        ctx: ConnContext,
        mut queued: mpsc::Receiver<Vec<u8>>,
        idle: Duration,
        slot: &SessionSlot,
    ) {
        let mut from_client = vec![0u8; MAX_DATAGRAM];
        let mut from_server = vec![0u8; MAX_DATAGRAM];
        let (mut up, mut down) = (0u64, 0u64);
        let mut draining = ctx.shared.draining();
        // Datagrams sent to the server since its last reply.
        let mut in_flight = 0u64;
        loop {
            // Another weir took over: end between an answer and the client's
            // next datagram, which then reaches the new weir's listener; nothing
            // of this flow is lost.
            if *draining.borrow()
                && in_flight == 0
                && slot.close_if_quiet(&mut queued, &self.downstream)
            {
                debug!(
                    bytes_up = up,
                    bytes_down = down,
                    "handed over; UDP session closed between datagrams"
                );
                return;
            }
            let step = tokio::time::timeout(idle, async {
                tokio::select! {
                    // Wakes the loop for the check above.
                    Ok(()) = draining.changed() => Ok((0, 0)),
                    Some(d) = queued.recv() => self.forward_to_server(&ctx, &d).await.map(|n| (n, 0)),
                    r = self.downstream.recv(&mut from_client) => match r {
                        Ok(n) => self.forward_to_server(&ctx, &from_client[..n]).await.map(|n| (n, 0)),
                        Err(e) => Err(e),
                    },
                    r = self.upstream.recv(&mut from_server) => match r {
                        Ok(n) => self.downstream.send(&from_server[..n]).await.map(|n| (0, n)),
                        Err(e) => Err(e),
                    },
                }
            })
            .await;
            match step {
                Err(_) => {
                    debug!(bytes_up = up, bytes_down = down, "UDP session idle; closed");
                    return;
                }
                Ok(Ok((u, d))) => {
                    up += u as u64;
                    down += d as u64;
                    if d > 0 {
                        in_flight = 0;
                    } else if u > 0 {
                        in_flight += 1;
                    }
                }
                // ICMP errors (port unreachable) surface here as ECONNREFUSED and
                // the like: the peer is not there, but a later datagram may be.
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    debug!(error = %e, "UDP peer unreachable");
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::PermissionDenied => {
                    info!("UDP flow no longer allowed by policy; session closed");
                    return;
                }
                Ok(Err(e)) => {
                    debug!(error = %e, "UDP session error; closed");
                    return;
                }
            }
        }
    }

    /// Sends a client datagram on, if the policy in force still allows the flow.
    async fn forward_to_server(&self, ctx: &ConnContext, datagram: &[u8]) -> io::Result<usize> {
        if ctx.shared.superseded() {
            return Err(io::Error::other(
                "this weir has handed over and its policy is stale; datagram dropped",
            ));
        }
        let d = ctx.decide();
        if let Some(flow) = refusal(ctx, &d) {
            ctx.shared.flows.emit(flow);
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        // The port has DNS rules now: this plain session must not forward
        // unchecked; closing it lets the next datagram open a DNS session.
        if d.verdict.needs_dns() {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.upstream.send(datagram).await
    }
}

/// The flow record refusing a UDP flow, or `None` when policy allows it as plain
/// UDP or with DNS rules (a DNS session checks every query). A port with HTTP
/// rules is refused: they cannot apply to datagrams, and forwarding unchecked
/// would ignore them.
fn refusal(ctx: &ConnContext, d: &Decision) -> Option<Flow> {
    let verdict = d.verdict.l4_verdict();
    if !d.verdict.l4_allowed() {
        return Some(ctx.flow(d, &verdict));
    }
    if !d.verdict.needs_l7() || d.verdict.needs_dns() {
        return None;
    }
    let mut flow = ctx.flow(d, &verdict);
    flow.verdict = FlowVerdict::Dropped;
    flow.drop_reason_desc = Some("POLICY_DENIED".into());
    flow.policy = "the port has HTTP rules, which cannot apply to UDP".into();
    Some(flow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_policy::CompiledPolicy;
    use weir_policy::identity::IdentityAllocator;

    fn key(port: u16) -> FlowKey {
        (
            SocketAddr::from(([10, 0, 0, 2], port)),
            SocketAddr::from(([10, 0, 0, 1], 53)),
        )
    }

    #[test]
    fn the_flow_table_counts_what_it_holds_and_caps_denials() {
        let policy =
            Arc::new(CompiledPolicy::compile(&[], &[], &mut IdentityAllocator::default()).unwrap());
        let mut t = FlowTable::default();
        let (tx, _rx) = mpsc::channel(1);
        t.insert(key(1), Entry::Open(tx.clone(), 1));
        t.insert(key(2), Entry::Open(tx.clone(), 2));
        let later = Instant::now() + Duration::from_secs(60);
        t.deny(key(3), later, policy.clone(), 2);
        t.deny(key(4), later, policy.clone(), 2);
        // At the cap: a new denial is not remembered, a known one is renewed.
        t.deny(key(5), later, policy.clone(), 2);
        t.deny(key(4), later, policy.clone(), 2);
        assert_eq!((t.open, t.denied, t.entries.len()), (2, 2, 4));
        // A denied flow that is allowed now replaces its denial.
        t.insert(key(3), Entry::Open(tx.clone(), 3));
        // Only the session that holds the entry removes it.
        t.remove_session(&key(3), 99);
        assert_eq!((t.open, t.denied), (3, 1));
        t.remove_session(&key(3), 3);
        assert_eq!((t.open, t.denied), (2, 1));
        t.insert(key(3), Entry::Open(tx, 3));
        t.remove(&key(1));
        t.remove(&key(1));
        assert_eq!((t.open, t.denied), (2, 1));
        // Expired denials are swept when the cap is reached.
        let past = Instant::now();
        t.deny(key(6), past, policy.clone(), 2);
        std::thread::sleep(Duration::from_millis(5));
        t.deny(key(7), later, policy, 2);
        assert!(!t.entries.contains_key(&key(6)));
        assert_eq!(t.denied, t.entries.len() - t.open);
    }

    /// One client address gets at most a quarter of the sessions; others still
    /// find room (before, one pod could take them all).
    #[test]
    fn one_client_address_gets_at_most_a_share_of_the_sessions() {
        let mut t = FlowTable::default();
        let (tx, _rx) = mpsc::channel(1);
        let max = 8;
        let a: IpAddr = [10, 0, 0, 2].into();
        let b: IpAddr = [10, 0, 0, 3].into();
        for port in 1..=2 {
            assert_eq!(t.room_for(a, max), Ok(()));
            t.insert(key(port), Entry::Open(tx.clone(), u64::from(port)));
        }
        assert!(t.room_for(a, max).unwrap_err().contains("this client"));
        assert_eq!(t.room_for(b, max), Ok(()));
        // A session ending gives its client room again.
        t.remove_session(&key(1), 1);
        assert_eq!(t.room_for(a, max), Ok(()));
        // The node-wide cap still holds.
        for port in 0..7 {
            let k = (SocketAddr::from(([10, 0, 1, port], 1)), key(0).1);
            t.insert(k, Entry::Open(tx.clone(), 100 + u64::from(port)));
        }
        assert!(
            t.room_for(b, max)
                .unwrap_err()
                .starts_with("too many UDP sessions;")
        );
        assert_eq!(client_share(2), 1);
        assert_eq!(client_share(8192), 2048);
    }
}
