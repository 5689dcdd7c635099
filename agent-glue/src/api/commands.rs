//! The run loop's side of the API: endpoint commands applied the way a SIGHUP
//! reload is (compile, steer, and keep the result only if all of it worked).

use std::sync::Arc;

use tonic::Status;
use tracing::{error, info};
use weir_policy::CompiledPolicy;
use weir_proxy::Shared;

use super::pb;
use super::server::Command;
use crate::cli::SteeringMode;
use crate::registry::{Source, Sources};

/// Compiles `next` and steers by it; the caller keeps `next` only on success.
pub fn apply(
    next: Sources,
    steer: &mut impl FnMut(&CompiledPolicy) -> anyhow::Result<()>,
) -> anyhow::Result<(Sources, Arc<CompiledPolicy>)> {
    let p = Arc::new(next.compile()?);
    steer(&p)?;
    Ok((next, p))
}

/// One API request, applied like a reload: nothing changes unless it all works.
/// For a request that changed (or tried to change) the policies — apply,
/// delete — the outcome, which counts as a reload in status and metrics.
#[must_use]
pub fn handle(
    cmd: Command,
    sources: &mut Sources,
    shared: &Shared,
    mode: SteeringMode,
    steer: &mut impl FnMut(&CompiledPolicy) -> anyhow::Result<()>,
) -> Option<anyhow::Result<()>> {
    let fail = |e: &anyhow::Error| Status::failed_precondition(format!("{e:#}"));
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
                return None;
            }
            let result = sources
                .with_added(ep)
                .and_then(|(next, _)| commit(next, sources, shared, steer))
                .map_err(|e| fail(&e))
                .and_then(|()| find(shared, &name, sources, mode));
            if result.is_ok() {
                info!(endpoint = %name, "endpoint registered");
            }
            let _ = reply.send(result);
        }
        Command::RefreshEndpoint(name, reply) => {
            let result = sources
                .with_refreshed(&name)
                .and_then(|next| commit(next, sources, shared, steer))
                .map_err(|e| fail(&e))
                .and_then(|()| find(shared, &name, sources, mode));
            if let Ok(ep) = &result {
                info!(endpoint = %name, ips = ?ep.ips, "endpoint addresses refreshed");
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
        // The control thread answers it before it gets here (it owns the cache).
        Command::ListFqdn(reply) => {
            let _ = reply.send(Err(Status::unavailable("the FQDN cache is not here")));
        }
        Command::Status(reply) => {
            let _ = reply.send(Err(Status::unavailable("the status is not here")));
        }
        Command::ApplyPolicies(docs, reply) => {
            let mut names: Vec<String> = Vec::new();
            let parsed = super::policy::parse_applied(&docs);
            let unparsed = parsed.is_err();
            let outcome = match parsed {
                Err(e) => Err(anyhow::Error::new(e).context("invalid policy")),
                Ok(applied) => {
                    names = applied.iter().map(|a| a.stored.name.clone()).collect();
                    sources
                        .with_applied(applied)
                        .and_then(|next| commit(next, sources, shared, steer))
                }
            };
            let result = match &outcome {
                Ok(()) => {
                    let revision = shared.policy_revision();
                    info!(policies = ?names, revision, "policies applied through the API");
                    Ok(pb::ApplyPolicyResponse { names, revision })
                }
                Err(e) => {
                    // One line with every error (`FILE:LINE:COL: message; ...`).
                    error!(
                        errors = %super::status::reload_errors(e).join("; "),
                        "policy apply refused; keeping the running policy"
                    );
                    Err(match e.downcast_ref::<weir_policy::LoadErrors>() {
                        Some(le) if unparsed => {
                            Status::invalid_argument(format!("invalid policy:\n{le}"))
                        }
                        _ => fail(e),
                    })
                }
            };
            let _ = reply.send(result);
            return Some(outcome);
        }
        Command::DeletePolicy(name, reply) => {
            let (result, outcome) = match sources.with_deleted(&name) {
                Err(e) if sources.policies.iter().any(|p| p.qualified_name() == name) => {
                    (Err(Status::failed_precondition(format!("{e:#}"))), None)
                }
                Err(e) => (Err(Status::not_found(format!("{e:#}"))), None),
                Ok(next) => {
                    let r = commit(next, sources, shared, steer);
                    let reply = match &r {
                        Ok(()) => {
                            info!(policy = %name, "policy deleted through the API");
                            Ok(pb::DeletePolicyResponse {
                                revision: shared.policy_revision(),
                            })
                        }
                        Err(e) => {
                            error!(
                                errors = %super::status::reload_errors(e).join("; "),
                                "policy delete refused; keeping the running policy"
                            );
                            Err(fail(e))
                        }
                    };
                    (reply, Some(r))
                }
            };
            let _ = reply.send(result);
            return outcome;
        }
        Command::GetPolicies(name, reply) => {
            let found = super::policy::infos(sources, name.as_deref(), true);
            let result = match &name {
                Some(n) if found.is_empty() => Err(Status::not_found(format!(
                    "no policy named `{n}` is in force"
                ))),
                _ => Ok(found),
            };
            let _ = reply.send(result);
        }
        Command::ListPolicies(reply) => {
            let _ = reply.send(Ok(super::policy::infos(sources, None, false)));
        }
        Command::Explain(q, reply) => {
            let _ = reply.send(explain(&q, sources, shared));
        }
    }
    None
}

/// Decides `q` against the installed policy. `sources` are what it was
/// compiled from (they change only together with it): the rules named in the
/// answer are read from them.
fn explain(
    q: &crate::explain::Query,
    sources: &Sources,
    shared: &Shared,
) -> Result<pb::ExplainResponse, Status> {
    let revision = shared.policy_revision();
    let compiled = shared.policy.load_full();
    let policies = sources
        .all_policies()
        .map_err(|e| Status::internal(format!("{e:#}")))?;
    let report =
        crate::explain::decide(q, &compiled, &policies).map_err(Status::invalid_argument)?;
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| Status::internal(format!("rendering the answer: {e}")))?;
    Ok(pb::ExplainResponse {
        allowed: report.allowed(),
        text: report.text(),
        json,
        revision,
    })
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
            shared.set_policy(p);
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
            .filter_map(|ip| crate::datapath::route_interface(*ip).ok())
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
        namespace: e.namespace.clone(),
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
