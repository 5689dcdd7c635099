//! `weir run`: load, compile, listen, steer; reload on SIGHUP; undo on exit.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use weir_policy::CompiledPolicy;
use weir_proxy::{FlowSink, ProxyConfig, Shared, listener};

use crate::api;
use crate::cli::{RunArgs, SteeringMode, init_tracing};
use crate::control::{self, ControlMsg, Files, Steering};
use crate::datapath::{Datapath, DatapathConfig};
use crate::fqdn::{FqdnState, LearnerHandle, Limits};
use crate::registry::Sources;
use crate::state;
use crate::steering::{self, SteeringConfig};

pub fn main(args: RunArgs) -> anyhow::Result<()> {
    init_tracing();
    raise_open_files_limit(&args);
    // One worker: a current-thread runtime, with no cross-thread wake-ups at all.
    let mut rt = match args.workers {
        Some(0) => bail!("--workers must be at least 1"),
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = rt
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run(args))
}

fn flow_sink(path: Option<&Path>) -> anyhow::Result<FlowSink> {
    Ok(match path {
        None => FlowSink::stdout(),
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening flow log {}", p.display()))?;
            FlowSink::new(Box::new(std::io::BufWriter::new(f)))
        }
    })
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating state dir {}", args.state_dir.display()))?;
    let ready = state::ready_file(&args.state_dir);
    let _ = std::fs::remove_file(&ready);
    let sources = Sources::load(
        &args.policy,
        args.endpoints.as_deref(),
        &args.state_dir,
        args.cluster.config(),
    )?;
    let policy = Arc::new(sources.compile()?);
    // The cache of the previous run (a crash included) is learned into the first
    // policy before anything is installed: the pinned maps still hold those
    // addresses, and the first sync must keep them.
    let mut fqdn = FqdnState::load(
        &args.state_dir,
        Limits {
            min_ttl_secs: args.fqdn_min_ttl,
            max_ttl_secs: args.fqdn_max_ttl,
            max_ips_per_name: args.fqdn_max_ips_per_name as usize,
            max_ips: args.fqdn_max_ips as usize,
            max_names: args.fqdn_max_names as usize,
        },
    );
    fqdn.learn_all_into(&policy);
    let shared = Shared::new(
        policy.clone(),
        flow_sink(args.flow_log.as_deref())?,
        proxy_config(&args),
    );
    let listeners = listener::bind(args.proxy_port).with_context(|| {
        format!(
            "binding the transparent listener on port {} (needs root or CAP_NET_ADMIN)",
            args.proxy_port
        )
    })?;
    let api_listener = api::server::bind(&args.api_socket)?;
    let udp_listeners = weir_proxy::udp::bind(args.proxy_port).with_context(|| {
        format!(
            "binding the transparent UDP listener on port {}",
            args.proxy_port
        )
    })?;
    let steer_cfg = SteeringConfig {
        proxy_port: args.proxy_port,
        fwmark: args.steering_args.fwmark,
        route_table: args.steering_args.route_table,
    };
    let (mode, mut datapath) = choose_steering(&args, &policy)?;
    if let Some(dp) = datapath.as_mut() {
        let refs: Vec<&tokio::net::TcpListener> = listeners.iter().collect();
        dp.attach_sk_lookup(&refs)
            .context("attaching the socket-lookup program")?;
        start_flow_events(dp, &shared);
    }
    let mut steering = Steering {
        mode,
        datapath,
        config: steer_cfg.clone(),
    };
    if let Err(e) = steering.apply(&policy) {
        let _ = steering::remove(&steer_cfg);
        return Err(e);
    }
    let control = control::spawn(
        sources,
        steering,
        Files {
            policy: args.policy.clone(),
            endpoints: args.endpoints.clone(),
        },
        shared.clone(),
        fqdn,
    )
    .context("starting the control thread")?;
    shared.set_fqdn_learner(Arc::new(LearnerHandle::new(control.clone())));
    let serving = Serving {
        tcp: tokio::spawn(listener::serve(shared.clone(), listeners)),
        udp: tokio::spawn(weir_proxy::udp::serve(shared.clone(), udp_listeners)),
    };
    let (api_tx, api_rx) = tokio::sync::mpsc::channel(16);
    let api = tokio::spawn(api::server::serve(api_listener, api_tx));
    std::fs::write(&ready, std::process::id().to_string())
        .with_context(|| format!("writing {}", ready.display()))?;
    info!(port = args.proxy_port, steering = ?mode, "weir ready");
    let result = serve_until_stopped(&control, api_rx, serving).await;
    api.abort();
    let _ = std::fs::remove_file(&args.api_socket);
    shut_down(&control, mode, &args, &steer_cfg).await;
    let _ = std::fs::remove_file(&ready);
    result
}

/// Refuses flag combinations that cannot work, before anything is touched.
fn check_args(args: &RunArgs) -> anyhow::Result<()> {
    if matches!(args.steering, SteeringMode::Nft | SteeringMode::None)
        && args.allow_localhost == crate::cli::AllowLocalhost::Policy
    {
        // The node's own packets never pass prerouting: only the eBPF datapath sees them.
        bail!(
            "--allow-localhost policy needs the eBPF datapath (--steering ebpf or auto): the node's own traffic never passes nft's prerouting"
        );
    }
    let (fw, up) = (args.steering_args.fwmark, args.steering_args.upstream_mark);
    if up & fw == fw {
        bail!(
            "--upstream-mark {up:#x} must not carry all of --fwmark's bits ({fw:#x}): the proxy's own packets would be delivered locally"
        );
    }
    Ok(())
}

fn proxy_config(args: &RunArgs) -> ProxyConfig {
    ProxyConfig {
        proxy_port: args.proxy_port,
        max_header_bytes: args.max_header_bytes,
        idle_timeout: args.idle_timeout,
        upstream_connect_timeout: args.upstream_connect_timeout,
        upstream_timeout: args.upstream_timeout,
        upstream_conns_per_client: args.upstream_conns_per_client,
        request_head_timeout: args.request_head_timeout,
        http2_max_streams: args.http2_max_streams,
        max_connections: args.max_connections,
        tcp_idle_timeout: args.tcp_idle_timeout,
        node_name: args.node_name.clone(),
        udp_idle_timeout: args.udp_idle_timeout,
        udp_max_sessions: args.udp_max_sessions,
        // Replies to the client's address need steering to come back to the proxy.
        upstream_mark: (args.steering != SteeringMode::None)
            .then_some(args.steering_args.upstream_mark),
    }
}

fn datapath_config(args: &RunArgs) -> DatapathConfig {
    DatapathConfig {
        proxy_port: args.proxy_port,
        mark: args.steering_args.fwmark,
        upstream_mark: args.steering_args.upstream_mark,
        bpf_root: Some(args.bpf_root.clone()),
        tc_attach: args.tc_attach,
        devices: match &args.devices {
            Some(names) => crate::datapath::Devices::Named(names.clone()),
            None => crate::datapath::Devices::Auto,
        },
        allow_localhost: args.allow_localhost == crate::cli::AllowLocalhost::Always,
    }
}

/// The steering mode in force (`auto` falls back to nft when the eBPF datapath
/// cannot load), with the loaded datapath when it is eBPF.
fn choose_steering(
    args: &RunArgs,
    policy: &CompiledPolicy,
) -> anyhow::Result<(SteeringMode, Option<Datapath>)> {
    let (mode, datapath) = match args.steering {
        SteeringMode::Ebpf => (
            SteeringMode::Ebpf,
            Some(ebpf_datapath(datapath_config(args), policy)?),
        ),
        SteeringMode::Auto => match ebpf_datapath(datapath_config(args), policy) {
            Ok(dp) => (SteeringMode::Ebpf, Some(dp)),
            Err(e) => {
                warn!(
                    error = %format!("{e:#}"),
                    "eBPF datapath unavailable; falling back to nftables TPROXY steering"
                );
                (SteeringMode::Nft, None)
            }
        },
        other => (other, None),
    };
    if mode != SteeringMode::Ebpf && args.allow_localhost == crate::cli::AllowLocalhost::Policy {
        warn!(
            "--allow-localhost policy needs the eBPF datapath: with this fallback the node itself reaches endpoints unpoliced"
        );
    }
    match mode {
        SteeringMode::Ebpf => {
            info!("steering: eBPF datapath (tc on endpoint interfaces, bpf_sk_assign to the proxy)")
        }
        SteeringMode::Nft => info!("steering: nftables TPROXY (table inet weir)"),
        _ => info!("steering: none (traffic must reach the proxy port by other means)"),
    }
    Ok((mode, datapath))
}

/// The kernel's verdict events become flow records on a task of their own.
fn start_flow_events(dp: &mut Datapath, shared: &Arc<Shared>) {
    if let Some(ring) = dp.take_events() {
        let counters = dp.take_counters();
        tokio::spawn(crate::datapath::events::drain(
            ring,
            counters,
            shared.clone(),
            dp.rules_handle(),
        ));
    }
}

/// The proxy's listener tasks; either one ending is an error.
struct Serving {
    tcp: tokio::task::JoinHandle<()>,
    udp: tokio::task::JoinHandle<()>,
}

/// Hands SIGHUP and API requests to the control thread until SIGTERM/SIGINT.
async fn serve_until_stopped(
    control: &std::sync::mpsc::Sender<ControlMsg>,
    mut api_rx: tokio::sync::mpsc::Receiver<api::server::Command>,
    mut serving: Serving,
) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let _ = control.send(ControlMsg::Reload);
            }
            Some(cmd) = api_rx.recv() => {
                let _ = control.send(ControlMsg::Api(cmd));
            }
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            r = &mut serving.tcp => {
                return Err(anyhow::anyhow!("listener stopped unexpectedly: {r:?}"));
            }
            r = &mut serving.udp => {
                return Err(anyhow::anyhow!("UDP listener stopped unexpectedly: {r:?}"));
            }
        }
    }
}

/// Stops the control thread and says what stays enforcing after weir is gone.
async fn shut_down(
    control: &std::sync::mpsc::Sender<ControlMsg>,
    mode: SteeringMode,
    args: &RunArgs,
    steer_cfg: &SteeringConfig,
) {
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
    let outlives = if control.send(ControlMsg::Stop(stopped_tx)).is_ok() {
        stopped_rx.await.unwrap_or(false)
    } else {
        false
    };
    match mode {
        SteeringMode::Ebpf if outlives => info!(
            bpf_root = %args.bpf_root.display(),
            "shutting down; the eBPF datapath stays attached and pinned, enforcing L3/L4 \
             (flows to the proxy wait for the next weir); `weir cleanup` removes it"
        ),
        SteeringMode::Ebpf => warn!(
            bpf_root = %args.bpf_root.display(),
            "shutting down; the pins are visible only inside this mount namespace, so \
             enforcement ends with this process"
        ),
        SteeringMode::None => info!("shutting down"),
        _ => {
            info!("shutting down; removing steering");
            if let Err(e) = steering::remove(steer_cfg) {
                error!(error = %e, "could not remove steering; run `weir cleanup`");
            }
        }
    }
}

/// Loads the eBPF datapath and checks it can attach, without touching traffic yet
/// (maps are filled and programs attached by the first `steer`).
fn ebpf_datapath(cfg: DatapathConfig, policy: &CompiledPolicy) -> anyhow::Result<Datapath> {
    let dp = Datapath::load(cfg).context("loading the eBPF datapath")?;
    // Every endpoint needs its own checked interface to attach to; find out now,
    // so that `auto` can still fall back cleanly.
    crate::datapath::links::endpoint_interfaces(policy)?;
    Ok(dp)
}

/// Every proxied connection holds two sockets and every UDP session two more; the
/// usual soft limit of 1024 open files would refuse them long before any other
/// limit. Raise it to the hard limit, and say so if that is still short.
fn raise_open_files_limit(args: &RunArgs) {
    // Each proxied TCP connection holds two files (client and upstream sockets;
    // more with --upstream-conns-per-client), each UDP session two.
    let wanted = 1024 + 2 * args.max_connections as u64 + 2 * args.udp_max_sessions as u64;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(got) if got < wanted => warn!(
            limit = got,
            wanted,
            "the open-files limit is low: connections and UDP sessions beyond it are refused (raise LimitNOFILE / ulimit -Hn)"
        ),
        Ok(got) => info!(limit = got, "open-files limit"),
        Err(e) => warn!(error = %e, "could not raise the open-files limit"),
    }
}
