//! A flow record's JSON line, written field by field.
//!
//! Every forwarded request, DNS query and answer has a record, and rendering
//! it through serde's generic machinery (a map serialiser per object, `Display`
//! for every address, the escape scan for strings that cannot need escaping)
//! was a third of the flow writer thread's time. The output is byte for byte
//! what `serde_json::to_writer(flow)` writes — the derived `Serialize` stays
//! the reference, and the tests below compare the two on every shape.

use std::net::IpAddr;

use weir_parsers::dns::DnsFlow;

use super::{
    Flow, FlowVerdict, Grpc, Http, HttpHeader, Icmp, KafkaFlow, L4, L7, L7Type, Ports,
    TrafficDirection,
};
use crate::http_match::HeaderMismatch;
use crate::model::MismatchAction;

/// Appends `flow` as one JSON object (no newline).
pub(super) fn write_flow(out: &mut String, f: &Flow) {
    out.push_str("{\"time\":\"");
    // A FlowTime is digits and `-T:.Z`: nothing to escape.
    out.push_str(f.time.as_str());
    out.push_str("\",\"verdict\":\"");
    out.push_str(match f.verdict {
        FlowVerdict::Forwarded => "FORWARDED",
        FlowVerdict::Dropped => "DROPPED",
        FlowVerdict::Error => "ERROR",
    });
    out.push('"');
    optional(
        out,
        "drop_reason_desc",
        f.drop_reason_desc.as_deref(),
        string,
    );
    out.push_str(",\"IP\":{\"source\":");
    ip(out, f.ip.source);
    out.push_str(",\"destination\":");
    ip(out, f.ip.destination);
    key(out, "ipVersion");
    string(out, f.ip.ip_version);
    out.push_str("},\"l4\":");
    l4(out, &f.l4);
    key(out, "source");
    out.push_str(f.source.json());
    key(out, "destination");
    out.push_str(f.destination.json());
    key(out, "Type");
    string(out, f.kind);
    out.push_str(",\"traffic_direction\":\"");
    out.push_str(match f.traffic_direction {
        TrafficDirection::Ingress => "INGRESS",
        TrafficDirection::Egress => "EGRESS",
        TrafficDirection::Unknown => "TRAFFIC_DIRECTION_UNKNOWN",
    });
    out.push_str("\",\"is_reply\":");
    out.push_str(if f.is_reply { "true" } else { "false" });
    key(out, "node_name");
    string(out, &f.node_name);
    optional(out, "l7", f.l7.as_ref(), l7_object);
    key(out, "policy");
    string(out, &f.policy);
    key(out, "Summary");
    string(out, &f.summary);
    out.push('}');
}

fn l4(out: &mut String, l4: &L4) {
    let ports = |out: &mut String, p: &Ports| {
        out.push_str("{\"source_port\":");
        number(out, u64::from(p.source_port));
        out.push_str(",\"destination_port\":");
        number(out, u64::from(p.destination_port));
        out.push('}');
    };
    let icmp = |out: &mut String, i: &Icmp| {
        out.push_str("{\"type\":");
        number(out, u64::from(i.kind));
        out.push_str(",\"code\":");
        number(out, u64::from(i.code));
        out.push('}');
    };
    match l4 {
        L4::Tcp(p) => {
            out.push_str("{\"TCP\":");
            ports(out, p);
        }
        L4::Udp(p) => {
            out.push_str("{\"UDP\":");
            ports(out, p);
        }
        L4::Icmpv4(i) => {
            out.push_str("{\"ICMPv4\":");
            icmp(out, i);
        }
        L4::Icmpv6(i) => {
            out.push_str("{\"ICMPv6\":");
            icmp(out, i);
        }
    }
    out.push('}');
}

fn l7_object(out: &mut String, l7: &L7) {
    out.push_str("{\"type\":\"");
    out.push_str(match l7.kind {
        L7Type::Request => "REQUEST",
        L7Type::Response => "RESPONSE",
    });
    out.push_str("\",\"latency_ns\":");
    number(out, l7.latency_ns);
    optional(out, "http", l7.http.as_ref(), http);
    optional(out, "dns", l7.dns.as_ref(), dns);
    // `upstream_ns` is not part of the record (`#[serde(skip)]`).
    optional(out, "kafka", l7.kafka.as_ref(), kafka);
    out.push('}');
}

fn http(out: &mut String, h: &Http) {
    out.push_str("{\"code\":");
    number(out, u64::from(h.code));
    key(out, "method");
    string(out, &h.method);
    key(out, "url");
    string(out, &h.url);
    key(out, "protocol");
    string(out, &h.protocol);
    if !h.headers.is_empty() {
        key(out, "headers");
        list(out, &h.headers, header);
    }
    if !h.header_mismatches.is_empty() {
        key(out, "header_mismatches");
        list(out, &h.header_mismatches, mismatch);
    }
    optional(out, "grpc", h.grpc.as_ref(), grpc);
    out.push('}');
}

fn header(out: &mut String, h: &HttpHeader) {
    out.push_str("{\"key\":");
    string(out, &h.key);
    key(out, "value");
    string(out, &h.value);
    out.push('}');
}

fn mismatch(out: &mut String, m: &HeaderMismatch) {
    out.push_str("{\"key\":");
    string(out, &m.key);
    optional(out, "required", m.required.as_deref(), string);
    optional(out, "found", m.found.as_deref(), string);
    key(out, "action");
    string(
        out,
        match m.action {
            MismatchAction::Log => "LOG",
            MismatchAction::Add => "ADD",
            MismatchAction::Delete => "DELETE",
            MismatchAction::Replace => "REPLACE",
        },
    );
    out.push('}');
}

fn grpc(out: &mut String, g: &Grpc) {
    out.push_str("{\"service\":");
    string(out, &g.service);
    key(out, "method");
    string(out, &g.method);
    if let Some(s) = g.status {
        key(out, "status");
        number(out, u64::from(s));
    }
    optional(out, "message", g.message.as_deref(), string);
    out.push('}');
}

fn dns(out: &mut String, d: &DnsFlow) {
    out.push_str("{\"query\":");
    string(out, &d.query);
    if !d.ips.is_empty() {
        key(out, "ips");
        list(out, &d.ips, |o, a| ip(o, *a));
    }
    if d.ttl != 0 {
        key(out, "ttl");
        number(out, u64::from(d.ttl));
    }
    string_list(out, "cnames", &d.cnames);
    if !d.observation_source.is_empty() {
        key(out, "observation_source");
        string(out, &d.observation_source);
    }
    if d.rcode != 0 {
        key(out, "rcode");
        number(out, u64::from(d.rcode));
    }
    string_list(out, "qtypes", &d.qtypes);
    string_list(out, "rrtypes", &d.rrtypes);
    out.push('}');
}

fn kafka(out: &mut String, k: &KafkaFlow) {
    out.push_str("{\"error_code\":");
    signed(out, i64::from(k.error_code));
    out.push_str(",\"api_version\":");
    signed(out, i64::from(k.api_version));
    key(out, "api_key");
    string(out, &k.api_key);
    out.push_str(",\"correlation_id\":");
    signed(out, i64::from(k.correlation_id));
    key(out, "topic");
    string(out, &k.topic);
    out.push('}');
}

/// `,"name":value` when there is a value (serde's `skip_serializing_if = "Option::is_none"`).
fn optional<T: ?Sized>(
    out: &mut String,
    name: &str,
    value: Option<&T>,
    write: impl FnOnce(&mut String, &T),
) {
    if let Some(v) = value {
        key(out, name);
        write(out, v);
    }
}

/// `,"name":["a","b"]` unless the list is empty (`skip_serializing_if = "Vec::is_empty"`).
fn string_list<S: AsRef<str>>(out: &mut String, name: &str, items: &[S]) {
    if !items.is_empty() {
        key(out, name);
        list(out, items, |o, s| string(o, s.as_ref()));
    }
}

/// `,"name":` (every key here follows another member).
fn key(out: &mut String, name: &str) {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":");
}

fn list<T>(out: &mut String, items: &[T], mut each: impl FnMut(&mut String, &T)) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        each(out, item);
    }
    out.push(']');
}

fn number(out: &mut String, mut n: u64) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

fn signed(out: &mut String, n: i64) {
    if n < 0 {
        out.push('-');
    }
    number(out, n.unsigned_abs());
}

/// An address as a JSON string (as serde writes it: its `Display`).
fn ip(out: &mut String, addr: IpAddr) {
    out.push('"');
    ip_text(out, addr);
    out.push('"');
}

/// An address's text (its `Display`), IPv4 without the formatting machinery.
pub(crate) fn ip_text(out: &mut String, addr: IpAddr) {
    match addr {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                number(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            // The text form's rules (longest zero run, embedded IPv4) are std's.
            let _ = write!(out, "{v6}");
        }
    }
}

/// A JSON string with serde_json's escapes: `"` and `\` backslashed, the
/// control characters below 0x20 as `\b \t \n \f \r` or `\u00XX`; everything
/// else (DEL and all non-ASCII included) as it is.
fn string(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    // Pieces of `s` are copied between escaped bytes. Every cut is next to
    // an ASCII byte (one that is escaped), so each piece is whole characters
    // and `get` never returns `None`.
    let piece = |out: &mut String, from: usize, to: usize| {
        debug_assert!(s.is_char_boundary(from) && s.is_char_boundary(to));
        out.push_str(s.get(from..to).unwrap_or_default());
    };
    let mut start = 0;
    // Most strings need no escape at all: skip to the first byte that might,
    // eight at a time (the skipped part goes out with the first piece).
    for (i, &b) in bytes.iter().enumerate().skip(clean_prefix(bytes)) {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            b'\t' => "\\t",
            b'\n' => "\\n",
            0x0c => "\\f",
            b'\r' => "\\r",
            0x00..=0x1f => {
                piece(out, start, i);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        piece(out, start, i);
        out.push_str(escape);
        start = i + 1;
    }
    piece(out, start, bytes.len());
    out.push('"');
}

/// How many leading bytes of `bytes` need no escape (a lower bound: the
/// 8-byte word holding the first one that does is left to the byte loop).
fn clean_prefix(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` is zero: the classic test (no false negatives; a false
    // positive only sends the word to the byte loop).
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut done = 0;
    for chunk in bytes.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        // Below 0x20: `x - 0x20` borrows into the high bit of such a byte.
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
        let quote = has_zero(x ^ (ONES * u64::from(b'"')));
        let backslash = has_zero(x ^ (ONES * u64::from(b'\\')));
        if control | quote | backslash != 0 {
            break;
        }
        done += 8;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{Endpoint, FlowPeers, FlowTime, Ip, RenderedEndpoint};
    use proptest::prelude::*;
    use std::borrow::Cow;
    use std::sync::Arc;

    fn hand(f: &Flow) -> String {
        let mut out = String::new();
        write_flow(&mut out, f);
        out
    }

    fn reference(f: &Flow) -> String {
        serde_json::to_string(f).expect("serialise")
    }

    /// Every character class the escaper treats apart, and more.
    const AWKWARD: &str =
        "a\"b\\c\u{0}\u{1}\u{8}\t\n\u{b}\u{c}\r\u{1f} \u{7f}é€😀/</script>\u{2028}";

    fn endpoint(id: Option<u32>, labels: &[&str]) -> Arc<RenderedEndpoint> {
        Arc::new(RenderedEndpoint::new(Endpoint {
            id,
            identity: id.unwrap_or(2),
            labels: labels.iter().map(|l| (*l).to_string()).collect(),
            namespace: id.map(|_| "default".to_string()),
            pod_name: id.map(|_| AWKWARD.to_string()),
        }))
    }

    fn base(src: IpAddr, dst: IpAddr) -> Flow {
        let peers = FlowPeers {
            source: endpoint(Some(1234), &["k8s:app=client", AWKWARD]),
            destination: endpoint(None, &["reserved:world"]),
            node_name: Arc::from("node-1"),
        };
        let mut f = Flow::with_peers(
            &peers,
            (src, 40_000),
            (dst, 8080),
            &crate::compile::Verdict {
                allowed: true,
                rules: Vec::new(),
                denied_in: None,
                l7: false,
            },
        );
        f.time = FlowTime::at(std::time::UNIX_EPOCH + std::time::Duration::new(1_795_000_000, 7));
        f.ip = Ip {
            source: src,
            destination: dst,
            ip_version: if src.is_ipv4() { "IPv4" } else { "IPv6" },
        };
        f
    }

    fn shapes() -> Vec<Flow> {
        let addr = |s: &str| s.parse::<IpAddr>().expect("address");
        let mut flows = Vec::new();
        for (src, dst) in [
            (addr("10.0.0.1"), addr("255.0.10.100")),
            (addr("0.0.0.0"), addr("192.168.1.254")),
            (addr("fd00::1"), addr("::ffff:10.1.2.3")),
            (addr("2001:db8:0:0:1:0:0:1"), addr("::")),
        ] {
            let l3 = base(src, dst);
            flows.push(l3.clone());
            flows.push(l3.clone().over_udp().with_error(AWKWARD));
            let mut icmp = l3.clone();
            icmp.l4 = L4::Icmpv4(Icmp { kind: 8, code: 0 });
            icmp.is_reply = true;
            icmp.traffic_direction = TrafficDirection::Egress;
            flows.push(icmp.clone());
            icmp.l4 = L4::Icmpv6(Icmp {
                kind: 255,
                code: 255,
            });
            icmp.traffic_direction = TrafficDirection::Unknown;
            icmp.verdict = FlowVerdict::Dropped;
            flows.push(icmp);
            let http = Http {
                code: 200,
                method: Cow::Borrowed("GET"),
                url: format!("http://host/{AWKWARD}"),
                protocol: Cow::Borrowed("HTTP/1.1"),
                ..Http::default()
            };
            flows.push(l3.clone().with_http(L7Type::Request, 0, http.clone()));
            let mut full = http.clone();
            full.method = Cow::Owned(AWKWARD.to_string());
            full.headers = vec![
                HttpHeader {
                    key: "x-a".into(),
                    value: AWKWARD.into(),
                },
                HttpHeader {
                    key: String::new(),
                    value: String::new(),
                },
            ];
            full.header_mismatches = vec![
                HeaderMismatch {
                    key: "x-token".into(),
                    required: Some(AWKWARD.into()),
                    found: None,
                    action: MismatchAction::Log,
                },
                HeaderMismatch {
                    key: "x-b".into(),
                    required: None,
                    found: Some("v".into()),
                    action: MismatchAction::Add,
                },
                HeaderMismatch {
                    key: "x-c".into(),
                    required: Some("r".into()),
                    found: Some("f".into()),
                    action: MismatchAction::Delete,
                },
                HeaderMismatch {
                    key: "x-d".into(),
                    required: None,
                    found: None,
                    action: MismatchAction::Replace,
                },
            ];
            full.grpc = Some(Grpc {
                service: "pkg.Svc".into(),
                method: "Do".into(),
                status: Some(u32::MAX),
                message: Some(AWKWARD.into()),
            });
            flows.push(
                l3.clone()
                    .with_http(L7Type::Response, u64::MAX, full.clone())
                    .with_upstream_ns(5),
            );
            full.grpc = Some(Grpc::default());
            full.code = 0;
            flows.push(l3.clone().with_http(L7Type::Request, 1, full));
            let query = DnsFlow {
                query: "api.example.com.".into(),
                observation_source: "proxy".into(),
                qtypes: vec!["A".into()],
                ..DnsFlow::default()
            };
            flows.push(
                l3.clone()
                    .over_udp()
                    .with_dns(L7Type::Request, 10, query.clone()),
            );
            let answer = DnsFlow {
                query: AWKWARD.into(),
                ips: vec![
                    "192.0.2.1".parse().expect("ip"),
                    "2001:db8::1".parse().expect("ip"),
                ],
                ttl: 30,
                cnames: vec!["a.example.".into(), AWKWARD.into()],
                observation_source: "".into(),
                rcode: 3,
                qtypes: vec!["A".into(), "AAAA".into()],
                rrtypes: vec!["CNAME".into(), "A".into()],
            };
            flows.push(l3.clone().with_dns(L7Type::Response, 20, answer));
            flows.push(l3.clone().with_dns(L7Type::Response, 0, DnsFlow::default()));
            let kafka = KafkaFlow {
                error_code: -29,
                api_version: i16::MIN,
                api_key: "produce".into(),
                correlation_id: i32::MIN,
                topic: AWKWARD.into(),
            };
            flows.push(l3.clone().with_kafka(3, kafka, AWKWARD.into()));
            let kafka = KafkaFlow {
                error_code: 0,
                api_version: i16::MAX,
                api_key: String::new(),
                correlation_id: i32::MAX,
                topic: String::new(),
            };
            let mut denied = l3.with_kafka(0, kafka, String::new());
            denied.verdict = FlowVerdict::Dropped;
            denied.policy = AWKWARD.into();
            flows.push(denied);
        }
        flows
    }

    #[test]
    fn every_record_shape_is_written_as_serde_writes_it() {
        let flows = shapes();
        assert!(flows.len() > 40);
        for f in &flows {
            let (hand, reference) = (hand(f), reference(f));
            assert_eq!(hand, reference);
            // And it is JSON a reader parses back.
            let _: serde_json::Value = serde_json::from_str(&hand).expect("valid JSON");
        }
    }

    #[test]
    fn characters_across_the_fast_scans_words_stay_whole() {
        // The clean-prefix scan stops at 8-byte words; a character split by
        // such a boundary, before and after an escape, must come out whole.
        for pad in 0..9 {
            for tail in ["\"", "\n", "é\\", "😀\u{1}", ""] {
                let s = format!("{}é€😀{tail}x", "a".repeat(pad));
                let mut out = String::new();
                string(&mut out, &s);
                assert_eq!(out, serde_json::to_string(&s).unwrap(), "{s:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn strings_escape_as_serde_escapes_them(s in any::<String>()) {
            let mut out = String::new();
            string(&mut out, &s);
            prop_assert_eq!(out, serde_json::to_string(&s).unwrap());
        }

        #[test]
        fn numbers_and_addresses_print_as_serde_prints_them(n in any::<u64>(), i in any::<i64>(), a in any::<std::net::Ipv4Addr>(), b in any::<std::net::Ipv6Addr>()) {
            let mut out = String::new();
            number(&mut out, n);
            prop_assert_eq!(out, n.to_string());
            let mut out = String::new();
            signed(&mut out, i);
            prop_assert_eq!(out, i.to_string());
            for addr in [IpAddr::V4(a), IpAddr::V6(b)] {
                let mut out = String::new();
                ip(&mut out, addr);
                prop_assert_eq!(out, serde_json::to_string(&addr).unwrap());
            }
        }
    }
}
