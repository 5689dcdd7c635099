//! The one flow record type for every verdict and every protocol, with field names
//! from Hubble's flow schema so `jq` filters written for `hubble observe -o json`
//! mostly carry over. Later protocols fill in their part of `l7`.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::compile::{CompiledPolicy, PeerInfo, Verdict};

mod json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FlowVerdict {
    Forwarded,
    Dropped,
    /// Refused for a reason other than policy (malformed request, upstream failure).
    Error,
}

/// Hubble's `traffic_direction`: whose policy the record is about — the
/// destination endpoint's ingress or the source endpoint's egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TrafficDirection {
    #[serde(rename = "INGRESS")]
    Ingress,
    #[serde(rename = "EGRESS")]
    Egress,
    /// Neither peer is a local endpoint and no rule decided.
    #[serde(rename = "TRAFFIC_DIRECTION_UNKNOWN")]
    Unknown,
}

impl TrafficDirection {
    /// The direction that decided `verdict`: the direction denied in; else that
    /// of the deciding rules (the destination's ingress when both directions
    /// allowed: the record is about the last check the flow passed); with no
    /// deciding rule, the destination's ingress when it is a local endpoint,
    /// the source's egress when that is.
    pub fn of(verdict: &Verdict, src_local: bool, dst_local: bool) -> Self {
        use crate::compile::Direction;
        let from = |d: Direction| match d {
            Direction::Ingress => TrafficDirection::Ingress,
            Direction::Egress => TrafficDirection::Egress,
        };
        if let Some(d) = verdict.denied_in {
            return from(d);
        }
        // Every record asks: no list of the rules' directions, one pass.
        let (mut ingress, mut egress) = (false, false);
        for dir in verdict.rules.iter().filter_map(|r| rule_direction(&r.rule)) {
            match dir {
                Direction::Ingress => ingress = true,
                Direction::Egress => egress = true,
            }
        }
        if ingress {
            TrafficDirection::Ingress
        } else if egress {
            TrafficDirection::Egress
        } else if dst_local {
            TrafficDirection::Ingress
        } else if src_local {
            TrafficDirection::Egress
        } else {
            TrafficDirection::Unknown
        }
    }
}

/// The direction a rule path (`specs[0].ingress[1].toPorts[0]...`) is in.
fn rule_direction(rule: &str) -> Option<crate::compile::Direction> {
    use crate::compile::Direction;
    rule.split(['.', '[']).find_map(|seg| match seg {
        "ingress" | "ingressDeny" => Some(Direction::Ingress),
        "egress" | "egressDeny" => Some(Direction::Egress),
        _ => None,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    #[serde(rename = "ID", skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    pub identity: u32,
    pub labels: Vec<String>,
    /// Hubble's `namespace`: a local endpoint's Kubernetes namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ip {
    pub source: IpAddr,
    pub destination: IpAddr,
    #[serde(rename = "ipVersion")]
    pub ip_version: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ports {
    pub source_port: u16,
    pub destination_port: u16,
}

#[derive(Debug, Clone, Serialize)]
pub enum L4 {
    #[serde(rename = "TCP")]
    Tcp(Ports),
    #[serde(rename = "UDP")]
    Udp(Ports),
    #[serde(rename = "ICMPv4")]
    Icmpv4(Icmp),
    #[serde(rename = "ICMPv6")]
    Icmpv6(Icmp),
}

#[derive(Debug, Clone, Serialize)]
pub struct Icmp {
    #[serde(rename = "type")]
    pub kind: u8,
    pub code: u8,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpHeader {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Http {
    /// Response status; 0 when no response was produced.
    pub code: u16,
    /// Borrowed for the standard methods and every protocol name: no string per record.
    pub method: Cow<'static, str>,
    pub url: String,
    pub protocol: Cow<'static, str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HttpHeader>,
    /// `headerMatches` entries whose header did not have the required value, and
    /// the `mismatch` action weir took (LOG, ADD, DELETE, REPLACE).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub header_mismatches: Vec<crate::http_match::HeaderMismatch>,
    /// Set when the request was a gRPC call (`content-type: application/grpc*`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Grpc>,
}

/// A gRPC call's facts: `/service/method` and the status it ended with.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Grpc {
    pub service: String,
    pub method: String,
    /// `grpc-status` from the trailers (or a trailers-only response); `None`
    /// when the call ended without one (cancelled or reset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum L7Type {
    Request,
    Response,
}

#[derive(Debug, Clone, Serialize)]
pub struct L7 {
    #[serde(rename = "type")]
    pub kind: L7Type,
    pub latency_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<Http>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<weir_parsers::dns::DnsFlow>,
    /// Of `latency_ns`, the time spent waiting for the upstream (a forwarded
    /// request). Not in Hubble's schema, so not in the JSON: it feeds the
    /// latency histograms, which split weir's own time from the server's.
    #[serde(skip)]
    pub upstream_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaFlow>,
}

/// Hubble's `l7.kafka`: one Kafka request and the error code it got (0 when it was
/// forwarded: the broker's own answer is not inspected).
#[derive(Debug, Clone, Serialize)]
pub struct KafkaFlow {
    pub error_code: i16,
    pub api_version: i16,
    /// The API's name (`produce`, `fetch`, ...), or its number when weir has none.
    pub api_key: String,
    pub correlation_id: i32,
    /// The topics it names, comma separated (Hubble has one field).
    pub topic: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    pub time: FlowTime,
    pub verdict: FlowVerdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_reason_desc: Option<String>,
    #[serde(rename = "IP")]
    pub ip: Ip,
    pub l4: L4,
    pub source: Arc<RenderedEndpoint>,
    pub destination: Arc<RenderedEndpoint>,
    #[serde(rename = "Type")]
    pub kind: &'static str,
    pub traffic_direction: TrafficDirection,
    /// A reply's record (an L7 RESPONSE, an ICMP echo reply); an L7 RESPONSE
    /// keeps the request's source and destination.
    pub is_reply: bool,
    pub node_name: Arc<str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l7: Option<L7>,
    /// The deciding rules (`policy rule-path`), or why nothing allowed it.
    pub policy: String,
    #[serde(rename = "Summary")]
    pub summary: String,
}

/// An endpoint with its JSON rendered once: every request on a connection
/// repeats it, so it is serialised per connection, not per flow.
#[derive(Debug, Clone)]
pub struct RenderedEndpoint {
    pub endpoint: Endpoint,
    json: Box<serde_json::value::RawValue>,
}

impl RenderedEndpoint {
    pub fn new(endpoint: Endpoint) -> Self {
        let json = serde_json::value::to_raw_value(&endpoint).unwrap_or_else(|_| {
            serde_json::value::RawValue::from_string("null".into()).expect("valid JSON")
        });
        RenderedEndpoint { endpoint, json }
    }

    /// The endpoint's JSON object, as rendered once.
    pub fn json(&self) -> &str {
        self.json.get()
    }
}

impl Serialize for RenderedEndpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(s)
    }
}

/// The parts of a flow that stay the same for every request on a connection,
/// built once per connection.
#[derive(Debug, Clone)]
pub struct FlowPeers {
    pub source: Arc<RenderedEndpoint>,
    pub destination: Arc<RenderedEndpoint>,
    pub node_name: Arc<str>,
}

/// The reserved label of a peer that is no local endpoint.
fn reserved_label(policy: &CompiledPolicy, identity: u32) -> &'static str {
    use crate::compile::CidrKind;
    match policy
        .cidr_identities()
        .iter()
        .find(|c| c.identity == identity)
        .map(|c| (c.kind, c.kube_apiserver))
    {
        Some((_, true)) => "reserved:kube-apiserver",
        Some((CidrKind::Cluster, _)) => "reserved:cluster",
        Some((CidrKind::RemoteNode, _)) => "reserved:remote-node",
        Some((CidrKind::World, _)) | None => "reserved:world",
    }
}

impl FlowPeers {
    pub fn new(
        policy: &CompiledPolicy,
        src: &PeerInfo,
        dst: &PeerInfo,
        node_name: Arc<str>,
    ) -> Self {
        let ep = |p: &PeerInfo| {
            let info = p.endpoint.and_then(|i| policy.endpoints().get(i));
            Arc::new(RenderedEndpoint::new(Endpoint {
                id: info.map(|_| p.identity),
                identity: p.identity,
                labels: match info {
                    Some(e) => e
                        .labels
                        .iter()
                        .map(|(k, v)| format!("k8s:{k}={v}"))
                        .collect(),
                    None if p.identity == crate::identity::IDENTITY_HOST => {
                        vec!["reserved:host".to_string()]
                    }
                    None => vec![reserved_label(policy, p.identity).to_string()],
                },
                namespace: info.map(|e| e.endpoint.namespace.clone()),
                pod_name: info.map(|e| e.endpoint.name.clone()),
            }))
        };
        FlowPeers {
            source: ep(src),
            destination: ep(dst),
            node_name,
        }
    }
}

/// Hubble's DNS summary (`DNS Query q. A`, `DNS Answer RCode: ...`, `DNS Answer
/// "ips" TTL: n (Proxy q. A)`), written into one string sized up front: two
/// records per query have one.
fn dns_summary(kind: &L7Type, dns: &weir_parsers::dns::DnsFlow) -> String {
    use std::fmt::Write;
    fn joined_len<S: AsRef<str>>(v: &[S]) -> usize {
        v.iter().map(|s| s.as_ref().len() + 1).sum()
    }
    fn push_joined<S: AsRef<str>>(out: &mut String, v: &[S]) {
        for (i, s) in v.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(s.as_ref());
        }
    }
    let mut out =
        String::with_capacity(48 + dns.query.len() + joined_len(&dns.qtypes) + 16 * dns.ips.len());
    match kind {
        L7Type::Request => out.push_str("DNS Query "),
        L7Type::Response if dns.rcode != 0 => {
            out.push_str("DNS Answer RCode: ");
            out.push_str(&weir_parsers::dns::rcode_name(
                u16::try_from(dns.rcode).unwrap_or(u16::MAX),
            ));
            out.push_str(" (Proxy ");
        }
        L7Type::Response => {
            out.push_str("DNS Answer \"");
            for (i, ip) in dns.ips.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                json::ip_text(&mut out, *ip);
            }
            let _ = write!(out, "\" TTL: {} (Proxy ", dns.ttl);
        }
    }
    out.push_str(&dns.query);
    out.push(' ');
    push_joined(&mut out, &dns.qtypes);
    if matches!(kind, L7Type::Response) {
        out.push(')');
    }
    out
}

impl Flow {
    /// A flow for a verdict on a TCP connection or request between two peers.
    pub fn new(
        policy: &CompiledPolicy,
        src: (&PeerInfo, u16),
        dst: (&PeerInfo, u16),
        verdict: &Verdict,
        node_name: &str,
    ) -> Flow {
        let peers = FlowPeers::new(policy, src.0, dst.0, Arc::from(node_name));
        Flow::with_peers(&peers, (src.0.ip, src.1), (dst.0.ip, dst.1), verdict)
    }

    /// A flow from a connection's cached peers.
    pub fn with_peers(
        peers: &FlowPeers,
        src: (IpAddr, u16),
        dst: (IpAddr, u16),
        verdict: &Verdict,
    ) -> Flow {
        Self::with_peers_and_policy(peers, src, dst, verdict, verdict.reason())
    }

    /// [`Flow::with_peers`] with the `policy` text given (a caller that
    /// rendered the verdict's reason already does not render it again).
    pub fn with_peers_and_policy(
        peers: &FlowPeers,
        src: (IpAddr, u16),
        dst: (IpAddr, u16),
        verdict: &Verdict,
        policy: String,
    ) -> Flow {
        Flow {
            time: FlowTime::now(),
            verdict: if verdict.allowed {
                FlowVerdict::Forwarded
            } else {
                FlowVerdict::Dropped
            },
            drop_reason_desc: (!verdict.allowed).then(|| "POLICY_DENIED".to_string()),
            ip: Ip {
                source: src.0,
                destination: dst.0,
                ip_version: if src.0.is_ipv4() { "IPv4" } else { "IPv6" },
            },
            l4: L4::Tcp(Ports {
                source_port: src.1,
                destination_port: dst.1,
            }),
            source: peers.source.clone(),
            destination: peers.destination.clone(),
            kind: "L3_L4",
            traffic_direction: TrafficDirection::of(
                verdict,
                peers.source.endpoint.id.is_some(),
                peers.destination.endpoint.id.is_some(),
            ),
            is_reply: false,
            node_name: peers.node_name.clone(),
            l7: None,
            policy,
            summary: String::new(),
        }
    }

    /// The same record for a UDP flow.
    pub fn over_udp(mut self) -> Flow {
        self.l4 = match self.l4 {
            L4::Tcp(ports) => L4::Udp(ports),
            udp => udp,
        };
        self
    }

    pub fn with_http(mut self, kind: L7Type, latency_ns: u64, http: Http) -> Flow {
        // `{protocol} {method} {url}[ => {code}]`, built in one string (every
        // HTTP record has one).
        let mut summary =
            String::with_capacity(http.protocol.len() + http.method.len() + http.url.len() + 10);
        for (i, part) in [&*http.protocol, &*http.method, http.url.as_str()]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                summary.push(' ');
            }
            summary.push_str(part);
        }
        if http.code != 0 {
            use std::fmt::Write;
            let _ = write!(summary, " => {}", http.code);
        }
        self.summary = summary;
        self.kind = "L7";
        self.is_reply = matches!(kind, L7Type::Response);
        self.l7 = Some(L7 {
            kind,
            latency_ns,
            http: Some(http),
            dns: None,
            upstream_ns: None,
            kafka: None,
        });
        self
    }

    /// Records how much of an L7 record's latency was the upstream's.
    pub fn with_upstream_ns(mut self, ns: u64) -> Flow {
        if let Some(l7) = &mut self.l7 {
            l7.upstream_ns = Some(ns);
        }
        self
    }

    /// A DNS query (REQUEST) or answer (RESPONSE) record; the summary reads like
    /// Hubble's (`DNS Query api.example.com. A`, `DNS Answer "192.0.2.1" TTL: 30
    /// (Proxy api.example.com. A)`).
    pub fn with_dns(
        mut self,
        kind: L7Type,
        latency_ns: u64,
        dns: weir_parsers::dns::DnsFlow,
    ) -> Flow {
        self.summary = dns_summary(&kind, &dns);
        self.kind = "L7";
        self.is_reply = matches!(kind, L7Type::Response);
        self.l7 = Some(L7 {
            kind,
            latency_ns,
            http: None,
            dns: Some(dns),
            upstream_ns: None,
            kafka: None,
        });
        self
    }

    /// A Kafka request record; `summary` reads like the request.
    pub fn with_kafka(mut self, latency_ns: u64, kafka: KafkaFlow, summary: String) -> Flow {
        self.summary = summary;
        self.kind = "L7";
        self.l7 = Some(L7 {
            kind: L7Type::Request,
            latency_ns,
            http: None,
            dns: None,
            kafka: Some(kafka),
            upstream_ns: None,
        });
        self
    }

    pub fn with_error(mut self, reason: impl Into<String>) -> Flow {
        self.verdict = FlowVerdict::Error;
        self.drop_reason_desc = Some(reason.into());
        self
    }

    /// Appends the record's JSON object (no newline) to `out`.
    pub fn write_json(&self, out: &mut String) {
        json::write_flow(out, self);
    }

    pub fn to_json_line(&self) -> String {
        // A record is 0.5–1.5 KB: one allocation up front instead of the
        // doublings `to_string` goes through.
        let mut line = String::with_capacity(1536);
        json::write_flow(&mut line, self);
        line.push('\n');
        line
    }
}

/// Current UTC time as RFC 3339 with nanoseconds, without a date-time dependency.
pub fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

/// `t` as flow records write it: UTC, nanoseconds, one fixed width (so two
/// such times compare as text).
pub fn rfc3339(t: SystemTime) -> String {
    FlowTime::at(t).as_str().to_string()
}

/// A flow record's time, [`rfc3339`]'s text held inline: every record has one,
/// and it costs no allocation (nor one per copy, for the bus's filter key).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowTime {
    text: [u8; FlowTime::CAPACITY],
    len: u8,
}

impl FlowTime {
    /// 30 bytes for years 0–9999; room for the rare wider year.
    const CAPACITY: usize = 40;

    pub fn now() -> Self {
        Self::at(SystemTime::now())
    }

    pub fn at(t: SystemTime) -> Self {
        let now = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let [y, m, d, h, min, sec] = civil(now.as_secs() as i64);
        let nanos = now.subsec_nanos();
        if !(0..=9999).contains(&y) {
            // Years past 9999 or before 0 are left to `format!`.
            return Self::from_ascii(&format!(
                "{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{sec:02}.{nanos:09}Z"
            ));
        }
        // Written digit by digit, not through `format!`'s padding machinery.
        let fields = [
            (y, 4),
            (m, 2),
            (d, 2),
            (h, 2),
            (min, 2),
            (sec, 2),
            (i64::from(nanos), 9),
        ];
        let mut out = FlowTime {
            text: [0; Self::CAPACITY],
            len: 0,
        };
        for ((mut v, width), sep) in fields.into_iter().zip(*b"--T::.Z") {
            // `v` is non-negative and below `10^width`; digits from the last
            // one, by a constant divisor (no `pow`, no division by a variable).
            let mut digits = [b'0'; 9];
            for slot in digits[..width].iter_mut().rev() {
                *slot = b'0' + v.rem_euclid(10) as u8;
                v /= 10;
            }
            digits[..width].iter().for_each(|&b| out.push(b));
            out.push(sep);
        }
        out
    }

    /// `s` (ASCII: what [`FlowTime::at`] writes), cut at the capacity.
    fn from_ascii(s: &str) -> Self {
        let mut out = FlowTime {
            text: [0; Self::CAPACITY],
            len: 0,
        };
        s.bytes().filter(u8::is_ascii).for_each(|b| out.push(b));
        out
    }

    fn push(&mut self, b: u8) {
        if let Some(slot) = self.text.get_mut(usize::from(self.len)) {
            *slot = b;
            self.len += 1;
        }
    }

    pub fn as_str(&self) -> &str {
        let bytes = self.text.get(..usize::from(self.len)).unwrap_or_default();
        // Only ASCII is ever pushed.
        std::str::from_utf8(bytes).unwrap_or_default()
    }
}

impl std::ops::Deref for FlowTime {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for FlowTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for FlowTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for FlowTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Seconds since the Unix epoch as UTC [year, month, day, hour, minute, second]
/// (civil-from-days, H. Hinnant).
fn civil(secs: i64) -> [i64; 6] {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    [y, m, d, rem / 3600, rem % 3600 / 60, rem % 60]
}

/// An RFC 3339 UTC time (`2026-11-22T20:01:02Z`, with or without a fraction)
/// in flow records' form, or `None` if it is not one.
pub fn normalize_rfc3339(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let ok = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && matches!(b[10], b'T' | b't' | b' ')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !ok {
        return None;
    }
    let rest = s.get(19..)?;
    let frac = match rest.strip_suffix(['Z', 'z'])? {
        "" => "",
        f => f.strip_prefix('.')?,
    };
    if frac.len() > 9
        || !frac.bytes().all(|d| d.is_ascii_digit())
        || rest.len() > 1 && frac.is_empty()
    {
        return None;
    }
    Some(format!("{}T{}.{frac:0<9}Z", &s[..10], &s[11..19]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_writes_what_format_wrote() {
        use std::time::{Duration, UNIX_EPOCH};
        for (secs, nanos) in [
            (0, 0),
            (951_782_400, 7),             // 2000-02-29
            (1_795_398_583, 159_000_001), // 2026-11-23
            (4_102_444_799, 999_999_999), // 2099-12-31T23:59:59
            (253_402_300_799, 1),         // 9999-12-31T23:59:59
            (253_402_300_800, 5),         // 10000-01-01: format!'s own
        ] {
            let t = UNIX_EPOCH + Duration::new(secs, nanos);
            // The same fields through `format!`'s padding: the text the digit
            // writer must reproduce.
            let [y, m, dd, h, min, sec] = super::civil(secs as i64);
            let want = format!("{y:04}-{m:02}-{dd:02}T{h:02}:{min:02}:{sec:02}.{nanos:09}Z");
            assert_eq!(super::rfc3339(t), want);
        }
        assert_eq!(
            super::rfc3339(UNIX_EPOCH + Duration::new(951_782_400, 7)),
            "2000-02-29T00:00:00.000000007Z"
        );
    }

    #[test]
    fn flow_time_serialises_and_orders_as_its_text() {
        use std::time::{Duration, UNIX_EPOCH};
        let a = super::FlowTime::at(UNIX_EPOCH + Duration::new(1_795_398_583, 9));
        let b = super::FlowTime::at(UNIX_EPOCH + Duration::new(1_795_398_583, 10));
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            "\"2026-11-23T01:49:43.000000009Z\""
        );
        assert!(a < b && a.as_str() < b.as_str());
        assert_eq!(a.as_str().len(), 30);
    }

    #[test]
    fn since_times_normalize_to_the_record_form() {
        use super::normalize_rfc3339 as n;
        assert_eq!(
            n("2026-11-22T20:01:02Z").as_deref(),
            Some("2026-11-22T20:01:02.000000000Z")
        );
        assert_eq!(
            n("2026-11-22T20:01:02.5Z").as_deref(),
            Some("2026-11-22T20:01:02.500000000Z")
        );
        for bad in [
            "",
            "2026-11-22",
            "2026-11-22T20:01:02",
            "2026-11-22T20:01:02+01:00",
            "2026-11-22T20:01:02.Z",
            "2026-11-22T20:01:02.1234567891Z",
        ] {
            assert_eq!(n(bad), None, "{bad}");
        }
        let t = super::rfc3339_now();
        assert_eq!(n(&t), Some(t));
    }

    #[test]
    fn traffic_direction_follows_the_deciding_side() {
        use super::TrafficDirection as T;
        use crate::compile::{Direction, RuleRef, Verdict};
        let v = |rules: &[&str], denied_in: Option<Direction>| Verdict {
            allowed: denied_in.is_none(),
            rules: rules
                .iter()
                .map(|r| RuleRef {
                    policy: "default/p".into(),
                    rule: (*r).into(),
                })
                .collect(),
            denied_in,
            l7: false,
        };
        assert_eq!(
            T::of(&v(&[], Some(Direction::Egress)), true, true),
            T::Egress
        );
        assert_eq!(
            T::of(&v(&[], Some(Direction::Ingress)), true, true),
            T::Ingress
        );
        assert_eq!(
            T::of(&v(&["specs[0].egress[0].toPorts[0]"], None), true, false),
            T::Egress
        );
        assert_eq!(
            T::of(
                &v(
                    &[
                        "specs[0].egress[0]",
                        "specs[1].ingress[2].toPorts[0].rules.http[0]"
                    ],
                    None
                ),
                true,
                true
            ),
            T::Ingress
        );
        assert_eq!(T::of(&v(&[], None), false, true), T::Ingress);
        assert_eq!(T::of(&v(&[], None), true, false), T::Egress);
        assert_eq!(T::of(&v(&[], None), false, false), T::Unknown);
    }

    #[test]
    fn dns_summaries_read_like_hubbles() {
        use super::{L7Type, dns_summary};
        use weir_parsers::dns::DnsFlow;
        let query = DnsFlow {
            query: "api.example.com.".into(),
            qtypes: vec!["A".into(), "AAAA".into()],
            ..DnsFlow::default()
        };
        assert_eq!(
            dns_summary(&L7Type::Request, &query),
            "DNS Query api.example.com. A,AAAA"
        );
        let refused = DnsFlow {
            rcode: 5,
            ..query.clone()
        };
        assert_eq!(
            dns_summary(&L7Type::Response, &refused),
            "DNS Answer RCode: Refused (Proxy api.example.com. A,AAAA)"
        );
        let answer = DnsFlow {
            ips: vec![
                "192.0.2.1".parse().expect("ip"),
                "2001:db8::1".parse().expect("ip"),
            ],
            ttl: 30,
            ..query
        };
        assert_eq!(
            dns_summary(&L7Type::Response, &answer),
            "DNS Answer \"192.0.2.1,2001:db8::1\" TTL: 30 (Proxy api.example.com. A,AAAA)"
        );
    }

    #[test]
    fn time_format() {
        let t = super::rfc3339_now();
        assert_eq!(t.len(), "2026-11-22T00:00:00.000000000Z".len());
        assert!(t.starts_with("20"));
        assert!(t.ends_with('Z'));
    }

    proptest::proptest! {
        /// The digit-by-digit text is `format!`'s (the path years past 9999 take).
        #[test]
        fn flow_time_digits_are_formats(secs in 0u64..253_402_300_800, nanos in 0u32..1_000_000_000) {
            use std::time::{Duration, UNIX_EPOCH};
            let t = super::FlowTime::at(UNIX_EPOCH + Duration::new(secs, nanos));
            let [y, m, d, h, min, sec] = super::civil(secs as i64);
            let expected = format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{sec:02}.{nanos:09}Z");
            proptest::prop_assert_eq!(t.as_str(), expected.as_str());
        }
    }
}
