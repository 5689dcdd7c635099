use std::time::Duration;

/// Data-plane limits and timeouts. The defaults are named in `weir run --help`
/// and the README; change them there too.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The transparent listener's port.
    pub proxy_port: u16,
    /// Largest request head accepted; larger heads get 431.
    pub max_header_bytes: usize,
    /// A client connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Connecting to the upstream; exceeding it answers 504.
    pub upstream_connect_timeout: Duration,
    /// From sending a request upstream to its response head; exceeding it answers 504.
    pub upstream_timeout: Duration,
    /// Upstream connections a client connection may have open at once (a hard
    /// limit: beyond it requests wait for one of them), kept for its next requests.
    pub upstream_conns_per_client: usize,
    /// From accept to the first decision (protocol detection and the first request
    /// head included); a connection that has not decided by then is closed.
    pub request_head_timeout: Duration,
    /// Streams an HTTP/2 client may have open at once on one connection.
    pub http2_max_streams: u32,
    /// HTTP/2 flow-control window of each stream, both legs (fixed, never
    /// adaptive): the most weir buffers for one stream in one direction.
    pub http2_stream_window: u32,
    /// HTTP/2 flow-control window of a whole connection, both legs (fixed).
    pub http2_connection_window: u32,
    /// HTTP/2 streams a client may reset before weir has handled them (Rapid
    /// Reset); beyond, the connection gets GOAWAY (ENHANCE_YOUR_CALM).
    pub http2_max_pending_resets: usize,
    /// HTTP/2 streams weir may have to reset because of a client's errors
    /// (MadeYouReset); beyond, the connection gets GOAWAY.
    pub http2_max_local_resets: usize,
    /// HTTP/2 streams a client may end (RST_STREAM) before their response in
    /// one second on one connection; beyond, GOAWAY and the connection closes.
    pub http2_max_resets_per_sec: u32,
    /// Client connections held at once; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// A spliced (L3/L4-only) TCP connection with no bytes either way for this
    /// long is closed.
    pub tcp_idle_timeout: Duration,
    /// Written into flow records.
    pub node_name: String,
    /// When set, HTTP/1 upstream connections leave from the client's own address
    /// with this SO_MARK (the steering delivers the replies back to the proxy).
    pub upstream_mark: Option<u32>,
    /// A UDP session (or a denied UDP flow's memory) ends after this much silence.
    pub udp_idle_timeout: Duration,
    /// Open UDP sessions at most (each holds two sockets); beyond, new flows' datagrams are dropped.
    pub udp_max_sessions: usize,
    /// The answer a DNS query that policy denies gets (REFUSED or NXDOMAIN).
    pub dns_deny_rcode: weir_parsers::dns::DenyRcode,
    /// From forwarding a DNS query to its answer; exceeding it answers SERVFAIL.
    pub dns_upstream_timeout: Duration,
    /// How long an answer waits for the FQDN learner (toFQDNs-selected names);
    /// exceeding it answers SERVFAIL rather than an address the datapath drops.
    pub dns_learn_timeout: Duration,
    /// Queries one DNS client flow (a UDP 4-tuple or a TCP connection) may have
    /// outstanding at once; beyond, queries are answered SERVFAIL.
    pub dns_max_outstanding: usize,
    /// Largest Kafka frame (request or response) the Kafka handler takes; a larger
    /// length closes the connection with a flow record.
    pub kafka_max_frame: usize,
    /// Array elements and tagged fields one Kafka request may decode into; more
    /// closes the connection with a flow record.
    pub kafka_max_request_entries: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            proxy_port: 15001,
            max_header_bytes: 16 * 1024,
            idle_timeout: Duration::from_secs(60),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(30),
            upstream_conns_per_client: 16,
            request_head_timeout: Duration::from_secs(10),
            http2_max_streams: 100,
            http2_stream_window: 256 * 1024,
            http2_connection_window: 1024 * 1024,
            http2_max_pending_resets: 20,
            http2_max_local_resets: 1024,
            http2_max_resets_per_sec: 200,
            max_connections: 16384,
            tcp_idle_timeout: Duration::from_secs(3600),
            node_name: "weir".to_string(),
            upstream_mark: None,
            udp_idle_timeout: Duration::from_secs(30),
            udp_max_sessions: 8192,
            dns_deny_rcode: weir_parsers::dns::DenyRcode::Refused,
            dns_upstream_timeout: Duration::from_secs(5),
            dns_learn_timeout: Duration::from_secs(2),
            dns_max_outstanding: 100,
            kafka_max_frame: weir_parsers::kafka::DEFAULT_MAX_FRAME,
            kafka_max_request_entries: weir_parsers::kafka::DEFAULT_MAX_REQUEST_ENTRIES,
        }
    }
}
