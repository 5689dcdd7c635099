//! The control thread: everything a policy change does outside the proxy —
//! re-reading files, compiling, writing the eBPF maps, attaching programs,
//! running `nft`/`ip` — happens here, on a thread of its own, so the proxy's
//! runtime threads never wait for a reload, a netlink call or a subprocess.
//! The run loop hands it SIGHUPs and API commands, and the policy watcher
//! (`watch.rs`) its reloads, over a channel.

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
use crate::registry::{LoadedDigest, SourceFiles, Sources};
use crate::steering::{self, SteeringConfig, SteeringSets};

/// What the control thread is asked to do.
pub enum ControlMsg {
    /// SIGHUP or a watched file changed: re-read the policy and endpoints files.
    Reload,
    /// The watcher has started: reload if the files changed since they were
    /// read at start (a change in between had no watcher to see it).
    ReloadIfChanged,
    /// A local API request.
    Api(api::server::Command),
    /// Shut down; the answer says whether enforcement outlives the process.
    Stop(tokio::sync::oneshot::Sender<bool>),
    /// Learn a DNS answer's addresses (from the proxy, through `LearnerHandle`).
    Learn(fqdn::learner::LearnJob),
    /// A new weir is taking over (see `takeover`): from now on change nothing
    /// (reloads and API changes are dropped); answered once every earlier
    /// message is done and the FQDN cache file is written, or with the reason
    /// the takeover must be refused.
    HandOver(tokio::sync::oneshot::Sender<Result<(), String>>),
    /// The takeover did not complete: apply changes again.
    Resume,
    /// The weir this one took over has drained and stopped its control thread;
    /// state it left in the state dir for its successor is complete now.
    PeerDrained { pid: u32 },
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

/// Where the policy is read from (for SIGHUP, the watcher and a weir that
/// drains after a handover), and the digests of what was read: updated here
/// as reloads and API commands read and write them.
pub struct Files {
    pub sources: SourceFiles,
    pub loaded: LoadedDigest,
}

/// Starts the control thread; it owns the sources, the steering and the FQDN
/// state from now on.
pub fn spawn(
    mut sources: Sources,
    mut steering: Steering,
    files: Files,
    shared: Arc<Shared>,
    mut fqdn: FqdnState,
    info: api::status::RunInfo,
) -> std::io::Result<std::sync::mpsc::Sender<ControlMsg>> {
    let (tx, rx) = std::sync::mpsc::channel::<ControlMsg>();
    std::thread::Builder::new()
        .name("weir-control".into())
        .spawn(move || {
            let mut next_tick = Instant::now() + FQDN_TICK;
            let mut handed_over = false;
            let mut reloads = api::status::ReloadLog::default();
            // The first policy is installed before this thread starts.
            shared
                .flows
                .bus()
                .metrics()
                .control
                .policy_revision
                .set(i64::try_from(shared.policy_revision()).unwrap_or(i64::MAX));
            loop {
                let msg = match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now()))
                {
                    Ok(msg) => Some(msg),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        fqdn.stop();
                        return;
                    }
                };
                match msg {
                    None => {}
                    Some(ControlMsg::Reload | ControlMsg::ReloadIfChanged | ControlMsg::Api(_))
                        if handed_over =>
                    {
                        // Another weir owns the maps and files now; an API
                        // caller sees its request dropped ("shutting down").
                        info!("handed over to a new weir; change ignored");
                    }
                    Some(ControlMsg::HandOver(done)) => match fqdn.hand_over_with_cache() {
                        Ok(()) => {
                            handed_over = true;
                            let _ = done.send(Ok(()));
                        }
                        Err(reason) => {
                            warn!(%reason, "refusing the takeover");
                            let _ = done.send(Err(reason));
                            // The new weir's datapath load rewrote the shared
                            // config before it asked: ours goes back.
                            resume(&mut steering, &shared);
                        }
                    },
                    Some(ControlMsg::Resume) => {
                        handed_over = false;
                        fqdn.hand_over(false);
                        // Answers learned meanwhile are in no journal.
                        fqdn.persist_if_due(true);
                        resume(&mut steering, &shared);
                    }
                    Some(ControlMsg::PeerDrained { pid }) => {
                        info!(pid, "the weir taken over has drained and stopped");
                        // What it learned while draining joins this cache. It could
                        // add addresses to these maps until it stopped, and remove
                        // none: one whose TTL ended meanwhile is in no cache (review
                        // F5). Read the maps back, so the next sync removes what no
                        // cache entry asks for.
                        if let Some(dp) = steering.datapath.as_mut()
                            && let Err(e) = dp.readopt()
                        {
                            warn!(error = %e, "re-reading the eBPF maps after the handover failed; addresses the old weir learned may stay until the next restart");
                        }
                        let policy = shared.policy.load_full();
                        fqdn.merge_handed_over(&policy, steering.fqdn_datapath());
                        fqdn.datapath_unsure();
                    }
                    Some(ControlMsg::ReloadIfChanged)
                        if files.sources.files_digest() == files.loaded.get().files => {}
                    Some(ControlMsg::Reload | ControlMsg::ReloadIfChanged) => {
                        let _changing = shared.policy_change();
                        // Before the files are read: a change racing the read
                        // leaves the digest behind them (stale, never current).
                        let digest = files.sources.files_digest();
                        let r = reload(&mut sources, &mut steering, &files, &shared, &mut fqdn);
                        if r.is_ok() {
                            files.loaded.set_files(digest);
                        }
                        record_reload(&mut reloads, &shared, r.as_ref().copied());
                    }
                    Some(ControlMsg::Api(api::server::Command::Status(reply))) => {
                        let status = api::status::collect(&api::status::Sources {
                            info: &info,
                            steering: &steering,
                            policies: sources.policies.len() + sources.api_policies.len(),
                            shared: &shared,
                            fqdn: &fqdn,
                            reloads: &reloads,
                        });
                        let _ = reply.send(Ok(status));
                    }
                    Some(ControlMsg::Api(api::server::Command::ListFqdn(reply))) => {
                        let policy = shared.policy.load();
                        let _ = reply.send(Ok(fqdn.list(&policy, fqdn::now_ms())));
                    }
                    Some(ControlMsg::Api(cmd)) => {
                        // A command may install a policy: the datapath holds it
                        // before the proxy does (see `Shared::policy_change`).
                        let _changing = shared.policy_change();
                        let writes = cmd.writes_state();
                        let mode = steering.mode;
                        let changed =
                            api::commands::handle(cmd, &mut sources, &shared, mode, &mut |p| {
                                fqdn.learn_all_into(p);
                                steering.apply(p)
                            });
                        // What the command left in the state dir (written, or
                        // put back after a failure) is what this policy is from.
                        // (Only after a command that writes there: a read-only
                        // one must not make a hand edit current.)
                        if writes {
                            files.loaded.set_api(files.sources.api_digest());
                        }
                        // `weir policy apply|delete` is a reload like SIGHUP's.
                        if let Some(r) = changed {
                            record_reload(&mut reloads, &shared, r.as_ref().copied());
                        }
                    }
                    Some(ControlMsg::Learn(job)) => {
                        // The installed policy: the one the datapath holds.
                        let policy = shared.policy.load_full();
                        let r = match steering.fqdn_datapath() {
                            Some(dp) if handed_over => fqdn.learn(
                                &job.req,
                                &policy,
                                Some(&mut fqdn::handover::HandedOverDatapath(dp)),
                                fqdn::now_ms(),
                            ),
                            dp => fqdn.learn(&job.req, &policy, dp, fqdn::now_ms()),
                        };
                        if let Err(e) = &r
                            && !matches!(e, weir_proxy::fqdn::LearnError::Full(_))
                        {
                            warn!(names = ?job.req.names, error = %e, "could not learn a DNS answer's addresses");
                        }
                        let _ = job.reply.send(r);
                    }
                    Some(ControlMsg::Stop(reply)) => {
                        fqdn.stop();
                        let outlives = steering
                            .datapath
                            .as_ref()
                            .is_some_and(Datapath::outlives_process);
                        drop(steering);
                        let _ = reply.send(outlives);
                        return;
                    }
                }
                let metrics = &shared.flows.bus().metrics().control;
                metrics
                    .policy_revision
                    .set(i64::try_from(shared.policy_revision()).unwrap_or(i64::MAX));
                // After a handover the new weir expires what is learned.
                if !handed_over && Instant::now() >= next_tick {
                    let policy = shared.policy.load_full();
                    fqdn.tick(&policy, steering.fqdn_datapath(), fqdn::now_ms());
                    fqdn.persist_if_due(false);
                    next_tick = Instant::now() + FQDN_TICK;
                    // Map fill for /metrics: from weir's own record, plus one
                    // map-info syscall per map.
                    if let Some(dp) = &steering.datapath {
                        for m in dp.map_fill() {
                            let labels = weir_proxy::flows::metrics::MapLabels { map: m.name };
                            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                            if let Some(n) = m.entries {
                                metrics.map_entries.get_or_create(&labels).set(gauge(n));
                            }
                            if let Some(n) = m.max_entries {
                                metrics.map_capacity.get_or_create(&labels).set(gauge(n));
                            }
                        }
                    }
                }
            }
        })?;
    Ok(tx)
}

/// Counts a reload (SIGHUP, a watched file, `weir policy apply|delete`) for
/// `weir status` and `/metrics`.
fn record_reload(
    reloads: &mut api::status::ReloadLog,
    shared: &Shared,
    r: Result<(), &anyhow::Error>,
) {
    reloads.record(r);
    let m = &shared.flows.bus().metrics().control;
    // The revision first: whoever sees the counter move sees the revision it
    // brought.
    m.policy_revision
        .set(i64::try_from(shared.policy_revision()).unwrap_or(i64::MAX));
    let result = if r.is_ok() { "success" } else { "failure" };
    m.reloads
        .get_or_create(&weir_proxy::flows::metrics::ReloadLabels { result })
        .inc();
    m.last_reload_success.set(i64::from(r.is_ok()));
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

/// Re-reads the files and applies them; on failure the running policy stays
/// (the error is logged and returned for `weir status`).
fn reload(
    sources: &mut Sources,
    steering: &mut Steering,
    files: &Files,
    shared: &Shared,
    fqdn: &mut FqdnState,
) -> anyhow::Result<()> {
    let mut next = sources.clone();
    let mut steered = false;
    let applied = next
        .reload_files(&files.sources.policy, files.sources.endpoints.as_deref())
        .and_then(|()| {
            api::commands::apply(next, &mut |p| {
                steered = true;
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
            Ok(())
        }
        Err(e) => {
            // One line with every error (`FILE:LINE:COL: message; ...`).
            error!(
                errors = %api::status::reload_errors(&e).join("; "),
                "reload failed; keeping the old policy"
            );
            if steered {
                // The maps may already hold the new policy (a step after the
                // sync failed): put the installed one back, as
                // `commands::commit` does.
                let old = shared.policy.load_full();
                fqdn.learn_all_into(&old);
                if let Err(se) = steering.apply(&old) {
                    fqdn.datapath_unsure();
                    error!(error = %format!("{se:#}"), "could not restore the previous policy in the datapath");
                }
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fqdn::{LearnerHandle, Limits};
    use weir_proxy::fqdn::{FqdnLearner, LearnRequest};

    const POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: f}\nspec:\n  endpointSelector: {matchLabels: {app: client}}\n  egress:\n  - toFQDNs: [{matchName: api.example.com}]\n    toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n";

    /// The loop the DNS proxy drives: a waited request is answered after the
    /// learning, a reload's new policy starts with the learned address (and its
    /// new selectors), `fqdn list` answers, and stopping writes the cache.
    #[test]
    fn the_control_thread_learns_relearns_on_reload_lists_and_persists() {
        let dir = std::env::temp_dir().join(format!("weir-control-fqdn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let policy_file = dir.join("p.yaml");
        std::fs::write(&policy_file, POLICY).unwrap();
        let eps = dir.join("e.yaml");
        std::fs::write(
            &eps,
            "endpoints:\n  - {name: client, ips: [10.0.0.1], labels: {app: client}}\n",
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let sources = Sources::load(
            std::slice::from_ref(&policy_file),
            Some(&eps),
            &dir,
            Default::default(),
        )
        .unwrap();
        let policy = Arc::new(sources.compile().unwrap());
        let mut fqdn = FqdnState::load(&dir, Limits::default());
        fqdn.learn_all_into(&policy);
        let view = fqdn.view();
        let shared = Shared::new(
            policy,
            weir_proxy::FlowSink::new(Box::new(std::io::sink())),
            Default::default(),
        );
        let steering = Steering {
            mode: SteeringMode::None,
            datapath: None,
            config: SteeringConfig {
                proxy_port: 15001,
                fwmark: 0x7700,
                route_table: 119,
            },
        };
        let sources_on_disk = SourceFiles {
            policy: vec![policy_file.clone()],
            endpoints: Some(eps),
            state_dir: dir.clone(),
        };
        let files = Files {
            loaded: LoadedDigest::new(sources_on_disk.digest()),
            sources: sources_on_disk,
        };
        let tx = spawn(
            sources,
            steering,
            files,
            shared.clone(),
            fqdn,
            api::status::RunInfo::new(Vec::new()),
        )
        .unwrap();
        // The watcher's start: nothing changed since the files were read, so
        // no reload.
        tx.send(ControlMsg::ReloadIfChanged).unwrap();
        let (qtx, qrx) = tokio::sync::oneshot::channel();
        tx.send(ControlMsg::Api(api::server::Command::Status(qtx)))
            .unwrap();
        let p = qrx.blocking_recv().unwrap().unwrap().policy.unwrap();
        assert_eq!((p.revision, p.reloads), (1, 0));
        let learner = LearnerHandle::new(tx.clone(), view);
        let ip: std::net::IpAddr = "203.0.113.5".parse().unwrap();
        let req = LearnRequest {
            names: vec!["api.example.com.".into()],
            addresses: vec![(ip, 300)],
            policy: shared.policy.load_full(),
            client: weir_proxy::fqdn::DnsClient::new(std::net::IpAddr::from([10, 0, 0, 1])),
        };
        assert!(req.selected());
        assert_eq!(learner.learn(req, true).blocking_recv().unwrap(), Ok(()));
        let learned = shared.policy.load().learned_fqdn_ip(ip).unwrap();
        assert_eq!(learned.selectors.len(), 1);
        // A reload adds a selector that selects the name: the new policy has the
        // address with both before it is installed.
        std::fs::write(
            &policy_file,
            POLICY.replace(
                "[{matchName: api.example.com}]",
                "[{matchName: api.example.com}, {matchPattern: '*.example.com'}]",
            ),
        )
        .unwrap();
        // (As the watcher's start would find it: changed since read.)
        tx.send(ControlMsg::ReloadIfChanged).unwrap();
        let (ltx, lrx) = tokio::sync::oneshot::channel();
        tx.send(ControlMsg::Api(api::server::Command::ListFqdn(ltx)))
            .unwrap();
        let names = lrx.blocking_recv().unwrap().unwrap();
        let after = shared.policy.load().learned_fqdn_ip(ip).unwrap();
        assert_eq!(after.selectors.len(), 2, "re-learned with the new selector");
        assert_eq!(names.len(), 1);
        assert_eq!(names[0].addresses[0].identity, after.identity);
        assert_eq!(names[0].addresses[0].selectors.len(), 2);
        // A broken reload: refused, reported by status with FILE:LINE:COL,
        // and the running policy (revision 2, after the reload above) stays.
        std::fs::write(&policy_file, "apiVersion: cilium.io/v2\nkind: [\n").unwrap();
        tx.send(ControlMsg::Reload).unwrap();
        let (qtx, qrx) = tokio::sync::oneshot::channel();
        tx.send(ControlMsg::Api(api::server::Command::Status(qtx)))
            .unwrap();
        let status = qrx.blocking_recv().unwrap().unwrap();
        let p = status.policy.unwrap();
        assert_eq!((p.revision, p.reloads, p.failed_reloads), (2, 2, 1));
        let last = p.last_reload.unwrap();
        assert!(!last.ok);
        let file = policy_file.display().to_string();
        assert!(
            last.errors[0].starts_with(&format!("{file}:")),
            "{:?}",
            last.errors
        );
        assert_eq!(status.steering, "none");
        assert!(shared.policy.load().learned_fqdn_ip(ip).is_some(), "kept");
        let (stx, srx) = tokio::sync::oneshot::channel();
        tx.send(ControlMsg::Stop(stx)).unwrap();
        assert!(!srx.blocking_recv().unwrap());
        let saved = crate::fqdn::persist::load(&dir, Limits::default()).unwrap();
        assert!(
            saved.get("api.example.com.", ip).is_some(),
            "written at stop"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
