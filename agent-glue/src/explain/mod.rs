//! `weir policy explain`: one decision and the rule that made it — offline
//! (`--policy` and `--endpoints` given: compiled here), or against a running
//! weir's policy and endpoints (`Policy.Explain` over `--api-socket`).
//! Exit status: 0 allowed, 1 denied, 2 anything that kept it from deciding.

pub mod remote;
mod report;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use weir_parsers::http::request_facts;
use weir_policy::identity::IdentityAllocator;
use weir_policy::{CompiledPolicy, Environment, Policy, Protocol};

pub use report::Report;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    #[value(name = "TCP", alias = "tcp")]
    Tcp,
    #[value(name = "UDP", alias = "udp")]
    Udp,
    /// ICMP (ICMPv6 towards an IPv6 address); `--port` is the ICMP type.
    #[value(name = "ICMP", alias = "icmp")]
    Icmp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Policy files or directories, to decide offline (with --endpoints).
    /// Without it the running weir (--api-socket) decides, against the policy
    /// and endpoints it enforces.
    #[arg(long)]
    pub policy: Vec<PathBuf>,
    /// Endpoints file (with --policy).
    #[arg(long, requires = "policy")]
    pub endpoints: Option<PathBuf>,
    /// The running weir's API socket (when --policy is not given).
    #[arg(long, default_value = "/run/weir/weir.sock", conflicts_with = "policy")]
    pub api_socket: PathBuf,
    /// Source endpoint name (or an IP address; unknown IPs are `world`).
    #[arg(long)]
    pub from: String,
    /// Destination endpoint name (or an IP address).
    #[arg(long)]
    pub to: String,
    /// Destination port: a number, or a named port of the destination endpoint
    /// (with `--proto ICMP`: the ICMP type, e.g. 8 for an IPv4 echo request).
    #[arg(long)]
    pub port: String,
    #[arg(long, value_enum, default_value = "TCP")]
    pub proto: Proto,
    /// An HTTP request to decide, as 'METHOD PATH' (path may include a query).
    #[arg(long)]
    pub http: Option<String>,
    /// Host header of the HTTP request.
    #[arg(long, requires = "http")]
    pub host: Option<String>,
    /// A request header, 'Name: value' (repeatable).
    #[arg(long, requires = "http")]
    pub header: Vec<String>,
    /// A DNS query to decide: the name looked up (compared lower-cased, with a
    /// trailing dot), e.g. `--port 53 --proto UDP --dns api.github.com`.
    #[arg(long, conflicts_with = "http")]
    pub dns: Option<String>,
    /// A Kafka request to decide, as 'APIKEY:VERSION:CLIENTID:TOPIC[,TOPIC...]'
    /// (APIKEY a name such as `produce` or `apiversions`, or a number; empty VERSION
    /// is 0, empty CLIENTID a null client id, no TOPIC none named — for Metadata,
    /// every topic), e.g. `--port 9092 --kafka produce:9:app:orders`.
    #[arg(long, conflicts_with_all = ["http", "dns"])]
    pub kafka: Option<String>,
    /// `text` (verdict, then the deciding rule) or `json`.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: Output,
    /// The cluster's ranges, as `weir run` takes them (offline only: a
    /// running weir has its own).
    #[command(flatten)]
    pub cluster: crate::config::ClusterArgs,
}

/// One question `explain` answers, offline or over the API.
#[derive(Debug, Clone)]
pub struct Query {
    pub from: String,
    pub to: String,
    pub port: String,
    pub proto: Proto,
    pub http: Option<String>,
    pub host: Option<String>,
    pub headers: Vec<String>,
    pub dns: Option<String>,
    pub kafka: Option<String>,
}

impl ExplainArgs {
    pub fn query(&self) -> Query {
        Query {
            from: self.from.clone(),
            to: self.to.clone(),
            port: self.port.clone(),
            proto: self.proto,
            http: self.http.clone(),
            host: self.host.clone(),
            headers: self.header.clone(),
            dns: self.dns.clone(),
            kafka: self.kafka.clone(),
        }
    }
}

fn bad_args(msg: &str) -> ExitCode {
    eprintln!("weir policy explain: {msg}");
    ExitCode::from(2)
}

pub fn main(args: &ExplainArgs) -> ExitCode {
    if args.policy.is_empty() {
        return remote::main(args);
    }
    let Some(endpoints_file) = &args.endpoints else {
        return bad_args("--policy needs --endpoints (or neither: ask the running weir)");
    };
    let policies = match weir_policy::load_policies(&args.policy) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let (endpoints, services) = match weir_policy::load_endpoints_file(endpoints_file) {
        Ok(f) => {
            let mut e = f.endpoints;
            if let Err(err) = crate::endpoints::resolve_netns_addresses(&mut e) {
                eprintln!("{err:#}");
                return ExitCode::from(2);
            }
            (e, f.services)
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let env = Environment {
        services,
        cluster: args.cluster.config(),
        host_addresses: Vec::new(),
    };
    for note in weir_policy::unresolved_references(&policies, &env) {
        eprintln!("note: {note}");
    }
    let compiled = match CompiledPolicy::compile_in(
        &policies,
        &endpoints,
        &env,
        &mut IdentityAllocator::default(),
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if !compiled.fqdn_selectors().is_empty() {
        eprintln!(
            "note: toFQDNs rules allow only addresses the DNS proxy has learned from allowed answers; explain learns none, so here they allow nothing"
        );
    }
    match decide(&args.query(), &compiled, &policies) {
        Ok(report) => print(&report, args.output),
        Err(msg) => bad_args(&msg),
    }
}

/// Decides `q` under `compiled` (compiled from `policies`, which name the
/// rules); `Err` is a question that cannot be decided (a bad flag value).
pub fn decide(q: &Query, compiled: &CompiledPolicy, policies: &[Policy]) -> Result<Report, String> {
    let resolve = |who: &str| -> Option<IpAddr> {
        if let Ok(ip) = who.parse::<IpAddr>() {
            return Some(ip);
        }
        compiled
            .endpoint_by_name(who)
            .and_then(|e| e.endpoint.ips.first().copied())
    };
    let Some(src) = resolve(&q.from) else {
        return Err(format!(
            "no endpoint named `{}` (and not an IP address)",
            q.from
        ));
    };
    let Some(dst) = resolve(&q.to) else {
        return Err(format!(
            "no endpoint named `{}` (and not an IP address)",
            q.to
        ));
    };
    let proto = match q.proto {
        Proto::Tcp => Protocol::Tcp,
        Proto::Udp => Protocol::Udp,
        Proto::Icmp if dst.is_ipv4() => Protocol::Icmp4,
        Proto::Icmp => Protocol::Icmp6,
    };
    let port = resolve_port(&q.port, compiled, dst, proto)?;
    let cv = compiled.connection(src, dst, proto, port);
    let mut header_actions: Vec<String> = Vec::new();
    if matches!(proto, Protocol::Icmp4 | Protocol::Icmp6) && q.dns.is_some() {
        return Err("--dns needs --proto UDP or TCP".into());
    }
    if let Some(k) = &q.kafka {
        if matches!(proto, Protocol::Icmp4 | Protocol::Icmp6 | Protocol::Udp) {
            return Err("--kafka needs --proto TCP".into());
        }
        let req = KafkaArg::parse(k)?;
        let (verdict, denial) = if cv.l4_allowed() && cv.needs_l7() {
            cv.kafka_verdict(compiled, &req.request())
        } else {
            (cv.l4_verdict(), None)
        };
        return Ok(
            Report::new(&cv, &verdict, compiled, policies, true).with_kafka(
                &cv,
                (&verdict, denial.as_ref()),
                compiled,
                policies,
                Some(k),
            ),
        );
    }
    if q.http.is_none() {
        let verdict = match &q.dns {
            Some(name) if cv.l4_allowed() && cv.needs_l7() => cv.dns_verdict(compiled, name),
            _ => cv.l4_verdict(),
        };
        return Ok(
            Report::new(&cv, &verdict, compiled, policies, q.dns.is_some())
                .with_dns(&cv, &verdict, compiled, policies, q.dns.as_deref())
                .with_kafka(&cv, (&verdict, None), compiled, policies, None),
        );
    }
    let verdict = match &q.http {
        None => cv.l4_verdict(),
        Some(req) => {
            let Some((method, path)) = req.trim().split_once(' ') else {
                return Err("--http takes 'METHOD PATH', e.g. 'GET /v1/status'".into());
            };
            let Ok(method) = Method::from_bytes(method.as_bytes()) else {
                return Err(format!("`{method}` is not an HTTP method"));
            };
            let Ok(uri) = path.trim().parse::<Uri>() else {
                return Err(format!("`{path}` is not a request target"));
            };
            let mut headers = HeaderMap::new();
            if let Some(h) = &q.host {
                match HeaderValue::from_str(h) {
                    Ok(v) => {
                        headers.insert(http::header::HOST, v);
                    }
                    Err(_) => return Err(format!("`{h}` is not a valid Host")),
                }
            }
            for h in &q.headers {
                let Some((n, v)) = h.split_once(':') else {
                    return Err(format!("--header takes 'Name: value', got `{h}`"));
                };
                let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(n.trim().as_bytes()),
                    HeaderValue::from_str(v.trim()),
                ) else {
                    return Err(format!("`{h}` is not a valid header"));
                };
                headers.append(n, v);
            }
            match request_facts(&method, &uri, &headers, false) {
                Err(reject) => {
                    return Ok(Report::new(&cv, &cv.l4_verdict(), compiled, policies, true)
                        .rejected(reject.to_string()));
                }
                Ok(facts) if cv.l4_allowed() && cv.needs_l7() => {
                    // As the proxy does: connection headers go before the check,
                    // but a protocol switch keeps its `Upgrade` lines.
                    let checked = cv.http_header_names(compiled);
                    let switch = weir_proxy::http::switch_headers(&method, &headers);
                    if let Err(why) = weir_proxy::http::prepare_headers(&mut headers, &checked) {
                        return Ok(Report::new(&cv, &cv.l4_verdict(), compiled, policies, true)
                            .rejected(why));
                    }
                    headers.extend(switch);
                    let (v, mismatches) = cv.http_decision(compiled, &facts, &headers);
                    for m in &mismatches {
                        header_actions.push(format!(
                            "headerMatches {}: {} {} (required {}, found {})",
                            m.action,
                            m.key,
                            match m.action {
                                weir_policy::model::MismatchAction::Log => "logged",
                                weir_policy::model::MismatchAction::Add => "added",
                                weir_policy::model::MismatchAction::Delete => "removed",
                                weir_policy::model::MismatchAction::Replace => "replaced",
                            },
                            m.required
                                .as_deref()
                                .map_or("presence".to_string(), |v| format!("{v:?}")),
                            m.found
                                .as_deref()
                                .map_or("nothing".to_string(), |v| format!("{v:?}")),
                        ));
                    }
                    v
                }
                Ok(_) => cv.l4_verdict(),
            }
        }
    };
    let mut report = Report::new(&cv, &verdict, compiled, policies, q.http.is_some());
    report.header_actions = header_actions;
    Ok(report)
}

/// `--kafka 'APIKEY:VERSION:CLIENTID:TOPIC[,TOPIC...]'`, parsed.
struct KafkaArg {
    api_key: i16,
    api_version: i16,
    client_id: Option<String>,
    topics: Vec<String>,
}

impl KafkaArg {
    fn parse(text: &str) -> Result<Self, String> {
        let usage = "--kafka takes 'APIKEY:VERSION:CLIENTID:TOPIC[,TOPIC...]', e.g. 'produce:9:app:orders' or 'metadata:12::'";
        let (key, rest) = text.split_once(':').ok_or(usage)?;
        let (version, rest) = rest.split_once(':').ok_or(usage)?;
        // A client id may contain ':'; a topic cannot.
        let (client, topics) = rest.rsplit_once(':').ok_or(usage)?;
        let api_key = weir_policy::kafka_match::parse_api_key(key).map_err(|e| e.to_string())?;
        let api_version = if version.is_empty() {
            0
        } else {
            weir_policy::kafka_match::parse_api_version(version).map_err(|e| e.to_string())?
        };
        let topics: Vec<String> = topics
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect();
        Ok(KafkaArg {
            api_key,
            api_version,
            client_id: (!client.is_empty()).then(|| client.to_string()),
            topics,
        })
    }

    fn request(&self) -> weir_policy::kafka_match::KafkaRequest<'_> {
        use weir_policy::kafka_match::{KafkaRequest, KafkaTopics};
        // As the parser reports it: Metadata naming no topic asks for every topic.
        let topics = if self.api_key == 3 && self.topics.is_empty() {
            KafkaTopics::All
        } else {
            KafkaTopics::Names(&self.topics)
        };
        KafkaRequest {
            api_key: self.api_key,
            api_version: self.api_version,
            client_id: self.client_id.as_deref(),
            topics,
        }
    }
}

pub fn print(report: &Report, output: Output) -> ExitCode {
    match output {
        Output::Text => print!("{}", report.text()),
        Output::Json => match serde_json::to_string_pretty(report) {
            Ok(j) => println!("{j}"),
            Err(e) => return bad_args(&format!("cannot render JSON: {e}")),
        },
    }
    if report.allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// A port number, or a named port of the destination endpoint (as a policy's
/// `port: NAME` resolves for ingress). For ICMP the "port" is the message type.
fn resolve_port(
    port: &str,
    compiled: &CompiledPolicy,
    dst: IpAddr,
    proto: Protocol,
) -> Result<u16, String> {
    if matches!(proto, Protocol::Icmp4 | Protocol::Icmp6)
        && let Ok(t) = port.parse::<u8>()
    {
        return Ok(u16::from(t));
    }
    if let Ok(n) = port.parse::<u16>()
        && !matches!(proto, Protocol::Icmp4 | Protocol::Icmp6)
    {
        return Ok(n);
    }
    if matches!(proto, Protocol::Icmp4 | Protocol::Icmp6) {
        return Err(format!(
            "`{port}` is not an ICMP type (0-255; 8 is an IPv4 echo request, 128 an IPv6 one)"
        ));
    }
    if port.is_empty() || port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{port}` is not a port (0-65535) or a port name"));
    }
    let Some(ep) = compiled.endpoint_by_ip(dst) else {
        return Err(format!(
            "`{port}` is a port name, but the destination is not an endpoint with named ports"
        ));
    };
    ep.endpoint.ports.get(port).copied().ok_or_else(|| {
        let names: Vec<&str> = ep.endpoint.ports.keys().map(String::as_str).collect();
        format!(
            "endpoint `{}` has no port named `{port}` (its named ports: {})",
            ep.endpoint.name,
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )
    })
}
