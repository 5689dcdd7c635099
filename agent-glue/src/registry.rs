//! What weir compiles from: the policies and endpoints files (re-read on SIGHUP)
//! and the endpoints registered and policies applied through the local API (kept
//! in the state dir, so a restarted weir still enforces them).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use weir_policy::model::ClusterConfig;
use weir_policy::{
    CompiledPolicy, Endpoint, Environment, LoadErrors, Policy, PolicyError, Service,
};

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

/// A policy applied with `weir policy apply`, as kept in the state dir: its
/// YAML document exactly as given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPolicy {
    /// `namespace/name`, or `name` for a clusterwide policy.
    pub name: String,
    pub yaml: String,
}

/// An applied policy with its parsed form (errors in it name `api:NAME`).
#[derive(Debug, Clone)]
pub struct ApiPolicy {
    pub stored: StoredPolicy,
    pub policy: Policy,
}

impl ApiPolicy {
    /// Parses a stored document: it must be exactly one policy of its name.
    pub fn parse(stored: StoredPolicy) -> Result<Self, LoadErrors> {
        let file = format!("api:{}", stored.name);
        let mut parsed = weir_policy::parse_policies(&stored.yaml, &file)?;
        match (parsed.pop(), parsed.is_empty()) {
            (Some(policy), true) if policy.qualified_name() == stored.name => {
                Ok(ApiPolicy { stored, policy })
            }
            _ => Err(LoadErrors(vec![PolicyError {
                file,
                line: 1,
                col: 1,
                message: format!(
                    "the document is not exactly one policy named `{}`",
                    stored.name
                ),
            }])),
        }
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
    /// Policies applied through the API (`<state-dir>/api-policies.json`).
    pub api_policies: Vec<ApiPolicy>,
    /// The cluster's ranges (`--cluster-cidr`, ...), fixed for the run.
    pub cluster: ClusterConfig,
    state_dir: PathBuf,
}

fn api_endpoints_file(state_dir: &Path) -> PathBuf {
    state_dir.join("api-endpoints.json")
}

fn api_policies_file(state_dir: &Path) -> PathBuf {
    state_dir.join("api-policies.json")
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
            api_policies: load_api_policies(state_dir)?,
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

    /// The policies in force: the files', then the API's. A name in both is an
    /// error at the file's position (so a reload that brings one in is refused
    /// and the running policy kept).
    pub fn all_policies(&self) -> anyhow::Result<Vec<Policy>> {
        let errors: Vec<PolicyError> = self
            .policies
            .iter()
            .filter(|p| {
                let name = p.qualified_name();
                self.api_policies.iter().any(|a| a.stored.name == name)
            })
            .map(|p| PolicyError {
                file: p.file.clone(),
                line: p.pos.line,
                col: p.pos.col,
                message: format!(
                    "policy `{0}` is both in this file and applied through the API: keep one (remove it here, or `weir policy delete {0}`)",
                    p.qualified_name()
                ),
            })
            .collect();
        if !errors.is_empty() {
            return Err(anyhow::Error::new(LoadErrors(errors)).context("conflicting policies"));
        }
        Ok(self
            .policies
            .iter()
            .cloned()
            .chain(self.api_policies.iter().map(|a| a.policy.clone()))
            .collect())
    }

    pub fn compile(&self) -> anyhow::Result<CompiledPolicy> {
        let policies = self.all_policies()?;
        let endpoints: Vec<Endpoint> = self.endpoints()?.into_iter().map(|(e, _)| e).collect();
        let mut ids = state::load_identities(&self.state_dir);
        let env = Environment {
            services: self.services.clone(),
            cluster: self.cluster.clone(),
            host_addresses: crate::datapath::node_addresses(),
        };
        for note in weir_policy::unresolved_references(&policies, &env) {
            warn!("{note}");
        }
        let compiled = CompiledPolicy::compile_in(&policies, &endpoints, &env, &mut ids)?;
        if let Err(e) = state::save_identities(&self.state_dir, &ids) {
            warn!(error = %e, dir = %self.state_dir.display(), "could not save identities");
        }
        info!(
            policies = policies.len(),
            endpoints = endpoints.len(),
            "policy compiled"
        );
        Ok(compiled)
    }

    /// Writes the API endpoints and policies to the state dir (each file
    /// atomically).
    pub fn persist(&self) -> anyhow::Result<()> {
        write_atomically(
            &api_endpoints_file(&self.state_dir),
            &serde_json::to_vec_pretty(&self.api_endpoints)?,
        )?;
        let stored: Vec<&StoredPolicy> = self.api_policies.iter().map(|a| &a.stored).collect();
        write_atomically(
            &api_policies_file(&self.state_dir),
            &serde_json::to_vec_pretty(&stored)?,
        )
    }

    /// A copy with `applied` added, each replacing an API policy of its name;
    /// refuses a name a --policy file has.
    pub fn with_applied(&self, applied: Vec<ApiPolicy>) -> anyhow::Result<Self> {
        let mut next = self.clone();
        for a in applied {
            match next
                .api_policies
                .iter_mut()
                .find(|p| p.stored.name == a.stored.name)
            {
                Some(old) => *old = a,
                None => next.api_policies.push(a),
            }
        }
        next.all_policies()?;
        Ok(next)
    }

    /// A copy without the API policy `name`.
    pub fn with_deleted(&self, name: &str) -> anyhow::Result<Self> {
        let Some(i) = self.api_policies.iter().position(|p| p.stored.name == name) else {
            if let Some(p) = self.policies.iter().find(|p| p.qualified_name() == name) {
                bail!(
                    "policy `{name}` comes from {}:{}; remove it there and reload (SIGHUP)",
                    p.file,
                    p.pos.line
                );
            }
            bail!("no policy named `{name}` was applied through the API");
        };
        let mut next = self.clone();
        next.api_policies.remove(i);
        Ok(next)
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

/// Where a policy is compiled from, on disk: the `--policy` files and
/// directories, the `--endpoints` file and the API's files in the state dir.
#[derive(Debug, Clone)]
pub struct SourceFiles {
    pub policy: Vec<PathBuf>,
    pub endpoints: Option<PathBuf>,
    pub state_dir: PathBuf,
}

/// Digests of what the sources held (see [`SourceFiles::digest`]): equal
/// digests from one process mean the same bytes, so the same policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcesDigest {
    /// The policy files (each policy directory's `*.yaml` / `*.yml`, as a
    /// reload reads them) and the endpoints file.
    pub files: u64,
    /// The API's policies and endpoints in the state dir.
    pub api: u64,
}

impl SourceFiles {
    /// What the files hold now (a file that cannot be read counts as its
    /// error). Blocking (file reads).
    pub fn digest(&self) -> SourcesDigest {
        SourcesDigest {
            files: self.files_digest(),
            api: self.api_digest(),
        }
    }

    pub fn files_digest(&self) -> u64 {
        let mut paths = Vec::new();
        for path in &self.policy {
            match weir_policy::policy_files(path) {
                Ok(files) => paths.extend(files),
                Err(_) => paths.push(path.clone()),
            }
        }
        paths.extend(self.endpoints.iter().cloned());
        digest_of(&paths)
    }

    pub fn api_digest(&self) -> u64 {
        digest_of(&[
            api_endpoints_file(&self.state_dir),
            api_policies_file(&self.state_dir),
        ])
    }
}

fn digest_of(paths: &[PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for path in paths {
        path.hash(&mut h);
        match std::fs::read(path) {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => e.kind().hash(&mut h),
        }
    }
    h.finish()
}

/// The digests of what this weir's policy was compiled from, kept as it
/// reads its sources: the files' taken *before* a load or reload reads them
/// (a change racing the read then counts as a change), the API's files' after
/// a command wrote them. A weir that has handed over compares them with the
/// files now ([`LoadedDigest::stale`]).
#[derive(Debug, Clone)]
pub struct LoadedDigest(std::sync::Arc<std::sync::Mutex<SourcesDigest>>);

impl LoadedDigest {
    pub fn new(at_load: SourcesDigest) -> Self {
        LoadedDigest(std::sync::Arc::new(std::sync::Mutex::new(at_load)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SourcesDigest> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self) -> SourcesDigest {
        *self.lock()
    }

    pub fn set(&self, d: SourcesDigest) {
        *self.lock() = d;
    }

    pub fn set_files(&self, files: u64) {
        self.lock().files = files;
    }

    pub fn set_api(&self, api: u64) {
        self.lock().api = api;
    }

    /// Whether `now` (the sources as they are) differs from what was loaded.
    pub fn stale(&self, now: SourcesDigest) -> bool {
        self.get() != now
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The policies applied through the API by an earlier run (none without the
/// file). One that no longer parses (a newer weir's field) stops the start
/// with its error rather than enforcing less than was applied.
fn load_api_policies(state_dir: &Path) -> anyhow::Result<Vec<ApiPolicy>> {
    let path = api_policies_file(state_dir);
    let stored: Vec<StoredPolicy> = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("reading applied policies from {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    stored
        .into_iter()
        .map(|s| {
            ApiPolicy::parse(s).map_err(|e| {
                anyhow::Error::new(e).context(format!(
                    "invalid policy applied through the API (in {})",
                    path.display()
                ))
            })
        })
        .collect()
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

    /// The digests a drain compares change with what a reload (or the API)
    /// would read, and only with that.
    #[test]
    fn the_sources_digest_follows_what_a_reload_reads() {
        let dir = std::env::temp_dir().join(format!("weir-digest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (policies, state) = (dir.join("policies"), dir.join("state"));
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(policies.join("a.yaml"), "a: 1\n").unwrap();
        let endpoints = dir.join("endpoints.yaml");
        std::fs::write(&endpoints, "endpoints: []\n").unwrap();
        let files = SourceFiles {
            policy: vec![policies.clone()],
            endpoints: Some(endpoints.clone()),
            state_dir: state.clone(),
        };
        let loaded = LoadedDigest::new(files.digest());
        // Rewritten with the same bytes, or a file a reload does not read.
        std::fs::write(policies.join("a.yaml"), "a: 1\n").unwrap();
        std::fs::write(policies.join("notes.txt"), "x").unwrap();
        assert!(!loaded.stale(files.digest()));
        let mut seen = vec![files.digest()];
        let mut changed = |what: &str, api: bool| {
            let d = files.digest();
            assert!(loaded.stale(d), "{what}: not stale");
            assert!(!seen.contains(&d), "{what}: the digest did not change");
            let before = *seen.last().unwrap();
            assert_eq!(
                (d.files != before.files, d.api != before.api),
                (!api, api),
                "{what}"
            );
            seen.push(d);
        };
        std::fs::write(policies.join("a.yaml"), "a: 2\n").unwrap();
        changed("a policy file edited", false);
        std::fs::write(policies.join("b.yml"), "b: 1\n").unwrap();
        changed("a policy file added", false);
        std::fs::write(&endpoints, "endpoints: [x]\n").unwrap();
        changed("the endpoints file edited", false);
        std::fs::write(api_policies_file(&state), "[]").unwrap();
        changed("a policy applied through the API", true);
        std::fs::write(api_endpoints_file(&state), "[]").unwrap();
        changed("an endpoint registered through the API", true);
        std::fs::remove_file(policies.join("b.yml")).unwrap();
        changed("a policy file removed", false);
        // What a reload and an API command record makes it current again.
        loaded.set_files(files.files_digest());
        assert!(loaded.stale(files.digest()));
        loaded.set_api(files.api_digest());
        assert!(!loaded.stale(files.digest()));
        let _ = std::fs::remove_dir_all(&dir);
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
            api_policies: Vec::new(),
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

    const P: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: NAME}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: b}}]\n";

    fn stored(name: &str) -> StoredPolicy {
        StoredPolicy {
            name: name.into(),
            yaml: P.replace("NAME", name),
        }
    }

    #[test]
    fn api_policies_are_kept_replaced_deleted_and_never_shadow_a_file_policy() {
        let dir = std::env::temp_dir().join(format!("weir-registry-pol-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file_policies =
            weir_policy::parse_policies(&P.replace("NAME", "fromfile"), "/etc/p.yaml").unwrap();
        let s = Sources {
            policies: file_policies,
            file_endpoints: Vec::new(),
            services: Vec::new(),
            api_endpoints: Vec::new(),
            api_policies: Vec::new(),
            cluster: ClusterConfig::default(),
            state_dir: dir.clone(),
        };
        let one = ApiPolicy::parse(stored("one")).unwrap();
        assert_eq!(one.policy.file, "api:one");
        let s = s.with_applied(vec![one]).unwrap();
        assert_eq!(s.all_policies().unwrap().len(), 2);
        // Applying the same name again replaces it.
        let mut again = stored("one");
        again.yaml = again.yaml.replace("app: b", "app: c");
        let s = s
            .with_applied(vec![ApiPolicy::parse(again.clone()).unwrap()])
            .unwrap();
        assert_eq!(s.api_policies.len(), 1);
        s.persist().unwrap();
        let loaded = load_api_policies(&dir).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].stored, again, "survives a restart as applied");
        // A file policy's name cannot be applied; the error points at the file.
        let clash = s
            .with_applied(vec![ApiPolicy::parse(stored("fromfile")).unwrap()])
            .err()
            .expect("refused");
        let le = clash.downcast_ref::<LoadErrors>().unwrap();
        assert_eq!(le.0[0].file, "/etc/p.yaml");
        assert_eq!(le.0[0].line, 3);
        assert!(le.0[0].message.contains("applied through the API"));
        // A stored document must be the policy it is named for.
        assert!(
            ApiPolicy::parse(StoredPolicy {
                name: "two".into(),
                yaml: P.replace("NAME", "one")
            })
            .is_err()
        );
        assert!(
            s.with_deleted("fromfile")
                .err()
                .expect("refused")
                .to_string()
                .contains("/etc/p.yaml:3")
        );
        assert!(s.with_deleted("nope").is_err());
        let s = s.with_deleted("one").unwrap();
        assert!(s.api_policies.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
