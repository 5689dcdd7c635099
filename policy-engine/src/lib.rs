//! weir's policy engine: CiliumNetworkPolicy YAML in, an immutable indexed decision
//! structure out, and verdicts that name the rule that decided them. Pure logic,
//! no I/O beyond reading the files it is pointed at.

mod compile;
mod decode;
pub mod dns_match;
pub mod endpoints;
mod error;
pub mod flow;
pub mod http_match;
pub mod identity;
pub mod kafka_match;
pub mod labels;
pub mod model;
pub mod yaml;

use std::path::{Path, PathBuf};

pub use compile::{
    CidrIdentity, CidrKind, CompileError, CompiledEndpoint, CompiledPolicy, ConnectionVerdict,
    DirDecision, Direction, Environment, FqdnSelectorId, L4Rule, LearnedIdentity, PeerInfo,
    RuleRef, Verdict, canonical_ip, fqdn_rules_without_dns, unresolved_references,
};
pub use endpoints::{Endpoint, EndpointsFile, Service, parse_endpoints, parse_endpoints_file};
pub use error::{LoadErrors, PolicyError};
pub use model::{Policy, Protocol};

use error::Diagnostics;

/// Parses every policy document in `text`; `file` names it in errors.
pub fn parse_policies(text: &str, file: &str) -> Result<Vec<Policy>, LoadErrors> {
    let mut d = Diagnostics::new(file);
    let docs = match yaml::parse_documents(text) {
        Ok(docs) => docs,
        Err(e) => {
            d.error(e.pos, e.message);
            return Err(LoadErrors(d.errors));
        }
    };
    let mut out = Vec::new();
    for doc in &docs {
        if let Some(p) = decode::policy(doc, file, &mut d) {
            out.push(p);
        }
    }
    check_unique_names(&out, &mut d);
    if d.errors.is_empty() {
        Ok(out)
    } else {
        Err(LoadErrors(d.errors))
    }
}

fn check_unique_names(policies: &[Policy], d: &mut Diagnostics) {
    for (i, p) in policies.iter().enumerate() {
        if p.name.is_empty() {
            continue; // already reported as missing
        }
        if policies[..i]
            .iter()
            .any(|q| q.qualified_name() == p.qualified_name() && q.kind == p.kind)
        {
            d.error(
                p.pos,
                format!("duplicate policy name `{}`", p.qualified_name()),
            );
        }
    }
}

/// The files a policy path stands for: the file itself, or every `*.yaml`/`*.yml`
/// in a directory (not recursive), in name order.
pub fn policy_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml") | Some("yml")
                    )
            })
            .collect();
        files.sort();
        Ok(files)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

/// Loads every policy under the given paths, collecting all errors of all files.
pub fn load_policies(paths: &[PathBuf]) -> Result<Vec<Policy>, LoadErrors> {
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        let files = match policy_files(path) {
            Ok(f) => f,
            Err(e) => {
                errors.push(io_error(path, &e));
                continue;
            }
        };
        for file in files {
            let name = file.display().to_string();
            match std::fs::read_to_string(&file) {
                Ok(text) => match parse_policies(&text, &name) {
                    Ok(mut p) => policies.append(&mut p),
                    Err(LoadErrors(mut e)) => errors.append(&mut e),
                },
                Err(e) => errors.push(io_error(&file, &e)),
            }
        }
    }
    let mut d = Diagnostics::new("");
    check_unique_names(&policies, &mut d);
    for mut e in d.errors {
        if let Some(p) = policies
            .iter()
            .rev()
            .find(|p| e.message.contains(&format!("`{}`", p.qualified_name())))
        {
            e.file = p.file.clone();
        }
        if !errors.contains(&e) {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(LoadErrors(errors))
    }
}

/// Loads an endpoints file (endpoints and services).
pub fn load_endpoints_file(path: &Path) -> Result<EndpointsFile, LoadErrors> {
    let name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_endpoints_file(&text, &name),
        Err(e) => Err(LoadErrors(vec![io_error(path, &e)])),
    }
}

fn io_error(path: &Path, e: &std::io::Error) -> PolicyError {
    PolicyError {
        file: path.display().to_string(),
        line: 1,
        col: 1,
        message: format!("cannot read: {e}"),
    }
}
