//! Endpoints given by their network namespace: weir reads their addresses there.

use std::net::IpAddr;
use std::process::Command;

use anyhow::{Context, bail};
use weir_policy::Endpoint;

/// Fills in the addresses of endpoints that name a `netns` but list no `ips`:
/// every global-scope address inside that namespace (not loopback, not link-local).
pub fn resolve_netns_addresses(endpoints: &mut [Endpoint]) -> anyhow::Result<()> {
    for ep in endpoints.iter_mut().filter(|e| e.ips.is_empty()) {
        let Some(ns) = ep.netns.clone() else { continue };
        ep.ips = netns_addresses(&ns)
            .with_context(|| format!("endpoint `{}`: reading addresses in netns {ns}", ep.name))?;
        if ep.ips.is_empty() {
            bail!("endpoint `{}`: netns {ns} has no global addresses", ep.name);
        }
    }
    Ok(())
}

/// Whether a named namespace (/run/netns/NAME) or a namespace path exists.
pub fn netns_exists(ns: &str) -> bool {
    if ns.starts_with('/') {
        std::path::Path::new(ns).exists()
    } else {
        std::path::Path::new("/run/netns").join(ns).exists()
    }
}

/// Global addresses in a named namespace (/run/netns/NAME) or a namespace path.
pub fn netns_addresses(ns: &str) -> anyhow::Result<Vec<IpAddr>> {
    let out = if ns.starts_with('/') {
        Command::new("nsenter")
            .arg(format!("--net={ns}"))
            .args(["--", "ip", "-j", "addr", "show"])
            .output()
    } else {
        Command::new("ip")
            .args(["-j", "-n", ns, "addr", "show"])
            .output()
    }
    .context("running `ip`")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let links: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j addr`")?;
    let mut ips = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if a["scope"] != "global" {
                continue;
            }
            if let Some(ip) = a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) {
                ips.push(ip);
            }
        }
    }
    ips.sort();
    ips.dedup();
    Ok(ips)
}
