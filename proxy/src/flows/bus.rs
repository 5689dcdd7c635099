//! The flow bus: a bounded ring of recent flow records and live subscribers.
//!
//! Only the flow writer thread publishes (see [`super::FlowSink`]), so the data
//! path never touches the bus's lock. Each subscriber has its own bounded queue;
//! when it is full, records for that subscriber are dropped and counted, and
//! the count is handed to it with its next read ([`Event::Lost`]). Publishing
//! never waits for a subscriber.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::Notify;
use weir_policy::flow::{Flow, FlowVerdict, L4, RenderedEndpoint};

/// Recent records kept by default (`--flow-buffer`): Hubble's default
/// (`hubble-event-buffer-capacity`, 4095). Each costs about its JSON's size, so
/// 4 MB or so; 65 536 (the old default) held ~67 MB under sustained traffic.
pub const DEFAULT_CAPACITY: usize = 4095;
/// Records a live subscriber may have unread before it loses some.
pub const SUBSCRIBER_QUEUE: usize = 8192;

/// A published record: its JSON (rendered once for every reader) and the few
/// facts filters and counters need.
#[derive(Debug)]
pub struct Record {
    pub key: FlowKey,
    body: Body,
}

/// The JSON is kept with its line's newline (the flow log writes it as it is).
#[derive(Debug)]
enum Body {
    /// Rendered when made (the flow log wants the line): the `Flow` itself is
    /// not kept, as the ring holds `--flow-buffer` of these.
    Json(Box<str>),
    /// Kept as it came, rendered the first time a reader asks (`--flow-log
    /// none`: most records are never read, and rendering was most of their cost).
    Lazy(Box<Flow>, OnceLock<Box<str>>),
}

impl Record {
    /// A record rendered now.
    pub fn rendered(flow: &Flow) -> Self {
        Record {
            key: FlowKey::new(flow),
            body: Body::Json(render(flow)),
        }
    }

    /// A record rendered when first read.
    pub fn lazy(flow: Box<Flow>) -> Self {
        Record {
            key: FlowKey::new(&flow),
            body: Body::Lazy(flow, OnceLock::new()),
        }
    }

    /// One JSON object, no trailing newline.
    pub fn json(&self) -> &str {
        let line = self.line();
        line.strip_suffix('\n').unwrap_or(line)
    }

    /// Whether the JSON was rendered when the record was made (else on first read).
    #[cfg(test)]
    pub fn rendered_when_made(&self) -> bool {
        matches!(self.body, Body::Json(_))
    }

    /// The JSON object and a newline: the flow log's line.
    pub fn line(&self) -> &str {
        match &self.body {
            Body::Json(j) => j,
            Body::Lazy(flow, j) => j.get_or_init(|| render(flow)),
        }
    }
}

fn render(flow: &Flow) -> Box<str> {
    thread_local! {
        /// Where records are rendered before being copied out at their size:
        /// one allocation per record, not a large one then a shrinking one.
        static SCRATCH: std::cell::RefCell<String> = std::cell::RefCell::new(String::with_capacity(2048));
    }
    let into = |scratch: &mut String| -> Box<str> {
        scratch.clear();
        flow.write_json(scratch);
        scratch.push('\n');
        Box::from(scratch.as_str())
    };
    // Every thread that emits records has one; a rare huge record (many
    // headers) does not leave its size behind.
    const KEEP: usize = 64 * 1024;
    SCRATCH
        .try_with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let line = into(&mut scratch);
            if scratch.capacity() > KEEP {
                *scratch = String::with_capacity(2048);
            }
            line
        })
        // The thread's locals are being torn down (a record emitted from a
        // destructor at thread exit).
        .unwrap_or_else(|_| into(&mut String::new()))
}

/// What filters and metrics read of a flow.
#[derive(Debug, Clone)]
pub struct FlowKey {
    pub verdict: FlowVerdict,
    /// `HTTP`, `DNS` (`OTHER` for a protocol the filters do not know yet);
    /// `None` for an L3/L4 record.
    pub l7: Option<&'static str>,
    /// `TCP`, `UDP`, `ICMPv4`, `ICMPv6`.
    pub l4: &'static str,
    /// (source, destination) for TCP and UDP.
    pub ports: Option<(u16, u16)>,
    pub source: Arc<RenderedEndpoint>,
    pub destination: Arc<RenderedEndpoint>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    /// As in the record: RFC 3339, nanoseconds, fixed width.
    pub time: weir_policy::flow::FlowTime,
    /// The drop reason as a metrics label (DROPPED and ERROR only).
    pub drop_reason: Option<String>,
    /// An L7 record's facts for the metrics.
    pub l7_facts: Option<L7Facts>,
}

/// What the metrics count of an L7 record (bounded values only: a method
/// class, never the path).
#[derive(Debug, Clone)]
pub struct L7Facts {
    /// A RESPONSE record (else REQUEST).
    pub response: bool,
    pub latency_ns: u64,
    /// Of `latency_ns`, the upstream's part (forwarded HTTP requests).
    pub upstream_ns: Option<u64>,
    /// HTTP: the method's class (`GET` .. `OTHER`) and the status code.
    pub http: Option<(&'static str, u16)>,
    /// DNS: the answer's rcode.
    pub dns_rcode: Option<u32>,
    /// Kafka: the API's name as a bounded label (`other` for a key weir has no
    /// name for: a number would let a client mint label values) and the error
    /// code weir answered.
    pub kafka: Option<(String, i16)>,
}

impl L7Facts {
    fn new(l7: &weir_policy::flow::L7) -> Self {
        L7Facts {
            response: matches!(l7.kind, weir_policy::flow::L7Type::Response),
            latency_ns: l7.latency_ns,
            upstream_ns: l7.upstream_ns,
            http: l7
                .http
                .as_ref()
                .map(|h| (super::metrics::method_class(&h.method), h.code)),
            dns_rcode: l7.dns.as_ref().map(|d| d.rcode),
            kafka: l7.kafka.as_ref().map(|k| {
                let named = k.api_key.bytes().all(|b| b.is_ascii_lowercase());
                (
                    if named {
                        k.api_key.clone()
                    } else {
                        "other".into()
                    },
                    k.error_code,
                )
            }),
        }
    }
}

impl FlowKey {
    pub fn new(f: &Flow) -> Self {
        FlowKey {
            verdict: f.verdict,
            l7: f.l7.as_ref().map(|l| {
                if l.http.is_some() {
                    "HTTP"
                } else if l.dns.is_some() {
                    "DNS"
                } else if l.kafka.is_some() {
                    "Kafka"
                } else {
                    "OTHER"
                }
            }),
            l4: match f.l4 {
                L4::Tcp(_) => "TCP",
                L4::Udp(_) => "UDP",
                L4::Icmpv4(_) => "ICMPv4",
                L4::Icmpv6(_) => "ICMPv6",
            },
            ports: match &f.l4 {
                L4::Tcp(p) | L4::Udp(p) => Some((p.source_port, p.destination_port)),
                L4::Icmpv4(_) | L4::Icmpv6(_) => None,
            },
            source: f.source.clone(),
            destination: f.destination.clone(),
            source_ip: f.ip.source,
            destination_ip: f.ip.destination,
            time: f.time,
            drop_reason: (f.verdict != FlowVerdict::Forwarded)
                .then(|| super::metrics::reason_label(f.drop_reason_desc.as_deref())),
            l7_facts: f.l7.as_ref().map(L7Facts::new),
        }
    }
}

/// What a subscriber reads.
#[derive(Debug, Clone)]
pub enum Event {
    Flow(Arc<Record>),
    /// This many matching records were dropped here because the subscriber did
    /// not keep up.
    Lost(u64),
}

pub struct FlowBus {
    inner: Mutex<Inner>,
    capacity: usize,
    /// Counted as records are published (on the writer thread).
    metrics: super::metrics::FlowMetrics,
}

struct Inner {
    ring: VecDeque<Arc<Record>>,
    subscribers: Vec<Arc<SubShared>>,
}

struct SubShared {
    filter: FlowFilter,
    queue_cap: usize,
    state: Mutex<SubState>,
    notify: Notify,
}

#[derive(Default)]
struct SubState {
    queue: VecDeque<Arc<Record>>,
    /// Dropped since the subscriber last read; every queued record precedes
    /// them (records are only dropped while the queue is full).
    lost: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not stop flow records: the data is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FlowBus {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(FlowBus {
            inner: Mutex::new(Inner {
                ring: VecDeque::with_capacity(capacity.min(4096)),
                subscribers: Vec::new(),
            }),
            capacity,
            metrics: super::metrics::FlowMetrics::default(),
        })
    }

    /// The counters derived from published records, and their registry.
    pub fn metrics(&self) -> &super::metrics::FlowMetrics {
        &self.metrics
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records in the ring now.
    pub fn len(&self) -> usize {
        lock(&self.inner).ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds records to the ring (evicting the oldest) and to every subscriber
    /// whose filter matches. Called by the writer thread only.
    pub fn publish(&self, records: &[Arc<Record>]) {
        if records.is_empty() {
            return;
        }
        for r in records {
            self.metrics.observe(&r.key);
        }
        let mut inner = lock(&self.inner);
        if self.capacity > 0 {
            for r in records {
                if inner.ring.len() == self.capacity {
                    inner.ring.pop_front();
                }
                inner.ring.push_back(r.clone());
            }
        }
        for sub in &inner.subscribers {
            let mut woke = false;
            {
                let mut st = lock(&sub.state);
                for r in records.iter().filter(|r| sub.filter.matches(&r.key)) {
                    if st.queue.len() < sub.queue_cap {
                        st.queue.push_back(r.clone());
                    } else {
                        st.lost += 1;
                    }
                    woke = true;
                }
            }
            if woke {
                sub.notify.notify_one();
            }
        }
    }

    /// The last `last` records matching `filter` (oldest first) and, when
    /// `follow`, a subscription to every matching record published after them:
    /// both are taken under one lock so nothing is missed or seen twice.
    pub fn query(
        self: &Arc<Self>,
        filter: FlowFilter,
        last: usize,
        follow: bool,
        queue_cap: usize,
    ) -> (Vec<Arc<Record>>, Option<Subscription>) {
        let mut inner = lock(&self.inner);
        let mut recent: Vec<Arc<Record>> = inner
            .ring
            .iter()
            .rev()
            .filter(|r| filter.matches(&r.key))
            .take(last)
            .cloned()
            .collect();
        recent.reverse();
        let sub = follow.then(|| {
            let shared = Arc::new(SubShared {
                filter,
                queue_cap: queue_cap.max(1),
                state: Mutex::new(SubState::default()),
                notify: Notify::new(),
            });
            inner.subscribers.push(shared.clone());
            Subscription {
                bus: self.clone(),
                shared,
                pending: VecDeque::new(),
            }
        });
        (recent, sub)
    }

    /// Subscribers now (for tests and status).
    pub fn subscribers(&self) -> usize {
        lock(&self.inner).subscribers.len()
    }
}

/// A live reader of the bus; unsubscribes when dropped.
pub struct Subscription {
    bus: Arc<FlowBus>,
    shared: Arc<SubShared>,
    pending: VecDeque<Event>,
}

impl Subscription {
    /// The next record or loss marker, waiting for one.
    pub async fn next(&mut self) -> Event {
        loop {
            if let Some(e) = self.try_next() {
                return e;
            }
            self.shared.notify.notified().await;
        }
    }

    /// The next record or loss marker if one is waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        if self.pending.is_empty() {
            let mut st = lock(&self.shared.state);
            self.pending.extend(st.queue.drain(..).map(Event::Flow));
            if st.lost > 0 {
                self.pending
                    .push_back(Event::Lost(std::mem::take(&mut st.lost)));
            }
        }
        self.pending.pop_front()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut inner = lock(&self.bus.inner);
        inner.subscribers.retain(|s| !Arc::ptr_eq(s, &self.shared));
    }
}

/// Which kind of record (`--type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowType {
    L3L4,
    L7,
    Http,
    Dns,
    /// Kafka's L7 records (none are produced yet: the Kafka proxy is still to
    /// come; the filter is accepted so scripts written for it work now).
    Kafka,
}

impl std::str::FromStr for FlowType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "l3-l4" | "l3_l4" | "l34" => Ok(FlowType::L3L4),
            "l7" => Ok(FlowType::L7),
            "http" => Ok(FlowType::Http),
            "dns" => Ok(FlowType::Dns),
            "kafka" => Ok(FlowType::Kafka),
            _ => Err(format!(
                "unknown flow type `{s}` (want l3-l4, l7, http, dns or kafka)"
            )),
        }
    }
}

/// A peer selector (`--from`, `--to`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerFilter {
    /// An endpoint's name, or `namespace/name`.
    Name(String),
    /// `k=v` (with or without a source prefix such as `k8s:`), or a label
    /// without value such as `reserved:world`.
    Label(String),
    Ip(IpAddr),
}

impl std::str::FromStr for PeerFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an empty peer selector".into());
        }
        if let Ok(ip) = s.parse() {
            return Ok(PeerFilter::Ip(ip));
        }
        if s.contains('=') || s.starts_with("reserved:") {
            return Ok(PeerFilter::Label(s.to_string()));
        }
        Ok(PeerFilter::Name(s.to_string()))
    }
}

impl PeerFilter {
    fn matches(&self, ep: &weir_policy::flow::Endpoint, ip: IpAddr) -> bool {
        match self {
            PeerFilter::Ip(want) => *want == ip,
            PeerFilter::Name(name) => ep.pod_name.as_deref().is_some_and(|pod| {
                pod == name
                    || name
                        .split_once('/')
                        .is_some_and(|(ns, n)| n == pod && ep.namespace.as_deref() == Some(ns))
            }),
            PeerFilter::Label(want) => {
                ep.labels.iter().any(|l| {
                    l == want
                    // `class=xwing` matches `k8s:class=xwing`.
                    || l.split_once(':').is_some_and(|(_, rest)| rest == want)
                }) || namespace_label_matches(want, ep)
            }
        }
    }
}

/// The namespace is no label in flow records (it is `namespace`), but policies
/// and endpoints know it as one.
fn namespace_label_matches(want: &str, ep: &weir_policy::flow::Endpoint) -> bool {
    let want = want.strip_prefix("k8s:").unwrap_or(want);
    want.strip_prefix("io.kubernetes.pod.namespace=")
        .is_some_and(|ns| ep.namespace.as_deref() == Some(ns))
}

/// What a reader asks for: every non-empty list must match (any of its
/// entries); empty lists match everything.
#[derive(Debug, Clone, Default)]
pub struct FlowFilter {
    pub verdicts: Vec<FlowVerdict>,
    pub types: Vec<FlowType>,
    pub from: Vec<PeerFilter>,
    pub to: Vec<PeerFilter>,
    /// Source or destination port.
    pub ports: Vec<u16>,
    /// RFC 3339 UTC time as in flow records (`...Z`, nanoseconds): records at
    /// or after it. Flow times have one fixed width, so they compare as text.
    pub since: Option<String>,
}

impl FlowFilter {
    pub fn matches(&self, f: &FlowKey) -> bool {
        (self.verdicts.is_empty() || self.verdicts.contains(&f.verdict))
            && (self.types.is_empty() || self.types.iter().any(|t| type_matches(*t, f)))
            && (self.from.is_empty()
                || self
                    .from
                    .iter()
                    .any(|p| p.matches(&f.source.endpoint, f.source_ip)))
            && (self.to.is_empty()
                || self
                    .to
                    .iter()
                    .any(|p| p.matches(&f.destination.endpoint, f.destination_ip)))
            && (self.ports.is_empty()
                || f.ports
                    .is_some_and(|(s, d)| self.ports.iter().any(|p| *p == s || *p == d)))
            && self.since.as_deref().is_none_or(|t| f.time.as_str() >= t)
    }
}

fn type_matches(t: FlowType, f: &FlowKey) -> bool {
    match t {
        FlowType::L3L4 => f.l7.is_none(),
        FlowType::L7 => f.l7.is_some(),
        FlowType::Http => f.l7 == Some("HTTP"),
        FlowType::Dns => f.l7 == Some("DNS"),
        FlowType::Kafka => f.l7 == Some("KAFKA"),
    }
}

/// Parses a verdict name (`FORWARDED`, `DROPPED`, `ERROR`; any case).
pub fn parse_verdict(s: &str) -> Result<FlowVerdict, String> {
    match s.to_ascii_uppercase().as_str() {
        "FORWARDED" => Ok(FlowVerdict::Forwarded),
        "DROPPED" => Ok(FlowVerdict::Dropped),
        "ERROR" => Ok(FlowVerdict::Error),
        _ => Err(format!(
            "unknown verdict `{s}` (want FORWARDED, DROPPED or ERROR)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_policy::flow::{Endpoint, FlowPeers, Http, L7Type, RenderedEndpoint};

    fn endpoint(name: Option<&str>, labels: &[&str]) -> Arc<RenderedEndpoint> {
        Arc::new(RenderedEndpoint::new(Endpoint {
            id: name.map(|_| 300),
            identity: if name.is_some() { 300 } else { 2 },
            labels: labels.iter().map(|l| l.to_string()).collect(),
            namespace: name.map(|_| "default".to_string()),
            pod_name: name.map(str::to_string),
        }))
    }

    /// A flow from tiefighter (class=tiefighter) to the world on `port`.
    fn flow(port: u16, allowed: bool) -> Flow {
        let peers = FlowPeers {
            source: endpoint(Some("tiefighter"), &["k8s:class=tiefighter"]),
            destination: endpoint(None, &["reserved:world"]),
            node_name: Arc::from("t"),
        };
        let verdict = weir_policy::Verdict {
            allowed,
            rules: vec![],
            denied_in: None,
            l7: false,
        };
        Flow::with_peers(
            &peers,
            ("10.0.0.1".parse().unwrap(), 40000),
            ("10.0.0.2".parse().unwrap(), port),
            &verdict,
        )
    }

    fn http(f: Flow) -> Flow {
        f.with_http(
            L7Type::Request,
            1,
            Http {
                method: "GET".into(),
                url: "http://x/".into(),
                protocol: "HTTP/1.1".into(),
                ..Http::default()
            },
        )
    }

    fn dns(f: Flow) -> Flow {
        f.over_udp().with_dns(
            L7Type::Request,
            1,
            weir_parsers::dns::DnsFlow {
                query: "a.example.".into(),
                qtypes: vec!["A".into()],
                ..Default::default()
            },
        )
    }

    fn kafka(f: Flow, api_key: &str, error_code: i16) -> Flow {
        f.with_kafka(
            1,
            weir_policy::flow::KafkaFlow {
                error_code,
                api_version: 9,
                api_key: api_key.into(),
                correlation_id: 7,
                topic: "empire".into(),
            },
            "Kafka".into(),
        )
    }

    fn rec(f: Flow) -> Arc<Record> {
        Arc::new(Record::rendered(&f))
    }

    fn ports_of(rs: &[Arc<Record>]) -> Vec<u16> {
        rs.iter().map(|r| r.key.ports.map_or(0, |p| p.1)).collect()
    }

    #[test]
    fn the_ring_is_bounded_and_answers_the_last_n() {
        let bus = FlowBus::new(4);
        let all: Vec<_> = (1..=10).map(|p| rec(flow(p, true))).collect();
        bus.publish(&all[..3]);
        bus.publish(&all[3..]);
        assert_eq!(bus.len(), 4);
        let (r, sub) = bus.query(FlowFilter::default(), 100, false, 10);
        assert!(sub.is_none());
        assert_eq!(ports_of(&r), [7, 8, 9, 10], "the newest, oldest first");
        let (r, _) = bus.query(FlowFilter::default(), 2, false, 10);
        assert_eq!(ports_of(&r), [9, 10]);
        let (r, _) = bus.query(FlowFilter::default(), 0, false, 10);
        assert!(r.is_empty());
        // The last N are counted among the matching records, not all records.
        let only_even = FlowFilter {
            ports: vec![8, 10],
            ..FlowFilter::default()
        };
        let (r, _) = bus.query(only_even, 1, false, 10);
        assert_eq!(ports_of(&r), [10]);
        let zero = FlowBus::new(0);
        zero.publish(&all);
        assert!(zero.is_empty());
    }

    #[test]
    fn filters_select_exactly_what_they_say() {
        // (port, record): 1 L3/L4 allowed, 2 L3/L4 dropped, 3 HTTP allowed,
        // 4 HTTP dropped, 5 DNS allowed, 6 an error.
        let mix = [
            flow(1, true),
            flow(2, false),
            http(flow(3, true)),
            http(flow(4, false)),
            dns(flow(5, true)),
            http(flow(6, true)).with_error("upstream failed"),
        ];
        let bus = FlowBus::new(100);
        let recs: Vec<_> = mix.into_iter().map(rec).collect();
        bus.publish(&recs);
        let cases: Vec<(FlowFilter, Vec<u16>)> = vec![
            (FlowFilter::default(), vec![1, 2, 3, 4, 5, 6]),
            (
                FlowFilter {
                    verdicts: vec![FlowVerdict::Dropped],
                    ..Default::default()
                },
                vec![2, 4],
            ),
            (
                FlowFilter {
                    verdicts: vec![FlowVerdict::Error, FlowVerdict::Forwarded],
                    ..Default::default()
                },
                vec![1, 3, 5, 6],
            ),
            (
                FlowFilter {
                    types: vec![FlowType::L3L4],
                    ..Default::default()
                },
                vec![1, 2],
            ),
            (
                FlowFilter {
                    types: vec![FlowType::L7],
                    ..Default::default()
                },
                vec![3, 4, 5, 6],
            ),
            (
                FlowFilter {
                    types: vec![FlowType::Http],
                    ..Default::default()
                },
                vec![3, 4, 6],
            ),
            (
                FlowFilter {
                    types: vec![FlowType::Dns],
                    ..Default::default()
                },
                vec![5],
            ),
            (
                FlowFilter {
                    types: vec![FlowType::Kafka],
                    ..Default::default()
                },
                vec![],
            ),
            (
                FlowFilter {
                    types: vec![FlowType::Kafka, FlowType::Dns],
                    ..Default::default()
                },
                vec![5],
            ),
            (
                FlowFilter {
                    types: vec![FlowType::Http],
                    verdicts: vec![FlowVerdict::Dropped],
                    ..Default::default()
                },
                vec![4],
            ),
            (
                FlowFilter {
                    ports: vec![40000],
                    ..Default::default()
                },
                vec![1, 2, 3, 4, 5, 6],
            ),
            (
                FlowFilter {
                    ports: vec![3, 5],
                    ..Default::default()
                },
                vec![3, 5],
            ),
            (
                FlowFilter {
                    since: Some("9999-01-01T00:00:00.000000000Z".into()),
                    ..Default::default()
                },
                vec![],
            ),
            (
                FlowFilter {
                    since: Some("2000-01-01T00:00:00.000000000Z".into()),
                    ..Default::default()
                },
                vec![1, 2, 3, 4, 5, 6],
            ),
        ];
        let peer_cases = [
            ("tiefighter", true, false),
            ("default/tiefighter", true, false),
            ("other/tiefighter", false, false),
            ("class=tiefighter", true, false),
            ("k8s:class=tiefighter", true, false),
            ("io.kubernetes.pod.namespace=default", true, false),
            ("class=xwing", false, false),
            ("reserved:world", false, true),
            ("10.0.0.2", false, true),
            ("10.0.0.1", true, false),
        ];
        for (filter, want) in cases {
            let (r, _) = bus.query(filter.clone(), 100, false, 1);
            assert_eq!(ports_of(&r), want, "{filter:?}");
        }
        for (sel, from, to) in peer_cases {
            let p: PeerFilter = sel.parse().unwrap();
            for (is_from, want) in [(true, from), (false, to)] {
                let filter = if is_from {
                    FlowFilter {
                        from: vec![p.clone()],
                        ..Default::default()
                    }
                } else {
                    FlowFilter {
                        to: vec![p.clone()],
                        ..Default::default()
                    }
                };
                let (r, _) = bus.query(filter, 100, false, 1);
                assert_eq!(r.len(), if want { 6 } else { 0 }, "{sel} from={is_from}");
            }
        }
        assert!("".parse::<PeerFilter>().is_err());
        assert_eq!("kafka".parse::<FlowType>(), Ok(FlowType::Kafka));
        assert!("smtp".parse::<FlowType>().is_err());
        assert!(parse_verdict("dropped").is_ok());
        assert!(parse_verdict("AUDIT").is_err());
    }

    /// A subscriber that does not read loses what does not fit in its queue and
    /// is told how many, after the records it did get; publishing never waits
    /// for it, and other subscribers lose nothing.
    #[test]
    fn a_slow_subscriber_loses_flows_and_is_told_how_many() {
        let bus = FlowBus::new(100);
        let (_, slow) = bus.query(FlowFilter::default(), 0, true, 3);
        let (_, fast) = bus.query(FlowFilter::default(), 0, true, 1000);
        let (_, dropped_only) = bus.query(
            FlowFilter {
                verdicts: vec![FlowVerdict::Dropped],
                ..Default::default()
            },
            0,
            true,
            1,
        );
        let (mut slow, mut fast, mut dropped_only) =
            (slow.unwrap(), fast.unwrap(), dropped_only.unwrap());
        assert_eq!(bus.subscribers(), 3);
        let started = std::time::Instant::now();
        for p in 1..=10 {
            bus.publish(&[rec(flow(p, p != 5))]);
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let drain = |s: &mut Subscription| {
            let mut seen = Vec::new();
            while let Some(e) = s.try_next() {
                seen.push(match e {
                    Event::Flow(r) => format!("{}", r.key.ports.map_or(0, |p| p.1)),
                    Event::Lost(n) => format!("lost {n}"),
                });
            }
            seen
        };
        assert_eq!(drain(&mut slow), ["1", "2", "3", "lost 7"]);
        assert_eq!(drain(&mut fast).len(), 10);
        // Only matching records count as lost.
        assert_eq!(drain(&mut dropped_only), ["5"]);
        // Once it reads again, it gets new records, and no stale loss count.
        bus.publish(&[rec(flow(11, true)), rec(flow(12, true))]);
        assert_eq!(drain(&mut slow), ["11", "12"]);
        drop(slow);
        drop(fast);
        assert_eq!(bus.subscribers(), 1);
    }

    /// A follower gets what the ring had, then only newer records: the query
    /// and the subscription are one step.
    #[tokio::test]
    async fn history_then_live_without_gaps_or_repeats() {
        let bus = FlowBus::new(100);
        bus.publish(&[rec(flow(1, true)), rec(flow(2, true))]);
        let (history, sub) = bus.query(FlowFilter::default(), 10, true, 10);
        let mut sub = sub.unwrap();
        assert_eq!(ports_of(&history), [1, 2]);
        let publisher = bus.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            publisher.publish(&[rec(flow(3, true))]);
        });
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), sub.next())
            .await
            .expect("a live record");
        match got {
            Event::Flow(r) => assert_eq!(r.key.ports.map(|p| p.1), Some(3)),
            Event::Lost(n) => panic!("lost {n}"),
        }
    }

    #[test]
    fn metrics_count_every_published_record_by_verdict_type_and_reason() {
        let bus = FlowBus::new(1);
        let recs: Vec<_> = [
            flow(1, true),
            flow(2, false),
            http(flow(3, true)),
            http(flow(4, false)),
            http(flow(5, false)),
            dns(flow(6, true)),
            http(flow(7, true)).with_error("MALFORMED_REQUEST: bad"),
            kafka(flow(8, true), "produce", 0),
            kafka(flow(9, false), "produce", 29),
            kafka(flow(10, false), "produce", 29),
            kafka(flow(11, false), "12345", 29),
        ]
        .into_iter()
        .map(rec)
        .collect();
        bus.publish(&recs);
        let text = bus.metrics().encode();
        let mut lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("weir_drop_total") || l.starts_with("weir_flows_processed"))
            .collect();
        lines.sort();
        assert_eq!(
            lines,
            [
                r#"weir_drop_total{reason="MALFORMED_REQUEST"} 1"#,
                r#"weir_drop_total{reason="POLICY_DENIED"} 6"#,
                r#"weir_flows_processed_total{verdict="DROPPED",type="L3_L4",protocol="TCP"} 1"#,
                r#"weir_flows_processed_total{verdict="DROPPED",type="L7",protocol="HTTP"} 2"#,
                r#"weir_flows_processed_total{verdict="DROPPED",type="L7",protocol="Kafka"} 3"#,
                r#"weir_flows_processed_total{verdict="ERROR",type="L7",protocol="HTTP"} 1"#,
                r#"weir_flows_processed_total{verdict="FORWARDED",type="L3_L4",protocol="TCP"} 1"#,
                r#"weir_flows_processed_total{verdict="FORWARDED",type="L7",protocol="DNS"} 1"#,
                r#"weir_flows_processed_total{verdict="FORWARDED",type="L7",protocol="HTTP"} 1"#,
                r#"weir_flows_processed_total{verdict="FORWARDED",type="L7",protocol="Kafka"} 1"#,
            ],
            "{text}"
        );
        // Every HTTP record is one request; the DNS one a query; every Kafka
        // record a request (an API key weir has no name for is `other`).
        for line in [
            r#"weir_http_requests_total{method="GET",code="0"} 4"#,
            r#"weir_dns_queries_total{verdict="FORWARDED"} 1"#,
            r#"weir_kafka_requests_total{api_key="produce",verdict="FORWARDED",error_code="0"} 1"#,
            r#"weir_kafka_requests_total{api_key="produce",verdict="DROPPED",error_code="29"} 2"#,
            r#"weir_kafka_requests_total{api_key="other",verdict="DROPPED",error_code="29"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "`{line}` missing:\n{text}");
        }
    }
}
