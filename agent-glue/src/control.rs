//! The control thread: everything a policy change does outside the proxy —
//! re-reading files, compiling, writing the eBPF maps, attaching programs,
//! running `nft`/`ip` — happens here, on a thread of its own, so the proxy's
//! runtime threads never wait for a reload, a netlink call or a subprocess.
//! The run loop hands it SIGHUPs and API commands over a channel.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tracing::{error, info};
use weir_policy::CompiledPolicy;
use weir_proxy::Shared;

use crate::api;
use crate::cli::SteeringMode;
use crate::datapath::Datapath;
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
    /// A new weir is taking over (see `takeover`): from now on change nothing
    /// (reloads and API changes are dropped); answered once every earlier
    /// message is done.
    HandOver(tokio::sync::oneshot::Sender<()>),
    /// The takeover did not complete: apply changes again.
    Resume,
    /// The weir this one took over has drained and stopped its control thread;
    /// state it left in the state dir for its successor is complete now.
    PeerDrained { pid: u32 },
}

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

/// Where policies and endpoints files are (for SIGHUP).
pub struct Files {
    pub policy: Vec<PathBuf>,
    pub endpoints: Option<PathBuf>,
}

/// Starts the control thread; it owns the sources and the steering from now on.
pub fn spawn(
    mut sources: Sources,
    mut steering: Steering,
    files: Files,
    shared: Arc<Shared>,
) -> std::io::Result<std::sync::mpsc::Sender<ControlMsg>> {
    let (tx, rx) = std::sync::mpsc::channel::<ControlMsg>();
    std::thread::Builder::new()
        .name("weir-control".into())
        .spawn(move || {
            let mut handed_over = false;
            for msg in rx {
                match msg {
                    ControlMsg::Reload | ControlMsg::Api(_) if handed_over => {
                        // Another weir owns the maps and files now; an API
                        // caller sees its request dropped ("shutting down").
                        info!("handed over to a new weir; change ignored");
                    }
                    ControlMsg::HandOver(done) => {
                        handed_over = true;
                        let _ = done.send(());
                    }
                    ControlMsg::Resume => {
                        handed_over = false;
                        resume(&mut steering, &shared);
                    }
                    ControlMsg::PeerDrained { pid } => {
                        info!(pid, "the weir taken over has drained and stopped");
                    }
                    ControlMsg::Reload => reload(&mut sources, &mut steering, &files, &shared),
                    ControlMsg::Api(cmd) => {
                        let mode = steering.mode;
                        api::commands::handle(cmd, &mut sources, &shared, mode, &mut |p| {
                            steering.apply(p)
                        });
                    }
                    ControlMsg::Stop(reply) => {
                        let outlives = steering
                            .datapath
                            .as_ref()
                            .is_some_and(Datapath::outlives_process);
                        drop(steering);
                        let _ = reply.send(outlives);
                        return;
                    }
                }
            }
        })?;
    Ok(tx)
}

/// A new weir that failed to take over may have changed the steering before it
/// went: make it this weir's again.
fn resume(steering: &mut Steering, shared: &Shared) {
    if let Some(dp) = steering.datapath.as_mut()
        && let Err(e) = dp.readopt()
    {
        error!(error = %e, "re-reading the eBPF maps after an abandoned takeover failed");
    }
    match steering.apply(&shared.policy.load()) {
        Ok(()) => info!("steering re-applied after an abandoned takeover"),
        Err(e) => {
            error!(error = %format!("{e:#}"), "re-applying steering after an abandoned takeover failed")
        }
    }
}

fn reload(sources: &mut Sources, steering: &mut Steering, files: &Files, shared: &Shared) {
    let mut next = sources.clone();
    let applied = next
        .reload_files(&files.policy, files.endpoints.as_deref())
        .and_then(|()| api::commands::apply(next, &mut |p| steering.apply(p)));
    match applied {
        Ok((next, p)) => {
            *sources = next;
            shared.set_policy(p);
            info!("policy reloaded");
        }
        Err(e) => error!(error = %format!("{e:#}"), "reload failed; keeping the old policy"),
    }
}
