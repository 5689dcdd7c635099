//! `weir observe`: flow records from a running weir's flow bus, like `hubble
//! observe` (compact lines or the records' JSON).

use std::path::PathBuf;
use std::time::SystemTime;

use clap::{Args, ValueEnum};
use serde_json::Value;

use super::client::{connect_channel, status_error};
use super::pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One line per flow: time, source -> destination, kind, verdict, summary,
    /// deciding rule.
    Compact,
    /// The flow records' JSON, one per line (Hubble field names).
    Json,
}

#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// The running weir's API socket (its --api-socket).
    #[arg(long, default_value = "/run/weir/weir.sock")]
    pub api_socket: PathBuf,
    /// Keep printing flows as they happen (after the --last ones).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print the last N matching flows from weir's ring of recent flows
    /// (default: 20 without --follow, none with it).
    #[arg(long)]
    pub last: Option<u64>,
    /// Only flows with this verdict (repeatable: any of them).
    #[arg(long, ignore_case = true, value_parser = ["FORWARDED", "DROPPED", "ERROR"])]
    pub verdict: Vec<String>,
    /// Only flows of this type (repeatable: any of them).
    #[arg(long = "type", value_name = "TYPE", value_parser = ["l3-l4", "l7", "http", "dns"])]
    pub kind: Vec<String>,
    /// Only flows from this peer: an endpoint name (or namespace/name), a label
    /// `k=v`, `reserved:world`, or an IP (repeatable: any of them).
    #[arg(long)]
    pub from: Vec<String>,
    /// Only flows to this peer (as --from).
    #[arg(long)]
    pub to: Vec<String>,
    /// Only flows with this source or destination port (repeatable).
    #[arg(long)]
    pub port: Vec<u16>,
    /// Only flows since this long ago (`30s`, `5m`) or this RFC 3339 UTC time.
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long, short = 'o', value_enum, default_value = "compact")]
    pub output: Output,
}

/// Flows printed without --last and without --follow (as `hubble observe`).
const DEFAULT_LAST: u64 = 20;

pub fn main(args: ObserveArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

fn since(s: &str) -> anyhow::Result<String> {
    if let Ok(d) = crate::cli::parse_duration(s) {
        let t = SystemTime::now()
            .checked_sub(d)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        return Ok(weir_policy::flow::rfc3339(t));
    }
    weir_policy::flow::normalize_rfc3339(s).ok_or_else(|| {
        anyhow::anyhow!("--since `{s}`: want a duration (30s, 5m) or an RFC 3339 UTC time")
    })
}

async fn run(args: ObserveArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let req = pb::GetFlowsRequest {
        last: args
            .last
            .unwrap_or(if args.follow { 0 } else { DEFAULT_LAST }),
        follow: args.follow,
        verdict: args
            .verdict
            .iter()
            .map(|v| v.to_ascii_uppercase())
            .collect(),
        r#type: args.kind,
        from: args.from,
        to: args.to,
        port: args.port.into_iter().map(u32::from).collect(),
        since: args
            .since
            .as_deref()
            .map(since)
            .transpose()?
            .unwrap_or_default(),
    };
    let channel = connect_channel(&args.api_socket).await?;
    let mut client = pb::observer_client::ObserverClient::new(channel);
    let mut stream = client
        .get_flows(req)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            // Mostly: weir stopped while we followed.
            Err(s) => anyhow::bail!("the flow stream from weir ended: {}", s.message()),
        };
        let line = match msg.event {
            Some(pb::get_flows_response::Event::FlowJson(json)) => match args.output {
                Output::Json => json,
                Output::Compact => match serde_json::from_str::<Value>(&json) {
                    Ok(v) => compact(&v),
                    Err(_) => json,
                },
            },
            Some(pb::get_flows_response::Event::Lost(l)) => match args.output {
                Output::Json => serde_json::json!({"lost_events": {"num_events_lost": l.count, "source": "weir observe: this reader fell behind"}}).to_string(),
                Output::Compact => format!("EVENTS LOST: {} flows (this reader fell behind)", l.count),
            },
            None => continue,
        };
        // A closed pipe (`| head`) ends the command quietly.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Ok(())
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `2026-11-22T20:01:02.345678901Z` as `Nov 22 20:01:02.345`.
fn short_time(t: &str) -> String {
    let month = t
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)));
    match (month, t.get(8..10), t.get(11..23)) {
        (Some(m), Some(d), Some(hms)) => format!("{m} {d} {hms}"),
        _ => t.to_string(),
    }
}

/// `default/tiefighter:41234 (ID:123)` for a local endpoint, `10.0.0.1:53
/// (world)` for any other peer.
fn peer(ep: &Value, ip: &Value, port: Option<u64>) -> String {
    let addr = match (ep.get("pod_name").and_then(Value::as_str), ip.as_str()) {
        (Some(pod), _) => match ep.get("namespace").and_then(Value::as_str) {
            Some(ns) => format!("{ns}/{pod}"),
            None => pod.to_string(),
        },
        (None, Some(ip)) if ip.contains(':') && port.is_some() => format!("[{ip}]"),
        (None, Some(ip)) => ip.to_string(),
        (None, None) => "?".to_string(),
    };
    let addr = match port {
        Some(p) => format!("{addr}:{p}"),
        None => addr,
    };
    let what = if ep.get("ID").is_some() {
        format!(
            "ID:{}",
            ep.get("identity").and_then(Value::as_u64).unwrap_or(0)
        )
    } else {
        ep.get("labels")
            .and_then(Value::as_array)
            .and_then(|l| l.first())
            .and_then(Value::as_str)
            .map(|l| l.strip_prefix("reserved:").unwrap_or(l).to_string())
            .unwrap_or_else(|| {
                format!(
                    "ID:{}",
                    ep.get("identity").and_then(Value::as_u64).unwrap_or(0)
                )
            })
    };
    format!("{addr} ({what})")
}

/// One `hubble observe`-like line for a flow record.
pub fn compact(f: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let l4 = f.get("l4").and_then(Value::as_object);
    let (proto, ports) = l4
        .and_then(|m| m.iter().next())
        .map(|(k, v)| (k.as_str(), v))
        .unwrap_or(("", &Value::Null));
    let port = |k: &str| ports.get(k).and_then(Value::as_u64);
    let src = peer(&f["source"], &f["IP"]["source"], port("source_port"));
    let dst = peer(
        &f["destination"],
        &f["IP"]["destination"],
        port("destination_port"),
    );
    let l7 = f.get("l7");
    let kind = match l7 {
        Some(l7) => {
            let dir = if s(&l7["type"]) == "RESPONSE" {
                "response"
            } else {
                "request"
            };
            let proto = if l7.get("http").is_some() {
                "http"
            } else if l7.get("dns").is_some() {
                "dns"
            } else {
                "l7"
            };
            format!("{proto}-{dir}")
        }
        None => format!(
            "policy-verdict:{}",
            if proto.is_empty() { "?" } else { proto }
        ),
    };
    let mut line = format!(
        "{}  {src} -> {dst}  {kind} {}",
        short_time(&s(&f["time"])),
        s(&f["verdict"])
    );
    let summary = s(&f["Summary"]);
    if !summary.is_empty() {
        line.push_str(&format!(" ({summary})"));
    }
    if let Some(reason) = f.get("drop_reason_desc").and_then(Value::as_str) {
        line.push_str(&format!(" {reason}"));
    }
    let policy = s(&f["policy"]);
    if !policy.is_empty() {
        line.push_str(&format!("  [{policy}]"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_reads_like_hubble_observe() {
        let f = serde_json::json!({
            "time": "2026-11-22T20:01:02.345678901Z",
            "verdict": "FORWARDED",
            "IP": {"source": "10.200.1.2", "destination": "10.201.1.1", "ipVersion": "IPv4"},
            "l4": {"UDP": {"source_port": 41234, "destination_port": 53}},
            "source": {"ID": 123, "identity": 123, "labels": ["k8s:class=tiefighter"], "namespace": "default", "pod_name": "tiefighter"},
            "destination": {"identity": 2, "labels": ["reserved:world"]},
            "Type": "L7",
            "node_name": "weir",
            "l7": {"type": "REQUEST", "latency_ns": 0, "dns": {"query": "api.example.com.", "qtypes": ["A"]}},
            "policy": "default/dns egress[0]",
            "Summary": "DNS Query api.example.com. A"
        });
        assert_eq!(
            compact(&f),
            "Nov 22 20:01:02.345  default/tiefighter:41234 (ID:123) -> 10.201.1.1:53 (world)  \
             dns-request FORWARDED (DNS Query api.example.com. A)  [default/dns egress[0]]"
        );
        let l4 = serde_json::json!({
            "time": "2026-01-02T03:04:05.000000000Z",
            "verdict": "DROPPED",
            "drop_reason_desc": "POLICY_DENIED",
            "IP": {"source": "fd00::2", "destination": "fd00::1", "ipVersion": "IPv6"},
            "l4": {"TCP": {"source_port": 1, "destination_port": 80}},
            "source": {"identity": 2, "labels": ["reserved:world"]},
            "destination": {"ID": 9, "identity": 9, "labels": [], "namespace": "ns", "pod_name": "web"},
            "Type": "L3_L4",
            "policy": "no rule matched",
            "Summary": ""
        });
        assert_eq!(
            compact(&l4),
            "Jan 02 03:04:05.000  [fd00::2]:1 (world) -> ns/web:80 (ID:9)  \
             policy-verdict:TCP DROPPED POLICY_DENIED  [no rule matched]"
        );
        // Whatever a record lacks, a line still comes out.
        assert!(compact(&serde_json::json!({})).contains(" -> "));
    }

    #[test]
    fn since_takes_a_duration_or_a_time() {
        assert!(since("5m").unwrap().ends_with('Z'));
        assert_eq!(
            since("2026-11-22T20:00:00Z").unwrap(),
            "2026-11-22T20:00:00.000000000Z"
        );
        assert!(since("yesterday").is_err());
    }
}
