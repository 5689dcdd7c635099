//! Serves the API. Requests that change what weir enforces are handed to the run
//! loop as [`Command`]s, so every change goes through the same compile-and-steer
//! path as a SIGHUP reload, one at a time.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::info;

use super::pb;
use crate::registry::ApiEndpoint;

pub type Reply<T> = oneshot::Sender<Result<T, Status>>;

/// What the run loop is asked to do.
pub enum Command {
    AddEndpoint(ApiEndpoint, Reply<pb::Endpoint>),
    ListEndpoints(Reply<Vec<pb::Endpoint>>),
    RemoveEndpoint(String, Reply<pb::Endpoint>),
    RefreshEndpoint(String, Reply<pb::Endpoint>),
    /// `weir fqdn list` (answered by the control thread, which owns the cache).
    ListFqdn(Reply<Vec<pb::FqdnName>>),
    /// `weir status` (answered by the control thread, which owns the datapath).
    Status(Reply<pb::GetStatusResponse>),
    /// `weir policy apply`: `(file, text)` documents, parsed by the run loop.
    ApplyPolicies(Vec<(String, String)>, Reply<pb::ApplyPolicyResponse>),
    /// `weir policy get [NAME]`.
    GetPolicies(Option<String>, Reply<Vec<pb::PolicyInfo>>),
    DeletePolicy(String, Reply<pb::DeletePolicyResponse>),
    ListPolicies(Reply<Vec<pb::PolicyInfo>>),
    /// `weir policy explain` without `--policy`: decided against the policy
    /// in force.
    Explain(crate::explain::Query, Reply<pb::ExplainResponse>),
}

impl Command {
    /// Whether handling it may write the state dir's API files (a commit, or
    /// its restore after a failure).
    pub fn writes_state(&self) -> bool {
        matches!(
            self,
            Command::AddEndpoint(..)
                | Command::RemoveEndpoint(..)
                | Command::RefreshEndpoint(..)
                | Command::ApplyPolicies(..)
                | Command::DeletePolicy(..)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another weir already serves the API at {0} (use a different --api-socket)")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("binding the API socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Binds the socket (creating its directory), replacing a stale socket left by a
/// weir that died, and restricts it to its owner (root).
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    use std::os::unix::fs::FileTypeExt;
    let io_err = |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_path_buf()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(listener)
}

/// Serves until the run loop goes away.
pub async fn serve(
    listener: UnixListener,
    commands: mpsc::Sender<Command>,
    flows: Arc<weir_proxy::FlowBus>,
    allowed: super::access::Allowed,
) {
    let observer = pb::observer_server::ObserverServer::new(ObserverApi { bus: flows });
    let fqdn = pb::fqdn_server::FqdnServer::new(FqdnApi(EndpointsApi {
        commands: commands.clone(),
    }));
    let status = pb::status_server::StatusServer::new(StatusApi(EndpointsApi {
        commands: commands.clone(),
    }));
    let policy = pb::policy_server::PolicyServer::new(PolicyApi(EndpointsApi {
        commands: commands.clone(),
    }));
    let svc = pb::endpoints_server::EndpointsServer::new(EndpointsApi { commands });
    let incoming = UnixListenerStream::new(listener);
    // Every service sits behind the caller check (SO_PEERCRED).
    if let Err(e) = tonic::transport::Server::builder()
        .layer(tonic::service::InterceptorLayer::new(allowed))
        .add_service(svc)
        .add_service(fqdn)
        .add_service(observer)
        .add_service(status)
        .add_service(policy)
        .serve_with_incoming(incoming)
        .await
    {
        tracing::error!(error = %e, "the local API stopped");
    }
}

struct EndpointsApi {
    commands: mpsc::Sender<Command>,
}

impl EndpointsApi {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| Status::unavailable("weir is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("weir is shutting down"))?
    }
}

#[tonic::async_trait]
impl pb::endpoints_server::Endpoints for EndpointsApi {
    async fn add(
        &self,
        request: Request<pb::AddEndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let ep = validate_add(request.into_inner())?;
        info!(endpoint = %ep.name, netns = %ep.netns, "API: add endpoint");
        self.ask(|r| Command::AddEndpoint(ep, r))
            .await
            .map(Response::new)
    }

    async fn list(
        &self,
        _: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        let endpoints = self.ask(Command::ListEndpoints).await?;
        Ok(Response::new(pb::ListEndpointsResponse { endpoints }))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveEndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        info!(endpoint = %name, "API: remove endpoint");
        self.ask(|r| Command::RemoveEndpoint(name, r))
            .await
            .map(Response::new)
    }

    async fn refresh(
        &self,
        request: Request<pb::RefreshEndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        info!(endpoint = %name, "API: refresh endpoint addresses");
        self.ask(|r| Command::RefreshEndpoint(name, r))
            .await
            .map(Response::new)
    }
}

/// The FQDN service; it asks the run loop the same way.
struct FqdnApi(EndpointsApi);

#[tonic::async_trait]
impl pb::fqdn_server::Fqdn for FqdnApi {
    async fn list(
        &self,
        _: Request<pb::ListFqdnRequest>,
    ) -> Result<Response<pb::ListFqdnResponse>, Status> {
        let names = self.0.ask(Command::ListFqdn).await?;
        Ok(Response::new(pb::ListFqdnResponse { names }))
    }
}

/// The status service; the control thread gathers the answer.
struct StatusApi(EndpointsApi);

#[tonic::async_trait]
impl pb::status_server::Status for StatusApi {
    async fn get(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.0.ask(Command::Status).await.map(Response::new)
    }
}

/// The policy service: every request goes to the run loop, which parses,
/// compiles and installs as for SIGHUP.
struct PolicyApi(EndpointsApi);

/// Most bytes of policy text one apply may carry (the message limit is 4 MiB).
const MAX_POLICY_BYTES: usize = 4 << 20;

#[tonic::async_trait]
impl pb::policy_server::Policy for PolicyApi {
    async fn apply(
        &self,
        request: Request<pb::ApplyPolicyRequest>,
    ) -> Result<Response<pb::ApplyPolicyResponse>, Status> {
        let docs: Vec<(String, String)> = request
            .into_inner()
            .documents
            .into_iter()
            .map(|d| {
                let file = if d.file.is_empty() {
                    "<api>".to_string()
                } else {
                    d.file
                };
                (file, d.yaml)
            })
            .collect();
        if docs.is_empty() {
            return Err(Status::invalid_argument("no policy documents given"));
        }
        if docs.iter().map(|(_, t)| t.len()).sum::<usize>() > MAX_POLICY_BYTES {
            return Err(Status::invalid_argument(
                "the policy documents exceed 4 MiB",
            ));
        }
        info!(files = ?docs.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(), "API: apply policies");
        self.0
            .ask(|r| Command::ApplyPolicies(docs, r))
            .await
            .map(Response::new)
    }

    async fn get(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        let name = Some(request.into_inner().name).filter(|n| !n.is_empty());
        let policies = self.0.ask(|r| Command::GetPolicies(name, r)).await?;
        Ok(Response::new(pb::GetPolicyResponse { policies }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        info!(policy = %name, "API: delete policy");
        self.0
            .ask(|r| Command::DeletePolicy(name, r))
            .await
            .map(Response::new)
    }

    async fn list(
        &self,
        _: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let policies = self.0.ask(Command::ListPolicies).await?;
        Ok(Response::new(pb::ListPoliciesResponse { policies }))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let q = crate::explain::remote::query(request.into_inner())
            .map_err(Status::invalid_argument)?;
        self.0
            .ask(|r| Command::Explain(q, r))
            .await
            .map(Response::new)
    }
}

/// `Observer.GetFlows`, answered from the flow bus directly: reading flows
/// never involves the run loop or the data path.
struct ObserverApi {
    bus: Arc<weir_proxy::FlowBus>,
}

/// Records a streaming reply may have in flight before the reader's bus queue
/// takes over (and counts what it loses).
const STREAM_BUFFER: usize = 256;

type FlowStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GetFlowsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::observer_server::Observer for ObserverApi {
    type GetFlowsStream = FlowStream;

    async fn get_flows(
        &self,
        request: Request<pb::GetFlowsRequest>,
    ) -> Result<Response<FlowStream>, Status> {
        let req = request.into_inner();
        let filter = flow_filter(&req)?;
        info!(last = req.last, follow = req.follow, "API: observe flows");
        let last = usize::try_from(req.last).unwrap_or(usize::MAX);
        // Scanning a ring of 65 536 records takes a few milliseconds: not on a
        // worker the proxy's connections share.
        let bus = self.bus.clone();
        let follow = req.follow;
        let (history, sub) = tokio::task::spawn_blocking(move || {
            bus.query(
                filter,
                last,
                follow,
                weir_proxy::flows::bus::SUBSCRIBER_QUEUE,
            )
        })
        .await
        .map_err(|_| Status::internal("reading the flow ring failed"))?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            let flow = |r: &weir_proxy::flows::Record| pb::GetFlowsResponse {
                event: Some(pb::get_flows_response::Event::FlowJson(
                    r.json().to_string(),
                )),
            };
            for r in &history {
                if tx.send(Ok(flow(r))).await.is_err() {
                    return;
                }
            }
            drop(history);
            let Some(mut sub) = sub else { return };
            loop {
                let msg = tokio::select! {
                    e = sub.next() => match e {
                        weir_proxy::flows::Event::Flow(r) => flow(&r),
                        weir_proxy::flows::Event::Lost(count) => pb::GetFlowsResponse {
                            event: Some(pb::get_flows_response::Event::Lost(pb::LostFlows {
                                count,
                            })),
                        },
                    },
                    // The reader went away while nothing was happening.
                    () = tx.closed() => return,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Turns a request's filters into the bus's, rejecting what does not parse.
fn flow_filter(req: &pb::GetFlowsRequest) -> Result<weir_proxy::FlowFilter, Status> {
    use weir_proxy::flows::bus::parse_verdict;
    let bad = |e: String| Status::invalid_argument(e);
    let peers = |v: &[String]| {
        v.iter()
            .map(|s| s.parse::<weir_proxy::PeerFilter>().map_err(bad))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(weir_proxy::FlowFilter {
        verdicts: req
            .verdict
            .iter()
            .map(|v| parse_verdict(v).map_err(bad))
            .collect::<Result<_, _>>()?,
        types: req
            .r#type
            .iter()
            .map(|t| t.parse().map_err(bad))
            .collect::<Result<_, _>>()?,
        from: peers(&req.from)?,
        to: peers(&req.to)?,
        ports: req
            .port
            .iter()
            .map(|p| u16::try_from(*p).map_err(|_| bad(format!("port {p} is out of range"))))
            .collect::<Result<_, _>>()?,
        since: if req.since.is_empty() {
            None
        } else {
            Some(
                weir_policy::flow::normalize_rfc3339(&req.since).ok_or_else(|| {
                    bad(format!(
                        "since `{}` is not an RFC 3339 UTC time (2026-11-22T20:01:02Z)",
                        req.since
                    ))
                })?,
            )
        },
    })
}

/// Checks an add request field by field; the namespace itself is read later.
fn validate_add(req: pb::AddEndpointRequest) -> Result<ApiEndpoint, Status> {
    if req.netns.is_empty() {
        return Err(Status::invalid_argument("netns is required"));
    }
    let name = if req.name.is_empty() {
        Path::new(&req.netns)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        req.name
    };
    if name.is_empty()
        || name.len() > 253
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Status::invalid_argument(format!(
            "endpoint name `{name}` must be 1-253 characters of A-Z a-z 0-9 - _ ."
        )));
    }
    // The same check as the endpoints file's: no label may forge one weir
    // derives itself (`reserved:`, `cidr:`), none may carry the canonical text's
    // separators, and the namespace label must agree with `--namespace`.
    let mut labels = std::collections::BTreeMap::new();
    for (k, v) in &req.labels {
        let key = weir_policy::model::strip_label_source(k);
        weir_policy::labels::check_user_label(key, v).map_err(Status::invalid_argument)?;
        if labels.insert(key.to_string(), v.clone()).is_some() {
            return Err(Status::invalid_argument(format!(
                "label `{key}` is given twice (`{k}` names it again)"
            )));
        }
    }
    let given = (!req.namespace.is_empty()).then_some(req.namespace.as_str());
    let namespace = weir_policy::labels::take_namespace(&mut labels, given)
        .map_err(Status::invalid_argument)?;
    let ips = req
        .ips
        .iter()
        .map(|s| {
            s.parse()
                .map_err(|_| Status::invalid_argument(format!("`{s}` is not an IP address")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ApiEndpoint {
        name,
        netns: req.netns,
        labels,
        namespace,
        ips,
        ips_from_netns: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, netns: &str, labels: &[(&str, &str)]) -> pb::AddEndpointRequest {
        pb::AddEndpointRequest {
            name: name.into(),
            netns: netns.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ips: vec![],
            namespace: String::new(),
        }
    }

    #[test]
    fn add_requests_are_checked_before_anything_changes() {
        let ok = validate_add(req("", "/run/netns/xwing", &[("class", "xwing")])).unwrap();
        assert_eq!(ok.name, "xwing", "the name defaults to the namespace's");
        assert_eq!(ok.labels["class"], "xwing");
        assert_eq!(ok.namespace, "default");
        let by_label = validate_add(req(
            "",
            "/run/netns/xwing",
            &[("k8s:io.kubernetes.pod.namespace", "rebels")],
        ))
        .unwrap();
        assert_eq!(by_label.namespace, "rebels");
        assert!(
            by_label.labels.is_empty(),
            "the namespace is not a label twice"
        );
        for (bad, why) in [
            (req("a", "", &[]), "netns is required"),
            (req("a b", "ns", &[]), "must be"),
            (req("a", "ns", &[("", "v")]), "label"),
            (req("a", "ns", &[("a,b", "v")]), "without `=` or `,`"),
            (req("a", "ns", &[("a", "v,w")]), "values without `,`"),
            (req("a", "ns", &[("reserved:host", "")]), "source prefix"),
            (req("a", "ns", &[("cidr:10.0.0.0/8", "")]), "source prefix"),
            (
                pb::AddEndpointRequest {
                    namespace: "dev".into(),
                    ..req("a", "ns", &[("k8s:io.kubernetes.pod.namespace", "prod")])
                },
                "disagree",
            ),
            (
                pb::AddEndpointRequest {
                    namespace: "Prod".into(),
                    ..req("a", "ns", &[])
                },
                "not a valid namespace name",
            ),
            (
                pb::AddEndpointRequest {
                    ips: vec!["10.0.0.300".into()],
                    ..req("a", "ns", &[])
                },
                "not an IP",
            ),
        ] {
            let e = validate_add(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(why), "{}", e.message());
        }
    }

    #[test]
    fn flow_filters_are_checked_not_ignored() {
        let ok = flow_filter(&pb::GetFlowsRequest {
            verdict: vec!["dropped".into()],
            r#type: vec!["http".into()],
            from: vec!["class=xwing".into()],
            to: vec!["deathstar".into()],
            port: vec![80],
            since: "2026-11-22T20:00:00Z".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ok.ports, [80]);
        assert_eq!(ok.since.as_deref(), Some("2026-11-22T20:00:00.000000000Z"));
        for bad in [
            pb::GetFlowsRequest {
                verdict: vec!["AUDIT".into()],
                ..Default::default()
            },
            pb::GetFlowsRequest {
                r#type: vec!["smtp".into()],
                ..Default::default()
            },
            pb::GetFlowsRequest {
                from: vec![String::new()],
                ..Default::default()
            },
            pb::GetFlowsRequest {
                port: vec![70_000],
                ..Default::default()
            },
            pb::GetFlowsRequest {
                since: "5m".into(),
                ..Default::default()
            },
        ] {
            let e = flow_filter(&bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_live_socket_is_not_taken_over_and_a_stale_one_is() {
        let dir = std::env::temp_dir().join(format!("weir-api-{}", std::process::id()));
        let path = dir.join("sub/weir.sock");
        let first = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&path), Err(BindError::InUse(_))));
        drop(first);
        // The socket file is left behind, as after a crash: replaced.
        assert!(path.exists());
        let _second = bind(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("file"), b"x").unwrap();
        assert!(matches!(
            bind(&dir.join("file")),
            Err(BindError::NotASocket(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
