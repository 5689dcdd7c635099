//! Kafka connections (issue 10, first cut): every request is checked as it arrives;
//! an allowed request is forwarded byte for byte; a denied one gets weir's own response
//! (`weir_parsers::kafka::deny_response`), written in request order — behind the
//! broker's responses to the allowed requests before it. Broker responses pass through
//! untouched, except a Metadata response for every topic, cut down to the topics the
//! client may see (`filter_metadata_response`). A frame that cannot be framed or whose header does not decode, a denied
//! Produce with `acks=0` (no response would keep the client in step) and a denial that
//! cannot be answered close the connection with a flow record.
//!
//! Topic ids (Produce v13, Fetch v13+) resolve through the proxy's map fed by every
//! Metadata response relayed (`topic_ids`); an id neither a relayed response nor the
//! broker, asked, named is denied by topic rules (`KafkaDenial::UnknownTopicId`).
//!
//! Fetch sessions (KIP-227): an incremental Fetch names only what changed and the
//! broker answers for every partition of the session, so it is decided on every topic
//! the session has held (`FetchSessions`), under the policy of the moment; one that
//! policy no longer allows closes the connection (the client opens a new session, by
//! a full Fetch decided as usual).
//!
//! An id no relayed Metadata response named is asked of the broker (`ask`) before
//! the request is decided.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info};
use weir_parsers::kafka::{
    BodyError, FrameSplitter, RequestFacts, TOPIC_AUTHORIZATION_FAILED, TopicRef, Topics,
    deny_response, fetch_response_session_id, filter_metadata_response, metadata_topic_ids,
    non_topic_error, request_facts_bounded,
};
use weir_policy::Verdict;
use weir_policy::flow::KafkaFlow;
use weir_policy::kafka_match::{KafkaRequest, KafkaTopics, api_key_name};

use crate::context::{ConnContext, Decision};
use crate::idle::Activity;

/// What the client is owed, in request order.
enum Owed {
    /// The broker's response to a forwarded request. Metadata responses (of this
    /// version) teach topic ids; one for every topic is cut down to the topics the
    /// client may see.
    Broker {
        correlation_id: i32,
        /// A Produce whose `acks` weir could not read: it may get no response.
        maybe_none: bool,
        metadata_version: Option<i16>,
        filter: Option<MetadataFilter>,
        /// A Fetch that asked for a new session: its version and topics, kept under
        /// the session id its response carries.
        opens_session: Option<(i16, Vec<TopicRef>)>,
    },
    /// weir's denial, waiting for the broker responses owed before it.
    Denial(Bytes),
    /// A forwarded Produce with `acks=0`: nothing is owed. A broker that answers it
    /// anyway (tansu 0.6 does; Kafka does not) has that answer dropped rather than
    /// taken for an out-of-order one — the client expects none (librdkafka ignores
    /// it when it talks to such a broker directly).
    NoResponse(i32),
}

/// Fetch sessions a connection opened, with every topic each has held (names or ids
/// as sent). Topics forgotten by a session stay: a session is never decided on less
/// than it may hold.
#[derive(Default)]
struct FetchSessions {
    by_id: HashMap<i32, HashSet<TopicRef>>,
}

/// Sessions kept per connection (clients open one per broker connection); beyond,
/// the lowest id is forgotten and its next incremental Fetch closes the connection.
const FETCH_SESSIONS: usize = 16;

impl FetchSessions {
    fn opened(&mut self, id: i32, topics: Vec<TopicRef>) {
        if self.by_id.len() >= FETCH_SESSIONS
            && !self.by_id.contains_key(&id)
            && let Some(&lowest) = self.by_id.keys().min()
        {
            self.by_id.remove(&lowest);
        }
        self.by_id.insert(id, topics.into_iter().collect());
    }
}

/// How many acks=0 correlation ids are remembered for a broker that answers them
/// (one that never does, like Kafka, leaves them here: the oldest go first).
const UNANSWERED: usize = 64;

/// How to filter a Metadata response: as if the client had asked for each topic alone.
struct MetadataFilter {
    version: i16,
    client_id: Option<String>,
}

/// Whether the broker answers a forwarded request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Yes,
    /// Produce with `acks=0`.
    No,
    /// A Produce whose body weir cannot read: the response's correlation id tells.
    Maybe,
}

/// What to do with one request.
enum Action {
    Forward {
        correlation_id: i32,
        response: Expect,
        metadata_version: Option<i16>,
        filter: Option<MetadataFilter>,
        opens_session: Option<(i16, Vec<TopicRef>)>,
        /// The request's flow record, queued after the request is written.
        record: Box<weir_policy::flow::Flow>,
    },
    Answer(Bytes),
    Close(String),
}

pub async fn serve(ctx: Arc<ConnContext>, client: TcpStream) {
    let timeout = ctx.shared.config.upstream_connect_timeout;
    let connecting = crate::socket::connect_upstream_tcp(ctx.upstream_source, ctx.orig_dst);
    let upstream = match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(error = %e, "Kafka upstream connect failed; closing client");
            return;
        }
        Err(_) => {
            info!(?timeout, "Kafka upstream connect timed out; closing client");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    match relay(&ctx, client, upstream).await {
        Ok(()) => debug!("Kafka connection closed"),
        Err(e) => debug!(error = %e, "Kafka connection ended with an error"),
    }
}

/// How many requests may wait for their response before weir stops reading the client
/// (clients keep at most a handful in flight).
const OWED_QUEUE: usize = 256;

/// What both directions of one connection share.
#[derive(Clone, Copy)]
struct PerConnection<'a> {
    last: &'a Activity,
    sessions: &'a Mutex<FetchSessions>,
    /// Correlation ids of forwarded requests whose response may still come.
    awaited: &'a Mutex<HashSet<i32>>,
    /// Bytes of denials queued and not yet written to the client.
    pending_denials: &'a AtomicUsize,
}

/// Both directions at once, in one task: while a write to one side waits, the other
/// direction still moves (a broker that stops reading until its response is read cannot
/// deadlock the relay).
async fn relay(ctx: &ConnContext, client: TcpStream, upstream: TcpStream) -> std::io::Result<()> {
    let (client_rd, client_wr) = client.into_split();
    let (up_rd, up_wr) = upstream.into_split();
    let (owed_tx, owed_rx) = mpsc::channel(OWED_QUEUE);
    let last = Activity::new();
    let sessions = Mutex::new(FetchSessions::default());
    let awaited = Mutex::new(HashSet::new());
    let pending = AtomicUsize::new(0);
    let shared = PerConnection {
        last: &last,
        sessions: &sessions,
        awaited: &awaited,
        pending_denials: &pending,
    };
    tokio::select! {
        r = requests_to_broker(ctx, client_rd, up_wr, owed_tx, shared) => r,
        r = responses_to_client(ctx, up_rd, client_wr, owed_rx, shared) => r,
        () = idle(ctx.shared.config.tcp_idle_timeout, &last) => {
            debug!("Kafka connection idle; closing both sides");
            Ok(())
        }
    }
}

/// Returns once no byte has moved either way for `timeout` (`--tcp-idle-timeout`, as
/// for spliced connections).
async fn idle(timeout: std::time::Duration, last: &Activity) {
    loop {
        let deadline = last.last() + timeout;
        if deadline <= Instant::now() {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Client → broker: frames, decisions, forwarding. What the client is owed goes to the
/// other direction before the request leaves, so its response always finds its place.
async fn requests_to_broker(
    ctx: &ConnContext,
    mut client_rd: OwnedReadHalf,
    mut up_wr: OwnedWriteHalf,
    owed: mpsc::Sender<Owed>,
    conn: PerConnection<'_>,
) -> std::io::Result<()> {
    let PerConnection {
        last,
        sessions,
        awaited,
        pending_denials,
    } = conn;
    let mut requests = FrameSplitter::new(ctx.shared.config.kafka_max_frame);
    // Topic ids weir asked the broker about for this connection (see `ask`).
    let mut asked: HashSet<[u8; 16]> = HashSet::new();
    loop {
        let n = client_rd.read_buf(requests.read_space(READ_CHUNK)).await?;
        last.touch();
        if n == 0 {
            // The client is done sending: let the broker know, and let the other
            // direction deliver what is still owed.
            let _ = up_wr.shutdown().await;
            drop(owed);
            return std::future::pending().await;
        }
        loop {
            let frame = match requests.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    close_flow(ctx, &format!("Kafka request framing: {e}"));
                    return Ok(());
                }
            };
            let payload = frame.payload();
            let facts = match request_facts_bounded(
                &payload,
                ctx.shared.config.kafka_max_request_entries,
            ) {
                Ok(f) => f,
                Err(e) => {
                    close_flow(ctx, &format!("Kafka request header: {e}"));
                    return Ok(());
                }
            };
            let unknown = ask::ids_to_ask(ctx, &facts, &asked);
            if !unknown.is_empty() {
                asked.extend(unknown.iter().copied());
                match ask::learn_from_broker(ctx, &unknown).await {
                    Ok(n) => debug!(
                        asked = unknown.len(),
                        learned = n,
                        "asked the broker about topic ids"
                    ),
                    Err(e) => {
                        info!(error = %e, "asking the broker about topic ids failed; they stay unknown")
                    }
                }
            }
            match decide(ctx, &payload, facts, sessions) {
                Action::Forward {
                    correlation_id,
                    response,
                    metadata_version,
                    filter,
                    opens_session,
                    record,
                } => {
                    // Responses are matched by correlation id: two forwarded requests
                    // with one id outstanding at once could have their answers swapped
                    // (an every-topic Metadata answer unfiltered; found by review).
                    // Clients never do this.
                    if !lock_ids(awaited).insert(correlation_id) {
                        close_flow(
                            ctx,
                            &format!(
                                "a Kafka request reuses correlation id {correlation_id} while a response to it is still owed"
                            ),
                        );
                        return Ok(());
                    }
                    let o = if response == Expect::No {
                        Owed::NoResponse(correlation_id)
                    } else {
                        Owed::Broker {
                            correlation_id,
                            maybe_none: response == Expect::Maybe,
                            metadata_version,
                            filter,
                            opens_session,
                        }
                    };
                    if owed.send(o).await.is_err() {
                        return Ok(());
                    }
                    up_wr.write_all(frame.wire()).await?;
                    ctx.shared.flows.emit(*record);
                }
                Action::Answer(bytes) => {
                    let waiting = pending_denials.fetch_add(bytes.len(), Ordering::Relaxed);
                    if waiting + bytes.len() > MAX_PENDING_DENIAL_BYTES {
                        close_flow(
                            ctx,
                            &format!(
                                "more than {MAX_PENDING_DENIAL_BYTES} bytes of Kafka denials wait behind the broker's responses"
                            ),
                        );
                        return Ok(());
                    }
                    if owed.send(Owed::Denial(bytes)).await.is_err() {
                        return Ok(());
                    }
                }
                Action::Close(why) => {
                    close_flow(ctx, &why);
                    return Ok(());
                }
            }
        }
    }
}

/// Broker → client: each broker response goes out in its request's place, weir's
/// denials in theirs.
async fn responses_to_client(
    ctx: &ConnContext,
    mut up_rd: OwnedReadHalf,
    mut client_wr: OwnedWriteHalf,
    mut owed_rx: mpsc::Receiver<Owed>,
    conn: PerConnection<'_>,
) -> std::io::Result<()> {
    let PerConnection {
        last,
        sessions,
        awaited,
        pending_denials,
    } = conn;
    let mut responses = FrameSplitter::new(ctx.shared.config.kafka_max_frame);
    let mut owed: VecDeque<Owed> = VecDeque::new();
    let mut unanswered: VecDeque<i32> = VecDeque::new();
    let mut requests_done = false;
    loop {
        tokio::select! {
            // First what is owed: an entry is queued before its request is forwarded,
            // so it is here before the response.
            biased;
            // Bounded here too: denials never wait for the broker, so a client
            // could queue them without end behind one response the broker holds.
            o = owed_rx.recv(), if !requests_done && owed.len() < OWED_QUEUE => match o {
                Some(Owed::NoResponse(c)) => {
                    if unanswered.len() == UNANSWERED
                        && let Some(gone) = unanswered.pop_front()
                    {
                        lock_ids(awaited).remove(&gone);
                    }
                    unanswered.push_back(c);
                }
                Some(o) => owed.push_back(o),
                None => requests_done = true,
            },
            n = up_rd.read_buf(responses.read_space(READ_CHUNK)) => {
                let n = n?;
                last.touch();
                if n == 0 {
                    return Ok(());
                }
                loop {
                    let frame = match responses.next_frame() {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => {
                            close_flow(ctx, &format!("Kafka response framing: {e}"));
                            return Ok(());
                        }
                    };
                    let Some(corr) = frame.payload().first_chunk::<4>().map(|c| i32::from_be_bytes(*c))
                    else {
                        close_flow(ctx, "a Kafka response without a correlation id");
                        return Ok(());
                    };
                    let owed_next = matches!(owed.front(), Some(Owed::Broker { correlation_id, .. }) if *correlation_id == corr);
                    if !owed_next && let Some(i) = unanswered.iter().position(|c| *c == corr) {
                        unanswered.remove(i);
                        lock_ids(awaited).remove(&corr);
                        debug!(correlation_id = corr, "the broker answered a Produce with acks=0; dropped");
                        continue;
                    }
                    // Produce requests that got no response (acks=0 weir could not read)
                    // leave the queue when a later response arrives; denials behind them
                    // are due before it.
                    while let Some(Owed::Broker {
                        correlation_id,
                        maybe_none: true,
                        ..
                    }) = owed.front()
                    {
                        if *correlation_id == corr {
                            break;
                        }
                        let gone = *correlation_id;
                        owed.pop_front();
                        lock_ids(awaited).remove(&gone);
                        write_denials_due(&mut owed, &mut client_wr, pending_denials).await?;
                    }
                    let next = owed.pop_front();
                    lock_ids(awaited).remove(&corr);
                    if !matches!(&next, Some(Owed::Broker { correlation_id, .. }) if *correlation_id == corr) {
                        close_flow(ctx, "the broker answered out of order or unasked");
                        return Ok(());
                    }
                    if let Some(Owed::Broker {
                        metadata_version: Some(v),
                        ..
                    }) = &next
                    {
                        // An undecodable Metadata response teaches nothing; the client
                        // gets it as the broker sent it (or filtered below).
                        if let Ok(pairs) = metadata_topic_ids(&frame.payload(), *v) {
                            ctx.shared.kafka_topic_ids.learn(broker_scope(ctx), pairs);
                        }
                    }
                    if let Some(Owed::Broker {
                        opens_session: Some((v, topics)),
                        ..
                    }) = &next
                        && let Some(id) = fetch_response_session_id(&frame.payload(), *v)
                    {
                        lock(sessions).opened(id, topics.clone());
                    }
                    match next {
                        Some(Owed::Broker { filter: None, .. }) => {
                            client_wr.write_all(frame.wire()).await?;
                        }
                        Some(Owed::Broker { filter: Some(f), .. }) => {
                            match filter_metadata_response(&frame.payload(), f.version, |topic| {
                                may_see(ctx, &f, topic)
                            }) {
                                Ok(bytes) => client_wr.write_all(&bytes).await?,
                                Err(e) => {
                                    close_flow(ctx, &e.to_string());
                                    return Ok(());
                                }
                            }
                        }
                        _ => {
                            close_flow(ctx, "the broker sent a response nothing asked for");
                            return Ok(());
                        }
                    }
                    // The next response in this read may belong behind a denial.
                    write_denials_due(&mut owed, &mut client_wr, pending_denials).await?;
                }
            }
        }
        write_denials_due(&mut owed, &mut client_wr, pending_denials).await?;
        if requests_done && owed.is_empty() {
            return Ok(());
        }
    }
}

/// Denials at the front owe nothing to the broker: they go now.
async fn write_denials_due(
    owed: &mut VecDeque<Owed>,
    client_wr: &mut OwnedWriteHalf,
    pending: &AtomicUsize,
) -> std::io::Result<()> {
    while let Some(Owed::Denial(_)) = owed.front() {
        if let Some(Owed::Denial(bytes)) = owed.pop_front() {
            client_wr.write_all(&bytes).await?;
            pending.fetch_sub(bytes.len(), Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The correlation ids of forwarded requests whose response may still come.
fn lock_ids(ids: &Mutex<HashSet<i32>>) -> std::sync::MutexGuard<'_, HashSet<i32>> {
    // Held only for one insert or remove.
    ids.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock(sessions: &Mutex<FetchSessions>) -> std::sync::MutexGuard<'_, FetchSessions> {
    // Held only for map updates that cannot panic half-way.
    sessions
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The topics a request is decided on: those it names, or for an incremental Fetch
/// every topic its session has held (`None`: a session this connection did not open).
fn decided_topics<'a>(
    list: &'a [TopicRef],
    facts: &RequestFacts,
    sessions: &Mutex<FetchSessions>,
) -> Option<Cow<'a, [TopicRef]>> {
    let Some(s) = facts.body.as_ref().ok().and_then(|b| b.fetch_session) else {
        return Some(Cow::Borrowed(list));
    };
    let mut sessions = lock(sessions);
    if !s.is_incremental() {
        if s.id != 0 {
            // Epoch -1 closes the session; the Fetch itself is a full one.
            sessions.by_id.remove(&s.id);
        }
        return Some(Cow::Borrowed(list));
    }
    let held = sessions.by_id.get_mut(&s.id)?;
    held.extend(list.iter().cloned());
    if held.len() > MAX_SESSION_TOPICS {
        // Forgotten: this Fetch and the session's next ones close the connection, and
        // the client starts a new session with a full Fetch (review F5: each
        // incremental Fetch could add names without end).
        sessions.by_id.remove(&s.id);
        return None;
    }
    Some(Cow::Owned(held.iter().cloned().collect()))
}

/// How much one read from either side may take (the buffer grows by this much at a
/// time, never by a frame's announced length).
const READ_CHUNK: usize = 64 * 1024;

/// Kafka's longest topic name.
const MAX_TOPIC_NAME: usize = 249;

/// Bytes of weir's denials that may wait for broker responses owed before them; a
/// client that piles up more (a denial can be several times its request: it names
/// every partition) is closed (review F6: 512 waiting denials could hold gigabytes).
const MAX_PENDING_DENIAL_BYTES: usize = 16 * 1024 * 1024;

/// Distinct topics one fetch session may have held (names and ids as sent). A
/// consumer's session holds the topics it reads; past this, weir forgets the session.
const MAX_SESSION_TOPICS: usize = 10_000;

/// Policy's decision on one request frame, with its flow record.
fn decide(
    ctx: &ConnContext,
    payload: &Bytes,
    facts: RequestFacts,
    sessions: &Mutex<FetchSessions>,
) -> Action {
    // Handed over, with a stale policy: decide nothing; the client reconnects
    // (to the new weir) and sends the request again.
    if ctx.shared.superseded() {
        return Action::Close(
            "this weir has handed over and its policy is stale; the client reconnects to the new weir".into(),
        );
    }
    if let Err(e @ BodyError::Malformed { .. }) = &facts.body {
        return Action::Close(e.to_string());
    }
    // Kafka refuses longer names (INVALID_TOPIC_EXCEPTION); weir's denial repeats every
    // name it was sent, so one would cost as much again (review F6).
    if let Ok(b) = &facts.body
        && let Topics::Listed(list) = &b.topics
        && list
            .iter()
            .any(|t| matches!(t, TopicRef::Name(n) if n.len() > MAX_TOPIC_NAME))
    {
        return Action::Close(format!(
            "a Kafka request names a topic longer than {MAX_TOPIC_NAME} bytes"
        ));
    }
    let names: Vec<String>;
    let topics = match &facts.body {
        Ok(b) => match &b.topics {
            Topics::All => KafkaTopics::All,
            Topics::Unknown => KafkaTopics::Undecodable,
            Topics::Listed(list) => match decided_topics(list, &facts, sessions) {
                None => KafkaTopics::UnknownFetchSession,
                Some(list) => {
                    // Ids become names through what Metadata responses said.
                    let resolved: Option<Vec<String>> = list
                        .iter()
                        .map(|t| match t {
                            TopicRef::Name(n) => Some(n.clone()),
                            TopicRef::Id(id) => {
                                ctx.shared.kafka_topic_ids.resolve(broker_scope(ctx), id)
                            }
                        })
                        .collect();
                    match resolved {
                        Some(n) => {
                            names = n;
                            KafkaTopics::Names(&names)
                        }
                        None => KafkaTopics::UnknownTopicId,
                    }
                }
            },
        },
        Err(_) => KafkaTopics::Undecodable,
    };
    let h = &facts.header;
    let req = KafkaRequest {
        api_key: h.api_key,
        api_version: h.api_version,
        client_id: h.client_id.as_deref(),
        topics,
    };
    let d = ctx.decide();
    let cv = &d.verdict;
    let (verdict, why) = if !cv.l4_allowed() || !cv.needs_l7() {
        (cv.l4_verdict(), None)
    } else {
        cv.kafka_verdict(&d.policy, &req)
    };
    let acks = facts.body.as_ref().ok().and_then(|b| b.acks);
    let fetch_session = facts.body.as_ref().ok().and_then(|b| b.fetch_session);
    if verdict.allowed {
        // Queued once the request is on its way: waking the flow writer first
        // would put its work ahead of the forward on a busy CPU.
        let record = request_record(ctx, &d, &verdict, &facts, None);
        let all_topics = h.api_key == 3 && req.topics == KafkaTopics::All;
        let filter = (all_topics && cv.needs_kafka()).then(|| MetadataFilter {
            version: h.api_version,
            client_id: h.client_id.clone(),
        });
        let metadata_version = (h.api_key == 3 && facts.body.is_ok()).then_some(h.api_version);
        let response = match (h.api_key, acks) {
            (0, Some(0)) => Expect::No,
            (0, None) => Expect::Maybe,
            _ => Expect::Yes,
        };
        let opens_session = match (&facts.body, fetch_session) {
            (Ok(b), Some(s)) if s.opens() => match &b.topics {
                Topics::Listed(list) => Some((h.api_version, list.clone())),
                _ => None,
            },
            _ => None,
        };
        return Action::Forward {
            correlation_id: h.correlation_id,
            response,
            metadata_version,
            filter,
            opens_session,
            record: Box::new(record),
        };
    }
    let reason = why.map(|w| w.to_string());
    if let Some(s) = fetch_session.filter(|s| s.is_incremental()) {
        // A denial naming what the request named (often nothing) would keep the
        // client polling its session: closing makes it open a new one by a full
        // Fetch, decided as usual.
        lock(sessions).by_id.remove(&s.id);
        let why = reason
            .clone()
            .unwrap_or_else(|| verdict.reason().to_string());
        emit(ctx, &d, &verdict, &facts, reason);
        return Action::Close(format!(
            "incremental Fetch of fetch session {} denied ({why}): closing so the client opens a new session",
            s.id
        ));
    }
    match deny_response(payload) {
        Ok(Some(bytes)) => {
            emit(ctx, &d, &verdict, &facts, reason);
            Action::Answer(bytes)
        }
        Ok(None) => {
            emit(ctx, &d, &verdict, &facts, reason);
            Action::Close(
                "denied Produce with acks=0 gets no response: closing, as a broker does".into(),
            )
        }
        Err(e) => {
            emit(ctx, &d, &verdict, &facts, reason);
            Action::Close(format!("denied request cannot be answered: {e}"))
        }
    }
}

/// Whether the client may see `topic` in a Metadata response: whether policy would
/// allow the same request naming that topic alone (under the current policy).
fn may_see(ctx: &ConnContext, f: &MetadataFilter, topic: &str) -> bool {
    let d = ctx.decide();
    let cv = &d.verdict;
    if !cv.l4_allowed() {
        return false;
    }
    if !cv.needs_l7() {
        return true;
    }
    let names = [topic.to_string()];
    let req = KafkaRequest {
        api_key: 3,
        api_version: f.version,
        client_id: f.client_id.as_deref(),
        topics: KafkaTopics::Names(&names),
    };
    cv.kafka_verdict(&d.policy, &req).0.allowed
}

/// Whose topic ids this connection's broker may use (see `topic_ids`).
/// The broker this connection talks to, whose Metadata answers teach topic ids.
fn broker_scope(ctx: &ConnContext) -> topic_ids::Scope {
    ctx.orig_dst
}

fn summary(facts: &RequestFacts) -> String {
    let h = &facts.header;
    let key = api_key_name(h.api_key).map_or_else(|| h.api_key.to_string(), str::to_string);
    let mut s = format!(
        "Kafka {key} v{} correlation {}",
        h.api_version, h.correlation_id
    );
    if let Ok(b) = &facts.body
        && let Topics::Listed(list) = &b.topics
        && !list.is_empty()
    {
        s.push_str(&format!(" topics {}", topic_list(list).join(",")));
    }
    s
}

/// Topics a flow record names at most (a request may name millions; the record
/// stays small and says how many it left out).
const RECORD_TOPICS: usize = 32;

/// Topic names, ids as `id:HEX` (resolved or not, the record shows what was sent);
/// beyond [`RECORD_TOPICS`], one last entry `(+N more)`.
fn topic_list(list: &[TopicRef]) -> Vec<String> {
    let mut out: Vec<String> = list
        .iter()
        .take(RECORD_TOPICS)
        .map(|t| match t {
            TopicRef::Name(n) => n.clone(),
            TopicRef::Id(id) => format!("id:{}", hex(id)),
        })
        .collect();
    if list.len() > RECORD_TOPICS {
        out.push(format!("(+{} more)", list.len() - RECORD_TOPICS));
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn emit(
    ctx: &ConnContext,
    d: &Decision,
    verdict: &Verdict,
    facts: &RequestFacts,
    reason: Option<String>,
) {
    ctx.shared
        .flows
        .emit(request_record(ctx, d, verdict, facts, reason));
}

/// The flow record of one request (Hubble's `l7.kafka`).
fn request_record(
    ctx: &ConnContext,
    d: &Decision,
    verdict: &Verdict,
    facts: &RequestFacts,
    reason: Option<String>,
) -> weir_policy::flow::Flow {
    let h = &facts.header;
    let topics = match &facts.body {
        Ok(b) => match &b.topics {
            Topics::Listed(list) => topic_list(list),
            _ => Vec::new(),
        },
        Err(_) => Vec::new(),
    };
    // The code weir's denial carries (see `deny_response`); 0 for a forwarded request.
    let error_code = match (verdict.allowed, topics.is_empty()) {
        (true, _) => 0,
        (false, false) => TOPIC_AUTHORIZATION_FAILED,
        (false, true) => non_topic_error(h.api_key),
    };
    let kafka = KafkaFlow {
        error_code,
        api_version: h.api_version,
        api_key: api_key_name(h.api_key).map_or_else(|| h.api_key.to_string(), str::to_string),
        correlation_id: h.correlation_id,
        topic: topics.join(","),
    };
    let mut f = ctx.flow(d, verdict).with_kafka(0, kafka, summary(facts));
    if let Some(r) = reason {
        f.policy = format!("{}: {r}", f.policy);
    }
    f
}

/// The flow record of a connection weir closes.
fn close_flow(ctx: &ConnContext, why: &str) {
    info!(reason = why, "closing Kafka connection");
    let d = ctx.decide();
    let mut f = ctx.flow(&d, &d.verdict.l4_verdict()).with_error(why);
    f.kind = "L7";
    f.summary = format!("Kafka connection closed: {why}");
    ctx.shared.flows.emit(f);
}

mod ask;
#[cfg(test)]
mod tests;
pub mod topic_ids;
