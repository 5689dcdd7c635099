//! The node-local endpoint registry: which workloads exist, their addresses and labels.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::decode::{Fields, scalar, seq, string_map};
use crate::error::{Diagnostics, LoadErrors};
use crate::yaml::{self, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// The workload's network namespace (a name under /run/netns or a path).
    pub netns: Option<String>,
    /// The workload's cgroup v2 path.
    pub cgroup: Option<String>,
    /// The node-side interface the workload's packets arrive on, when it is not
    /// the host side of a veth pair (which weir finds and checks by itself).
    pub interface: Option<String>,
    /// Named ports, usable in policies as `port: NAME`.
    pub ports: BTreeMap<String, u16>,
}

/// Parses an endpoints file:
///
/// ```yaml
/// endpoints:
///   - name: deathstar
///     ips: [10.200.0.10]
///     labels: {org: empire, class: deathstar}
/// ```
pub fn parse_endpoints(text: &str, file: &str) -> Result<Vec<Endpoint>, LoadErrors> {
    let mut d = Diagnostics::new(file);
    let docs = match yaml::parse_documents(text) {
        Ok(docs) => docs,
        Err(e) => {
            d.error(e.pos, e.message);
            return Err(LoadErrors(d.errors));
        }
    };
    let mut out: Vec<Endpoint> = Vec::new();
    for doc in docs.iter().filter(|n| n.value != Value::Null) {
        let Some(mut f) = Fields::of(doc, "endpoints file", &mut d) else {
            continue;
        };
        let list = f.take("endpoints");
        f.finish("endpoints file", &mut d);
        for item in list
            .and_then(|l| seq(l, "endpoints", &mut d))
            .unwrap_or(&[])
        {
            let Some(mut ef) = Fields::of(item, "endpoint", &mut d) else {
                continue;
            };
            let pos = ef.pos();
            let name = ef
                .take("name")
                .and_then(|n| scalar(n, "name", &mut d))
                .map(str::to_string);
            let mut ips = Vec::new();
            if let Some(list) = ef.take("ips") {
                for ip in seq(list, "ips", &mut d).unwrap_or(&[]) {
                    if let Some(text) = scalar(ip, "ip", &mut d) {
                        match text.parse::<IpAddr>() {
                            Ok(a) => ips.push(a),
                            Err(_) => d.error(ip.pos, format!("`{text}` is not an IP address")),
                        }
                    }
                }
            }
            let labels = ef
                .take("labels")
                .map(|n| string_map(n, "labels", &mut d))
                .unwrap_or_default();
            let netns = ef
                .take("netns")
                .and_then(|n| scalar(n, "netns", &mut d))
                .map(str::to_string);
            let cgroup = ef
                .take("cgroup")
                .and_then(|n| scalar(n, "cgroup", &mut d))
                .map(str::to_string);
            let interface = ef
                .take("interface")
                .and_then(|n| scalar(n, "interface", &mut d))
                .map(str::to_string);
            let mut ports = BTreeMap::new();
            if let Some(pm) = ef.take("ports") {
                if let Value::Map(entries) = &pm.value {
                    for (k, v) in entries {
                        let (Some(k), Some(vt)) =
                            (scalar(k, "port name", &mut d), scalar(v, "port", &mut d))
                        else {
                            continue;
                        };
                        match vt.parse::<u16>() {
                            Ok(p) if p > 0 => {
                                ports.insert(k.to_string(), p);
                            }
                            _ => d.error(v.pos, format!("port `{vt}` is out of range (1-65535)")),
                        }
                    }
                } else {
                    d.error(pm.pos, "ports must be a mapping of name to port number");
                }
            }
            ef.finish("endpoint", &mut d);
            let Some(name) = name else {
                d.error(pos, "endpoint needs `name`");
                continue;
            };
            if ips.is_empty() && netns.is_none() {
                d.error(pos, format!("endpoint `{name}` needs `ips` or `netns`"));
            }
            if out.iter().any(|e| e.name == name) {
                d.error(pos, format!("duplicate endpoint name `{name}`"));
            }
            for ip in &ips {
                if let Some(other) = out.iter().find(|e| e.ips.contains(ip)) {
                    d.error(
                        pos,
                        format!("IP {ip} of `{name}` already belongs to `{}`", other.name),
                    );
                }
            }
            out.push(Endpoint {
                name,
                ips,
                labels,
                netns,
                cgroup,
                interface,
                ports,
            });
        }
    }
    if d.errors.is_empty() {
        Ok(out)
    } else {
        Err(LoadErrors(d.errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_form() {
        let eps = parse_endpoints(
            "endpoints:\n  - name: deathstar\n    ips: [10.200.0.10, 'fd00::10']\n    labels: {org: empire, class: deathstar}\n    ports: {http: 80}\n",
            "e.yaml",
        )
        .unwrap();
        assert_eq!(eps[0].name, "deathstar");
        assert_eq!(eps[0].ips.len(), 2);
        assert_eq!(eps[0].labels["org"], "empire");
        assert_eq!(eps[0].ports["http"], 80);
    }

    #[test]
    fn errors_point_at_the_value() {
        let err = parse_endpoints(
            "endpoints:\n  - name: a\n    ips: [10.0.0.300]\n    colour: red\n",
            "e.yaml",
        )
        .unwrap_err();
        let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert!(
            lines.contains(&"e.yaml:3:11: `10.0.0.300` is not an IP address".to_string()),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"e.yaml:4:5: unknown field `colour` in endpoint".to_string()),
            "{lines:?}"
        );
    }
}
