//! Prometheus counters derived from the flow bus: every published record is
//! counted on the writer thread, so the data path pays nothing for them. Label
//! values come from fixed sets (verdicts, types, protocols, weir's own reason
//! codes): no per-peer, per-IP or per-path label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use weir_policy::flow::FlowVerdict;

use super::bus::{FlowKey, L7Facts};
use super::kernel::KernelCounters;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    /// FORWARDED, DROPPED, ERROR.
    pub verdict: &'static str,
    /// L3_L4 or L7 (Hubble's `Type`).
    pub r#type: &'static str,
    /// TCP, UDP, ICMPv4, ICMPv6 for L3/L4; HTTP, DNS, Kafka for L7.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// success or failure.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// GET, POST, PUT, DELETE, HEAD, OPTIONS, PATCH, CONNECT or OTHER.
    pub method: &'static str,
    /// The status code weir answered or forwarded (403 for a denial, 400 for
    /// a refused request, 502/504 for an upstream failure).
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsQueryLabels {
    /// FORWARDED, DROPPED (denied by policy) or ERROR.
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsResponseLabels {
    /// The answer's rcode name (NoError, NXDomain, Refused, ...).
    pub rcode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KafkaLabels {
    /// The API's name (`produce`, `fetch`, ...; the names of `weir policy explain
    /// --kafka`), `other` for a key weir has no name for.
    pub api_key: String,
    /// FORWARDED, DROPPED (denied by policy) or ERROR (the connection closed).
    pub verdict: &'static str,
    /// The error code weir answered (29 TOPIC_AUTHORIZATION_FAILED, ...), 0 when
    /// forwarded (the broker's own answer is not inspected).
    pub error_code: i16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// How the proxy handled the connection: http, dns (DNS over TCP), kafka or
    /// tcp (L4 splice).
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    /// weir's map name (a fixed set).
    pub map: &'static str,
}

/// What the control thread reports (it owns the policy sources and the
/// datapath): set there, read by scrapes.
#[derive(Default)]
pub struct ControlMetrics {
    pub policy_revision: Gauge,
    pub reloads: Family<ReloadLabels, Counter>,
    pub last_reload_success: Gauge,
    pub map_entries: Family<MapLabels, Gauge>,
    pub map_capacity: Family<MapLabels, Gauge>,
}

/// The protocols a proxied TCP connection is handled as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnProtocol {
    Http,
    Dns,
    Kafka,
    Tcp,
}

impl ConnProtocol {
    const ALL: [ConnProtocol; 4] = [
        ConnProtocol::Http,
        ConnProtocol::Dns,
        ConnProtocol::Kafka,
        ConnProtocol::Tcp,
    ];

    fn label(self) -> &'static str {
        match self {
            ConnProtocol::Http => "http",
            ConnProtocol::Dns => "dns",
            ConnProtocol::Kafka => "kafka",
            ConnProtocol::Tcp => "tcp",
        }
    }
}

/// Connection counters the data path moves itself (one atomic add each):
/// handles taken from their families once, so no connection looks a label up.
pub struct ConnMetrics {
    by_protocol: [(Counter, Gauge); 4],
    /// UDP sessions open now.
    pub udp_sessions: Gauge,
}

/// One proxied connection, counted open until dropped.
pub struct OpenConn(Gauge);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ConnMetrics {
    /// Counts a connection handled as `protocol`; open until the guard drops.
    pub fn open(&self, protocol: ConnProtocol) -> OpenConn {
        let i = ConnProtocol::ALL
            .iter()
            .position(|p| *p == protocol)
            .unwrap_or(0);
        let (total, open) = &self.by_protocol[i];
        total.inc();
        open.inc();
        OpenConn(open.clone())
    }
}

/// Latency histograms of HTTP requests (seconds).
struct HttpLatency {
    /// Request head received to response head (or refusal) sent.
    total: Histogram,
    /// Waiting for the upstream (forwarded requests only).
    upstream: Histogram,
    /// weir's own part: `total - upstream`, or `total` when refused.
    added: Histogram,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 25 µs .. ~6.7 s: weir's own time is tens of microseconds.
    exponential_buckets(0.000_025, 2.0, 19)
}

/// The flow counters and the registry they are in (the one `/metrics` serves;
/// later metrics register here too).
pub struct FlowMetrics {
    pub registry: Registry,
    flows: Family<FlowLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    http_latency: HttpLatency,
    dns_queries: Family<DnsQueryLabels, Counter>,
    dns_responses: Family<DnsResponseLabels, Counter>,
    kafka_requests: Family<KafkaLabels, Counter>,
    /// Records the flow writer had no room for (counted by the sink itself).
    pub lost: Counter,
    pub control: ControlMetrics,
    pub conns: ConnMetrics,
    /// The datapath's per-CPU packet counters, read at each scrape.
    pub kernel: std::sync::Arc<KernelCounters>,
}

impl Default for FlowMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let flows = Family::<FlowLabels, Counter>::default();
        let drops = Family::<DropLabels, Counter>::default();
        registry.register(
            "weir_flows_processed",
            "Flow records by verdict, type (L3_L4, L7) and protocol",
            flows.clone(),
        );
        registry.register(
            "weir_drop",
            "Flows dropped or refused (verdict DROPPED or ERROR) by reason",
            drops.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "weir_flows_lost",
            "Flow records dropped because the flow writer could not keep up (in no log, ring or other counter)",
            lost.clone(),
        );
        let control = ControlMetrics::default();
        // A scrape reads in this order and a reload writes the revision before
        // counting itself: reading the counter first, a scrape that sees a reload
        // counted also sees the revision it brought.
        registry.register(
            "weir_policy_reloads",
            "Policy reloads (SIGHUP, watched files, weir policy apply/delete) by result (success, failure)",
            control.reloads.clone(),
        );
        registry.register(
            "weir_policy_revision",
            "Policies installed by this process (1 is the first)",
            control.policy_revision.clone(),
        );
        registry.register(
            "weir_policy_last_reload_success",
            "1 when the last reload installed its policy (or none happened yet), 0 when it was refused",
            control.last_reload_success.clone(),
        );
        control.last_reload_success.set(1);
        registry.register(
            "weir_bpf_map_entries",
            "Entries weir wrote into each eBPF map",
            control.map_entries.clone(),
        );
        registry.register(
            "weir_bpf_map_capacity",
            "Each eBPF map's max_entries",
            control.map_capacity.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "weir_http_requests",
            "HTTP requests by method class and the status code weir answered or forwarded (one per request, whatever its verdict)",
            http_requests.clone(),
        );
        let http_latency = HttpLatency {
            total: Histogram::new(latency_buckets()),
            upstream: Histogram::new(latency_buckets()),
            added: Histogram::new(latency_buckets()),
        };
        registry.register(
            "weir_http_request_duration_seconds",
            "HTTP requests: from the request head to the response head weir sent (forwarded or its own)",
            http_latency.total.clone(),
        );
        registry.register(
            "weir_http_upstream_duration_seconds",
            "Forwarded HTTP requests: time waiting for the upstream's response head (connect included)",
            http_latency.upstream.clone(),
        );
        registry.register(
            "weir_http_added_duration_seconds",
            "HTTP requests: weir's own time (request duration minus upstream time; all of it for a refused request)",
            http_latency.added.clone(),
        );
        let dns_queries = Family::<DnsQueryLabels, Counter>::default();
        registry.register(
            "weir_dns_queries",
            "DNS queries by verdict (FORWARDED, DROPPED, ERROR)",
            dns_queries.clone(),
        );
        let dns_responses = Family::<DnsResponseLabels, Counter>::default();
        registry.register(
            "weir_dns_responses",
            "DNS answers sent to clients by rcode",
            dns_responses.clone(),
        );
        let kafka_requests = Family::<KafkaLabels, Counter>::default();
        registry.register(
            "weir_kafka_requests",
            "Kafka requests by API, verdict and the error code weir answered (0: forwarded)",
            kafka_requests.clone(),
        );
        let conns_total = Family::<ConnLabels, Counter>::default();
        let conns_open = Family::<ConnLabels, Gauge>::default();
        registry.register(
            "weir_proxy_connections",
            "Client TCP connections the proxy accepted, by how it handled them (http, dns, kafka, tcp)",
            conns_total.clone(),
        );
        registry.register(
            "weir_proxy_connections_open",
            "Client TCP connections open now, by protocol",
            conns_open.clone(),
        );
        let by_protocol = ConnProtocol::ALL.map(|p| {
            let l = ConnLabels {
                protocol: p.label(),
            };
            (
                conns_total.get_or_create(&l).clone(),
                conns_open.get_or_create(&l).clone(),
            )
        });
        let conns = ConnMetrics {
            by_protocol,
            udp_sessions: Gauge::default(),
        };
        registry.register(
            "weir_udp_sessions_open",
            "UDP sessions (client, original destination) open now",
            conns.udp_sessions.clone(),
        );
        let kernel = std::sync::Arc::new(KernelCounters::default());
        registry.register_collector(Box::new(kernel.clone()));
        FlowMetrics {
            registry,
            flows,
            drops,
            http_requests,
            http_latency,
            dns_queries,
            dns_responses,
            kafka_requests,
            lost,
            control,
            conns,
            kernel,
        }
    }
}

impl FlowMetrics {
    pub fn observe(&self, f: &FlowKey) {
        let verdict = match f.verdict {
            FlowVerdict::Forwarded => "FORWARDED",
            FlowVerdict::Dropped => "DROPPED",
            FlowVerdict::Error => "ERROR",
        };
        self.flows
            .get_or_create(&FlowLabels {
                verdict,
                r#type: if f.l7.is_some() { "L7" } else { "L3_L4" },
                protocol: f.l7.unwrap_or(f.l4),
            })
            .inc();
        if let Some(reason) = &f.drop_reason {
            self.drops
                .get_or_create(&DropLabels {
                    reason: reason.clone(),
                })
                .inc();
        }
        if let Some(l7) = &f.l7_facts {
            self.observe_l7(verdict, l7);
        }
    }

    fn observe_l7(&self, verdict: &'static str, l7: &L7Facts) {
        let secs = |ns: u64| ns as f64 / 1e9;
        if let Some((method, code)) = l7.http {
            // Every request has one record: a RESPONSE when forwarded, a
            // REQUEST when weir answered it itself.
            self.http_requests
                .get_or_create(&HttpLabels { method, code })
                .inc();
            let h = &self.http_latency;
            h.total.observe(secs(l7.latency_ns));
            match l7.upstream_ns {
                Some(up) => {
                    h.upstream.observe(secs(up));
                    h.added.observe(secs(l7.latency_ns.saturating_sub(up)));
                }
                None => h.added.observe(secs(l7.latency_ns)),
            }
        } else if let Some((api_key, error_code)) = &l7.kafka {
            self.kafka_requests
                .get_or_create(&KafkaLabels {
                    api_key: api_key.clone(),
                    verdict,
                    error_code: *error_code,
                })
                .inc();
        } else if let Some(rcode) = l7.dns_rcode {
            if l7.response {
                let rcode = u16::try_from(rcode).unwrap_or(u16::MAX);
                self.dns_responses
                    .get_or_create(&DnsResponseLabels {
                        rcode: weir_parsers::dns::rcode_name(rcode),
                    })
                    .inc();
            } else {
                self.dns_queries
                    .get_or_create(&DnsQueryLabels { verdict })
                    .inc();
            }
        }
    }

    /// The registry in Prometheus's text format (OpenMetrics flavour).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// An HTTP method as a bounded label: the common ones by name, any other
/// (WebDAV's, made-up ones) as OTHER.
pub fn method_class(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        "CONNECT" => "CONNECT",
        _ => "OTHER",
    }
}

/// A drop reason as a bounded label: weir's reason codes are upper-case names,
/// some followed by `: detail` (`MALFORMED_REQUEST: ...`): the name only.
pub(super) fn reason_label(desc: Option<&str>) -> String {
    let Some(desc) = desc else {
        return "UNKNOWN".into();
    };
    let code = desc.split([':', ' ']).next().unwrap_or("");
    if !code.is_empty()
        && code.len() <= 48
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        code.to_string()
    } else {
        "OTHER".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_metrics_are_in_the_registry() {
        let m = FlowMetrics::default();
        m.control.policy_revision.set(3);
        m.control
            .reloads
            .get_or_create(&ReloadLabels { result: "failure" })
            .inc();
        m.control.last_reload_success.set(0);
        m.control
            .map_entries
            .get_or_create(&MapLabels {
                map: "weir_ipcache",
            })
            .set(5);
        let t = m.encode();
        for line in [
            "weir_policy_revision 3",
            r#"weir_policy_reloads_total{result="failure"} 1"#,
            "weir_policy_last_reload_success 0",
            r#"weir_bpf_map_entries{map="weir_ipcache"} 5"#,
        ] {
            assert!(t.lines().any(|l| l == line), "`{line}` missing:\n{t}");
        }
    }

    #[test]
    fn methods_are_a_bounded_set() {
        assert_eq!(method_class("GET"), "GET");
        assert_eq!(method_class("PATCH"), "PATCH");
        assert_eq!(method_class("PROPFIND"), "OTHER");
        assert_eq!(method_class("get"), "OTHER");
    }

    #[test]
    fn http_records_count_by_method_and_code_with_latencies() {
        let m = FlowMetrics::default();
        let key = |method: &str, code, upstream_ns: Option<u64>| {
            use std::sync::Arc;
            use weir_policy::flow::{Endpoint, Flow, FlowPeers, Http, L7Type, RenderedEndpoint};
            let ep = Arc::new(RenderedEndpoint::new(Endpoint {
                id: None,
                identity: 2,
                labels: vec!["reserved:world".into()],
                namespace: None,
                pod_name: None,
            }));
            let peers = FlowPeers {
                source: ep.clone(),
                destination: ep,
                node_name: Arc::from("t"),
            };
            let verdict = weir_policy::Verdict {
                allowed: upstream_ns.is_some(),
                rules: vec![],
                denied_in: None,
                l7: true,
            };
            let http = Http {
                code,
                method: method.to_string().into(),
                url: "http://x/a?b=c".into(),
                protocol: "HTTP/1.1".into(),
                ..Http::default()
            };
            let ip = "10.0.0.1".parse().unwrap();
            let f = Flow::with_peers(&peers, (ip, 1), (ip, 80), &verdict);
            let f = match upstream_ns {
                Some(up) => f
                    .with_http(L7Type::Response, 3_000_000, http)
                    .with_upstream_ns(up),
                None => f.with_http(L7Type::Request, 3_000_000, http),
            };
            FlowKey::new(&f)
        };
        m.observe(&key("GET", 200, Some(2_000_000)));
        m.observe(&key("GET", 200, Some(2_000_000)));
        m.observe(&key("PROPFIND", 403, None));
        let t = m.encode();
        for line in [
            r#"weir_http_requests_total{method="GET",code="200"} 2"#,
            r#"weir_http_requests_total{method="OTHER",code="403"} 1"#,
            "weir_http_request_duration_seconds_count 3",
            "weir_http_upstream_duration_seconds_count 2",
            "weir_http_upstream_duration_seconds_sum 0.004",
            "weir_http_added_duration_seconds_count 3",
            // 1 ms each forwarded, 3 ms the refused one.
            "weir_http_added_duration_seconds_sum 0.005",
        ] {
            assert!(t.lines().any(|l| l == line), "`{line}` missing:\n{t}");
        }
    }

    #[test]
    fn reasons_are_bounded_names() {
        assert_eq!(reason_label(Some("POLICY_DENIED")), "POLICY_DENIED");
        assert_eq!(
            reason_label(Some("MALFORMED_REQUEST: bad header x")),
            "MALFORMED_REQUEST"
        );
        assert_eq!(
            reason_label(Some("DNS_QUERY_REJECTED:multiple_questions")),
            "DNS_QUERY_REJECTED"
        );
        assert_eq!(reason_label(Some("upstream said no")), "OTHER");
        assert_eq!(reason_label(None), "UNKNOWN");
    }
}
