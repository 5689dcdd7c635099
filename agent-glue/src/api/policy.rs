//! `Policy.Apply/Get/Delete/List` and `weir policy apply|get|delete|list`:
//! policies kept by weir itself (in the state dir) beside the `--policy` files.
//! The control thread parses and installs them, the way SIGHUP does.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use weir_policy::model::PolicyKind;
use weir_policy::{LoadErrors, Policy, PolicyError};

use super::client::{connect_channel, status_error};
use super::pb;
use crate::registry::{ApiPolicy, Sources, StoredPolicy};

/// The YAML documents of `text`, each with the 1-based line it starts on. A
/// document ends at a `---` line (a document start marker); a marker with
/// content after it (`--- {apiVersion: ...}`) starts its document on that line.
pub fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs: Vec<(usize, String)> = Vec::new();
    let mut current = (1, String::new());
    for (i, line) in text.lines().enumerate() {
        let marker = line
            .strip_prefix("---")
            .filter(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace));
        match marker {
            Some(rest) => {
                let done = std::mem::replace(&mut current, (i + 1, String::new()));
                if !done.1.trim().is_empty() {
                    docs.push(done);
                }
                let rest = rest.trim();
                if rest.is_empty() || rest.starts_with('#') {
                    current.0 = i + 2;
                } else {
                    current.1.push_str(rest);
                    current.1.push('\n');
                }
            }
            None => {
                current.1.push_str(line);
                current.1.push('\n');
            }
        }
    }
    if !current.1.trim().is_empty() {
        docs.push(current);
    }
    docs
}

/// The document of `text` that holds `line` (where a policy's name is).
fn document_at(text: &str, line: usize) -> Option<String> {
    split_documents(text)
        .into_iter()
        .rev()
        .find(|(start, _)| *start <= line)
        .map(|(_, doc)| doc)
}

/// Parses `weir policy apply`'s documents (`(file, text)`) into the policies to
/// keep, each with its own document. Every error of every file is reported
/// with its `FILE:LINE:COL`; a name given twice is one of them.
pub fn parse_applied(documents: &[(String, String)]) -> Result<Vec<ApiPolicy>, LoadErrors> {
    let mut errors = Vec::new();
    let mut out: Vec<ApiPolicy> = Vec::new();
    for (file, text) in documents {
        let policies = match weir_policy::parse_policies(text, file) {
            Ok(p) => p,
            Err(LoadErrors(mut e)) => {
                errors.append(&mut e);
                continue;
            }
        };
        for p in policies {
            let name = p.qualified_name();
            let at = |message: String| PolicyError {
                file: file.clone(),
                line: p.pos.line,
                col: p.pos.col,
                message,
            };
            if out.iter().any(|a| a.stored.name == name) {
                errors.push(at(format!("policy `{name}` is given twice")));
                continue;
            }
            let Some(yaml) = document_at(text, p.pos.line) else {
                errors.push(at(format!("cannot find the document of policy `{name}`")));
                continue;
            };
            // Parsed again from its own document: what a restart will read.
            match ApiPolicy::parse(StoredPolicy { name, yaml }) {
                Ok(a) => out.push(a),
                Err(LoadErrors(e)) => errors.extend(e.into_iter().map(|e| at(e.message))),
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(LoadErrors(errors))
    }
}

fn kind_name(k: PolicyKind) -> &'static str {
    match k {
        PolicyKind::Namespaced => "CiliumNetworkPolicy",
        PolicyKind::Clusterwide => "CiliumClusterwideNetworkPolicy",
    }
}

fn info(p: &Policy, source: String, yaml: Option<String>) -> pb::PolicyInfo {
    pb::PolicyInfo {
        name: p.qualified_name(),
        kind: kind_name(p.kind).into(),
        source,
        rules: u32::try_from(p.rules.len()).unwrap_or(u32::MAX),
        yaml: yaml.unwrap_or_default(),
    }
}

/// The policies in force (files first, then the API's), or the one named;
/// with their documents when `with_yaml` (a file's is read again from disk).
pub fn infos(sources: &Sources, name: Option<&str>, with_yaml: bool) -> Vec<pb::PolicyInfo> {
    let wanted = |p: &Policy| name.is_none_or(|n| p.qualified_name() == n);
    let files = sources.policies.iter().filter(|p| wanted(p)).map(|p| {
        let yaml = with_yaml
            .then(|| std::fs::read_to_string(&p.file).ok())
            .flatten()
            .and_then(|text| document_at(&text, p.pos.line));
        info(p, format!("{}:{}:{}", p.file, p.pos.line, p.pos.col), yaml)
    });
    let api = sources
        .api_policies
        .iter()
        .filter(|a| wanted(&a.policy))
        .map(|a| {
            info(
                &a.policy,
                "api".into(),
                with_yaml.then(|| a.stored.yaml.clone()),
            )
        });
    files.chain(api).collect()
}

/// A YAML document as JSON: unquoted scalars that read as numbers, booleans or
/// null become those, everything else a string.
pub fn yaml_to_json(text: &str) -> Option<Value> {
    use weir_policy::yaml::Value as Y;
    fn conv(n: &weir_policy::yaml::Node) -> Value {
        match &n.value {
            Y::Null => Value::Null,
            Y::Scalar { text, quoted: true } => json!(text),
            Y::Scalar {
                text,
                quoted: false,
            } => match text.as_str() {
                "true" => json!(true),
                "false" => json!(false),
                "null" | "~" => Value::Null,
                t => t
                    .parse::<i64>()
                    .map(Value::from)
                    .ok()
                    .or_else(|| {
                        t.parse::<f64>()
                            .ok()
                            .filter(|f| f.is_finite())
                            .map(Value::from)
                    })
                    .unwrap_or_else(|| json!(t)),
            },
            Y::Seq(items) => Value::Array(items.iter().map(conv).collect()),
            Y::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| {
                        let key = match &k.value {
                            Y::Scalar { text, .. } => text.clone(),
                            _ => conv(k).to_string(),
                        };
                        (key, conv(v))
                    })
                    .collect(),
            ),
        }
    }
    let docs = weir_policy::yaml::parse_documents(text).ok()?;
    docs.first().map(conv)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GetOutput {
    /// The YAML documents, `---` between them.
    Yaml,
    /// A JSON array: name, kind, source, rules, and the policy itself.
    Json,
}

#[derive(Debug, Args)]
pub struct ApiPolicyArgs {
    /// The running weir's API socket (its --api-socket).
    #[arg(long, default_value = "/run/weir/weir.sock")]
    pub api_socket: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ApiPolicyCommand {
    /// Add or replace policies in the running weir (kept in its state dir, so
    /// they survive a restart); compiled and installed like a SIGHUP reload,
    /// all or nothing.
    Apply {
        /// Policy files or directories (every *.yaml / *.yml in them).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        api: ApiPolicyArgs,
    },
    /// Print the policies in force, or the one named.
    Get {
        /// `namespace/name`, or `name` for a clusterwide policy.
        name: Option<String>,
        #[arg(long, short = 'o', value_enum, default_value = "yaml")]
        output: GetOutput,
        #[command(flatten)]
        api: ApiPolicyArgs,
    },
    /// Remove a policy applied with `weir policy apply`.
    Delete {
        name: String,
        #[command(flatten)]
        api: ApiPolicyArgs,
    },
    /// Every policy in force: NAME KIND SOURCE RULES.
    List {
        #[command(flatten)]
        api: ApiPolicyArgs,
    },
}

pub fn main(cmd: ApiPolicyCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cmd))
}

async fn client(
    api: &ApiPolicyArgs,
) -> anyhow::Result<pb::policy_client::PolicyClient<tonic::transport::Channel>> {
    Ok(pb::policy_client::PolicyClient::new(
        connect_channel(&api.api_socket).await?,
    ))
}

/// Every policy file under `paths`, read (a directory: its *.yaml / *.yml).
fn read_documents(paths: &[PathBuf]) -> anyhow::Result<Vec<pb::PolicyDocument>> {
    let mut docs = Vec::new();
    for path in paths {
        let files = weir_policy::policy_files(path)
            .with_context(|| format!("reading {}", path.display()))?;
        for file in files {
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            docs.push(pb::PolicyDocument {
                file: absolute(&file).display().to_string(),
                yaml,
            });
        }
    }
    if docs.is_empty() {
        anyhow::bail!("no policy files (*.yaml, *.yml) in the paths given");
    }
    Ok(docs)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

async fn run(cmd: ApiPolicyCommand) -> anyhow::Result<()> {
    match cmd {
        ApiPolicyCommand::Apply { files, api } => {
            let documents = read_documents(&files)?;
            let r = client(&api)
                .await?
                .apply(pb::ApplyPolicyRequest { documents })
                .await
                .map_err(status_error)?
                .into_inner();
            for name in &r.names {
                println!("applied policy {name}");
            }
            println!("policy revision {}", r.revision);
        }
        ApiPolicyCommand::Get { name, output, api } => {
            let policies = client(&api)
                .await?
                .get(pb::GetPolicyRequest {
                    name: name.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .policies;
            match output {
                GetOutput::Yaml => {
                    for (i, p) in policies.iter().enumerate() {
                        if i > 0 {
                            println!("---");
                        }
                        println!("# {} ({}, from {})", p.name, p.kind, p.source);
                        print!("{}", p.yaml);
                        if !p.yaml.ends_with('\n') {
                            println!();
                        }
                    }
                }
                GetOutput::Json => {
                    let v: Vec<Value> = policies
                        .iter()
                        .map(|p| {
                            json!({
                                "name": p.name,
                                "kind": p.kind,
                                "source": p.source,
                                "rules": p.rules,
                                "policy": yaml_to_json(&p.yaml),
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
            }
        }
        ApiPolicyCommand::Delete { name, api } => {
            let r = client(&api)
                .await?
                .delete(pb::DeletePolicyRequest { name: name.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("deleted policy {name}");
            println!("policy revision {}", r.revision);
        }
        ApiPolicyCommand::List { api } => {
            let policies = client(&api)
                .await?
                .list(pb::ListPoliciesRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .policies;
            print!("{}", list_table(&policies));
        }
    }
    Ok(())
}

/// `NAME KIND SOURCE RULES`, aligned.
pub fn list_table(policies: &[pb::PolicyInfo]) -> String {
    let rows: Vec<[String; 4]> = std::iter::once([
        "NAME".to_string(),
        "KIND".into(),
        "SOURCE".into(),
        "RULES".into(),
    ])
    .chain(policies.iter().map(|p| {
        [
            p.name.clone(),
            p.kind.clone(),
            p.source.clone(),
            p.rules.to_string(),
        ]
    }))
    .collect();
    let w = |i: usize| rows.iter().map(|r| r[i].len()).max().unwrap_or(0);
    let (a, b, c) = (w(0), w(1), w(2));
    rows.iter()
        .map(|r| format!("{:<a$}  {:<b$}  {:<c$}  {}\n", r[0], r[1], r[2], r[3]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "# two policies\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: b}}]\n---\napiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: b\nspec:\n  endpointSelector: {matchLabels: {app: b}}\n  ingress:\n  - toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n";

    #[test]
    fn documents_split_at_markers_and_keep_their_lines() {
        let docs = split_documents(TWO);
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].0, 1);
        assert_eq!(docs[1].0, 10);
        assert!(docs[1].1.starts_with("apiVersion"));
        assert_eq!(
            split_documents("---\na: 1\n--- # c\n\n---\nb: 2\n").len(),
            2
        );
        let inline = split_documents("--- {a: 1}\n");
        assert_eq!(inline, [(1, "{a: 1}\n".to_string())]);
        assert_eq!(split_documents("----\n").len(), 1, "not a marker");
    }

    #[test]
    fn applied_files_become_one_stored_document_per_policy() {
        let got = parse_applied(&[("/p/two.yaml".into(), TWO.into())]).unwrap();
        let names: Vec<&str> = got.iter().map(|a| a.stored.name.as_str()).collect();
        assert_eq!(names, ["a", "b"], "unqualified as written");
        assert!(got[1].stored.yaml.starts_with("apiVersion"));
        assert!(!got[0].stored.yaml.contains("name: b"));
        assert_eq!(got[0].policy.file, "api:a");
        // Errors carry the caller's file, line and column.
        let bad = TWO.replace("ingress:\n  - toPorts", "ingres:\n  - toPorts");
        let e = parse_applied(&[("/p/two.yaml".into(), bad)]).unwrap_err();
        assert_eq!(e.0[0].file, "/p/two.yaml");
        assert_eq!(e.0[0].line, 16, "{e}");
        let twice = parse_applied(&[
            ("/x.yaml".into(), TWO.into()),
            ("/y.yaml".into(), TWO.into()),
        ])
        .unwrap_err();
        assert!(
            twice
                .0
                .iter()
                .all(|e| e.file == "/y.yaml" && e.message.contains("given twice")),
            "{twice}"
        );
    }

    #[test]
    fn json_output_types_scalars_like_yaml() {
        let v = yaml_to_json("a: 1\nb: '80'\nc: true\nd: [x, 2.5]\ne: ~\n").unwrap();
        assert_eq!(
            v,
            json!({"a": 1, "b": "80", "c": true, "d": ["x", 2.5], "e": null})
        );
        let t = list_table(&[pb::PolicyInfo {
            name: "a".into(),
            kind: "CiliumNetworkPolicy".into(),
            source: "api".into(),
            rules: 1,
            yaml: String::new(),
        }]);
        assert_eq!(
            t,
            "NAME  KIND                 SOURCE  RULES\na     CiliumNetworkPolicy  api     1\n"
        );
    }
}
