//! DNS over TCP (RFC 7766): both directions framed with [`TcpDnsFramer`]; each
//! query decided as over UDP. Denied and rejected queries are answered at once
//! (out of order, which RFC 7766 §6.2.1.1 allows), allowed ones forwarded on one
//! upstream connection from the client's address, and answers matched back by ID
//! and question, so a resolver answering pipelined queries out of order works. A
//! zone transfer's several answer messages stream through in order.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info};
use weir_parsers::dns::{FrameError, TcpDnsFramer, tcp_frame};
use weir_policy::flow::FlowVerdict;

use super::{AnswerMatch, Outstanding, Pending, QueryAction};
use crate::context::ConnContext;
use crate::socket;

/// Frames queued for the client's writer; beyond, reading stops (backpressure).
const WRITE_QUEUE: usize = 64;

/// Serves one client connection to a port with DNS rules.
pub async fn serve(ctx: Arc<ConnContext>, client: TcpStream) {
    let (client_rd, client_wr) = client.into_split();
    let (tx, rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    // A client that stops reading must not hold the connection (and its
    // upstream and queued answers) forever: each frame gets `idle_timeout`.
    let write_timeout = ctx.shared.config.idle_timeout;
    let writer = tokio::spawn(write_loop(client_wr, rx, write_timeout).in_current_span());
    Conn {
        ctx: ctx.clone(),
        tx,
        outstanding: Outstanding::new(0),
        upstream: Upstream::NotConnected,
        releases: JoinSet::new(),
        chains: HashMap::new(),
    }
    .run(client_rd)
    .await;
    // Everything queued for the client is written before the connection closes
    // (each frame within its deadline, so this ends too).
    if let Ok(Err(WriteStalled)) = writer.await {
        info!(timeout = ?write_timeout, "DNS client did not read an answer in time; closed");
        let d = ctx.decide();
        let mut f = ctx.flow(&d, &d.verdict.l4_verdict());
        f.verdict = FlowVerdict::Dropped;
        f.drop_reason_desc = Some("DNS_CLIENT_WRITE_TIMEOUT".into());
        f.policy = format!("the DNS client did not take an answer within {write_timeout:?}");
        ctx.shared.flows.emit(f);
    }
}

/// The client did not take a frame within the write timeout.
struct WriteStalled;

/// Writes queued frames to the client. On a stalled write it resets the
/// connection and returns, dropping `rx`: the conn sees its sender closed and
/// ends (its upstream and pending releases with it).
async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    timeout: Duration,
) -> Result<(), WriteStalled> {
    while let Some(frame) = rx.recv().await {
        match tokio::time::timeout(timeout, wr.write_all(&frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "writing to the DNS client failed");
                return Ok(());
            }
            Err(_) => {
                // Linger 0: the close is a reset, so the kernel does not keep
                // retrying the unread data to a zero window either.
                let _ = socket2::SockRef::from(wr.as_ref()).set_linger(Some(Duration::ZERO));
                return Err(WriteStalled);
            }
        }
    }
    let _ = wr.shutdown().await;
    Ok(())
}

enum Upstream {
    NotConnected,
    Connected(OwnedReadHalf, OwnedWriteHalf, TcpDnsFramer),
    /// Connecting failed at that instant; queries in the next
    /// [`RECONNECT_AFTER`] get SERVFAIL at once rather than wait for another
    /// connect timeout each, and the first one after it tries again.
    Failed(String, std::time::Instant),
}

/// How long a failed connect to the resolver is not tried again.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

struct Conn {
    ctx: Arc<ConnContext>,
    /// Frames for the client.
    tx: mpsc::Sender<Vec<u8>>,
    outstanding: Outstanding,
    upstream: Upstream,
    /// Answers waiting for the FQDN learner.
    releases: JoinSet<()>,
    /// Per query ID, when the last release of that ID is out: the messages of a
    /// zone transfer reach the client in the order the resolver sent them.
    chains: HashMap<u16, oneshot::Receiver<()>>,
}

#[cfg(test)]
thread_local! {
    /// Loop turns of the conns run on this thread (a test counts them: a conn
    /// must not spin).
    pub(crate) static LOOP_TURNS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Sleeps until `at`; never resolves for `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Reads from the upstream if there is one (never resolves otherwise).
async fn read_upstream(up: &mut Upstream, buf: &mut [u8]) -> io::Result<usize> {
    match up {
        Upstream::Connected(rd, _, _) => rd.read(buf).await,
        _ => std::future::pending().await,
    }
}

impl Conn {
    async fn run(mut self, mut client_rd: OwnedReadHalf) {
        self.outstanding = Outstanding::new(self.ctx.shared.config.dns_max_outstanding);
        let idle = self.ctx.shared.config.idle_timeout;
        let mut framer = TcpDnsFramer::default();
        let mut from_client = vec![0u8; 16 * 1024];
        let mut from_server = vec![0u8; 16 * 1024];
        let mut client_open = true;
        let mut last_activity = Instant::now();
        // When the first byte of the message being framed arrived: a message
        // must be complete within `idle` of it, however slowly its bytes trickle
        // in (each byte would otherwise renew `last_activity`: slowloris).
        let mut frame_started: Option<Instant> = None;
        let mut draining = self.ctx.shared.draining();
        // Closed when the writer gave up on the client (see `write_loop`); its
        // free slots say when reading the client may go on.
        let queue = self.tx.clone();
        loop {
            let busy = !self.outstanding.is_empty() || !self.releases.is_empty();
            if !client_open && !busy {
                return;
            }
            // Another weir took over: close between answers with nothing half
            // read (RFC 7766 §6.2.3 lets a server close an idle connection); the
            // client reconnects to the new weir.
            if *draining.borrow() && !busy && framer.buffered() == 0 {
                debug!("handed over; DNS connection closed between queries");
                return;
            }
            #[cfg(test)]
            LOOP_TURNS.with(|c| c.set(c.get() + 1));
            let wake = match self.outstanding.next_deadline() {
                Some(deadline) => Some(deadline),
                // Only releases pending: they end by themselves (learn timeout,
                // writer deadline) and `join_next` wakes the loop; the idle
                // deadline may be past by then and would fire at once, a spin.
                None if busy => None,
                None => Some(last_activity + idle),
            };
            let frame_deadline = frame_started.filter(|_| client_open).map(|t| t + idle);
            let wake = match (wake, frame_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Backpressure: no reading from the client while its answers queue
            // is full, nor from the resolver while `dns_max_outstanding`
            // answers are parked (both resume as those drain, which wakes the
            // loop through `reserve` / `join_next`).
            let queue_full = queue.capacity() == 0;
            let releases_full = self.releases.len() >= self.outstanding.max();
            tokio::select! {
                r = client_rd.read(&mut from_client), if client_open && !queue_full => match r {
                    Ok(0) => {
                        if framer.buffered() > 0 {
                            debug!("DNS client closed mid-message");
                        }
                        client_open = false;
                    }
                    Ok(n) => {
                        last_activity = Instant::now();
                        let before = framer.buffered();
                        framer.push(&from_client[..n]);
                        if let Err(e) = self.client_messages(&mut framer).await {
                            self.framing_failed(&e, "client");
                            return;
                        }
                        let left = framer.buffered();
                        if left == 0 {
                            frame_started = None;
                        } else if frame_started.is_none() || left < before + n {
                            // A message completed: the bytes left began one
                            // in this read.
                            frame_started = Some(last_activity);
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "DNS client connection failed");
                        client_open = false;
                    }
                },
                r = read_upstream(&mut self.upstream, &mut from_server), if !releases_full => match r {
                    Ok(0) | Err(_) => self.upstream_gone("the resolver closed the connection").await,
                    Ok(n) => {
                        last_activity = Instant::now();
                        if let Err(e) = self.server_messages(&from_server[..n]).await {
                            self.framing_failed(&e, "resolver");
                            self.upstream_gone("the resolver sent an unframeable message").await;
                        }
                    }
                },
                Ok(()) = draining.changed(), if !*draining.borrow() => {}
                Ok(_slot) = queue.reserve(), if queue_full => {}
                () = queue.closed() => {
                    debug!("DNS client writer gone; connection aborted");
                    return;
                }
                Some(_) = self.releases.join_next(), if !self.releases.is_empty() => {
                    if self.releases.is_empty() {
                        self.chains.clear();
                    }
                }
                () = sleep_until(wake) => {
                    let now = Instant::now();
                    let why = super::upstream_timeout_reason(self.ctx.shared.config.dns_upstream_timeout);
                    for p in self.outstanding.expire(now) {
                        if !p.answered {
                            self.answer_servfail(&p, &why).await;
                        }
                    }
                    if frame_deadline.is_some_and(|d| d <= now) {
                        self.frame_timed_out(idle);
                        return;
                    }
                    if !busy && last_activity + idle <= now {
                        debug!("DNS connection idle; closed");
                        return;
                    }
                }
            }
        }
    }

    fn frame_timed_out(&self, limit: Duration) {
        info!(
            ?limit,
            "DNS over TCP: client message not complete in time; closing"
        );
        let d = self.ctx.decide();
        let mut f = self.ctx.flow(&d, &d.verdict.l4_verdict());
        f.verdict = FlowVerdict::Dropped;
        f.drop_reason_desc = Some("DNS_FRAME_TIMEOUT".into());
        f.policy = format!("a DNS message from the client took longer than {limit:?} to arrive");
        self.ctx.shared.flows.emit(f);
    }

    fn framing_failed(&self, e: &FrameError, from: &str) {
        info!(error = %e, from, "DNS over TCP: bad frame; closing");
        let d = self.ctx.decide();
        let mut f = self.ctx.flow(&d, &d.verdict.l4_verdict());
        f.verdict = FlowVerdict::Dropped;
        f.drop_reason_desc = Some("DNS_BAD_FRAME".into());
        f.policy = format!("DNS over TCP from the {from}: {e}");
        self.ctx.shared.flows.emit(f);
    }

    /// Queues a frame for the client; waits while the queue is full (at most
    /// until the writer's deadline: a stalled writer drops the queue and this
    /// fails at once).
    async fn send_client(&self, msg: &[u8]) {
        if let Ok(frame) = tcp_frame(msg) {
            let _ = self.tx.send(frame).await;
        }
    }

    async fn answer_servfail(&self, p: &Pending, why: &str) {
        if let Some(r) = super::servfail(&self.ctx, p, why) {
            self.send_client(&r).await;
        }
    }

    async fn client_messages(&mut self, framer: &mut TcpDnsFramer) -> Result<(), FrameError> {
        while let Some(msg) = framer.next_message()? {
            match super::decide_query(
                &self.ctx,
                &msg,
                self.outstanding.has_room(self.releases.len()),
            ) {
                QueryAction::Reply(r) => self.send_client(&r).await,
                QueryAction::Drop => {}
                // The record first: forwarding may connect, fail and answer
                // SERVFAIL, whose record must come after the query's.
                QueryAction::Forward(p) => {
                    self.ctx
                        .shared
                        .flows
                        .emit(super::query_record(&self.ctx, &p));
                    self.forward(p, &msg).await;
                }
            }
        }
        Ok(())
    }

    async fn forward(&mut self, p: Pending, msg: &[u8]) {
        let retry = match &self.upstream {
            Upstream::NotConnected => true,
            Upstream::Failed(_, at) => at.elapsed() >= RECONNECT_AFTER,
            Upstream::Connected(..) => false,
        };
        if retry {
            let cfg = &self.ctx.shared.config;
            let connecting =
                socket::connect_upstream_tcp(self.ctx.upstream_source, self.ctx.orig_dst);
            self.upstream =
                match tokio::time::timeout(cfg.upstream_connect_timeout, connecting).await {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        let (rd, wr) = s.into_split();
                        Upstream::Connected(rd, wr, TcpDnsFramer::default())
                    }
                    Ok(Err(e)) => Upstream::Failed(
                        format!("connecting to the resolver failed: {e}"),
                        std::time::Instant::now(),
                    ),
                    Err(_) => Upstream::Failed(
                        format!(
                            "connecting to the resolver took longer than {:?}",
                            cfg.upstream_connect_timeout
                        ),
                        std::time::Instant::now(),
                    ),
                };
        }
        // A resolver that stops reading must not hold this connection (and
        // its client) forever: the write gets the upstream timeout.
        let timeout = self.ctx.shared.config.dns_upstream_timeout;
        let sent = match &mut self.upstream {
            Upstream::Connected(_, wr, _) => match tcp_frame(msg) {
                Ok(frame) => match tokio::time::timeout(timeout, wr.write_all(&frame)).await {
                    Ok(r) => r.map_err(|e| format!("sending to the resolver failed: {e}")),
                    Err(_) => {
                        let why = format!("the resolver did not take a query within {timeout:?}");
                        self.answer_servfail(&p, &why).await;
                        self.upstream_gone(&why).await;
                        return;
                    }
                },
                Err(e) => Err(e.to_string()),
            },
            Upstream::Failed(why, _) => Err(why.clone()),
            Upstream::NotConnected => Err("not connected".into()),
        };
        match sent {
            Ok(()) => {
                self.outstanding.add(p);
            }
            Err(why) => self.answer_servfail(&p, &why).await,
        }
    }

    /// The resolver's connection ended: its outstanding queries get SERVFAIL,
    /// and the next query connects again.
    async fn upstream_gone(&mut self, why: &str) {
        self.upstream = Upstream::NotConnected;
        for p in self.outstanding.drain() {
            if !p.answered {
                self.answer_servfail(&p, why).await;
            }
        }
    }

    async fn server_messages(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        let mut messages = Vec::new();
        if let Upstream::Connected(_, _, framer) = &mut self.upstream {
            framer.push(bytes);
            while let Some(m) = framer.next_message()? {
                messages.push(m);
            }
        }
        for m in messages {
            self.on_answer(m).await;
        }
        Ok(())
    }

    async fn on_answer(&mut self, msg: Vec<u8>) {
        let (p, facts) = match self.outstanding.take_answer(&msg) {
            AnswerMatch::Unmatched => {
                debug!(
                    len = msg.len(),
                    "DNS answer matches no outstanding query; dropped"
                );
                return;
            }
            AnswerMatch::Matched(p, Err(e)) => {
                self.answer_servfail(&p, &format!("unusable answer: {e}"))
                    .await;
                return;
            }
            AnswerMatch::Matched(p, Ok(a)) => (p, a),
        };
        let msg = super::replacement(&p, &facts).unwrap_or(msg);
        let id = p.facts.id;
        let gate = super::gate(&self.ctx.shared, &p, &facts);
        let prev = self.chains.remove(&id);
        if prev.is_none() {
            match gate {
                super::Gate::Open => {
                    self.send_client(&msg).await;
                    self.ctx
                        .shared
                        .flows
                        .emit(super::answer_flow(&self.ctx, &p, &facts));
                    return;
                }
                super::Gate::Closed(why) => {
                    self.answer_servfail(&p, &why).await;
                    return;
                }
                super::Gate::Wait(_) => {}
            }
        }
        let (done_tx, done_rx) = oneshot::channel();
        self.chains.insert(id, done_rx);
        let (ctx, tx) = (self.ctx.clone(), self.tx.clone());
        // Waiting for the learner must not hold up the connection's other
        // queries; the chain keeps one ID's messages in order.
        self.releases.spawn(
            async move {
                if let Some(prev) = prev {
                    let _ = prev.await;
                }
                let out = match gate.passed(&ctx.shared).await {
                    Ok(()) => {
                        ctx.shared.flows.emit(super::answer_flow(&ctx, &p, &facts));
                        Some(msg)
                    }
                    Err(why) => super::servfail(&ctx, &p, &why),
                };
                if let Some(frame) = out.and_then(|m| tcp_frame(&m).ok()) {
                    let _ = tx.send(frame).await;
                }
                let _ = done_tx.send(());
            }
            .in_current_span(),
        );
    }
}
