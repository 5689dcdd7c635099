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
    /// Aligned columns under a header: TIMESTAMP, SOURCE, DESTINATION, TYPE,
    /// VERDICT, SUMMARY (with --follow, fixed widths: rows print as they come).
    Table,
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
    #[arg(long = "type", value_name = "TYPE", value_parser = ["l3-l4", "l7", "http", "dns", "kafka"])]
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
    // Without --follow the whole table is known before it is printed, and its
    // columns fit it; a followed table has fixed widths.
    let mut table = Vec::new();
    if args.output == Output::Table && args.follow {
        let _ = writeln!(
            out,
            "{}",
            table_line(&TABLE_HEADER.map(String::from), &FOLLOW_WIDTHS)
        );
    }
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
                Output::Table => {
                    let row = table_row(&serde_json::from_str(&json).unwrap_or(Value::Null));
                    if !args.follow {
                        table.push(row);
                        continue;
                    }
                    table_line(&row, &FOLLOW_WIDTHS)
                }
            },
            Some(pb::get_flows_response::Event::Lost(l)) => match args.output {
                Output::Json => serde_json::json!({"lost_events": {"num_events_lost": l.count, "source": "weir observe: this reader fell behind"}}).to_string(),
                Output::Compact | Output::Table => {
                    format!("EVENTS LOST: {} flows (this reader fell behind)", l.count)
                }
            },
            None => continue,
        };
        // A closed pipe (`| head`) ends the command quietly.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    if args.output == Output::Table && !args.follow {
        let _ = write!(out, "{}", render_table(&table));
    }
    Ok(())
}

const TABLE_HEADER: [&str; 6] = [
    "TIMESTAMP",
    "SOURCE",
    "DESTINATION",
    "TYPE",
    "VERDICT",
    "SUMMARY",
];
/// Column widths of a followed table (the last column is not padded).
const FOLLOW_WIDTHS: [usize; 5] = [19, 36, 36, 22, 9];

/// One table row: the compact line's parts in columns.
pub fn table_row(f: &Value) -> [String; 6] {
    let p = parts(f);
    let mut summary = p.summary;
    if let Some(reason) = p.drop_reason {
        summary = if summary.is_empty() {
            reason
        } else {
            format!("{summary} {reason}")
        };
    }
    if !p.policy.is_empty() {
        summary = format!("{summary} [{}]", p.policy).trim_start().to_string();
    }
    [p.time, p.src, p.dst, p.kind, p.verdict, summary]
}

/// A header and the rows, each column as wide as its widest cell, two
/// spaces apart (as `hubble observe -o table`).
pub fn render_table(rows: &[[String; 6]]) -> String {
    let header = TABLE_HEADER.map(String::from);
    let mut widths = [0usize; 5];
    for row in std::iter::once(&header).chain(rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    std::iter::once(&header)
        .chain(rows)
        .map(|r| table_line(r, &widths) + "\n")
        .collect()
}

fn table_line(row: &[String; 6], widths: &[usize; 5]) -> String {
    let mut line = String::new();
    for (cell, w) in row.iter().zip(widths) {
        line.push_str(&format!("{cell:<w$}  "));
    }
    line.push_str(&row[5]);
    line.trim_end().to_string()
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

/// What a compact line or a table row shows of a record.
struct Parts {
    time: String,
    src: String,
    dst: String,
    kind: String,
    verdict: String,
    summary: String,
    drop_reason: Option<String>,
    policy: String,
}

/// One `hubble observe`-like line for a flow record.
pub fn compact(f: &Value) -> String {
    let p = parts(f);
    let mut line = format!(
        "{}  {} -> {}  {} {}",
        p.time, p.src, p.dst, p.kind, p.verdict
    );
    if !p.summary.is_empty() {
        line.push_str(&format!(" ({})", p.summary));
    }
    if let Some(reason) = p.drop_reason {
        line.push_str(&format!(" {reason}"));
    }
    if !p.policy.is_empty() {
        line.push_str(&format!("  [{}]", p.policy));
    }
    line
}

fn parts(f: &Value) -> Parts {
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
            } else if l7.get("kafka").is_some() {
                "kafka"
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
    Parts {
        time: short_time(&s(&f["time"])),
        src,
        dst,
        kind,
        verdict: s(&f["verdict"]),
        summary: s(&f["Summary"]),
        drop_reason: f
            .get("drop_reason_desc")
            .and_then(Value::as_str)
            .map(str::to_string),
        policy: s(&f["policy"]),
    }
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
    fn table_aligns_columns_under_a_header() {
        let http = serde_json::json!({
            "time": "2026-11-22T20:01:02.345678901Z",
            "verdict": "DROPPED",
            "drop_reason_desc": "POLICY_DENIED",
            "IP": {"source": "10.200.0.20", "destination": "10.200.0.10", "ipVersion": "IPv4"},
            "l4": {"TCP": {"source_port": 40312, "destination_port": 80}},
            "source": {"ID": 7, "identity": 7, "labels": [], "namespace": "default", "pod_name": "tiefighter"},
            "destination": {"ID": 9, "identity": 9, "labels": [], "namespace": "default", "pod_name": "deathstar"},
            "Type": "L7",
            "l7": {"type": "REQUEST", "latency_ns": 1, "http": {"code": 403, "method": "PUT", "url": "http://x/", "protocol": "HTTP/1.1"}},
            "policy": "no rule matched (ingress, HTTP)",
            "Summary": "HTTP/1.1 PUT http://x/ => 403"
        });
        let l4 = serde_json::json!({
            "time": "2026-11-22T20:01:03.000000000Z",
            "verdict": "FORWARDED",
            "IP": {"source": "1.2.3.4", "destination": "10.200.0.10", "ipVersion": "IPv4"},
            "l4": {"UDP": {"source_port": 5, "destination_port": 53}},
            "source": {"identity": 2, "labels": ["reserved:world"]},
            "destination": {"ID": 9, "identity": 9, "labels": [], "namespace": "default", "pod_name": "deathstar"},
            "Type": "L3_L4",
            "policy": "",
            "Summary": ""
        });
        let t = render_table(&[table_row(&http), table_row(&l4)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert_eq!(
            lines[0],
            "TIMESTAMP            SOURCE                           DESTINATION                  TYPE                VERDICT    SUMMARY"
        );
        assert_eq!(
            lines[1],
            "Nov 22 20:01:02.345  default/tiefighter:40312 (ID:7)  default/deathstar:80 (ID:9)  http-request        DROPPED    HTTP/1.1 PUT http://x/ => 403 POLICY_DENIED [no rule matched (ingress, HTTP)]"
        );
        assert_eq!(
            lines[2],
            "Nov 22 20:01:03.000  1.2.3.4:5 (world)                default/deathstar:53 (ID:9)  policy-verdict:UDP  FORWARDED"
        );
        // Every column starts at the same place on every line.
        let starts = |l: &str, w: &str| l.find(w).unwrap();
        assert_eq!(starts(lines[0], "VERDICT"), starts(lines[1], "DROPPED"));
        assert_eq!(starts(lines[0], "VERDICT"), starts(lines[2], "FORWARDED"));
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
