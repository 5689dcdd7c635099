//! DNS over UDP: one session per client flow (4-tuple), opened by
//! [`crate::udp`] when the flow's port has DNS rules.
//!
//! Clients use a fresh source port for almost every query, so a session is
//! short-lived: it ends [`LINGER`] after its last query was answered (not after
//! the generic UDP idle timeout), which keeps the two sockets a session holds
//! from piling up: a stub resolver sending 1 000 queries/s from new ports keeps
//! about 250 sessions (500 sockets) open, and `udp_max_sessions` (8 192) caps
//! such clients at about 30 000 queries/s. Measured (debug build, e2e lab):
//! 2 000 queries from new ports at ~1 400/s left ~1 200 sessions open with a
//! 1 s linger, as expected; 2.5 s after the burst all were closed.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{Instrument, debug};

use super::{AnswerMatch, Outstanding, QueryAction};
use crate::context::ConnContext;
use crate::udp::SessionSlot;
use crate::udp_socket::UdpSessionSocket;

/// How long a session with nothing outstanding waits for another query from
/// the same client port before it closes. A stub resolver sends its A and AAAA
/// queries back to back (glibc) and retransmits only after a second or more; a
/// query after the session closed simply opens a new one.
pub const LINGER: Duration = Duration::from_millis(250);

const MAX_DATAGRAM: usize = 65_535;

thread_local! {
    /// Two receive buffers per worker thread rather than two 64 KiB buffers per
    /// session: a thousand short sessions would otherwise hold 128 MB.
    static RECV_BUFS: RefCell<[Vec<u8>; 2]> = RefCell::new([vec![0; MAX_DATAGRAM], vec![0; MAX_DATAGRAM]]);
}

/// One datagram as read.
pub(crate) struct Datagram {
    pub bytes: Vec<u8>,
    /// The kernel reassembled it from IP fragments (it says so on sockets that
    /// asked: [`crate::socket::report_reassembly`]).
    pub reassembled: bool,
}

/// The next datagram on `sock`, and the one after it if it was there already,
/// each copied out at its own size. Cancel-safe ([`UdpSessionSocket::read_with`]).
///
/// One `recvmmsg` for up to two: when only one comes back the socket is
/// empty, so its readiness is cleared as a read that would block clears it,
/// and the session waits for the next datagram instead of finding out with
/// a second read that returns EAGAIN — one system call per datagram fewer
/// (`tests/perf/dns.sh` counted 1.1 such reads per query). A datagram that
/// arrives after the read wakes the socket again (a new edge for epoll), so
/// none is left waiting.
async fn recv_datagrams(sock: &UdpSessionSocket) -> io::Result<(Datagram, Option<Datagram>)> {
    sock.read_with(|_| {
        let (first, second) = recv_two(sock)?;
        let drained = second.is_none();
        Ok(((first, second), drained))
    })
    .await
}

/// Reads one or two datagrams without waiting (`WouldBlock` when there is none).
fn recv_two(sock: &UdpSessionSocket) -> io::Result<(Datagram, Option<Datagram>)> {
    RECV_BUFS.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        let [a, b] = &mut *bufs;
        let [first, second] = crate::socket::recv_two(sock, a, b)?;
        let copy = |d: Option<crate::socket::Datagram>, buf: &[u8]| {
            d.and_then(|d| {
                buf.get(..d.len).map(|bytes| Datagram {
                    bytes: bytes.to_vec(),
                    reassembled: d.reassembled,
                })
            })
        };
        let first = copy(first, a).ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        Ok((first, copy(second, b)))
    })
}

/// Runs one DNS session until it has been quiet for [`LINGER`].
pub(crate) async fn run(
    downstream: UdpSessionSocket,
    upstream: UdpSessionSocket,
    ctx: ConnContext,
    mut queued: mpsc::Receiver<Vec<u8>>,
    slot: SessionSlot,
) {
    let ctx = Arc::new(ctx);
    let downstream = Arc::new(downstream);
    let mut outstanding = Outstanding::new(ctx.shared.config.dns_max_outstanding);
    let mut releases: JoinSet<()> = JoinSet::new();
    let mut quiet_since = Instant::now();
    let mut draining = ctx.shared.draining();
    // One timer for the session, moved only to an earlier deadline: a later one
    // (every query and answer moves the linger) is taken up when the timer
    // fires early. Registering a fresh timer per loop cost two timer-wheel
    // insertions and removals per query.
    let mut armed_at = quiet_since + LINGER;
    let sleep = tokio::time::sleep_until(armed_at.into());
    tokio::pin!(sleep);
    loop {
        let wake = outstanding.next_deadline().unwrap_or(quiet_since + LINGER);
        if wake < armed_at || sleep.is_elapsed() {
            armed_at = wake;
            sleep.as_mut().reset(wake.into());
        }
        let mut timer = false;
        tokio::select! {
            Some(d) = queued.recv() => {
                on_query(&ctx, &downstream, &upstream, &mut outstanding, releases.len(), &d).await;
            }
            r = recv_datagrams(&downstream) => match r {
                // (A client's query in fragments is its own to send: it is
                // decided whole, like any other.)
                Ok((d, next)) => {
                    on_query(&ctx, &downstream, &upstream, &mut outstanding, releases.len(), &d.bytes).await;
                    if let Some(d) = next {
                        on_query(&ctx, &downstream, &upstream, &mut outstanding, releases.len(), &d.bytes).await;
                    }
                }
                // The client's port is closed (ICMP for an answer sent there).
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    debug!("DNS client gone");
                }
                Err(e) => {
                    debug!(error = %e, "DNS client socket failed; session closed");
                    return;
                }
            },
            r = recv_datagrams(&upstream) => match r {
                Ok((d, next)) => {
                    on_answer(&ctx, &downstream, &mut outstanding, &mut releases, &d).await;
                    if let Some(d) = next {
                        on_answer(&ctx, &downstream, &mut outstanding, &mut releases, &d).await;
                    }
                }
                // ICMP port unreachable: nothing listens there; fail the queries
                // now rather than at their timeout.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    for p in outstanding.drain() {
                        if let Some(r) = super::servfail(&ctx, &p, "the resolver refused (ICMP unreachable)") {
                            to_client(&downstream, &r).await;
                        }
                    }
                }
                Err(e) => debug!(error = %e, "DNS upstream socket error"),
            },
            Some(_) = releases.join_next(), if !releases.is_empty() => {}
            Ok(()) = draining.changed(), if !*draining.borrow() => {}
            () = &mut sleep => {
                timer = true;
                let now = Instant::now();
                let why = super::upstream_timeout_reason(ctx.shared.config.dns_upstream_timeout);
                for p in outstanding.expire(now) {
                    if p.answered {
                        continue;
                    }
                    if let Some(r) = super::servfail(&ctx, &p, &why) {
                        to_client(&downstream, &r).await;
                    }
                }
            }
        }
        // Another weir took over: end between an answer and the client's next
        // query, which then reaches the new weir's listener.
        if *draining.borrow()
            && outstanding.is_empty()
            && releases.is_empty()
            && slot.close_if_quiet(&mut queued, &downstream)
        {
            debug!("handed over; DNS session closed between queries");
            return;
        }
        // Quiet means: nothing outstanding, and nothing but the timer happened.
        if !timer || !outstanding.is_empty() || !releases.is_empty() {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= LINGER && slot.close_if_quiet(&mut queued, &downstream) {
            debug!("DNS session done");
            return;
        }
    }
}

/// Sends an answer (or weir's own reply) to the client; a failure is logged
/// with the session's span (the client's address), not dropped unseen.
async fn to_client(downstream: &UdpSessionSocket, bytes: &[u8]) {
    if let Err(e) = downstream.send(bytes).await {
        debug!(error = %e, len = bytes.len(), "sending to the DNS client failed");
    }
}

async fn on_query(
    ctx: &ConnContext,
    downstream: &UdpSessionSocket,
    upstream: &UdpSessionSocket,
    outstanding: &mut Outstanding,
    parked: usize,
    msg: &[u8],
) {
    match super::decide_query(ctx, msg, outstanding.has_room(parked)) {
        QueryAction::Reply(r) => {
            to_client(downstream, &r).await;
        }
        QueryAction::Drop => {}
        QueryAction::Forward(p) => {
            if let Err(e) = upstream.send(msg).await {
                debug!(error = %e, "sending a DNS query upstream failed");
            }
            // The record is built once the query is on its way (its answer is
            // read by this same task, so it cannot be matched before `add`).
            let record = super::query_record(ctx, &p);
            outstanding.add(p);
            ctx.shared.flows.emit(record);
        }
    }
}

async fn on_answer(
    ctx: &Arc<ConnContext>,
    downstream: &Arc<UdpSessionSocket>,
    outstanding: &mut Outstanding,
    releases: &mut JoinSet<()>,
    datagram: &Datagram,
) {
    let msg = &datagram.bytes[..];
    let (p, mut facts) = match outstanding.take_answer(msg) {
        AnswerMatch::Unmatched => {
            debug!(
                len = msg.len(),
                "DNS answer matches no outstanding query; dropped"
            );
            return;
        }
        AnswerMatch::Matched(p, Err(e)) => {
            if let Some(r) = super::servfail(ctx, &p, &format!("unusable answer: {e}")) {
                to_client(downstream, &r).await;
            }
            return;
        }
        AnswerMatch::Matched(p, Ok(a)) => (p, a),
    };
    if datagram.reassembled {
        super::distrust_reassembled(&mut facts);
    }
    let replaced = super::replacement(&p, &facts);
    let msg = replaced.as_deref().unwrap_or(msg);
    let reply = match super::gate(&ctx.shared, &p, &facts) {
        super::Gate::Open => {
            to_client(downstream, msg).await;
            ctx.shared.flows.emit(super::answer_flow(ctx, &p, &facts));
            return;
        }
        super::Gate::Closed(why) => {
            if let Some(r) = super::servfail(ctx, &p, &why) {
                to_client(downstream, &r).await;
            }
            return;
        }
        super::Gate::Wait(reply) => reply,
    };
    let (ctx, downstream, msg) = (ctx.clone(), downstream.clone(), msg.to_vec());
    // Waiting for the learner must not hold up the session's other queries.
    releases.spawn(
        async move {
            match super::wait_for(&ctx.shared, reply).await {
                Ok(()) => {
                    to_client(&downstream, &msg).await;
                    ctx.shared.flows.emit(super::answer_flow(&ctx, &p, &facts));
                }
                Err(why) => {
                    if let Some(r) = super::servfail(&ctx, &p, &why) {
                        to_client(&downstream, &r).await;
                    }
                }
            }
        }
        .in_current_span(),
    );
}
