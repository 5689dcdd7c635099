//! The `weir` command line. The forms here are a contract other tests rely on.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::{demo, explain, run, steering};

#[derive(Debug, Parser)]
#[command(
    name = "weir",
    version = crate::VERSION,
    about = "Node-local L7-aware network policy proxy",
    after_long_help = "Environment:\n  WEIR_LOG  a tracing filter for weir's log when --log-level is not given \
                       (`info`, `warn,weir_proxy=debug`)\n\n\
                       Signals (weir run):\n  SIGHUP    reopen the flow log and reload policies and endpoints\n  \
                       SIGTERM, SIGINT  stop"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: LogArgs,
}

/// How weir logs (to stderr). `WEIR_LOG` (a tracing filter such as
/// `info,weir_proxy=debug`) applies when `--log-level` is not given.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Least severe level logged (overrides WEIR_LOG) [default: info, or WEIR_LOG].
    #[arg(long, global = true, value_enum)]
    pub log_level: Option<LogLevel>,
    /// `text` (one human-readable line per event) or `json` (one JSON object
    /// per line, for log shippers).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Set once from the command line, read by [`init_tracing`].
static LOG_ARGS: std::sync::OnceLock<LogArgs> = std::sync::OnceLock::new();

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and steering for a node.
    Run(Box<RunArgs>),
    /// Check or explain policies; apply, get, delete or list those of a
    /// running weir.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Build a small star-wars node in network namespaces, enforce a policy on it
    /// with real curl and grpcio requests, print the verdicts, tear it all down.
    Demo(demo::DemoArgs),
    /// Register, list and remove endpoints of a running weir (over --api-socket).
    Endpoint(crate::api::client::EndpointArgs),
    /// Show the names learned from allowed DNS answers (over --api-socket).
    Fqdn(crate::api::client::FqdnArgs),
    /// Show flow records of a running weir, recent ones and live (over
    /// --api-socket), like `hubble observe`.
    Observe(crate::api::observe::ObserveArgs),
    /// What a running weir is doing: version, steering, attached programs, map
    /// fill, listeners, policy revision and last reload (over --api-socket),
    /// like `cilium status`.
    Status(crate::api::status::StatusArgs),
    /// Print a shell completion script (`weir completions bash >
    /// /etc/bash_completion.d/weir`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff, generated from this command line: `weir
    /// man | man -l -`), or with --dir write one page per command there
    /// (weir.1, weir-run.1, weir-policy-apply.1, ...).
    Man {
        /// Write every page into this directory instead of printing weir.1.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Inspect the eBPF datapath in this network namespace.
    #[command(subcommand)]
    Datapath(DatapathCommand),
    /// Remove everything weir installed: pinned eBPF links (detaching the programs)
    /// and maps under --bpf-root, the nft table `inet weir`, and ip rules and routes
    /// with protocol 119 in the current network namespace.
    Cleanup(CleanupArgs),
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub steering: SteeringArgs,
    /// bpffs directory with weir's pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/weir")]
    pub bpf_root: PathBuf,
    /// The API socket of the weir whose state this is: while a weir answers
    /// there, cleanup refuses (it would pull enforcement from under it).
    #[arg(long, default_value = "/run/weir/weir.sock")]
    pub api_socket: PathBuf,
    /// Remove everything even though a weir is running.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum DatapathCommand {
    /// List the tc (TCX) programs attached to each interface:
    /// `INTERFACE DIRECTION PROGRAM` per line.
    Show,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Exit 0 when every policy is valid; otherwise exit 1 with one
    /// `FILE:LINE:COL: message` line per error on stderr.
    Validate {
        /// Policy files or directories (every *.yaml / *.yml in them).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Decide one connection or request and say which rule decided it.
    Explain(Box<explain::ExplainArgs>),
    /// apply, get, delete, list: policies of a running weir (over --api-socket).
    #[command(flatten)]
    Api(crate::api::policy::ApiPolicyCommand),
}

/// Parses `500ms`, `5s`, `2m`, `1h` (a bare number is seconds).
#[derive(Debug, Clone, Copy)]
pub enum AdminAddr {
    Off,
    At(std::net::SocketAddr),
}

fn parse_admin_addr(s: &str) -> Result<AdminAddr, String> {
    if s == "off" {
        return Ok(AdminAddr::Off);
    }
    s.parse()
        .map(AdminAddr::At)
        .map_err(|_| format!("`{s}` is not an address:port (e.g. 127.0.0.1:9965) or `off`"))
}

/// `1048576`, `512K`, `100M`, `1G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("`{s}` is not a size (e.g. 1048576, 512K, 100M, 1G)"))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 5s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit in `{s}` (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    v.map_err(|_| format!("`{s}` is not a mark (decimal or 0x-hex)"))
        .and_then(|m| {
            if m == 0 {
                Err("the mark must not be 0".into())
            } else {
                Ok(m)
            }
        })
}

#[derive(Debug, Clone, Args)]
pub struct SteeringArgs {
    /// Packet mark for steered packets (matched by weir's `ip rule`).
    #[arg(long, default_value = "0x7700", value_parser = parse_mark)]
    pub fwmark: u32,
    /// Routing table that delivers marked packets locally.
    #[arg(long, default_value_t = 119)]
    pub route_table: u32,
    /// SO_MARK on the proxy's upstream sockets (which connect from the client's
    /// address); must not match --fwmark's bits.
    #[arg(long, default_value = "0x7800", value_parser = parse_mark)]
    pub upstream_mark: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SteeringMode {
    /// The eBPF datapath when this kernel can load and attach it (bpf_sk_assign),
    /// else nftables; the log says which one is in use.
    Auto,
    /// nftables TPROXY rules + ip rule/route (the fallback).
    Nft,
    /// weir's eBPF datapath: tc programs on each endpoint's host interface
    /// (L3/L4 in the kernel, bpf_sk_assign to the proxy for L7 flows).
    Ebpf,
    /// Install nothing: traffic must reach the proxy port some other way.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AllowLocalhost {
    /// The node reaches every local endpoint (L3/L4; its traffic is never proxied).
    Always,
    /// The node is the `host` identity, allowed only by policy.
    Policy,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Policy files or directories (every *.yaml / *.yml in them).
    #[arg(long, required = true)]
    pub policy: Vec<PathBuf>,
    /// Endpoints file (`endpoints: [{name, ips, labels, netns, ...}]`); more can be
    /// registered at run time with `weir endpoint add`.
    #[arg(long)]
    pub endpoints: Option<PathBuf>,
    /// Do not watch the --policy files and directories and the --endpoints file
    /// (by default a change there reloads them, as SIGHUP does).
    #[arg(long)]
    pub no_watch_policy: bool,
    /// How long the watched files must stay unchanged before a reload (an
    /// editor's save or a copied directory is one reload, not several).
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub watch_debounce: Duration,
    /// Port of the transparent listener.
    #[arg(long, default_value_t = 15001)]
    pub proxy_port: u16,
    #[command(flatten)]
    pub cluster: crate::config::ClusterArgs,
    /// How steered traffic reaches the proxy.
    #[arg(long, value_enum, default_value = "auto")]
    pub steering: SteeringMode,
    #[command(flatten)]
    pub steering_args: SteeringArgs,
    /// Where weir keeps state (identities, readiness marker).
    #[arg(long, default_value = "/var/lib/weir")]
    pub state_dir: PathBuf,
    /// How the eBPF datapath attaches: TCX links, or cls_bpf filters on a clsact
    /// qdisc (netlink) where the kernel has no TCX.
    #[arg(long, value_enum, default_value = "auto")]
    pub tc_attach: crate::datapath::attach::TcAttach,
    /// Devices where peers that are not local endpoints come in (the world, CIDR
    /// peers, other nodes), comma separated; weir's netdev programs go on them.
    /// Default: every interface but `lo` and the endpoints' veths, found again at
    /// each policy change.
    #[arg(long, value_delimiter = ',')]
    pub devices: Option<Vec<String>>,
    /// Whether the node itself (the `host` identity) may reach every local
    /// endpoint (`always`, Cilium's default, for health checks), or is decided by
    /// policy like any peer (`policy`: `fromEntities: [host]` allows it).
    #[arg(long, value_enum, default_value = "always")]
    pub allow_localhost: AllowLocalhost,
    /// bpffs directory for weir's pins (used by the eBPF datapath).
    #[arg(long, default_value = "/sys/fs/bpf/weir")]
    pub bpf_root: PathBuf,
    /// cgroup v2 directory for sock_ops programs (never the root cgroup).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Local API socket (gRPC, mode 0600) for `weir endpoint`, `observe`,
    /// `status`, ...
    #[arg(long, default_value = "/run/weir/weir.sock")]
    pub api_socket: PathBuf,
    /// A uid besides root that may use the API (repeatable). Each call is
    /// checked with SO_PEERCRED; the socket stays mode 0600, so that user also
    /// needs access to it (e.g. `setfacl -m u:UID:rw` on the socket).
    #[arg(long = "api-allow-uid", value_name = "UID")]
    pub api_allow_uid: Vec<u32>,
    /// Write flow records (JSON lines) here instead of stdout. `none`: write
    /// none — records still reach `weir observe` (the --flow-buffer ring, live
    /// readers) and the metrics, and are rendered only when read (a file
    /// named "none" is `./none`).
    #[arg(long)]
    pub flow_log: Option<PathBuf>,
    /// Rotate the --flow-log file when the next record would take it past this
    /// size (bytes, or with K, M, G: KiB, MiB, GiB; 0: never). Default 100M.
    #[arg(long, default_value = "100M", value_parser = parse_size)]
    pub flow_log_max_size: u64,
    /// Rotated flow log files kept (`FILE.1` newest .. `FILE.N`); 0 keeps none.
    #[arg(long, default_value_t = weir_proxy::flows::rotate::DEFAULT_MAX_FILES)]
    pub flow_log_max_files: u32,
    /// The admin HTTP listener: `/metrics` (Prometheus) and `/healthz`.
    /// `off` serves none.
    #[arg(long, default_value = "127.0.0.1:9965", value_parser = parse_admin_addr)]
    pub admin_addr: AdminAddr,
    /// Recent flow records kept in memory for `weir observe` (0: none; each
    /// costs about its JSON's size, ~1 KiB).
    #[arg(long, default_value_t = weir_proxy::flows::bus::DEFAULT_CAPACITY)]
    pub flow_buffer: usize,
    /// Node name written into flow records.
    #[arg(long, default_value = "weir")]
    pub node_name: String,
    /// Largest request head accepted; larger ones get 431.
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,
    /// Close client connections idle this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Give up connecting upstream after this long (answers 504; over HTTP/2,
    /// getting a connection, probe and waits included, answers 503 / gRPC
    /// UNAVAILABLE).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,
    /// Give up waiting for an upstream response head after this long (answers 504).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// Upstream connections a client connection may have open at once, kept for
    /// its next requests; a hard limit (an HTTP/2 client's requests beyond it
    /// wait for one). They close with the client connection.
    #[arg(long, default_value_t = 16)]
    pub upstream_conns_per_client: usize,
    /// A UDP flow through the proxy ends after this much silence.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub udp_idle_timeout: Duration,
    /// Most UDP flows through the proxy at once (each holds two sockets).
    #[arg(long, default_value_t = 8192)]
    pub udp_max_sessions: usize,
    /// The answer to a DNS query that policy denies: `refused` or `nxdomain`.
    #[arg(long, default_value = "refused")]
    pub dns_deny_rcode: weir_parsers::dns::DenyRcode,
    /// From forwarding a DNS query to the resolver's answer; beyond, the client
    /// gets SERVFAIL.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub dns_upstream_timeout: Duration,
    /// How long an answer for a toFQDNs-selected name waits for its addresses to
    /// reach the datapath; beyond, the client gets SERVFAIL.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub dns_learn_timeout: Duration,
    /// DNS queries one client flow (UDP 4-tuple or TCP connection) may have
    /// outstanding at once; beyond, the client gets SERVFAIL.
    #[arg(long, default_value_t = 100)]
    pub dns_max_outstanding: usize,
    /// Largest Kafka frame (request or response) in bytes on a port with Kafka rules;
    /// a larger one closes the connection with a flow record.
    #[arg(long, default_value_t = weir_parsers::kafka::DEFAULT_MAX_FRAME)]
    pub kafka_max_frame: usize,
    /// Array elements and tagged fields one Kafka request may decode into (all its
    /// arrays together); a request with more closes the connection with a flow
    /// record. Bounds the memory a request's facts take whatever the frame size.
    #[arg(long, default_value_t = weir_parsers::kafka::DEFAULT_MAX_REQUEST_ENTRIES)]
    pub kafka_max_request_entries: usize,
    /// Data-plane worker threads (default: one per CPU).
    #[arg(long)]
    pub workers: Option<usize>,
    /// From accepting a connection to its first decision (protocol detection and
    /// the first request head included); a connection that has not decided by
    /// then is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub request_head_timeout: Duration,
    /// Streams an HTTP/2 client may have open at once on one connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, default_value_t = 100)]
    pub http2_max_streams: u32,
    /// HTTP/2 flow-control window per stream (bytes), client and server legs
    /// alike; fixed, never adaptive: the most weir buffers per stream and direction.
    #[arg(long, default_value_t = 256 * 1024, value_parser = clap::value_parser!(u32).range(65535..=2147483647))]
    pub http2_stream_window: u32,
    /// HTTP/2 flow-control window per connection (bytes), both legs; fixed.
    #[arg(long, default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u32).range(65535..=2147483647))]
    pub http2_connection_window: u32,
    /// HTTP/2 streams a client may reset before weir handled them (Rapid Reset,
    /// CVE-2023-44487); beyond, its connection gets GOAWAY and a flow record.
    #[arg(long, default_value_t = 20)]
    pub http2_max_pending_resets: usize,
    /// HTTP/2 streams weir may reset because of a client's protocol errors
    /// (MadeYouReset, CVE-2025-8671); beyond, its connection gets GOAWAY.
    #[arg(long, default_value_t = 1024)]
    pub http2_max_local_resets: usize,
    /// HTTP/2 streams a client may reset before their response, per second and
    /// connection; beyond, the connection gets GOAWAY and a flow record (other
    /// connections are unaffected). Also per client address and destination for
    /// the streams weir cancels on the server: beyond, that client's new streams
    /// there are refused (REFUSED_STREAM) for the rest of the second.
    #[arg(long, default_value_t = 200)]
    pub http2_max_resets_per_sec: u32,
    /// Client connections the proxy holds at once; beyond, a new connection is
    /// accepted and closed at once (with a warning at most once a second).
    #[arg(long, default_value_t = 16384)]
    pub max_connections: usize,
    /// A spliced (L3/L4-only) TCP connection with no bytes either way for this
    /// long is closed.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub tcp_idle_timeout: Duration,
    /// Shortest time (seconds) an address from an allowed DNS answer stays in
    /// the toFQDNs allowlist, whatever the answer's TTL.
    #[arg(long, default_value_t = 0)]
    pub fqdn_min_ttl: u32,
    /// Most addresses kept per DNS name; beyond, the oldest learned goes.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub fqdn_max_ips_per_name: u32,
    /// Take over the listening sockets of the weir running with this
    /// --api-socket (planned restart or upgrade; fails if none runs). Without
    /// the flag a running weir is taken over when one answers, else weir starts
    /// afresh.
    #[arg(long)]
    pub takeover: bool,
    /// After handing its sockets to a new weir, this weir lets its open
    /// connections and UDP sessions finish for at most this long, then exits
    /// (once the policy's sources change, it forwards no new DNS query or UDP
    /// datagram meanwhile: its policy is stale).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Longest time (seconds) an address stays after its answer: longer TTLs
    /// are cut to this.
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u32).range(1..))]
    pub fqdn_max_ttl: u32,
    /// Most distinct addresses in the FQDN cache (learned ipcache entries
    /// included; the kernel's ipcache holds 65 536 entries in all). Beyond,
    /// names no selector selects go; if none, an answer with new addresses
    /// gets SERVFAIL.
    #[arg(long, default_value_t = 32_768, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub fqdn_max_ips: u32,
    /// Most names in the FQDN cache; beyond, as for `--fqdn-max-ips`.
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..))]
    pub fqdn_max_names: u32,
    /// (name, address) entries of names a toFQDNs selector selects that one
    /// DNS client (a local endpoint, else an address) may bring into the FQDN
    /// cache however full it is; beyond, only while this many addresses and
    /// names stay free (of --fqdn-max-ips, --fqdn-max-names) for the other
    /// clients, then that client's answers with new selected addresses get
    /// SERVFAIL, nobody else's. Selected names are never evicted to make room,
    /// so this keeps one client from filling the cache for all. Entries read
    /// back after a restart count against no client.
    #[arg(long, default_value_t = 8_192, value_parser = clap::value_parser!(u32).range(1..))]
    pub fqdn_max_entries_per_client: u32,
}

pub fn main(cli: Cli) -> ExitCode {
    let _ = LOG_ARGS.set(cli.log.clone());
    match cli.command {
        Command::Policy(PolicyCommand::Validate { paths }) => {
            match weir_policy::load_policies(&paths) {
                Ok(p) => {
                    for w in weir_policy::fqdn_rules_without_dns(&p) {
                        eprintln!("warning: {w}");
                    }
                    println!("{} policies valid", p.len());
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    for e in &errors.0 {
                        eprintln!("{e}");
                    }
                    ExitCode::from(1)
                }
            }
        }
        Command::Policy(PolicyCommand::Explain(args)) => explain::main(&args),
        Command::Policy(PolicyCommand::Api(cmd)) => exit_from(crate::api::policy::main(cmd)),
        Command::Run(args) => exit_from(run::main(*args)),
        Command::Demo(args) => exit_from(demo::main(&args)),
        Command::Endpoint(args) => exit_from(crate::api::client::main(args)),
        Command::Fqdn(args) => exit_from(crate::api::client::fqdn_main(args)),
        Command::Observe(args) => exit_from(crate::api::observe::main(args)),
        Command::Status(args) => exit_from(crate::api::status::main(args)),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "weir", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man { dir } => exit_from(man(dir.as_deref())),
        Command::Datapath(DatapathCommand::Show) => {
            for (iface, dir, prog) in crate::datapath::attached_programs() {
                println!("{iface} {dir} {prog}");
            }
            ExitCode::SUCCESS
        }
        Command::Cleanup(args) => {
            let log = init_tracing();
            let done = cleanup(&args);
            // What cleanup logged comes out before the error that ends it.
            drop(log);
            exit_from(done)
        }
    }
}

/// `weir cleanup`: refuses while a weir answers on the API socket (unless
/// `--force`), then removes everything weir installed and says what that was.
fn cleanup(args: &CleanupArgs) -> anyhow::Result<()> {
    // Mid-takeover the API socket is briefly absent; the takeover socket answers.
    let takeover = crate::takeover::socket_path(&args.api_socket);
    let running = std::os::unix::net::UnixStream::connect(&args.api_socket).is_ok()
        || crate::takeover::connect(&takeover).is_ok_and(|c| c.is_some());
    if running && !args.force {
        anyhow::bail!(
            "a weir is running (it answers on {}): stop it first, or pass --force to remove its enforcement from under it",
            args.api_socket.display()
        );
    }
    let cfg = steering::SteeringConfig {
        proxy_port: 0,
        fwmark: args.steering.fwmark,
        route_table: args.steering.route_table,
    };
    let filters = crate::datapath::attach::remove_netlink_filters(&crate::datapath::PROGRAMS);
    let pins = crate::datapath::pins::remove_tree(&args.bpf_root)
        .map_err(|e| anyhow::anyhow!("removing pins under {}: {e}", args.bpf_root.display()))?;
    let installed = steering::remove(&cfg)?;
    let mut parts = Vec::new();
    if pins > 0 {
        parts.push(format!(
            "{pins} pinned eBPF links and maps under {}",
            args.bpf_root.display()
        ));
    }
    if filters > 0 {
        parts.push(format!("{filters} tc (clsact) filters"));
    }
    if installed.nft_table {
        parts.push(format!("the nft table inet {}", steering::TABLE));
    }
    if installed.ip_rules > 0 {
        parts.push(format!("{} ip rules (proto 119)", installed.ip_rules));
    }
    if installed.route_tables > 0 {
        parts.push(format!(
            "the local routes of table {} ({} families)",
            args.steering.route_table, installed.route_tables
        ));
    }
    if parts.is_empty() {
        println!("nothing of weir's was installed here");
    } else {
        println!("removed {}", parts.join(", "));
    }
    Ok(())
}

fn exit_from(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `weir man`: the pages clap_mangen renders from the command definitions
/// (so they never disagree with `--help`).
fn man(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    let cmd = <Cli as clap::CommandFactory>::command();
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            use std::io::Write;
            // A closed pipe (`| head`) is no error worth reporting.
            let _ = std::io::stdout().write_all(&out);
            Ok(())
        }
    }
}

/// Logs to stderr as `--log-level`/`WEIR_LOG` and `--log-format` say; colour
/// codes only when stderr is a terminal (a file or journald gets plain text).
/// Lines are written by a thread of their own ([`crate::log_writer`]); keep
/// the returned flush until exit.
pub fn init_tracing() -> Option<crate::log_writer::ExitFlush> {
    use std::io::IsTerminal;
    let args = LOG_ARGS.get();
    let filter = match args.and_then(|a| a.log_level) {
        Some(level) => tracing_subscriber::EnvFilter::new(level_name(level)),
        None => tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    let ansi = std::io::stderr().is_terminal();
    let json = matches!(
        args.map_or(LogFormat::Text, |a| a.log_format),
        LogFormat::Json
    );
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match crate::log_writer::start(std::io::stderr(), crate::log_writer::QUEUE_LINES) {
        Ok((queue, flush)) => {
            let builder = builder.with_writer(queue);
            let _ = if json {
                builder.json().with_ansi(false).try_init()
            } else {
                builder.with_ansi(ansi).try_init()
            };
            Some(flush)
        }
        // No thread to spare: write in place, as before there was one.
        Err(e) => {
            eprintln!("weir: logging from the calling thread (no log thread: {e})");
            let builder = builder.with_writer(std::io::stderr);
            let _ = if json {
                builder.json().with_ansi(false).try_init()
            } else {
                builder.with_ansi(ansi).try_init()
            };
            None
        }
    }
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
