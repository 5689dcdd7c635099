//! `weir policy explain`: one decision and the rule that made it, offline.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use weir_parsers::http::request_facts;
use weir_policy::identity::IdentityAllocator;
use weir_policy::{CompiledPolicy, Protocol};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    #[value(name = "TCP", alias = "tcp")]
    Tcp,
    #[value(name = "UDP", alias = "udp")]
    Udp,
    /// ICMP echo (ping); `--port` is ignored.
    #[value(name = "ICMP", alias = "icmp")]
    Icmp,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Policy files or directories.
    #[arg(long, required = true)]
    pub policy: Vec<PathBuf>,
    /// Endpoints file.
    #[arg(long)]
    pub endpoints: PathBuf,
    /// Source endpoint name (or an IP address; unknown IPs are `world`).
    #[arg(long)]
    pub from: String,
    /// Destination endpoint name (or an IP address).
    #[arg(long)]
    pub to: String,
    /// Destination port.
    #[arg(long)]
    pub port: u16,
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
}

fn bad_args(msg: &str) -> ExitCode {
    eprintln!("weir policy explain: {msg}");
    ExitCode::from(2)
}

pub fn main(args: &ExplainArgs) -> ExitCode {
    let policies = match weir_policy::load_policies(&args.policy) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let endpoints = match weir_policy::load_endpoints(&args.endpoints) {
        Ok(mut e) => {
            if let Err(err) = crate::endpoints::resolve_netns_addresses(&mut e) {
                eprintln!("{err:#}");
                return ExitCode::from(1);
            }
            e
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let compiled =
        match CompiledPolicy::compile(&policies, &endpoints, &mut IdentityAllocator::default()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        };
    let resolve = |who: &str| -> Option<IpAddr> {
        if let Ok(ip) = who.parse::<IpAddr>() {
            return Some(ip);
        }
        compiled
            .endpoint_by_name(who)
            .and_then(|e| e.endpoint.ips.first().copied())
    };
    let Some(src) = resolve(&args.from) else {
        return bad_args(&format!(
            "no endpoint named `{}` (and not an IP address)",
            args.from
        ));
    };
    let Some(dst) = resolve(&args.to) else {
        return bad_args(&format!(
            "no endpoint named `{}` (and not an IP address)",
            args.to
        ));
    };
    let proto = match args.proto {
        Proto::Tcp => Protocol::Tcp,
        Proto::Udp => Protocol::Udp,
        Proto::Icmp => Protocol::Icmp,
    };
    let cv = compiled.connection(src, dst, proto, args.port);
    let mut header_actions: Vec<String> = Vec::new();
    let verdict = match &args.http {
        None => cv.l4_verdict(),
        Some(req) => {
            let Some((method, path)) = req.trim().split_once(' ') else {
                return bad_args("--http takes 'METHOD PATH', e.g. 'GET /v1/status'");
            };
            let Ok(method) = Method::from_bytes(method.as_bytes()) else {
                return bad_args(&format!("`{method}` is not an HTTP method"));
            };
            let Ok(uri) = path.trim().parse::<Uri>() else {
                return bad_args(&format!("`{path}` is not a request target"));
            };
            let mut headers = HeaderMap::new();
            if let Some(h) = &args.host {
                match HeaderValue::from_str(h) {
                    Ok(v) => {
                        headers.insert(http::header::HOST, v);
                    }
                    Err(_) => return bad_args(&format!("`{h}` is not a valid Host")),
                }
            }
            for h in &args.header {
                let Some((n, v)) = h.split_once(':') else {
                    return bad_args(&format!("--header takes 'Name: value', got `{h}`"));
                };
                let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(n.trim().as_bytes()),
                    HeaderValue::from_str(v.trim()),
                ) else {
                    return bad_args(&format!("`{h}` is not a valid header"));
                };
                headers.append(n, v);
            }
            match request_facts(&method, &uri, &headers, false) {
                Err(reject) => {
                    println!("DENIED");
                    println!("the proxy answers 400 before policy: {reject}");
                    return ExitCode::SUCCESS;
                }
                Ok(facts) if cv.l4_allowed() && cv.needs_l7() => {
                    // As the proxy does: connection headers go before the check.
                    let checked = cv.http_header_names(&compiled);
                    weir_proxy::http::prepare_headers(&mut headers, &checked);
                    let (v, mismatches) = cv.http_decision(&compiled, &facts, &headers);
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
    println!("{}", if verdict.allowed { "ALLOWED" } else { "DENIED" });
    println!("{}", verdict.reason());
    for a in &header_actions {
        println!("{a}");
    }
    if !cv.l4_allowed() {
        println!("(denied at L3/L4: the peer may not reach this port at all)");
    }
    ExitCode::SUCCESS
}
