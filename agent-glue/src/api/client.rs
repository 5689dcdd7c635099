//! `weir endpoint add|list|remove`: a client of the running weir's API socket.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use hyper_util::rt::TokioIo;
use tonic::transport::Channel;

use super::pb;
use super::pb::endpoints_client::EndpointsClient;

#[derive(Debug, Args)]
pub struct EndpointArgs {
    /// The running weir's API socket (its --api-socket).
    #[arg(long, global = true, default_value = "/run/weir/weir.sock")]
    pub api_socket: PathBuf,
    #[command(subcommand)]
    pub command: EndpointCommand,
}

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Register a workload by its network namespace: weir reads its addresses,
    /// attaches to its host interface and enforces policy on it from now on (and
    /// after a restart).
    Add {
        /// A name under /run/netns, or a path to a namespace file.
        #[arg(long)]
        netns: String,
        /// Labels, `k=v,k2=v2` (repeatable).
        #[arg(long, value_delimiter = ',', value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Endpoint name (default: the namespace's name).
        #[arg(long)]
        name: Option<String>,
        /// Use these addresses instead of every global address in the namespace.
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
        /// Its Kubernetes namespace (the label `k8s:io.kubernetes.pod.namespace`,
        /// which `--labels` may give instead; namespaced policies of other
        /// namespaces neither select nor admit it). Default: `default`.
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Every endpoint the running weir enforces: one line each, or JSON.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Unregister an endpoint added with `weir endpoint add`.
    Remove { name: String },
    /// Read an endpoint's addresses from its namespace again (weir reads them at
    /// `add` and otherwise never, so a workload cannot change its own identity).
    Refresh { name: String },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not a label (want key=value)")),
    }
}

pub fn main(args: EndpointArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn connect(path: &Path) -> anyhow::Result<EndpointsClient<Channel>> {
    Ok(EndpointsClient::new(connect_channel(path).await?))
}

pub(crate) async fn connect_channel(path: &Path) -> anyhow::Result<Channel> {
    let socket = path.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::from_static("http://weir.local")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|e| {
            // The transport error repeats its cause; the innermost one says it all.
            let mut cause: &dyn std::error::Error = &e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            anyhow::anyhow!(
                "cannot reach weir's API at {}: {cause} (is `weir run` running with this --api-socket?)",
                path.display()
            )
        })?;
    Ok(channel)
}

pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        // Says so plainly: the message alone could read like a policy refusal.
        tonic::Code::PermissionDenied => anyhow::anyhow!("permission denied: {}", s.message()),
        _ => anyhow::anyhow!("{}", s.message()),
    }
}

async fn run(args: EndpointArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.api_socket).await?;
    match args.command {
        EndpointCommand::Add {
            netns,
            labels,
            name,
            ips,
            namespace,
        } => {
            let ep = client
                .add(pb::AddEndpointRequest {
                    name: name.unwrap_or_default(),
                    netns,
                    labels: labels.into_iter().collect(),
                    ips: ips.iter().map(ToString::to_string).collect(),
                    namespace: namespace.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "added endpoint {} (identity {}, {})",
                ep.name,
                ep.identity,
                ep.ips.join(" ")
            );
        }
        EndpointCommand::List { json } => {
            let mut eps = client
                .list(pb::ListEndpointsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .endpoints;
            eps.sort_by(|a, b| a.name.cmp(&b.name));
            if json {
                let v: Vec<_> = eps.iter().map(endpoint_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", table(&eps));
            }
        }
        EndpointCommand::Remove { name } => {
            let ep = client
                .remove(pb::RemoveEndpointRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("removed endpoint {}", ep.name);
        }
        EndpointCommand::Refresh { name } => {
            let ep = client
                .refresh(pb::RefreshEndpointRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("endpoint {}: {}", ep.name, ep.ips.join(", "));
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct FqdnArgs {
    /// The running weir's API socket (its --api-socket).
    #[arg(long, global = true, default_value = "/run/weir/weir.sock")]
    pub api_socket: PathBuf,
    #[command(subcommand)]
    pub command: FqdnCommand,
}

#[derive(Debug, Subcommand)]
pub enum FqdnCommand {
    /// Every name learned from allowed DNS answers: its addresses, each with its
    /// identity, the time left on its TTL (or that a live connection keeps it)
    /// and the toFQDNs selectors using it.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub fn fqdn_main(args: FqdnArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let channel = connect_channel(&args.api_socket).await?;
        let mut client = pb::fqdn_client::FqdnClient::new(channel);
        match args.command {
            FqdnCommand::List { json } => {
                let names = client
                    .list(pb::ListFqdnRequest {})
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .names;
                if json {
                    let v: Vec<_> = names.iter().map(fqdn_json).collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print!("{}", fqdn_table(&names));
                }
            }
        }
        Ok(())
    })
}

fn fqdn_expiry(a: &pb::FqdnAddress) -> String {
    if a.kept {
        "kept: connection alive".into()
    } else {
        format!("{}s", a.expires_in_secs)
    }
}

fn fqdn_json(n: &pb::FqdnName) -> serde_json::Value {
    serde_json::json!({
        "name": n.name,
        "selectors": n.selectors,
        "addresses": n.addresses.iter().map(|a| serde_json::json!({
            "ip": a.ip,
            "identity": a.identity,
            "expires_in_secs": a.expires_in_secs,
            "kept": a.kept,
            "selectors": a.selectors,
        })).collect::<Vec<_>>(),
    })
}

/// `NAME IP IDENTITY EXPIRES SELECTORS`, one line per address.
fn fqdn_table(names: &[pb::FqdnName]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "IP".into(),
        "IDENTITY".into(),
        "EXPIRES".into(),
        "SELECTORS".into(),
    ]];
    for n in names {
        for a in &n.addresses {
            rows.push([
                n.name.clone(),
                a.ip.clone(),
                if a.identity == 0 {
                    "-".into()
                } else {
                    a.identity.to_string()
                },
                fqdn_expiry(a),
                if a.selectors.is_empty() {
                    "-".into()
                } else {
                    a.selectors.join("; ")
                },
            ]);
        }
    }
    let mut widths = [0usize; 5];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn labels_text(labels: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    let parts: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

fn endpoint_json(ep: &pb::Endpoint) -> serde_json::Value {
    let labels: BTreeMap<_, _> = ep.labels.iter().collect();
    serde_json::json!({
        "name": ep.name,
        "namespace": ep.namespace,
        "identity": ep.identity,
        "source": ep.source,
        "ips": ep.ips,
        "labels": labels,
        "netns": ep.netns,
        "interfaces": ep.interfaces,
    })
}

/// `NAME NAMESPACE IDENTITY SOURCE IPS LABELS INTERFACES`, aligned.
fn table(eps: &[pb::Endpoint]) -> String {
    let or_dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
    let mut rows = vec![[
        "NAME".to_string(),
        "NAMESPACE".into(),
        "IDENTITY".into(),
        "SOURCE".into(),
        "IPS".into(),
        "LABELS".into(),
        "INTERFACES".into(),
    ]];
    for ep in eps {
        rows.push([
            ep.name.clone(),
            or_dash(ep.namespace.clone()),
            ep.identity.to_string(),
            ep.source.clone(),
            or_dash(ep.ips.join(",")),
            labels_text(&ep.labels),
            or_dash(ep.interfaces.join(",")),
        ]);
    }
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fqdn_list_shows_one_line_per_address() {
        let n = pb::FqdnName {
            name: "api.example.com.".into(),
            selectors: vec!["matchName: api.example.com.".into()],
            addresses: vec![
                pb::FqdnAddress {
                    ip: "203.0.113.7".into(),
                    identity: 16842,
                    expires_in_secs: 27,
                    kept: false,
                    selectors: vec!["matchName: api.example.com.".into()],
                },
                pb::FqdnAddress {
                    ip: "2001:db8::7".into(),
                    identity: 0,
                    expires_in_secs: 0,
                    kept: true,
                    selectors: vec![],
                },
            ],
        };
        let t = fqdn_table(std::slice::from_ref(&n));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert_eq!(lines[0].find("EXPIRES"), lines[1].find("27s"));
        assert!(lines[1].ends_with("matchName: api.example.com."), "{t}");
        assert!(lines[2].contains("kept: connection alive"), "{t}");
        assert!(lines[2].ends_with('-'), "{t}");
        assert_eq!(fqdn_json(&n)["addresses"][1]["kept"], true);
    }

    #[test]
    fn labels_parse_and_tables_align() {
        assert_eq!(parse_label("a=b").unwrap(), ("a".into(), "b".into()));
        assert_eq!(parse_label("a=").unwrap(), ("a".into(), "".into()));
        assert!(parse_label("=b").is_err());
        assert!(parse_label("ab").is_err());
        let ep = pb::Endpoint {
            name: "xwing".into(),
            ips: vec!["10.0.0.2".into()],
            labels: [("class".to_string(), "xwing".to_string())].into(),
            netns: "x".into(),
            identity: 4242,
            source: "api".into(),
            interfaces: vec![],
            namespace: "prod".into(),
        };
        let t = table(&[ep]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].starts_with("xwing"));
        assert_eq!(lines[0].find("NAMESPACE"), lines[1].find("prod"));
        assert!(lines[1].ends_with("class=xwing  -"), "{t}");
        assert_eq!(lines[0].find("IDENTITY"), lines[1].find("4242"));
    }
}
