//! `weir run`: load, compile, listen, steer; reload on SIGHUP; undo on exit.

use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use weir_policy::CompiledPolicy;
use weir_proxy::{FlowSink, ProxyConfig, Shared, listener};

use crate::admin::Readiness;
use crate::api;
use crate::cli::{RunArgs, SteeringMode, init_tracing};
use crate::control::{self, ControlMsg, Files, Steering};
use crate::datapath::{Datapath, DatapathConfig};
use crate::fqdn::{FqdnState, LearnerHandle, Limits};
use crate::registry::{LoadedDigest, SourceFiles, Sources};
use crate::state;
use crate::steering::{self, SteeringConfig};
use crate::takeover;

mod handover;
use handover::{
    decide_takeover, drain, duplicate_listeners, finish_takeover, on_takeover_event,
    remove_if_ours, start_takeover_listener, take_over,
};

pub fn main(args: RunArgs) -> anyhow::Result<()> {
    let _log = init_tracing();
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

fn flow_sink(args: &RunArgs) -> anyhow::Result<FlowSink> {
    let out: Box<dyn weir_proxy::flows::FlowOutput> = match args.flow_log.as_deref() {
        None => Box::new(weir_proxy::flows::Stdout),
        Some(p) if p.as_os_str() == "none" => Box::new(weir_proxy::flows::Discard),
        Some(p) => Box::new(
            weir_proxy::flows::rotate::RotatingFile::open(
                p,
                args.flow_log_max_size,
                args.flow_log_max_files,
            )
            .with_context(|| format!("opening flow log {}", p.display()))?,
        ),
    };
    Ok(FlowSink::with_output(
        out,
        weir_proxy::flows::QUEUE_CAPACITY,
        weir_proxy::FlowBus::new(args.flow_buffer),
    ))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating state dir {}", args.state_dir.display()))?;
    let ready = state::ready_file(&args.state_dir);
    let takeover_path = takeover::socket_path(&args.api_socket);
    let taking_over = decide_takeover(&args, &takeover_path).await?;
    if !taking_over {
        let _ = std::fs::remove_file(&ready);
    }
    let source_files = SourceFiles {
        policy: args.policy.clone(),
        endpoints: args.endpoints.clone(),
        state_dir: args.state_dir.clone(),
    };
    // Taken before each read (see `LoadedDigest`).
    let loaded = LoadedDigest::new(source_files.digest());
    let load_sources = || {
        Sources::load(
            &args.policy,
            args.endpoints.as_deref(),
            &args.state_dir,
            args.cluster.config(),
        )
    };
    let mut sources = load_sources()?;
    let mut policy = Arc::new(sources.compile()?);
    let shared = Shared::new(policy.clone(), flow_sink(&args)?, proxy_config(&args));
    let readiness = Arc::new(crate::admin::Readiness::default());
    Readiness::set(&readiness.policy, true);
    if let crate::cli::AdminAddr::At(addr) = args.admin_addr {
        crate::admin::spawn(
            addr,
            shared.flows.bus().clone(),
            readiness.clone(),
            taking_over,
        )?;
    }
    // A takeover gets the listeners from the running weir, after everything
    // else is ready; the API socket is bound once that weir has released it.
    let bound = if taking_over {
        None
    } else {
        Some(bind_listeners(&args)?)
    };
    let steer_cfg = SteeringConfig {
        proxy_port: args.proxy_port,
        fwmark: args.steering_args.fwmark,
        route_table: args.steering_args.route_table,
    };
    let (mode, mut datapath) = choose_steering(&args, &policy)?;
    let (listeners, udp_listeners, mut api_listener, peer) = match bound {
        Some((tcp, api, udp)) => (tcp, udp, Some(api), None),
        None => {
            let taken = take_over(&takeover_path, args.proxy_port).await?;
            // The running weir changed nothing since it answered; what it
            // changed before (API endpoints) is in the state dir.
            loaded.set(source_files.digest());
            sources = load_sources()?;
            policy = Arc::new(sources.compile()?);
            shared.set_policy(policy.clone());
            (
                taken.tcp,
                taken.udp,
                None,
                Some((taken.conn, taken.old_pid)),
            )
        }
    };
    // The cache of the previous run (a crash included; on a takeover, what the
    // running weir last wrote) is learned into the first policy before anything
    // is installed: the pinned maps still hold those addresses, and the first
    // sync must keep them.
    let mut fqdn = FqdnState::load(
        &args.state_dir,
        Limits {
            min_ttl_secs: args.fqdn_min_ttl,
            max_ttl_secs: args.fqdn_max_ttl,
            max_ips_per_name: args.fqdn_max_ips_per_name as usize,
            max_ips: args.fqdn_max_ips as usize,
            max_names: args.fqdn_max_names as usize,
            max_entries_per_client: args.fqdn_max_entries_per_client as usize,
        },
    );
    fqdn.learn_all_into(&policy);
    let dups = duplicate_listeners(&listeners, &udp_listeners)?;
    let mut events_task = None;
    if let Some(dp) = datapath.as_mut() {
        let tcp: Vec<&tokio::net::TcpListener> = listeners.iter().collect();
        let udp: Vec<&tokio::net::UdpSocket> = udp_listeners.iter().collect();
        dp.attach_sk_lookup(&tcp, &udp)
            .context("attaching the socket-lookup program")?;
        events_task = start_flow_events(dp, &shared);
    }
    let mut steering = Steering {
        mode,
        datapath,
        config: steer_cfg.clone(),
    };
    if let Err(e) = steering.apply(&policy) {
        // A weir being taken over still serves with this steering.
        if peer.is_none() {
            let _ = steering::remove(&steer_cfg);
        }
        return Err(e);
    }
    Readiness::set(&readiness.steering, true);
    let info = api::status::RunInfo::new(api::status::listeners(&listeners, &udp_listeners));
    let fqdn_view = fqdn.view();
    let control = control::spawn(
        sources,
        steering,
        Files {
            sources: source_files.clone(),
            loaded: loaded.clone(),
        },
        shared.clone(),
        fqdn,
        info,
    )
    .context("starting the control thread")?;
    shared.set_fqdn_learner(Arc::new(LearnerHandle::new(control.clone(), fqdn_view)));
    if !args.no_watch_policy {
        // A change goes the way SIGHUP does: to the control thread.
        let tx = control.clone();
        let watching = crate::watch::spawn(
            &args.policy,
            args.endpoints.as_deref(),
            args.watch_debounce,
            move || {
                let _ = tx.send(ControlMsg::Reload);
            },
        );
        // Enforcement does not depend on it: say so and go on.
        match watching {
            // A change since the files were read had no watcher to see it.
            Ok(_) => {
                let _ = control.send(ControlMsg::ReloadIfChanged);
            }
            Err(e) => {
                warn!(error = %e, "cannot watch the policy files (inotify); they reload on SIGHUP only")
            }
        }
    }
    let mut serving = Serving {
        tcp: tokio::spawn(listener::serve(shared.clone(), listeners)),
        udp: tokio::spawn(weir_proxy::udp::serve(shared.clone(), udp_listeners)),
        events: None,
    };
    if let Some((conn, old_pid)) = peer {
        api_listener = finish_takeover(&args, conn, old_pid, &control).await;
    }
    serving.events = events_task.map(FlowEvents::spawn);
    let (api_tx, api_rx) = tokio::sync::mpsc::channel(16);
    let api = api_listener.map(|l| {
        tokio::spawn(api::server::serve(
            l,
            api_tx.clone(),
            shared.flows.bus().clone(),
            api::access::Allowed::new(&args.api_allow_uid),
        ))
    });
    let (takeover_tx, takeover_rx) = tokio::sync::mpsc::channel(4);
    let takeover_thread = start_takeover_listener(&takeover_path, dups, &args, takeover_tx);
    state::write_ready(&ready).with_context(|| format!("writing {}", ready.display()))?;
    Readiness::set(&readiness.listeners, true);
    info!(port = args.proxy_port, steering = ?mode, "weir ready");
    let mut running = Running {
        serving,
        api,
        api_tx,
        quiesced: false,
        shared: shared.clone(),
    };
    let stopped = serve_until_stopped(&control, api_rx, takeover_rx, &mut running, &args).await;
    if let Some(api) = &running.api {
        api.abort();
    }
    // Stopping, or another weir serves the listeners now.
    Readiness::set(&readiness.listeners, false);
    match stopped {
        Ok(Stopped::HandedOver(drained)) => {
            let left = drain(&shared, args.drain_timeout, (source_files, loaded)).await;
            shut_down(&control, mode, &args, &steer_cfg, true).await;
            let _ = drained.send(left);
            if let Some(t) = takeover_thread {
                // The final message goes out before the process ends.
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            remove_if_ours(&ready);
            info!("handed over and drained; exiting");
            Ok(())
        }
        other => {
            let _ = std::fs::remove_file(&args.api_socket);
            if takeover_thread.is_some() {
                let _ = std::fs::remove_file(&takeover_path);
            }
            shut_down(&control, mode, &args, &steer_cfg, false).await;
            remove_if_ours(&ready);
            other.map(|_| ())
        }
    }
}

/// Binds the transparent TCP and UDP listeners and the API socket (a fresh start).
fn bind_listeners(
    args: &RunArgs,
) -> anyhow::Result<(
    Vec<tokio::net::TcpListener>,
    tokio::net::UnixListener,
    Vec<tokio::net::UdpSocket>,
)> {
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
    Ok((listeners, api_listener, udp_listeners))
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
        http2_stream_window: args.http2_stream_window,
        http2_connection_window: args.http2_connection_window,
        http2_max_pending_resets: args.http2_max_pending_resets,
        http2_max_local_resets: args.http2_max_local_resets,
        http2_max_resets_per_sec: args.http2_max_resets_per_sec,
        max_connections: args.max_connections,
        tcp_idle_timeout: args.tcp_idle_timeout,
        node_name: args.node_name.clone(),
        udp_idle_timeout: args.udp_idle_timeout,
        udp_max_sessions: args.udp_max_sessions,
        dns_deny_rcode: args.dns_deny_rcode,
        dns_upstream_timeout: args.dns_upstream_timeout,
        dns_learn_timeout: args.dns_learn_timeout,
        dns_max_outstanding: args.dns_max_outstanding,
        kafka_max_frame: args.kafka_max_frame,
        kafka_max_request_entries: args.kafka_max_request_entries,
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

/// The kernel's verdict events, to become flow records on a task of their own.
fn start_flow_events(dp: &mut Datapath, shared: &Arc<Shared>) -> Option<FlowEvents> {
    if let Some(counters) = dp.counters_reader() {
        crate::datapath::counters::install(shared.flows.bus().metrics(), counters);
    }
    let ring = dp.take_events()?;
    let counters = dp.take_counters();
    Some(FlowEvents(Box::pin(crate::datapath::events::drain(
        ring,
        counters,
        shared.clone(),
        dp.rules_handle(),
    ))))
}

/// The events task, not yet spawned: the ring buffer is pinned and shared, and
/// a weir taking over starts reading it only once the old one has stopped (two
/// readers of one ring would race for its records).
struct FlowEvents(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>);

impl FlowEvents {
    fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.0)
    }
}

/// The proxy's listener tasks; either one ending is an error.
struct Serving {
    tcp: tokio::task::JoinHandle<()>,
    udp: tokio::task::JoinHandle<()>,
    /// The kernel's verdict events (eBPF only).
    events: Option<tokio::task::JoinHandle<()>>,
}

/// What the run loop holds that a takeover stops.
struct Running {
    serving: Serving,
    api: Option<tokio::task::JoinHandle<()>>,
    api_tx: tokio::sync::mpsc::Sender<api::server::Command>,
    /// A takeover is under way: the API is stopped and the control thread quiet.
    quiesced: bool,
    shared: Arc<Shared>,
}

enum Stopped {
    /// SIGTERM or SIGINT.
    Signal,
    /// A new weir serves the listeners; send the drain's result here.
    HandedOver(std::sync::mpsc::Sender<(usize, usize)>),
}

/// Hands SIGHUP and API requests to the control thread until SIGTERM/SIGINT or
/// until a new weir has taken over.
async fn serve_until_stopped(
    control: &std::sync::mpsc::Sender<ControlMsg>,
    mut api_rx: tokio::sync::mpsc::Receiver<api::server::Command>,
    mut takeover_rx: tokio::sync::mpsc::Receiver<takeover::OldEvent>,
    running: &mut Running,
    args: &RunArgs,
) -> anyhow::Result<Stopped> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let serving = &mut running.serving;
        tokio::select! {
            _ = hup.recv() => {
                // logrotate's signal too: the flow log is opened again.
                running.shared.flows.reopen();
                let _ = control.send(ControlMsg::Reload);
            }
            Some(cmd) = api_rx.recv() => {
                let _ = control.send(ControlMsg::Api(cmd));
            }
            Some(ev) = takeover_rx.recv() => {
                if let Some(drained) = on_takeover_event(ev, control, running, args).await {
                    return Ok(Stopped::HandedOver(drained));
                }
            }
            _ = term.recv() => return Ok(Stopped::Signal),
            _ = int.recv() => return Ok(Stopped::Signal),
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
    handed_over: bool,
) {
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
    let outlives = if control.send(ControlMsg::Stop(stopped_tx)).is_ok() {
        stopped_rx.await.unwrap_or(false)
    } else {
        false
    };
    match mode {
        // Everything installed is the new weir's now.
        _ if handed_over => info!("stopped; the steering stays for the weir that took over"),
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
