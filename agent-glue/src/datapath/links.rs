//! The node's network interfaces, and which one is each endpoint's own.
//!
//! An endpoint's identity comes from the interface its packets arrive on, so weir
//! attaches its endpoint programs only where that is true: the host side of a veth
//! pair whose peer lives in the endpoint's namespace, or an interface the
//! endpoints file names. An address that routes anywhere else (the uplink, a
//! bridge, a dummy) is refused with the reason, never attached there.
//!
//! Everything goes through netlink (`ip -j`), not /sys/class/net: nsenter keeps
//! the old namespace's /sys. These run on the control thread, never the proxy's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::process::Command;

use weir_policy::{CompiledPolicy, Endpoint};

use super::DatapathError;

/// One interface as `ip -j -d link show` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    /// `veth`, `bridge`, `dummy`, ... (`None` for plain devices such as a NIC).
    pub kind: Option<String>,
    /// For a veth: the peer's interface index, in the peer's namespace.
    pub peer_index: Option<u32>,
    /// Set when the peer lives in another network namespace.
    pub peer_in_other_netns: bool,
}

/// The interfaces of one network namespace.
#[derive(Debug, Clone, Default)]
pub struct Links(Vec<Link>);

impl Links {
    /// This process's network namespace.
    pub fn read() -> Result<Links, String> {
        Self::from_output(Command::new("ip").args(["-j", "-d", "link", "show"]))
    }

    /// A named namespace (/run/netns/NAME) or a namespace path.
    pub fn read_in(ns: &str) -> Result<Links, String> {
        let mut cmd = if ns.starts_with('/') {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={ns}"))
                .args(["--", "ip", "-j", "-d", "link", "show"]);
            c
        } else {
            let mut c = Command::new("ip");
            c.args(["-j", "-d", "-n", ns, "link", "show"]);
            c
        };
        Self::from_output(&mut cmd)
    }

    fn from_output(cmd: &mut Command) -> Result<Links, String> {
        let out = cmd.output().map_err(|e| format!("cannot run `ip`: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Self::parse(&out.stdout)
    }

    fn parse(json: &[u8]) -> Result<Links, String> {
        let v: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| format!("unexpected `ip -j` output: {e}"))?;
        let links = v
            .as_array()
            .ok_or("unexpected `ip -j` output: not a list")?
            .iter()
            .filter_map(|l| {
                Some(Link {
                    name: l["ifname"].as_str()?.to_string(),
                    index: u32::try_from(l["ifindex"].as_u64()?).ok()?,
                    kind: l["linkinfo"]["info_kind"].as_str().map(str::to_string),
                    peer_index: l["link_index"].as_u64().and_then(|i| u32::try_from(i).ok()),
                    peer_in_other_netns: l.get("link_netnsid").is_some(),
                })
            })
            .collect();
        Ok(Links(links))
    }

    pub fn by_name(&self, name: &str) -> Option<&Link> {
        self.0.iter().find(|l| l.name == name)
    }

    fn by_index(&self, index: u32) -> Option<&Link> {
        self.0.iter().find(|l| l.index == index)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|l| l.name.as_str())
    }

    pub fn indexes(&self) -> HashMap<String, u32> {
        self.0.iter().map(|l| (l.name.clone(), l.index)).collect()
    }
}

/// Interfaces of this network namespace, sorted (none when `ip` fails).
pub fn interfaces() -> Vec<String> {
    let mut names: Vec<String> = Links::read()
        .unwrap_or_default()
        .names()
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// Interface name → index in this network namespace.
pub fn interface_indexes() -> HashMap<String, u32> {
    Links::read().unwrap_or_default().indexes()
}

/// The interface the node routes `ip` through.
pub fn route_interface(ip: IpAddr) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["-j", "route", "get", &ip.to_string()])
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("unexpected `ip -j` output: {e}"))?;
    v.get(0)
        .and_then(|r| r.get("dev"))
        .and_then(|d| d.as_str())
        .filter(|d| *d != "lo")
        .map(str::to_string)
        .ok_or_else(|| "no route through a network interface".into())
}

/// Checks that `link` may carry `ep`'s identity; the reason when it may not.
/// `peer_links` reads the links of a namespace (injected for tests).
pub fn check_endpoint_link(
    ep: &Endpoint,
    link: &Link,
    peer_links: &dyn Fn(&str) -> Result<Links, String>,
) -> Result<(), String> {
    if let Some(named) = &ep.interface {
        if &link.name != named {
            return Err(format!(
                "it routes via {}, not via the endpoint's interface {named}",
                link.name
            ));
        }
        return Ok(());
    }
    let is_veth = link.kind.as_deref() == Some("veth");
    if !is_veth || !link.peer_in_other_netns {
        let what = match link.kind.as_deref() {
            Some("veth") => "a veth whose peer is in this namespace".to_string(),
            Some(k) => format!("a {k} device"),
            None => "a device".to_string(),
        };
        return Err(format!(
            "it routes via {}, {what}, not the host side of a veth pair leading into a \
             workload's namespace; weir attaches endpoint programs only to an endpoint's own \
             interface (name it with `interface:` in the endpoints file if this is intended)",
            link.name
        ));
    }
    if let Some(ns) = &ep.netns {
        let theirs = peer_links(ns).map_err(|e| format!("reading netns {ns}: {e}"))?;
        let peer = link.peer_index.and_then(|i| theirs.by_index(i));
        let pairs = peer.is_some_and(|p| {
            p.kind.as_deref() == Some("veth")
                && p.peer_in_other_netns
                && p.peer_index == Some(link.index)
        });
        if !pairs {
            return Err(format!(
                "it routes via {}, whose veth peer is not in the endpoint's netns {ns}",
                link.name
            ));
        }
    }
    Ok(())
}

/// Each endpoint address with the interface its packets arrive on, checked
/// (see the module comment); one interface never carries two endpoints.
pub fn endpoint_interfaces(
    policy: &CompiledPolicy,
) -> Result<HashMap<IpAddr, Link>, DatapathError> {
    let links = Links::read().map_err(|detail| DatapathError::Links { detail })?;
    let mut out = HashMap::new();
    let mut owner: HashMap<String, &str> = HashMap::new();
    for ep in policy.endpoints() {
        let ep = &ep.endpoint;
        for ip in &ep.ips {
            let refuse = |detail: String| DatapathError::Interface {
                endpoint: ep.name.clone(),
                ip: *ip,
                detail,
            };
            let name = match &ep.interface {
                Some(named) if links.by_name(named).is_none() => {
                    return Err(refuse(format!("its interface {named} does not exist")));
                }
                _ => route_interface(*ip).map_err(refuse)?,
            };
            let link = links
                .by_name(&name)
                .ok_or_else(|| refuse(format!("interface {name} vanished")))?;
            check_endpoint_link(ep, link, &Links::read_in).map_err(refuse)?;
            if let Some(other) = owner.insert(link.name.clone(), &ep.name)
                && other != ep.name
            {
                return Err(refuse(format!(
                    "{} already carries endpoint `{other}`; an interface gives one identity",
                    link.name
                )));
            }
            out.insert(*ip, link.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ep(netns: Option<&str>, interface: Option<&str>) -> Endpoint {
        Endpoint {
            name: "deathstar".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            labels: BTreeMap::new(),
            namespace: "default".into(),
            netns: netns.map(str::to_string),
            cgroup: None,
            interface: interface.map(str::to_string),
            ports: BTreeMap::new(),
        }
    }

    fn link(name: &str, index: u32, kind: Option<&str>, peer: Option<u32>, other: bool) -> Link {
        Link {
            name: name.into(),
            index,
            kind: kind.map(str::to_string),
            peer_index: peer,
            peer_in_other_netns: other,
        }
    }

    fn no_netns(_: &str) -> Result<Links, String> {
        Err("no namespaces here".into())
    }

    #[test]
    fn parses_ip_json() {
        let json = br#"[{"ifindex":1,"ifname":"lo"},
            {"ifindex":2,"ifname":"eth0"},
            {"ifindex":7,"link_index":2,"ifname":"weirv0","link_netnsid":0,
             "linkinfo":{"info_kind":"veth"}}]"#;
        let links = Links::parse(json).unwrap();
        assert_eq!(
            links.by_name("weirv0"),
            Some(&link("weirv0", 7, Some("veth"), Some(2), true))
        );
        assert_eq!(
            links.by_name("eth0"),
            Some(&link("eth0", 2, None, None, false))
        );
    }

    #[test]
    fn the_uplink_bridges_and_local_veths_are_refused() {
        let e = ep(None, None);
        for l in [
            link("eth0", 2, None, None, false),
            link("br0", 3, Some("bridge"), None, false),
            link("veth-a", 4, Some("veth"), Some(5), false),
        ] {
            let err = check_endpoint_link(&e, &l, &no_netns).unwrap_err();
            assert!(err.contains(&l.name) && err.contains("interface:"), "{err}");
        }
        assert!(
            check_endpoint_link(&e, &link("v0", 7, Some("veth"), Some(2), true), &no_netns).is_ok()
        );
    }

    #[test]
    fn a_veth_must_lead_into_the_endpoints_own_netns() {
        let e = ep(Some("deathstar"), None);
        let ours = link("v0", 7, Some("veth"), Some(2), true);
        let theirs = |pairs_with: u32| {
            move |_: &str| {
                Ok(Links(vec![link(
                    "eth0",
                    2,
                    Some("veth"),
                    Some(pairs_with),
                    true,
                )]))
            }
        };
        assert!(check_endpoint_link(&e, &ours, &theirs(7)).is_ok());
        // Index 2 in that namespace is a veth, but the pair of another interface.
        let err = check_endpoint_link(&e, &ours, &theirs(9)).unwrap_err();
        assert!(
            err.contains("not in the endpoint's netns deathstar"),
            "{err}"
        );
    }

    #[test]
    fn a_named_interface_must_be_the_one_the_address_routes_through() {
        let e = ep(None, Some("tap0"));
        assert!(
            check_endpoint_link(&e, &link("tap0", 9, Some("tun"), None, false), &no_netns).is_ok()
        );
        let err =
            check_endpoint_link(&e, &link("eth0", 2, None, None, false), &no_netns).unwrap_err();
        assert!(
            err.contains("not via the endpoint's interface tap0"),
            "{err}"
        );
    }
}
