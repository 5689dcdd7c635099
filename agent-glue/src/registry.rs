//! What weir compiles from: the policies and endpoints files (re-read on SIGHUP)
//! and the endpoints registered through the local API (kept in the state dir, so
//! a restarted weir still enforces them).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use weir_policy::model::ClusterConfig;
use weir_policy::{CompiledPolicy, Endpoint, Environment, Policy, Service};

use crate::state;

/// An endpoint registered with `weir endpoint add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiEndpoint {
    pub name: String,
    pub netns: String,
    pub labels: BTreeMap<String, String>,
    /// Its Kubernetes namespace (`--namespace`; registrations from before
    /// namespaces existed are in `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The endpoint's addresses: given explicitly, or the namespace's global
    /// addresses as read at registration (and by `weir endpoint refresh`, never
    /// otherwise: a workload adding an address inside its namespace must not
    /// change what weir enforces for it, or where weir attaches).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Whether `ips` were read from the namespace (so a refresh may re-read them).
    #[serde(default)]
    pub ips_from_netns: bool,
}

fn default_namespace() -> String {
    weir_policy::labels::DEFAULT_NAMESPACE.to_string()
}

impl ApiEndpoint {
    /// Reads the namespace's addresses into `ips` when there are none yet.
    pub fn read_addresses_if_missing(&mut self) -> anyhow::Result<()> {
        if self.ips.is_empty() {
            self.ips = crate::endpoints::netns_addresses(&self.netns).with_context(|| {
                format!(
                    "endpoint `{}`: reading addresses in netns {}",
                    self.name, self.netns
                )
            })?;
            if self.ips.is_empty() {
                bail!(
                    "endpoint `{}`: netns {} has no global addresses",
                    self.name,
                    self.netns
                );
            }
            self.ips_from_netns = true;
        }
        Ok(())
    }

    /// The endpoint as policy sees it; an error when its namespace is gone.
    pub fn resolve(&self) -> anyhow::Result<Endpoint> {
        if !crate::endpoints::netns_exists(&self.netns) {
            bail!("netns {} no longer exists", self.netns);
        }
        let mut ep = Endpoint {
            name: self.name.clone(),
            ips: self.ips.clone(),
            labels: self.labels.clone(),
            namespace: self.namespace.clone(),
            netns: Some(self.netns.clone()),
            cgroup: None,
            interface: None,
            ports: BTreeMap::new(),
        };
        crate::endpoints::resolve_netns_addresses(std::slice::from_mut(&mut ep))?;
        Ok(ep)
    }
}

/// Where an endpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    File,
    Api,
}

#[derive(Clone)]
pub struct Sources {
    pub policies: Vec<Policy>,
    pub file_endpoints: Vec<Endpoint>,
    /// The endpoints file's `services:` (for `toServices`).
    pub services: Vec<Service>,
    pub api_endpoints: Vec<ApiEndpoint>,
    /// The cluster's ranges (`--cluster-cidr`, ...), fixed for the run.
    pub cluster: ClusterConfig,
    state_dir: PathBuf,
}

fn api_endpoints_file(state_dir: &Path) -> PathBuf {
    state_dir.join("api-endpoints.json")
}

impl Sources {
    /// Reads the policy and endpoints files (errors keep `file:line:col`) and the
    /// API endpoints persisted in the state dir.
    pub fn load(
        policy: &[PathBuf],
        endpoints: Option<&Path>,
        state_dir: &Path,
        cluster: ClusterConfig,
    ) -> anyhow::Result<Self> {
        let mut sources = Sources {
            policies: Vec::new(),
            file_endpoints: Vec::new(),
            services: Vec::new(),
            api_endpoints: load_api_endpoints(state_dir)?,
            cluster,
            state_dir: state_dir.to_path_buf(),
        };
        sources.reload_files(policy, endpoints)?;
        Ok(sources)
    }

    /// Re-reads the policy and endpoints files; on error nothing changes.
    pub fn reload_files(
        &mut self,
        policy: &[PathBuf],
        endpoints: Option<&Path>,
    ) -> anyhow::Result<()> {
        let policies = weir_policy::load_policies(policy)
            .map_err(|e| anyhow::Error::new(e).context("invalid policy"))?;
        let file = match endpoints {
            Some(path) => weir_policy::load_endpoints_file(path)
                .map_err(|e| anyhow::Error::new(e).context("invalid endpoints"))?,
            None => Default::default(),
        };
        let mut file_endpoints = file.endpoints;
        crate::endpoints::resolve_netns_addresses(&mut file_endpoints)?;
        self.policies = policies;
        self.file_endpoints = file_endpoints;
        self.services = file.services;
        Ok(())
    }

    /// Every endpoint with its source. An API endpoint whose namespace is gone is
    /// left out (with a log line): there is nothing left to enforce for it.
    pub fn endpoints(&self) -> anyhow::Result<Vec<(Endpoint, Source)>> {
        let mut all: Vec<(Endpoint, Source)> = self
            .file_endpoints
            .iter()
            .cloned()
            .map(|e| (e, Source::File))
            .collect();
        for api in &self.api_endpoints {
            match api.resolve() {
                Ok(ep) => all.push((ep, Source::Api)),
                Err(e) => warn!(
                    endpoint = %api.name,
                    error = %format!("{e:#}"),
                    "registered endpoint skipped: its namespace cannot be read"
                ),
            }
        }
        check_unique(all.iter().map(|(e, _)| e))?;
        Ok(all)
    }

    pub fn compile(&self) -> anyhow::Result<CompiledPolicy> {
        let endpoints: Vec<Endpoint> = self.endpoints()?.into_iter().map(|(e, _)| e).collect();
        let mut ids = state::load_identities(&self.state_dir);
        let env = Environment {
            services: self.services.clone(),
            cluster: self.cluster.clone(),
            host_addresses: crate::datapath::node_addresses(),
        };
        for note in weir_policy::unresolved_references(&self.policies, &env) {
            warn!("{note}");
        }
        let compiled = CompiledPolicy::compile_in(&self.policies, &endpoints, &env, &mut ids)?;
        if let Err(e) = state::save_identities(&self.state_dir, &ids) {
            warn!(error = %e, dir = %self.state_dir.display(), "could not save identities");
        }
        info!(
            policies = self.policies.len(),
            endpoints = endpoints.len(),
            "policy compiled"
        );
        Ok(compiled)
    }

    /// Writes the API endpoints to the state dir (atomically).
    pub fn persist(&self) -> anyhow::Result<()> {
        let path = api_endpoints_file(&self.state_dir);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.api_endpoints)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// A copy with `ep` registered; refuses a name or address already in use.
    pub fn with_added(&self, ep: ApiEndpoint) -> anyhow::Result<(Self, Endpoint)> {
        if self.file_endpoints.iter().any(|e| e.name == ep.name)
            || self.api_endpoints.iter().any(|e| e.name == ep.name)
        {
            bail!("an endpoint named `{}` already exists", ep.name);
        }
        let mut ep = ep;
        ep.read_addresses_if_missing()?;
        let resolved = ep
            .resolve()
            .with_context(|| format!("endpoint `{}`", ep.name))?;
        let mut next = self.clone();
        next.api_endpoints.push(ep);
        next.endpoints()?;
        Ok((next, resolved))
    }

    /// A copy with the API endpoint `name`'s addresses read from its namespace again.
    pub fn with_refreshed(&self, name: &str) -> anyhow::Result<Self> {
        let Some(i) = self.api_endpoints.iter().position(|e| e.name == name) else {
            if self.file_endpoints.iter().any(|e| e.name == name) {
                bail!(
                    "endpoint `{name}` comes from the endpoints file, which is re-read on reload (SIGHUP)"
                );
            }
            bail!("no endpoint named `{name}`");
        };
        let mut next = self.clone();
        let ep = &mut next.api_endpoints[i];
        if !ep.ips_from_netns {
            bail!(
                "endpoint `{name}` was registered with explicit addresses; remove it and add it again to change them"
            );
        }
        ep.ips.clear();
        ep.read_addresses_if_missing()?;
        next.endpoints()?;
        Ok(next)
    }

    /// A copy without the API endpoint `name`.
    pub fn with_removed(&self, name: &str) -> anyhow::Result<(Self, ApiEndpoint)> {
        let Some(i) = self.api_endpoints.iter().position(|e| e.name == name) else {
            if self.file_endpoints.iter().any(|e| e.name == name) {
                bail!(
                    "endpoint `{name}` comes from the endpoints file; remove it there and reload (SIGHUP)"
                );
            }
            bail!("no endpoint named `{name}`");
        };
        let mut next = self.clone();
        let removed = next.api_endpoints.remove(i);
        Ok((next, removed))
    }
}

fn load_api_endpoints(state_dir: &Path) -> anyhow::Result<Vec<ApiEndpoint>> {
    let path = api_endpoints_file(state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let mut eps: Vec<ApiEndpoint> = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading registered endpoints from {}", path.display()))?;
            // Registered by an older weir, which read addresses at every compile:
            // read them once now, and keep them.
            for ep in eps.iter_mut() {
                if let Err(e) = ep.read_addresses_if_missing() {
                    warn!(endpoint = %ep.name, error = %format!("{e:#}"), "registered endpoint has no addresses yet");
                }
            }
            Ok(eps)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Names and addresses must each belong to one endpoint only: an address in two
/// endpoints would make its identity ambiguous.
pub fn check_unique<'a>(endpoints: impl Iterator<Item = &'a Endpoint>) -> anyhow::Result<()> {
    let mut names = BTreeMap::new();
    let mut ips: BTreeMap<IpAddr, &str> = BTreeMap::new();
    for ep in endpoints {
        if names.insert(ep.name.as_str(), ()).is_some() {
            bail!("two endpoints are named `{}`", ep.name);
        }
        for ip in &ep.ips {
            if let Some(other) = ips.insert(*ip, &ep.name) {
                bail!("address {ip} belongs to both `{other}` and `{}`", ep.name);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str, ips: &[&str]) -> Endpoint {
        Endpoint {
            name: name.into(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            labels: BTreeMap::new(),
            namespace: "default".into(),
            netns: None,
            cgroup: None,
            interface: None,
            ports: BTreeMap::new(),
        }
    }

    #[test]
    fn an_address_in_two_endpoints_is_refused() {
        let a = ep("a", &["10.0.0.1"]);
        let b = ep("b", &["10.0.0.2", "10.0.0.1"]);
        let err = check_unique([&a, &b].into_iter()).unwrap_err().to_string();
        assert!(err.contains("10.0.0.1") && err.contains("`a`") && err.contains("`b`"));
        assert!(check_unique([&a, &ep("c", &["10.0.0.3"])].into_iter()).is_ok());
        assert!(check_unique([&a, &ep("a", &["10.0.0.3"])].into_iter()).is_err());
    }

    #[test]
    fn api_endpoints_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("weir-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Sources {
            policies: Vec::new(),
            file_endpoints: Vec::new(),
            services: Vec::new(),
            api_endpoints: Vec::new(),
            cluster: ClusterConfig::default(),
            state_dir: dir.clone(),
        };
        s.api_endpoints.push(ApiEndpoint {
            name: "xwing".into(),
            netns: "weir-test-xwing".into(),
            labels: [("class".to_string(), "xwing".to_string())].into(),
            namespace: "default".into(),
            ips: vec!["10.1.0.2".parse().unwrap()],
            ips_from_netns: false,
        });
        s.persist().unwrap();
        assert_eq!(load_api_endpoints(&dir).unwrap(), s.api_endpoints);
        let (without, removed) = s.with_removed("xwing").unwrap();
        assert_eq!(removed.name, "xwing");
        assert!(without.api_endpoints.is_empty());
        assert!(s.with_removed("nope").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
