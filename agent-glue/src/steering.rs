//! First-version steering: nftables TPROXY rules (through `nft`'s JSON interface)
//! plus a policy-routing rule and table that deliver marked packets locally.
//!
//! Everything installed carries weir's name: the nft table is `inet weir`, and the
//! `ip rule` and routes carry routing protocol 119 (`proto 119`), so a restart or
//! `weir cleanup` removes exactly these and nothing else.
//!
//! What is steered: every TCP and UDP packet addressed to an endpoint that some
//! policy selects for ingress, and every one from an endpoint selected for egress.
//! The proxy then enforces L3/L4 (refusing peers no rule allows) and L7. Other IP
//! protocols to or from those endpoints are dropped: the proxy could not check them.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use thiserror::Error;
use weir_policy::{CompiledPolicy, Direction};

pub const TABLE: &str = "weir";
/// Routing protocol number that tags weir's ip rules and routes.
pub const RT_PROTO: &str = "119";

#[derive(Debug, Error)]
pub enum SteeringError {
    #[error("cannot run `{0}`: {1} (is it installed? `make deps` installs nftables and iproute2)")]
    Spawn(String, std::io::Error),
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
}

#[derive(Debug, Clone)]
pub struct SteeringConfig {
    pub proxy_port: u16,
    pub fwmark: u32,
    pub route_table: u32,
}

/// The addresses to steer, from the compiled policy.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SteeringSets {
    pub ingress: Vec<IpAddr>,
    pub egress: Vec<IpAddr>,
}

impl SteeringSets {
    pub fn from_policy(policy: &CompiledPolicy) -> Self {
        let mut s = SteeringSets::default();
        for (i, ep) in policy.endpoints().iter().enumerate() {
            if policy.is_selected(i, Direction::Ingress) {
                s.ingress.extend(&ep.endpoint.ips);
            }
            if policy.is_selected(i, Direction::Egress) {
                s.egress.extend(&ep.endpoint.ips);
            }
        }
        s
    }
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String, SteeringError> {
    let text = format!("{cmd} {}", args.join(" "));
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| SteeringError::Spawn(cmd.to_string(), e))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| SteeringError::Spawn(cmd.to_string(), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| SteeringError::Spawn(cmd.to_string(), e))?;
    if !out.status.success() {
        return Err(SteeringError::Failed {
            cmd: text,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn table() -> Value {
    json!({"family": "inet", "name": TABLE})
}

fn set_decl(name: &str, ty: &str) -> Value {
    json!({"add": {"set": {"family": "inet", "table": TABLE, "name": name, "type": ty}}})
}

fn set_elements(name: &str, ips: impl Iterator<Item = String>) -> Option<Value> {
    let elems: Vec<String> = ips.collect();
    (!elems.is_empty()).then(|| {
        json!({"add": {"element": {"family": "inet", "table": TABLE, "name": name, "elem": elems}}})
    })
}

fn rule(expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": "inet", "table": TABLE, "chain": "prerouting", "expr": expr}}})
}

fn matches(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn set_mark(mark: u32) -> Value {
    json!({"mangle": {"key": {"meta": {"key": "mark"}}, "value": mark}})
}

/// The whole nft ruleset for the sets, as one JSON batch (applied atomically).
pub fn ruleset(sets: &SteeringSets, cfg: &SteeringConfig) -> Value {
    let mut cmds = vec![
        // add+delete+add: replaces an old table of ours in the same transaction.
        json!({"add": {"table": table()}}),
        json!({"delete": {"table": table()}}),
        json!({"add": {"table": table()}}),
        set_decl("ingress4", "ipv4_addr"),
        set_decl("ingress6", "ipv6_addr"),
        set_decl("egress4", "ipv4_addr"),
        set_decl("egress6", "ipv6_addr"),
    ];
    let v4 = |ips: &[IpAddr]| {
        ips.iter()
            .filter(|i| i.is_ipv4())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .into_iter()
    };
    let v6 = |ips: &[IpAddr]| {
        ips.iter()
            .filter(|i| i.is_ipv6())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .into_iter()
    };
    cmds.extend(set_elements("ingress4", v4(&sets.ingress)));
    cmds.extend(set_elements("ingress6", v6(&sets.ingress)));
    cmds.extend(set_elements("egress4", v4(&sets.egress)));
    cmds.extend(set_elements("egress6", v6(&sets.egress)));
    cmds.push(json!({"add": {"chain": {
        "family": "inet", "table": TABLE, "name": "prerouting",
        "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"
    }}}));
    // Packets of connections (and UDP sessions) the proxy already has go to that
    // socket; so do the servers' replies to its upstream sockets.
    for proto in ["tcp", "udp"] {
        cmds.push(rule(vec![
            matches(json!({"meta": {"key": "l4proto"}}), json!(proto)),
            matches(json!({"socket": {"key": "transparent"}}), json!(1)),
            set_mark(cfg.fwmark),
            json!({"accept": null}),
        ]));
    }
    let tproxy = |cmds: &mut Vec<Value>, proto: &str, family: &str, field: &str, set: &str| {
        cmds.push(rule(vec![
            matches(json!({"meta": {"key": "l4proto"}}), json!(proto)),
            matches(
                json!({"payload": {"protocol": family, "field": field}}),
                json!(set),
            ),
            json!({"tproxy": {"family": family, "port": cfg.proxy_port}}),
            set_mark(cfg.fwmark),
            json!({"accept": null}),
        ]));
    };
    // Anything else to or from an enforced endpoint (other than ICMP, which
    // carries the errors of the flows above) is something policy cannot see.
    let drop_others = |cmds: &mut Vec<Value>, family: &str, field: &str, set: &str| {
        cmds.push(rule(vec![
            matches(
                json!({"payload": {"protocol": family, "field": field}}),
                json!(set),
            ),
            json!({"match": {"op": "!=", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["icmp", "ipv6-icmp"]}}}),
            json!({"drop": null}),
        ]));
    };
    let egress = [("ip", "@egress4"), ("ip6", "@egress6")];
    // TCP from egress-enforced endpoints before the node's own addresses: their
    // connections to node-local services are decided by policy too. (A reply of
    // theirs to one of the node's own plain sockets finds that socket in
    // `tproxy`'s lookup; it is not transparent, so the rule does not apply and
    // the packet goes on to the accept below.) Not UDP: a proxied UDP session
    // answers from a socket bound to the service's own address and port, which a
    // node-local service usually holds exclusively.
    for (family, set) in egress {
        tproxy(&mut cmds, "tcp", family, "saddr", set);
    }
    // Other traffic for the node itself is never steered.
    cmds.push(rule(vec![
        matches(
            json!({"fib": {"result": "type", "flags": ["daddr"]}}),
            json!("local"),
        ),
        json!({"accept": null}),
    ]));
    for (family, set) in egress {
        tproxy(&mut cmds, "udp", family, "saddr", set);
        drop_others(&mut cmds, family, "saddr", set);
    }
    for (family, set) in [("ip", "@ingress4"), ("ip6", "@ingress6")] {
        for proto in ["tcp", "udp"] {
            tproxy(&mut cmds, proto, family, "daddr", set);
        }
        drop_others(&mut cmds, family, "daddr", set);
    }
    json!({"nftables": cmds})
}

/// Installs (or replaces) the nft table and the routing rule/table.
pub fn install(sets: &SteeringSets, cfg: &SteeringConfig) -> Result<(), SteeringError> {
    let batch = ruleset(sets, cfg).to_string();
    run("nft", &["-j", "-f", "-"], Some(&batch))?;
    install_local_delivery(cfg)
}

/// The `ip rule` (fwmark → table) and `local` default routes that deliver marked
/// packets to the proxy's transparent sockets; both the nft and the eBPF steering
/// need them.
pub fn install_local_delivery(cfg: &SteeringConfig) -> Result<(), SteeringError> {
    let mark = format!("{:#x}/{:#x}", cfg.fwmark, cfg.fwmark);
    let table = cfg.route_table.to_string();
    for fam in ["-4", "-6"] {
        // Keep a rule that is already right: removing it, even for a moment,
        // loses the packets steered meanwhile (a reload, or a new weir taking
        // over a running one). Otherwise replace rather than add, so a restart
        // does not stack duplicates.
        let listed = run("ip", &[fam, "rule", "show"], None)?;
        if !has_only_rule(&listed, &mark, &table) {
            remove_rules(fam)?;
            run(
                "ip",
                &[
                    fam, "rule", "add", "fwmark", &mark, "lookup", &table, "protocol", RT_PROTO,
                ],
                None,
            )?;
        }
        let dst = if fam == "-4" { "0.0.0.0/0" } else { "::/0" };
        run(
            "ip",
            &[
                fam, "route", "replace", "local", dst, "dev", "lo", "table", &table, "proto",
                RT_PROTO,
            ],
            None,
        )?;
    }
    Ok(())
}

/// `ip rule show` lists exactly one rule of ours, and it is this one.
fn has_only_rule(listed: &str, mark: &str, table: &str) -> bool {
    let tag = format!(" proto {RT_PROTO}");
    let ours: Vec<&str> = listed
        .lines()
        .filter(|l| l.trim_end().ends_with(&tag))
        .collect();
    let want = format!("from all fwmark {mark} lookup {table}{tag}");
    matches!(ours.as_slice(), [one] if one.split_once(':').is_some_and(|(_, r)| r.trim() == want))
}

fn remove_rules(fam: &str) -> Result<usize, SteeringError> {
    // `ip rule show` does not filter by protocol: find ours by their `proto 119`
    // and delete each by its preference number.
    let listed = run("ip", &[fam, "rule", "show"], None)?;
    let tag = format!(" proto {RT_PROTO}");
    let mut removed = 0;
    for line in listed.lines().filter(|l| l.trim_end().ends_with(&tag)) {
        if let Some((pref, _)) = line.split_once(':') {
            run(
                "ip",
                &[
                    fam,
                    "rule",
                    "del",
                    "pref",
                    pref.trim(),
                    "protocol",
                    RT_PROTO,
                ],
                None,
            )?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// What [`remove`] found and removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub nft_table: bool,
    pub ip_rules: usize,
    pub route_tables: usize,
}

/// The rules in weir's nft table (`None`: no table), for `weir status`.
pub fn nft_rules() -> Option<usize> {
    let out = run("nft", &["-j", "list", "table", "inet", TABLE], None).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    Some(
        v["nftables"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|o| o.get("rule").is_some()).count()),
    )
}

/// Removes everything `install` created, and nothing else. Missing pieces are fine.
pub fn remove(cfg: &SteeringConfig) -> Result<Removed, SteeringError> {
    let mut removed = Removed::default();
    let have_table = run("nft", &["list", "table", "inet", TABLE], None).is_ok();
    if have_table {
        run("nft", &["delete", "table", "inet", TABLE], None)?;
        removed.nft_table = true;
    }
    let table = cfg.route_table.to_string();
    for fam in ["-4", "-6"] {
        removed.ip_rules += remove_rules(fam)?;
        let routes = run(
            "ip",
            &[fam, "route", "show", "table", &table, "proto", RT_PROTO],
            None,
        )
        .unwrap_or_default();
        if !routes.trim().is_empty() {
            run(
                "ip",
                &[fam, "route", "flush", "table", &table, "proto", RT_PROTO],
                None,
            )?;
            removed.route_tables += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_already_right_is_kept() {
        let mark = "0x7700/0x7700";
        let one = "0:\tfrom all lookup local\n32765:\tfrom all fwmark 0x7700/0x7700 lookup 119 proto 119\n";
        assert!(has_only_rule(one, mark, "119"));
        assert!(!has_only_rule(one, mark, "120"));
        assert!(!has_only_rule(one, "0x7800/0x7800", "119"));
        let two = format!("{one}32764:\tfrom all fwmark 0x7700/0x7700 lookup 119 proto 119\n");
        assert!(!has_only_rule(&two, mark, "119"));
        assert!(!has_only_rule("0:\tfrom all lookup local\n", mark, "119"));
    }

    #[test]
    fn ruleset_shape() {
        let sets = SteeringSets {
            ingress: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            egress: vec![],
        };
        let cfg = SteeringConfig {
            proxy_port: 15001,
            fwmark: 0x7700,
            route_table: 119,
        };
        let v = ruleset(&sets, &cfg);
        let text = v.to_string();
        assert!(text.contains("\"elem\":[\"10.0.0.1\"]"));
        assert!(text.contains("\"elem\":[\"fd00::1\"]"));
        assert!(!text.contains("\"name\":\"egress4\",\"elem\""));
        // TCP and UDP for each of the four address sets; one drop per set.
        assert_eq!(text.matches("\"tproxy\"").count(), 8);
        assert_eq!(text.matches("\"drop\"").count(), 4);
    }

    /// The order of the prerouting rules: the proxy's own sockets first, then TCP
    /// from egress-enforced sources (so their connections to node addresses are
    /// policed), then the node's own addresses, then the rest as before.
    #[test]
    fn egress_is_steered_before_local_traffic_is_accepted() {
        let sets = SteeringSets {
            ingress: vec!["10.0.0.1".parse().unwrap()],
            egress: vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
        };
        let cfg = SteeringConfig {
            proxy_port: 15001,
            fwmark: 0x7700,
            route_table: 119,
        };
        let v = ruleset(&sets, &cfg);
        let rules: Vec<String> = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"].get("rule"))
            .map(|r| {
                let e = r["expr"].to_string();
                let what = if e.contains("\"transparent\"") {
                    "socket"
                } else if e.contains("\"fib\"") {
                    "local"
                } else if e.contains("@egress4") {
                    "egress4"
                } else if e.contains("@egress6") {
                    "egress6"
                } else if e.contains("@ingress4") {
                    "ingress4"
                } else if e.contains("@ingress6") {
                    "ingress6"
                } else {
                    "?"
                };
                let verdict = if e.contains("\"drop\"") { "drop" } else { "" };
                let proto = if e.contains("\"tcp\"") {
                    "/tcp"
                } else if e.contains("\"udp\"") {
                    "/udp"
                } else {
                    ""
                };
                format!("{what}{proto}{verdict}")
            })
            .collect();
        let expected = [
            "socket/tcp",
            "socket/udp",
            "egress4/tcp",
            "egress6/tcp",
            "local",
            "egress4/udp",
            "egress4drop",
            "egress6/udp",
            "egress6drop",
            "ingress4/tcp",
            "ingress4/udp",
            "ingress4drop",
            "ingress6/tcp",
            "ingress6/udp",
            "ingress6drop",
        ];
        assert_eq!(rules, expected);
    }
}
