//! `weir run`: load, compile, listen, steer; reload on SIGHUP; undo on exit.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tonic::Status;
use tracing::{error, info, warn};

use weir_policy::CompiledPolicy;
use weir_proxy::{FlowSink, ProxyConfig, Shared, listener};

use crate::api::{self, pb, server::Command};
use crate::cli::{RunArgs, SteeringMode, init_tracing};
use crate::datapath::{Datapath, DatapathConfig};
use crate::registry::{Source, Sources};
use crate::state;
use crate::steering::{self, SteeringConfig, SteeringSets};

pub fn main(args: RunArgs) -> anyhow::Result<()> {
    init_tracing();
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
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating state dir {}", args.state_dir.display()))?;
    let ready = state::ready_file(&args.state_dir);
    let _ = std::fs::remove_file(&ready);
    let mut sources = Sources::load(&args.policy, args.endpoints.as_deref(), &args.state_dir)?;
    let policy = Arc::new(sources.compile()?);
    let config = ProxyConfig {
        proxy_port: args.proxy_port,
        max_header_bytes: args.max_header_bytes,
        idle_timeout: args.idle_timeout,
        upstream_connect_timeout: args.upstream_connect_timeout,
        upstream_timeout: args.upstream_timeout,
        upstream_conns_per_client: args.upstream_conns_per_client,
        node_name: args.node_name.clone(),
        // Replies to the client's address need steering to come back to the proxy.
        udp_idle_timeout: args.udp_idle_timeout,
        udp_max_sessions: args.udp_max_sessions,
        upstream_mark: (args.steering != SteeringMode::None)
            .then_some(args.steering_args.upstream_mark),
    };
    let (fw, up) = (args.steering_args.fwmark, args.steering_args.upstream_mark);
    if up & fw == fw {
        bail!(
            "--upstream-mark {up:#x} must not carry all of --fwmark's bits ({fw:#x}): the proxy's own packets would be delivered locally"
        );
    }
    let shared = Shared::new(policy.clone(), flow_sink(args.flow_log.as_deref())?, config);
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
    let dp_config = DatapathConfig {
        proxy_port: args.proxy_port,
        mark: args.steering_args.fwmark,
        upstream_mark: args.steering_args.upstream_mark,
        bpf_root: Some(args.bpf_root.clone()),
        tc_attach: args.tc_attach,
    };
    let (mode, mut datapath) = match args.steering {
        SteeringMode::Ebpf => (
            SteeringMode::Ebpf,
            Some(ebpf_datapath(dp_config.clone(), &policy)?),
        ),
        SteeringMode::Auto => match ebpf_datapath(dp_config, &policy) {
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
    match mode {
        SteeringMode::Ebpf => {
            info!("steering: eBPF datapath (tc on endpoint interfaces, bpf_sk_assign to the proxy)")
        }
        SteeringMode::Nft => info!("steering: nftables TPROXY (table inet weir)"),
        _ => info!("steering: none (traffic must reach the proxy port by other means)"),
    }
    if let Some(dp) = datapath.as_mut()
        && let Some(ring) = dp.take_events()
    {
        tokio::spawn(crate::datapath::events::drain(
            ring,
            shared.clone(),
            dp.rules_handle(),
        ));
    }
    let mut steer = |p: &CompiledPolicy| -> anyhow::Result<()> {
        match (mode, datapath.as_mut()) {
            (SteeringMode::Nft, _) => steering::install(&SteeringSets::from_policy(p), &steer_cfg)
                .context("installing nftables steering")?,
            (SteeringMode::Ebpf, Some(dp)) => {
                dp.sync(p)?;
                dp.attach_endpoints(p)?;
                dp.detach_unused(p);
                steering::install_local_delivery(&steer_cfg)
                    .context("installing the local-delivery rule for redirected packets")?;
            }
            _ => {}
        }
        Ok(())
    };
    if let Err(e) = steer(&policy) {
        let _ = steering::remove(&steer_cfg);
        return Err(e);
    }
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut serve = tokio::spawn(listener::serve(shared.clone(), listeners));
    let mut serve_udp = tokio::spawn(weir_proxy::udp::serve(shared.clone(), udp_listeners));
    let (api_tx, mut api_rx) = tokio::sync::mpsc::channel(16);
    let api = tokio::spawn(api::server::serve(api_listener, api_tx));
    std::fs::write(&ready, std::process::id().to_string())
        .with_context(|| format!("writing {}", ready.display()))?;
    info!(port = args.proxy_port, steering = ?mode, "weir ready");
    let result = loop {
        tokio::select! {
            _ = hup.recv() => {
                let mut next = sources.clone();
                let applied = next
                    .reload_files(&args.policy, args.endpoints.as_deref())
                    .and_then(|()| apply(next, &mut steer));
                match applied {
                    Ok((next, p)) => {
                        sources = next;
                        shared.policy.store(p);
                        info!("policy reloaded");
                    }
                    Err(e) => error!(error = %format!("{e:#}"), "reload failed; keeping the old policy"),
                }
            }
            Some(cmd) = api_rx.recv() => {
                handle_api(cmd, &mut sources, &shared, mode, &mut steer);
            }
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
            r = &mut serve => {
                break Err(anyhow::anyhow!("listener stopped unexpectedly: {r:?}"));
            }
            r = &mut serve_udp => {
                break Err(anyhow::anyhow!("UDP listener stopped unexpectedly: {r:?}"));
            }
        }
    };
    let _ = steer;
    api.abort();
    let _ = std::fs::remove_file(&args.api_socket);
    drop(datapath);
    match mode {
        SteeringMode::Ebpf => info!(
            bpf_root = %args.bpf_root.display(),
            "shutting down; the eBPF datapath stays attached and pinned, enforcing L3/L4 \
             (flows to the proxy wait for the next weir); `weir cleanup` removes it"
        ),
        SteeringMode::None => info!("shutting down"),
        _ => {
            info!("shutting down; removing steering");
            if let Err(e) = steering::remove(&steer_cfg) {
                error!(error = %e, "could not remove steering; run `weir cleanup`");
            }
        }
    }
    let _ = std::fs::remove_file(&ready);
    result
}

/// Loads the eBPF datapath and checks it can attach, without touching traffic yet
/// (maps are filled and programs attached by the first `steer`).
fn ebpf_datapath(cfg: DatapathConfig, policy: &CompiledPolicy) -> anyhow::Result<Datapath> {
    let dp = Datapath::load(cfg).context("loading the eBPF datapath")?;
    // Every endpoint needs a host interface to attach to; find out now, so that
    // `auto` can still fall back cleanly.
    for ep in policy.endpoints() {
        for ip in &ep.endpoint.ips {
            crate::datapath::host_interface(*ip).map_err(|e| {
                anyhow::anyhow!(
                    "no host interface for endpoint {} ({ip}): {e}",
                    ep.endpoint.name
                )
            })?;
        }
    }
    Ok(dp)
}

/// Compiles `next` and steers by it; the caller keeps `next` only on success.
fn apply(
    next: Sources,
    steer: &mut impl FnMut(&CompiledPolicy) -> anyhow::Result<()>,
) -> anyhow::Result<(Sources, Arc<CompiledPolicy>)> {
    let p = Arc::new(next.compile()?);
    steer(&p)?;
    Ok((next, p))
}

/// One API request, applied like a reload: nothing changes unless it all works.
fn handle_api(
    cmd: Command,
    sources: &mut Sources,
    shared: &Shared,
    mode: SteeringMode,
    steer: &mut impl FnMut(&CompiledPolicy) -> anyhow::Result<()>,
) {
    let fail = |e: anyhow::Error| Status::failed_precondition(format!("{e:#}"));
    match cmd {
        Command::ListEndpoints(reply) => {
            let policy = shared.policy.load();
            let _ = reply.send(Ok(policy
                .endpoints()
                .iter()
                .map(|ep| describe(ep, sources, mode))
                .collect()));
        }
        Command::AddEndpoint(ep, reply) => {
            let name = ep.name.clone();
            let exists = shared
                .policy
                .load()
                .endpoints()
                .iter()
                .any(|e| e.endpoint.name == name)
                || sources.api_endpoints.iter().any(|e| e.name == name);
            if exists {
                let _ = reply.send(Err(Status::already_exists(format!(
                    "an endpoint named `{name}` already exists"
                ))));
                return;
            }
            let result = sources
                .with_added(ep)
                .and_then(|(next, _)| commit(next, sources, shared, steer))
                .map_err(fail)
                .and_then(|()| find(shared, &name, sources, mode));
            if result.is_ok() {
                info!(endpoint = %name, "endpoint registered");
            }
            let _ = reply.send(result);
        }
        Command::RemoveEndpoint(name, reply) => {
            let before = find(shared, &name, sources, mode);
            let result = sources
                .with_removed(&name)
                .and_then(|(next, _)| commit(next, sources, shared, steer))
                .map_err(|e| Status::not_found(format!("{e:#}")))
                .and(before);
            if result.is_ok() {
                info!(endpoint = %name, "endpoint unregistered");
            }
            let _ = reply.send(result);
        }
    }
}

/// Persists `next`'s API endpoints, then compiles and steers by it; on failure the
/// persisted state goes back to `current`'s.
fn commit(
    next: Sources,
    current: &mut Sources,
    shared: &Shared,
    steer: &mut impl FnMut(&CompiledPolicy) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    next.persist()?;
    match apply(next, steer) {
        Ok((next, p)) => {
            *current = next;
            shared.policy.store(p);
            Ok(())
        }
        Err(e) => {
            if let Err(pe) = current.persist() {
                error!(error = %format!("{pe:#}"), "could not restore the registered endpoints file");
            }
            // The maps may hold part of the failed change: put the old policy back.
            if let Err(se) = steer(&shared.policy.load_full()) {
                error!(error = %format!("{se:#}"), "could not restore the previous policy in the datapath");
            }
            Err(e)
        }
    }
}

fn find(
    shared: &Shared,
    name: &str,
    sources: &Sources,
    mode: SteeringMode,
) -> Result<pb::Endpoint, Status> {
    let policy = shared.policy.load();
    policy
        .endpoints()
        .iter()
        .find(|e| e.endpoint.name == name)
        .map(|e| describe(e, sources, mode))
        .ok_or_else(|| Status::not_found(format!("no endpoint named `{name}`")))
}

fn describe(
    ep: &weir_policy::CompiledEndpoint,
    sources: &Sources,
    mode: SteeringMode,
) -> pb::Endpoint {
    let e = &ep.endpoint;
    let source = if sources.api_endpoints.iter().any(|a| a.name == e.name) {
        Source::Api
    } else {
        Source::File
    };
    let mut interfaces: Vec<String> = if mode == SteeringMode::Ebpf {
        e.ips
            .iter()
            .filter_map(|ip| crate::datapath::host_interface(*ip).ok())
            .collect()
    } else {
        Vec::new()
    };
    interfaces.sort();
    interfaces.dedup();
    pb::Endpoint {
        name: e.name.clone(),
        ips: e.ips.iter().map(ToString::to_string).collect(),
        labels: e.labels.clone().into_iter().collect(),
        netns: e.netns.clone().unwrap_or_default(),
        identity: ep.identity,
        source: match source {
            Source::Api => "api",
            Source::File => "file",
        }
        .into(),
        interfaces,
    }
}
