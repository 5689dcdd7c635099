//! Rust mirrors of the structs in `redirect-ebpf/bpf/weir_redirect.h`. The test
//! at the bottom compares each one's size and field offsets with the BTF of the
//! compiled object, so a change on one side without the other fails the build.

use std::net::IpAddr;

pub const LAYOUT_VERSION: u32 = 6;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeirCounter {
    pub packets: u64,
    pub bytes: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointKey {
    pub ip: [u32; 4],
    pub family: u32,
}

pub const EP_INGRESS_ENFORCED: u32 = 1;
pub const EP_EGRESS_ENFORCED: u32 = 2;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    pub identity: u32,
    pub endpoint_id: u32,
    pub flags: u32,
    pub ifindex: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpcacheKey {
    pub prefixlen: u32,
    pub family: u32,
    pub ip: [u32; 4],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub prefixlen: u32,
    pub endpoint_id: u32,
    pub direction: u8,
    pub protocol: u8,
    pub pad: u16,
    pub identity: u32,
    pub dport: u16,
    pub pad2: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub verdict: u32,
    pub rule_id: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub family: u8,
    pub leg: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtValue {
    pub verdict: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub policy_generation: u32,
    pub last_seen_ns: u64,
    pub rule_id: u32,
    pub origin: u8,
    pub flags: u8,
    pub reason: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub id: u32,
    pub protocol: u8,
    pub family: u8,
    pub pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FragValue {
    pub last_seen_ns: u64,
    pub mark: u32,
    pub sport: u16,
    pub dport: u16,
    pub leg: u8,
    pub pad: [u8; 7],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Config {
    pub proxy_port: u32,
    pub mark: u32,
    pub policy_generation: u32,
    pub upstream_mark: u32,
    pub flags: u32,
    pub pad: u32,
}

/// `weir_devices` values: what the interface is to weir.
pub const DEVICE_ENDPOINT: u32 = 1;
pub const DEVICE_NETDEV: u32 = 2;

/// `weir_config.flags`: the node may reach every local endpoint (`--allow-localhost always`).
pub const CFG_ALLOW_LOCALHOST: u32 = 1;

/// `weir_ct_value.flags`.
pub const CT_CLOSING: u8 = 8;
/// Allowed once, dropped since a policy change.
pub const CT_REVOKED: u8 = 16;
/// Conntrack lifetimes (seconds since the last packet), as in the header.
pub const CT_TCP_SYN_LIFETIME: u64 = 60;
pub const CT_TCP_LIFETIME: u64 = 21600;
pub const CT_CLOSING_LIFETIME: u64 = 10;
pub const CT_OTHER_LIFETIME: u64 = 60;
pub const CT_DROP_LIFETIME: u64 = 5;
pub const CT_SEEN_REPLY: u8 = 1;

/// The enums of weir_redirect.h, checked against the object's BTF below.
pub mod kernel_enum {
    /// `enum weir_counter_index`
    pub const WEIR_COUNTER_SEEN: u32 = 0;
    pub const WEIR_COUNTER_ALLOWED: u32 = 1;
    pub const WEIR_COUNTER_DROPPED: u32 = 2;
    pub const WEIR_COUNTER_REDIRECTED: u32 = 3;
    pub const WEIR_COUNTER_EVENTS_LOST: u32 = 4;
    pub const WEIR_COUNTER_MAX: u32 = 5;
    /// `enum weir_verdict`
    pub const WEIR_DROP: u32 = 0;
    pub const WEIR_ALLOW: u32 = 1;
    pub const WEIR_REDIRECT: u32 = 2;
    pub const WEIR_PROXY_LEG: u32 = 3;
    /// `enum weir_ct_leg`
    pub const WEIR_LEG_CLIENT: u8 = 0;
    pub const WEIR_LEG_PROXY: u8 = 1;
    /// `enum weir_event_kind`
    pub const WEIR_EVENT_ALLOWED: u8 = 1;
    pub const WEIR_EVENT_DROPPED: u8 = 2;
    pub const WEIR_EVENT_REDIRECTED: u8 = 3;
    /// `enum weir_event_flag`: or'ed into an event's kind.
    pub const WEIR_EVENT_F_REPLY: u8 = 0x80;
    /// `enum weir_drop_reason`
    pub const WEIR_REASON_NONE: u8 = 0;
    pub const WEIR_REASON_POLICY_EGRESS: u8 = 1;
    pub const WEIR_REASON_POLICY_INGRESS: u8 = 2;
    pub const WEIR_REASON_NO_PROXY: u8 = 3;
    pub const WEIR_REASON_UNSUPPORTED_PROTOCOL: u8 = 4;
    pub const WEIR_REASON_SPOOFED_SOURCE: u8 = 5;
    pub const WEIR_REASON_FRAGMENT_WITHOUT_HEAD: u8 = 6;
    pub const WEIR_REASON_ICMP_UNTRACKED: u8 = 7;

    /// (C enumerator name, value) of every constant above.
    pub const ALL: &[(&str, u32)] = &[
        ("WEIR_COUNTER_SEEN", WEIR_COUNTER_SEEN),
        ("WEIR_COUNTER_ALLOWED", WEIR_COUNTER_ALLOWED),
        ("WEIR_COUNTER_DROPPED", WEIR_COUNTER_DROPPED),
        ("WEIR_COUNTER_REDIRECTED", WEIR_COUNTER_REDIRECTED),
        ("WEIR_COUNTER_EVENTS_LOST", WEIR_COUNTER_EVENTS_LOST),
        ("WEIR_COUNTER_MAX", WEIR_COUNTER_MAX),
        ("WEIR_DROP", WEIR_DROP),
        ("WEIR_ALLOW", WEIR_ALLOW),
        ("WEIR_REDIRECT", WEIR_REDIRECT),
        ("WEIR_PROXY_LEG", WEIR_PROXY_LEG),
        ("WEIR_LEG_CLIENT", WEIR_LEG_CLIENT as u32),
        ("WEIR_LEG_PROXY", WEIR_LEG_PROXY as u32),
        ("WEIR_EVENT_ALLOWED", WEIR_EVENT_ALLOWED as u32),
        ("WEIR_EVENT_DROPPED", WEIR_EVENT_DROPPED as u32),
        ("WEIR_EVENT_REDIRECTED", WEIR_EVENT_REDIRECTED as u32),
        ("WEIR_EVENT_F_REPLY", WEIR_EVENT_F_REPLY as u32),
        ("WEIR_REASON_NONE", WEIR_REASON_NONE as u32),
        (
            "WEIR_REASON_POLICY_EGRESS",
            WEIR_REASON_POLICY_EGRESS as u32,
        ),
        (
            "WEIR_REASON_POLICY_INGRESS",
            WEIR_REASON_POLICY_INGRESS as u32,
        ),
        ("WEIR_REASON_NO_PROXY", WEIR_REASON_NO_PROXY as u32),
        (
            "WEIR_REASON_UNSUPPORTED_PROTOCOL",
            WEIR_REASON_UNSUPPORTED_PROTOCOL as u32,
        ),
        (
            "WEIR_REASON_SPOOFED_SOURCE",
            WEIR_REASON_SPOOFED_SOURCE as u32,
        ),
        (
            "WEIR_REASON_FRAGMENT_WITHOUT_HEAD",
            WEIR_REASON_FRAGMENT_WITHOUT_HEAD as u32,
        ),
        (
            "WEIR_REASON_ICMP_UNTRACKED",
            WEIR_REASON_ICMP_UNTRACKED as u32,
        ),
    ];
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Event {
    pub timestamp_ns: u64,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub family: u8,
    pub kind: u8,
    pub reason: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub rule_id: u32,
    pub ifindex: u32,
}

impl Event {
    /// Reads an event as the kernel wrote it (native byte order, C layout); `None`
    /// when `raw` is too short.
    pub fn from_bytes(raw: &[u8]) -> Option<Event> {
        use std::mem::offset_of;
        if raw.len() < std::mem::size_of::<Event>() {
            return None;
        }
        let u16_at = |o: usize| u16::from_ne_bytes([raw[o], raw[o + 1]]);
        let u32_at = |o: usize| u32::from_ne_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
        let words = |o: usize| [u32_at(o), u32_at(o + 4), u32_at(o + 8), u32_at(o + 12)];
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&raw[offset_of!(Event, timestamp_ns)..][..8]);
        Some(Event {
            timestamp_ns: u64::from_ne_bytes(ts),
            saddr: words(offset_of!(Event, saddr)),
            daddr: words(offset_of!(Event, daddr)),
            sport: u16_at(offset_of!(Event, sport)),
            dport: u16_at(offset_of!(Event, dport)),
            protocol: raw[offset_of!(Event, protocol)],
            family: raw[offset_of!(Event, family)],
            kind: raw[offset_of!(Event, kind)],
            reason: raw[offset_of!(Event, reason)],
            src_identity: u32_at(offset_of!(Event, src_identity)),
            dst_identity: u32_at(offset_of!(Event, dst_identity)),
            rule_id: u32_at(offset_of!(Event, rule_id)),
            ifindex: u32_at(offset_of!(Event, ifindex)),
        })
    }
}

// SAFETY: every type here is `repr(C)`, `Copy`, made only of integers, with
// explicit padding fields, so any byte pattern is a valid value and none has
// uninitialised padding — what aya::Pod requires for map keys and values.
unsafe impl aya::Pod for WeirCounter {}
// SAFETY: as above.
unsafe impl aya::Pod for EndpointKey {}
// SAFETY: as above.
unsafe impl aya::Pod for EndpointInfo {}
// SAFETY: as above.
unsafe impl aya::Pod for IpcacheKey {}
// SAFETY: as above.
unsafe impl aya::Pod for IpcacheValue {}
// SAFETY: as above.
unsafe impl aya::Pod for PolicyKey {}
// SAFETY: as above.
unsafe impl aya::Pod for PolicyValue {}
// SAFETY: as above.
unsafe impl aya::Pod for CtKey {}
// SAFETY: as above.
unsafe impl aya::Pod for CtValue {}
// SAFETY: as above.
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
unsafe impl aya::Pod for FragKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FragValue {}

/// An address as the maps store it: four network-order words and a family.
pub fn ip_words(ip: IpAddr) -> ([u32; 4], u32) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], 4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], 6)
        }
    }
}

/// The inverse of `ip_words`.
pub fn ip_from_words(words: [u32; 4], family: u8) -> IpAddr {
    if family == 4 {
        IpAddr::from(words[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::mem::{offset_of, size_of};

    use object::{Object, ObjectSection};

    #[test]
    fn events_read_field_by_field_as_the_kernel_lays_them_out() {
        let mut raw = vec![0u8; size_of::<super::Event>()];
        raw[offset_of!(super::Event, timestamp_ns)..][..8].copy_from_slice(&7u64.to_ne_bytes());
        raw[offset_of!(super::Event, daddr) + 4..][..4].copy_from_slice(&9u32.to_ne_bytes());
        raw[offset_of!(super::Event, dport)..][..2].copy_from_slice(&80u16.to_be_bytes());
        raw[offset_of!(super::Event, kind)] = 2;
        raw[offset_of!(super::Event, ifindex)..][..4].copy_from_slice(&42u32.to_ne_bytes());
        let e = super::Event::from_bytes(&raw).unwrap();
        assert_eq!(e.timestamp_ns, 7);
        assert_eq!(e.daddr, [0, 9, 0, 0]);
        assert_eq!(u16::from_be(e.dport), 80);
        assert_eq!((e.kind, e.ifindex), (2, 42));
        assert!(super::Event::from_bytes(&raw[..raw.len() - 1]).is_none());
    }

    type Structs = HashMap<String, (u32, HashMap<String, u32>)>;

    /// Struct name → (size, member name → byte offset), read from `.BTF`.
    fn btf_structs(elf: &[u8]) -> Structs {
        btf_types(elf).0
    }

    /// The structs, and every enumerator (name → value), read from `.BTF`.
    fn btf_types(elf: &[u8]) -> (Structs, HashMap<String, u32>) {
        // include_bytes! data has no alignment; the ELF reader wants it aligned, and a
        // fresh heap copy is (malloc aligns to 16).
        let view = elf.to_vec();
        assert_eq!(view.as_ptr() as usize % 8, 0);
        let file = object::File::parse(&*view).expect("ELF");
        let btf = file
            .section_by_name(".BTF")
            .expect(".BTF section")
            .data()
            .expect("data");
        let u32_at = |o: usize| u32::from_le_bytes(btf[o..o + 4].try_into().unwrap());
        assert_eq!(u16::from_le_bytes([btf[0], btf[1]]), 0xeb9f, "BTF magic");
        let hdr_len = u32_at(4) as usize;
        let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
        let str_off = u32_at(16) as usize;
        let strings = &btf[hdr_len + str_off..];
        let name = |off: u32| {
            let s = &strings[off as usize..];
            String::from_utf8_lossy(&s[..s.iter().position(|b| *b == 0).unwrap()]).into_owned()
        };
        let mut out = HashMap::new();
        let mut enums = HashMap::new();
        let (mut at, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        while at < end {
            let (name_off, info, size) = (u32_at(at), u32_at(at + 4), u32_at(at + 8));
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            at += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => vlen * 12,
                6 | 13 => vlen * 8,
                _ => 0,
            };
            if kind == 4 {
                let mut members = HashMap::new();
                for m in 0..vlen {
                    let base = at + m * 12;
                    let off = u32_at(base + 8) & if info >> 31 == 1 { 0xff_ffff } else { u32::MAX };
                    members.insert(name(u32_at(base)), off / 8);
                }
                out.insert(name(name_off), (size, members));
            }
            if kind == 6 {
                for m in 0..vlen {
                    let base = at + m * 8;
                    enums.insert(name(u32_at(base)), u32_at(base + 4));
                }
            }
            at += extra;
        }
        (out, enums)
    }

    #[test]
    fn rust_enum_constants_match_the_btf() {
        let (_, enums) = btf_types(weir_redirect_ebpf::OBJECT);
        for (name, value) in super::kernel_enum::ALL {
            assert_eq!(enums.get(*name), Some(value), "enumerator {name}");
        }
    }

    macro_rules! check {
        ($btf:expr, $c:literal, $t:ty, [$($f:ident),*]) => {{
            let (size, members) = $btf.get($c).unwrap_or_else(|| panic!("struct {} not in BTF", $c));
            assert_eq!(*size as usize, size_of::<$t>(), "size of {}", $c);
            let mut rust_fields = 0;
            $(
                rust_fields += 1;
                assert_eq!(
                    members.get(stringify!($f)).copied(),
                    Some(offset_of!($t, $f) as u32),
                    "offset of {}.{}", $c, stringify!($f)
                );
            )*
            assert_eq!(rust_fields, members.len(), "field count of {}", $c);
        }};
    }

    #[test]
    fn rust_mirrors_match_the_btf() {
        use super::*;
        let btf = btf_structs(weir_redirect_ebpf::OBJECT);
        check!(btf, "weir_counter", WeirCounter, [packets, bytes]);
        check!(btf, "weir_endpoint_key", EndpointKey, [ip, family]);
        check!(
            btf,
            "weir_endpoint_info",
            EndpointInfo,
            [identity, endpoint_id, flags, ifindex]
        );
        check!(btf, "weir_ipcache_key", IpcacheKey, [prefixlen, family, ip]);
        check!(btf, "weir_ipcache_value", IpcacheValue, [identity, pad]);
        check!(
            btf,
            "weir_policy_key",
            PolicyKey,
            [
                prefixlen,
                endpoint_id,
                direction,
                protocol,
                pad,
                identity,
                dport,
                pad2
            ]
        );
        check!(btf, "weir_policy_value", PolicyValue, [verdict, rule_id]);
        check!(
            btf,
            "weir_ct_key",
            CtKey,
            [saddr, daddr, sport, dport, protocol, family, leg, pad]
        );
        check!(
            btf,
            "weir_frag_key",
            FragKey,
            [saddr, daddr, id, protocol, family, pad]
        );
        check!(
            btf,
            "weir_frag_value",
            FragValue,
            [last_seen_ns, mark, sport, dport, leg, pad]
        );
        check!(
            btf,
            "weir_ct_value",
            CtValue,
            [
                verdict,
                src_identity,
                dst_identity,
                policy_generation,
                last_seen_ns,
                rule_id,
                origin,
                flags,
                reason,
                pad
            ]
        );
        check!(
            btf,
            "weir_config",
            Config,
            [
                proxy_port,
                mark,
                policy_generation,
                upstream_mark,
                flags,
                pad
            ]
        );
        check!(
            btf,
            "weir_event",
            Event,
            [
                timestamp_ns,
                saddr,
                daddr,
                sport,
                dport,
                protocol,
                family,
                kind,
                reason,
                src_identity,
                dst_identity,
                rule_id,
                ifindex
            ]
        );
    }

    #[test]
    fn address_words_round_trip() {
        for ip in ["10.200.0.10", "fd00:200::10"] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let (w, fam) = super::ip_words(ip);
            assert_eq!(super::ip_from_words(w, fam as u8), ip);
        }
    }
}
