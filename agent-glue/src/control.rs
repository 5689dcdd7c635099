//! The control thread: everything a policy change does outside the proxy —
//! re-reading files, compiling, writing the eBPF maps, attaching programs,
//! running `nft`/`ip` — happens here, on a thread of its own, so the proxy's
//! runtime threads never wait for a reload, a netlink call or a subprocess.
//! The run loop hands it SIGHUPs and API commands over a channel.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing::{error, info, warn};
use weir_policy::CompiledPolicy;
use weir_proxy::Shared;

use crate::api;
use crate::cli::SteeringMode;
use crate::datapath::Datapath;
use crate::fqdn::{self, FqdnDatapath, FqdnState};
use crate::registry::Sources;
use crate::steering::{self, SteeringConfig, SteeringSets};

/// What the control thread is asked to do.
pub enum ControlMsg {
    /// SIGHUP: re-read the policy and endpoints files.
    Reload,
    /// A local API request.
    Api(api::server::Command),
    /// Shut down; the answer says whether enforcement outlives the process.
    Stop(tokio::sync::oneshot::Sender<bool>),
    /// Learn a DNS answer's addresses (from the proxy, through `LearnerHandle`).
    Learn(fqdn::learner::LearnJob),
}

/// How often expired FQDN entries are looked for (and the cache written).
const FQDN_TICK: Duration = Duration::from_secs(1);

/// The steering of one weir: the eBPF datapath, or nft, or nothing.
pub struct Steering {
    pub mode: SteeringMode,
    pub datapath: Option<Datapath>,
    pub config: SteeringConfig,
}

impl Steering {
    /// Makes the kernel enforce `policy` (maps, attachments, rules).
    pub fn apply(&mut self, policy: &CompiledPolicy) -> anyhow::Result<()> {
        match (self.mode, self.datapath.as_mut()) {
            (SteeringMode::Nft, _) => {
                steering::install(&SteeringSets::from_policy(policy), &self.config)
                    .context("installing nftables steering")?
            }
            (SteeringMode::Ebpf, Some(dp)) => {
                dp.sync(policy)?;
                dp.attach_interfaces(policy)?;
                steering::install_local_delivery(&self.config)
                    .context("installing the local-delivery rule for redirected packets")?;
            }
            _ => {}
        }
        Ok(())
    }
}

impl Steering {
    /// The datapath the FQDN learner writes: only the eBPF one (with nft or no
    /// steering the proxy decides every connection, from the policy alone).
    pub fn fqdn_datapath(&mut self) -> Option<&mut dyn FqdnDatapath> {
        match (self.mode, self.datapath.as_mut()) {
            (SteeringMode::Ebpf, Some(dp)) => Some(dp),
            _ => None,
        }
    }
}

/// Where policies and endpoints files are (for SIGHUP).
pub struct Files {
    pub policy: Vec<PathBuf>,
    pub endpoints: Option<PathBuf>,
}

/// Starts the control thread; it owns the sources, the steering and the FQDN
/// state from now on.
pub fn spawn(
    mut sources: Sources,
    mut steering: Steering,
    files: Files,
    shared: Arc<Shared>,
    mut fqdn: FqdnState,
) -> std::io::Result<std::sync::mpsc::Sender<ControlMsg>> {
    let (tx, rx) = std::sync::mpsc::channel::<ControlMsg>();
    std::thread::Builder::new()
        .name("weir-control".into())
        .spawn(move || {
            let mut next_tick = Instant::now() + FQDN_TICK;
            loop {
                let msg = match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now()))
                {
                    Ok(msg) => Some(msg),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        fqdn.persist_if_due(true);
                        return;
                    }
                };
                match msg {
                    None => {}
                    Some(ControlMsg::Reload) => {
                        reload(&mut sources, &mut steering, &files, &shared, &mut fqdn)
                    }
                    Some(ControlMsg::Api(api::server::Command::ListFqdn(reply))) => {
                        let policy = shared.policy.load();
                        let _ = reply.send(Ok(fqdn.list(&policy, fqdn::now_ms())));
                    }
                    Some(ControlMsg::Api(cmd)) => {
                        let mode = steering.mode;
                        api::commands::handle(cmd, &mut sources, &shared, mode, &mut |p| {
                            fqdn.learn_all_into(p);
                            steering.apply(p)
                        });
                    }
                    Some(ControlMsg::Learn(job)) => {
                        // The installed policy: the one the datapath holds.
                        let policy = shared.policy.load_full();
                        let r = fqdn.learn(
                            &job.req,
                            &policy,
                            steering.fqdn_datapath(),
                            fqdn::now_ms(),
                        );
                        if let Err(e) = &r {
                            warn!(names = ?job.req.names, error = %e, "could not learn a DNS answer's addresses");
                        }
                        let _ = job.reply.send(r);
                    }
                    Some(ControlMsg::Stop(reply)) => {
                        fqdn.persist_if_due(true);
                        let outlives = steering
                            .datapath
                            .as_ref()
                            .is_some_and(Datapath::outlives_process);
                        drop(steering);
                        let _ = reply.send(outlives);
                        return;
                    }
                }
                if Instant::now() >= next_tick {
                    let policy = shared.policy.load_full();
                    fqdn.tick(&policy, steering.fqdn_datapath(), fqdn::now_ms());
                    fqdn.persist_if_due(false);
                    next_tick = Instant::now() + FQDN_TICK;
                }
            }
        })?;
    Ok(tx)
}

fn reload(
    sources: &mut Sources,
    steering: &mut Steering,
    files: &Files,
    shared: &Shared,
    fqdn: &mut FqdnState,
) {
    let mut next = sources.clone();
    let applied = next
        .reload_files(&files.policy, files.endpoints.as_deref())
        .and_then(|()| {
            api::commands::apply(next, &mut |p| {
                // Before the datapath sees it: the new policy starts with every
                // address learned so far.
                fqdn.learn_all_into(p);
                steering.apply(p)
            })
        });
    match applied {
        Ok((next, p)) => {
            *sources = next;
            shared.set_policy(p);
            info!("policy reloaded");
        }
        Err(e) => error!(error = %format!("{e:#}"), "reload failed; keeping the old policy"),
    }
}
