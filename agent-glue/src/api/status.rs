//! `Status.Get` and `weir status`: what a running weir is doing. The control
//! thread gathers it (it owns the datapath, the sources and the FQDN cache);
//! the CLI renders it as text like `cilium status`, or as JSON whose field
//! names are the proto's and stay stable.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use weir_policy::LoadErrors;

use super::client::{connect_channel, status_error};
use super::pb;
use crate::cli::SteeringMode;
use crate::control::Steering;
use crate::datapath::Role;

/// What the run loop knows at start that status reports for the whole run.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub started: SystemTime,
    pub started_at: Instant,
    pub listeners: Vec<pb::Listener>,
}

impl RunInfo {
    pub fn new(listeners: Vec<pb::Listener>) -> Self {
        RunInfo {
            started: SystemTime::now(),
            started_at: Instant::now(),
            listeners,
        }
    }
}

/// The proxy's listening sockets, as status shows them.
pub fn listeners(
    tcp: &[tokio::net::TcpListener],
    udp: &[tokio::net::UdpSocket],
) -> Vec<pb::Listener> {
    let one = |protocol: &str, addr: std::io::Result<std::net::SocketAddr>| {
        addr.ok().map(|a| pb::Listener {
            protocol: protocol.into(),
            address: a.to_string(),
            port: u32::from(a.port()),
            family: if a.is_ipv4() { "IPv4" } else { "IPv6" }.into(),
        })
    };
    tcp.iter()
        .filter_map(|l| one("TCP", l.local_addr()))
        .chain(udp.iter().filter_map(|u| one("UDP", u.local_addr())))
        .collect()
}

/// Policy reloads (SIGHUP, a watched file, `weir policy apply|delete`): how
/// many, and how the last one went.
#[derive(Debug, Default)]
pub struct ReloadLog {
    pub reloads: u64,
    pub failed: u64,
    pub last: Option<pb::Reload>,
}

impl ReloadLog {
    pub fn record(&mut self, result: Result<(), &anyhow::Error>) {
        self.reloads += 1;
        let errors = match result {
            Ok(()) => Vec::new(),
            Err(e) => {
                self.failed += 1;
                reload_errors(e)
            }
        };
        self.last = Some(pb::Reload {
            ok: errors.is_empty(),
            time: weir_policy::flow::rfc3339(SystemTime::now()),
            errors,
        });
    }
}

/// One line per error: `FILE:LINE:COL: message` for errors in policy and
/// endpoints files, else the error with its causes.
pub fn reload_errors(e: &anyhow::Error) -> Vec<String> {
    match e.chain().find_map(|c| c.downcast_ref::<LoadErrors>()) {
        Some(le) if !le.0.is_empty() => le.0.iter().map(ToString::to_string).collect(),
        _ => vec![format!("{e:#}")],
    }
}

/// What the control thread knows, gathered for one `Status.Get`.
pub struct Sources<'a> {
    pub info: &'a RunInfo,
    pub steering: &'a Steering,
    pub policies: usize,
    pub shared: &'a weir_proxy::Shared,
    pub fqdn: &'a crate::fqdn::FqdnState,
    pub reloads: &'a ReloadLog,
}

/// Gathers the status. Reads the kernel for what is attached (a few netlink
/// queries and `tc`/`nft` runs): the control thread, not a proxy worker.
pub fn collect(s: &Sources<'_>) -> pb::GetStatusResponse {
    let roles: Vec<(String, Role)> = s
        .steering
        .datapath
        .as_ref()
        .map(crate::datapath::Datapath::interface_roles)
        .unwrap_or_default();
    let mut interfaces: Vec<pb::Interface> = Vec::new();
    for (iface, direction, name) in crate::datapath::attached_programs() {
        let program = pb::AttachedProgram {
            direction: direction.into(),
            name,
        };
        match interfaces.iter_mut().find(|i| i.name == iface) {
            Some(i) => i.programs.push(program),
            None => interfaces.push(pb::Interface {
                role: role_of(&roles, &iface).into(),
                name: iface,
                programs: vec![program],
            }),
        }
    }
    // An interface weir attached to but the kernel lists nothing for is worth
    // seeing: something took weir's programs off.
    for (iface, role) in &roles {
        if !interfaces.iter().any(|i| &i.name == iface) {
            interfaces.push(pb::Interface {
                name: iface.clone(),
                role: role_name(*role).into(),
                programs: Vec::new(),
            });
        }
    }
    interfaces.sort_by(|a, b| (a.role.is_empty(), &a.name).cmp(&(b.role.is_empty(), &b.name)));
    let maps = s
        .steering
        .datapath
        .as_ref()
        .map(|dp| {
            dp.map_fill()
                .into_iter()
                .map(|m| pb::BpfMap {
                    name: m.name.into(),
                    entries: m.entries.unwrap_or(0),
                    has_entries: m.entries.is_some(),
                    max_entries: m.max_entries.unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default();
    let bus = s.shared.flows.bus();
    let policy = s.shared.policy.load();
    pb::GetStatusResponse {
        version: crate::VERSION.into(),
        pid: std::process::id(),
        started: weir_policy::flow::rfc3339(s.info.started),
        uptime_secs: s.info.started_at.elapsed().as_secs(),
        steering: steering_name(s.steering.mode).into(),
        interfaces,
        maps,
        listeners: s.info.listeners.clone(),
        policy: Some(pb::PolicyStatus {
            revision: s.shared.policy_revision(),
            policies: u32::try_from(s.policies).unwrap_or(u32::MAX),
            endpoints: u32::try_from(policy.endpoints().len()).unwrap_or(u32::MAX),
            reloads: s.reloads.reloads,
            failed_reloads: s.reloads.failed,
            last_reload: s.reloads.last.clone(),
        }),
        fqdn: Some(pb::FqdnStatus {
            names: s.fqdn.cache.name_count() as u64,
            addresses: s.fqdn.cache.ip_count() as u64,
        }),
        flows: Some(pb::FlowStatus {
            buffered: bus.len() as u64,
            capacity: bus.capacity() as u64,
            lost: bus.metrics().lost.get(),
            subscribers: bus.subscribers() as u64,
        }),
        nft_rules: (s.steering.mode == SteeringMode::Nft)
            .then(crate::steering::nft_rules)
            .flatten()
            .map(|n| n as u64),
    }
}

fn role_of(roles: &[(String, Role)], iface: &str) -> &'static str {
    roles
        .iter()
        .find(|(i, _)| i == iface)
        .map_or("", |(_, r)| role_name(*r))
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Endpoint => "endpoint",
        Role::Netdev => "netdev",
    }
}

fn steering_name(m: SteeringMode) -> &'static str {
    match m {
        SteeringMode::Ebpf => "ebpf",
        SteeringMode::Nft => "nft",
        SteeringMode::None => "none",
        // Resolved before anything runs; kept total for the type's sake.
        SteeringMode::Auto => "auto",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned lines, like `cilium status`.
    Text,
    /// One JSON object; field names are the API's and stay stable.
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The running weir's API socket (its --api-socket).
    #[arg(long, default_value = "/run/weir/weir.sock")]
    pub api_socket: PathBuf,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
}

pub fn main(args: StatusArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = rt.block_on(async {
        let mut client =
            pb::status_client::StatusClient::new(connect_channel(&args.api_socket).await?);
        client
            .get(pb::GetStatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(status_error)
    })?;
    match args.output {
        Output::Text => print!("{}", render_text(&status)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&to_json(&status))?),
    }
    Ok(())
}

/// The JSON form: the proto's field names; absent parts are `null`.
pub fn to_json(s: &pb::GetStatusResponse) -> Value {
    let policy = s.policy.clone().unwrap_or_default();
    let fqdn = s.fqdn.unwrap_or_default();
    let flows = s.flows.unwrap_or_default();
    json!({
        "version": s.version,
        "pid": s.pid,
        "started": s.started,
        "uptime_secs": s.uptime_secs,
        "steering": s.steering,
        "nft_rules": s.nft_rules,
        "interfaces": s.interfaces.iter().map(|i| json!({
            "name": i.name,
            "role": if i.role.is_empty() { Value::Null } else { json!(i.role) },
            "programs": i.programs.iter().map(|p| json!({
                "direction": p.direction,
                "name": p.name,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "maps": s.maps.iter().map(|m| json!({
            "name": m.name,
            "entries": if m.has_entries { json!(m.entries) } else { Value::Null },
            "max_entries": m.max_entries,
        })).collect::<Vec<_>>(),
        "listeners": s.listeners.iter().map(|l| json!({
            "protocol": l.protocol,
            "address": l.address,
            "port": l.port,
            "family": l.family,
        })).collect::<Vec<_>>(),
        "policy": {
            "revision": policy.revision,
            "policies": policy.policies,
            "endpoints": policy.endpoints,
            "reloads": policy.reloads,
            "failed_reloads": policy.failed_reloads,
            "last_reload": policy.last_reload.map(|r| json!({
                "ok": r.ok,
                "time": r.time,
                "errors": r.errors,
            })),
        },
        "fqdn": {"names": fqdn.names, "addresses": fqdn.addresses},
        "flows": {
            "buffered": flows.buffered,
            "capacity": flows.capacity,
            "lost": flows.lost,
            "subscribers": flows.subscribers,
        },
    })
}

/// `1d2h3m4s`, largest unit first, zero parts left out.
fn human_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= len {
            let _ = write!(out, "{}{unit}", secs / len);
            secs %= len;
        }
    }
    out
}

/// The text form, one `Label:  value` line per part, details indented below.
pub fn render_text(s: &pb::GetStatusResponse) -> String {
    let mut o = String::new();
    let mut line = |label: &str, value: &str| {
        let _ = writeln!(o, "{:<17}{value}", format!("{label}:"));
    };
    line("Version", &s.version);
    line(
        "Uptime",
        &format!(
            "{} (since {}, pid {})",
            human_duration(Duration::from_secs(s.uptime_secs)),
            s.started,
            s.pid
        ),
    );
    let steering = match s.steering.as_str() {
        "ebpf" => "eBPF datapath (tc on interfaces, bpf_sk_assign to the proxy)".to_string(),
        "nft" => match s.nft_rules {
            Some(n) => format!("nftables TPROXY (table inet weir, {n} rules)"),
            None => "nftables TPROXY (table inet weir MISSING)".to_string(),
        },
        "none" => "none (traffic reaches the proxy port by other means)".to_string(),
        other => other.to_string(),
    };
    line("Steering", &steering);
    let ours = s.interfaces.iter().filter(|i| !i.role.is_empty()).count();
    line(
        "Interfaces",
        &format!(
            "{ours} with weir's programs, {} with others' only",
            s.interfaces.len() - ours
        ),
    );
    let width = s.interfaces.iter().map(|i| i.name.len()).max().unwrap_or(0);
    for i in &s.interfaces {
        let progs = if i.programs.is_empty() {
            "NOTHING ATTACHED".to_string()
        } else {
            i.programs
                .iter()
                .map(|p| format!("{} {}", p.direction, p.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let role = if i.role.is_empty() { "-" } else { &i.role };
        let _ = writeln!(o, "  {:<width$}  {role:<8}  {progs}", i.name);
    }
    if !s.maps.is_empty() {
        let _ = writeln!(o, "BPF maps:");
        let width = s.maps.iter().map(|m| m.name.len()).max().unwrap_or(0);
        for m in &s.maps {
            let fill = match (m.has_entries, m.max_entries) {
                (true, 0) => format!("{}", m.entries),
                (true, max) => format!(
                    "{}/{max} ({:.1}%)",
                    m.entries,
                    m.entries as f64 * 100.0 / max as f64
                ),
                (false, 0) => "-".to_string(),
                (false, max) => format!("-/{max} (kernel-managed, not counted)"),
            };
            let _ = writeln!(o, "  {:<width$}  {fill}", m.name);
        }
    }
    let listeners = s
        .listeners
        .iter()
        .map(|l| format!("{} {}", l.protocol, l.address))
        .collect::<Vec<_>>()
        .join(", ");
    let mut line = |label: &str, value: &str| {
        let _ = writeln!(o, "{:<17}{value}", format!("{label}:"));
    };
    line(
        "Proxy listeners",
        if listeners.is_empty() {
            "none"
        } else {
            &listeners
        },
    );
    let p = s.policy.clone().unwrap_or_default();
    line(
        "Policy",
        &format!(
            "revision {}, {} policies, {} endpoints",
            p.revision, p.policies, p.endpoints
        ),
    );
    match &p.last_reload {
        None => line("Last reload", "none since start"),
        Some(r) if r.ok => line(
            "Last reload",
            &format!(
                "OK at {} ({} reloads, {} failed)",
                r.time, p.reloads, p.failed_reloads
            ),
        ),
        Some(r) => {
            line(
                "Last reload",
                &format!(
                    "FAILED at {} ({} reloads, {} failed); the previous policy stays in force",
                    r.time, p.reloads, p.failed_reloads
                ),
            );
            for e in &r.errors {
                for l in e.lines() {
                    let _ = writeln!(o, "  {l}");
                }
            }
        }
    }
    let mut line = |label: &str, value: &str| {
        let _ = writeln!(o, "{:<17}{value}", format!("{label}:"));
    };
    let f = s.fqdn.unwrap_or_default();
    line(
        "FQDN cache",
        &format!("{} names, {} addresses", f.names, f.addresses),
    );
    let fl = s.flows.unwrap_or_default();
    line(
        "Flows",
        &format!(
            "{}/{} buffered, {} lost, {} followers",
            fl.buffered, fl.capacity, fl.lost, fl.subscribers
        ),
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> pb::GetStatusResponse {
        pb::GetStatusResponse {
            version: "0.1.0 (git 0123456789ab)".into(),
            pid: 42,
            started: "2026-11-22T20:00:00.000000000Z".into(),
            uptime_secs: 3723,
            steering: "ebpf".into(),
            interfaces: vec![
                pb::Interface {
                    name: "weirv0".into(),
                    role: "endpoint".into(),
                    programs: vec![
                        pb::AttachedProgram {
                            direction: "ingress".into(),
                            name: "weir_from_endpo".into(),
                        },
                        pb::AttachedProgram {
                            direction: "egress".into(),
                            name: "weir_to_endpoin".into(),
                        },
                    ],
                },
                pb::Interface {
                    name: "gone0".into(),
                    role: "netdev".into(),
                    programs: vec![],
                },
            ],
            maps: vec![
                pb::BpfMap {
                    name: "weir_ipcache".into(),
                    entries: 6,
                    has_entries: true,
                    max_entries: 65536,
                },
                pb::BpfMap {
                    name: "weir_ct".into(),
                    entries: 0,
                    has_entries: false,
                    max_entries: 262_144,
                },
            ],
            listeners: vec![pb::Listener {
                protocol: "TCP".into(),
                address: "[::]:15001".into(),
                port: 15001,
                family: "IPv6".into(),
            }],
            policy: Some(pb::PolicyStatus {
                revision: 3,
                policies: 1,
                endpoints: 3,
                reloads: 2,
                failed_reloads: 1,
                last_reload: Some(pb::Reload {
                    ok: false,
                    time: "2026-11-22T20:01:00.000000000Z".into(),
                    errors: vec!["/p.yaml:4:3: unknown field `egres`".into()],
                }),
            }),
            fqdn: Some(pb::FqdnStatus {
                names: 2,
                addresses: 5,
            }),
            flows: Some(pb::FlowStatus {
                buffered: 10,
                capacity: 65536,
                lost: 0,
                subscribers: 1,
            }),
            nft_rules: None,
        }
    }

    #[test]
    fn text_reads_like_cilium_status() {
        let t = render_text(&sample());
        let has = |s: &str| assert!(t.contains(s), "`{s}` missing from:\n{t}");
        has("Version:         0.1.0 (git 0123456789ab)\n");
        has("Uptime:          1h2m3s (since 2026-11-22T20:00:00.000000000Z, pid 42)\n");
        has("Steering:        eBPF datapath");
        has("  weirv0  endpoint  ingress weir_from_endpo, egress weir_to_endpoin\n");
        has("  gone0   netdev    NOTHING ATTACHED\n");
        has("  weir_ipcache  6/65536 (0.0%)\n");
        has("  weir_ct       -/262144 (kernel-managed, not counted)\n");
        has("Proxy listeners: TCP [::]:15001\n");
        has("Policy:          revision 3, 1 policies, 3 endpoints\n");
        has("Last reload:     FAILED at 2026-11-22T20:01:00.000000000Z (2 reloads, 1 failed)");
        has("\n  /p.yaml:4:3: unknown field `egres`\n");
        has("FQDN cache:      2 names, 5 addresses\n");
        has("Flows:           10/65536 buffered, 0 lost, 1 followers\n");
        let nft = render_text(&pb::GetStatusResponse {
            steering: "nft".into(),
            nft_rules: Some(12),
            policy: None,
            ..sample()
        });
        assert!(
            nft.contains("nftables TPROXY (table inet weir, 12 rules)"),
            "{nft}"
        );
        assert!(nft.contains("Last reload:     none since start"), "{nft}");
    }

    #[test]
    fn json_field_names_are_stable() {
        let v = to_json(&sample());
        assert_eq!(v["steering"], "ebpf");
        assert_eq!(v["interfaces"][0]["name"], "weirv0");
        assert_eq!(v["interfaces"][0]["programs"][1]["name"], "weir_to_endpoin");
        assert_eq!(v["maps"][0]["entries"], 6);
        assert!(
            v["maps"][1]["entries"].is_null(),
            "not counted is null, not 0"
        );
        assert_eq!(v["maps"][1]["max_entries"], 262_144);
        assert_eq!(v["listeners"][0]["family"], "IPv6");
        assert_eq!(v["policy"]["revision"], 3);
        assert_eq!(v["policy"]["last_reload"]["ok"], false);
        assert_eq!(
            v["policy"]["last_reload"]["errors"][0],
            "/p.yaml:4:3: unknown field `egres`"
        );
        assert_eq!(v["fqdn"]["addresses"], 5);
        assert_eq!(v["flows"]["subscribers"], 1);
        assert!(v["nft_rules"].is_null());
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "flows",
                "fqdn",
                "interfaces",
                "listeners",
                "maps",
                "nft_rules",
                "pid",
                "policy",
                "started",
                "steering",
                "uptime_secs",
                "version"
            ]
        );
    }

    #[test]
    fn reload_errors_keep_file_line_col() {
        let le = LoadErrors(vec![weir_policy::PolicyError {
            file: "/p.yaml".into(),
            line: 4,
            col: 3,
            message: "unknown field".into(),
        }]);
        let e = anyhow::Error::new(le).context("invalid policy");
        assert_eq!(reload_errors(&e), ["/p.yaml:4:3: unknown field"]);
        let other = anyhow::anyhow!("endpoint x: gone");
        assert_eq!(reload_errors(&other), ["endpoint x: gone"]);
        let mut log = ReloadLog::default();
        log.record(Err(&e));
        log.record(Ok(()));
        assert_eq!((log.reloads, log.failed), (2, 1));
        assert!(log.last.is_some_and(|r| r.ok && r.errors.is_empty()));
        assert_eq!(human_duration(Duration::from_secs(90_061)), "1d1h1m1s");
        assert_eq!(human_duration(Duration::ZERO), "0s");
    }
}
