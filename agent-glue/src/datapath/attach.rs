//! Putting the tc programs on an interface, and taking them off: TCX links pinned
//! under `--bpf-root` (kernels with TCX, like this one), or classic cls_bpf
//! filters on a `clsact` qdisc through netlink where TCX is missing. Either way
//! the attachment outlives the weir that made it, and the next weir swaps its
//! program in place, so enforcement has no gap.

use std::path::Path;
use std::process::Command;

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use tracing::{info, warn};

use super::pins;

/// How programs are attached (`--tc-attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX where the kernel has it (6.6+), else clsact + netlink.
    #[default]
    Auto,
    /// TCX links only.
    Tcx,
    /// cls_bpf filters on a clsact qdisc (the fallback for kernels without TCX).
    Netlink,
}

/// weir's filters sit at this priority and handle (119, as in weir's `proto 119`
/// routes), so a restarted weir finds and replaces exactly its own.
const NL_PRIORITY: u16 = 119;

/// The endpoint programs' filters have handle 119, the netdev programs' 120, so
/// an interface changing role briefly holds both.
fn nl_handle(program: &str) -> TcHandle {
    if program.ends_with("_netdev") {
        TcHandle::new(0, 120)
    } else {
        TcHandle::new(0, 119)
    }
}

/// How one program is attached to one interface direction.
#[derive(Debug)]
pub enum Attached {
    /// A TCX link held by its pin (and by this process if it adopted the link).
    Tcx(Option<tc::SchedClassifierLinkId>),
    /// A cls_bpf filter; the kernel holds it, not this process.
    Netlink,
}

/// Attaches `prog` (named `name`) to `iface`/`at`. A pinned TCX link or a weir
/// filter left by an earlier run is taken over in place.
pub fn attach(
    prog: &mut SchedClassifier,
    name: &str,
    iface: &str,
    at: TcAttachType,
    pin: Option<&Path>,
    mode: TcAttach,
) -> Result<Attached, String> {
    if mode != TcAttach::Netlink {
        match attach_tcx(prog, iface, at, pin) {
            Ok(a) => return Ok(a),
            Err(e) if mode == TcAttach::Tcx => return Err(e),
            Err(e) => {
                warn!(%iface, error = %e, "TCX attach failed; falling back to a clsact qdisc (netlink)")
            }
        }
    }
    attach_netlink(prog, name, iface, at)
}

fn attach_tcx(
    prog: &mut SchedClassifier,
    iface: &str,
    at: TcAttachType,
    pin: Option<&Path>,
) -> Result<Attached, String> {
    if let Some(old) = pin.and_then(pins::pinned_link) {
        let link = old.try_into().map_err(|e: LinkError| e.to_string())?;
        let id = prog.attach_to_link(link).map_err(|e| format!("{e:#}"))?;
        return Ok(Attached::Tcx(Some(id)));
    }
    let id = prog
        .attach_with_options(iface, at, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .map_err(|e| format!("{e:#}"))?;
    let Some(pin) = pin else {
        return Ok(Attached::Tcx(Some(id)));
    };
    let link = prog.take_link(id).map_err(|e| format!("{e:#}"))?;
    let fd_link: FdLink = link.try_into().map_err(|e: LinkError| e.to_string())?;
    fd_link
        .pin(pin)
        .map_err(|e| format!("pinning the link at {}: {e}", pin.display()))?;
    Ok(Attached::Tcx(None))
}

fn attach_netlink(
    prog: &mut SchedClassifier,
    name: &str,
    iface: &str,
    at: TcAttachType,
) -> Result<Attached, String> {
    // Our filter from an earlier run: replace its program (no gap).
    let replaced = SchedClassifierLink::attached(iface, at, NL_PRIORITY, nl_handle(name), None)
        .map_err(|e| e.to_string())
        .and_then(|old| prog.attach_to_link(old).map_err(|e| format!("{e:#}")));
    let id = match replaced {
        Ok(id) => id,
        Err(_) => {
            if !has_clsact(iface) {
                tc::qdisc_add_clsact(iface)
                    .map_err(|e| format!("adding a clsact qdisc to {iface}: {e:#}"))?;
            }
            let options = NlOptions {
                priority: NL_PRIORITY,
                handle: nl_handle(name),
                classid: None,
            };
            prog.attach_with_options(iface, at, TcAttachOptions::Netlink(options))
                .map_err(|e| format!("{e:#}"))?
        }
    };
    // The filter must outlive this process, as a pinned TCX link does: dropping
    // aya's handle would detach it, so it is let go of instead (it owns no fd).
    let link = prog.take_link(id).map_err(|e| format!("{e:#}"))?;
    std::mem::forget(link);
    info!(%iface, program = name, "attached as a cls_bpf filter (clsact, netlink)");
    Ok(Attached::Netlink)
}

fn has_clsact(iface: &str) -> bool {
    Command::new("tc")
        .args(["-j", "qdisc", "show", "dev", iface])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .any(|q| q["kind"] == "clsact")
}

/// Takes `name` off `iface`/`at`: the pinned link is unpinned (and, if this
/// process holds it, detached); weir's netlink filter is deleted.
pub fn detach(
    prog: Option<&mut SchedClassifier>,
    name: &str,
    iface: &str,
    at: TcAttachType,
    how: Attached,
    pin: Option<&Path>,
) {
    match how {
        Attached::Tcx(id) => {
            if let (Some(prog), Some(id)) = (prog, id)
                && let Err(e) = prog.detach(id)
            {
                warn!(%iface, program = name, error = %e, "detaching");
            }
            if let Some(link) = pin.and_then(|p| PinnedLink::from_pin(p).ok()) {
                let _ = link.unpin();
            }
        }
        Attached::Netlink => {
            if let Err(e) = tc::qdisc_detach_program(iface, at, name) {
                warn!(%iface, program = name, error = %e, "removing the tc filter");
            }
        }
    }
}

/// Deletes every weir filter (by program name) on every interface of this
/// network namespace, for `weir cleanup`; returns how many were removed. The
/// clsact qdisc goes too when nothing else is left on it.
pub fn remove_netlink_filters(names: &[&str]) -> usize {
    let mut removed = 0;
    for iface in super::interfaces() {
        let mut touched = false;
        for at in [TcAttachType::Ingress, TcAttachType::Egress] {
            for name in names {
                if tc::qdisc_detach_program(&iface, at, name).is_ok() {
                    removed += 1;
                    touched = true;
                }
            }
        }
        if touched && netlink_filters(&iface).is_empty() {
            let _ = Command::new("tc")
                .args(["qdisc", "del", "dev", &iface, "clsact"])
                .status();
        }
    }
    removed
}

/// `(direction, filter name)` of every cls_bpf filter on `iface`'s clsact qdisc.
pub fn netlink_filters(iface: &str) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for dir in ["ingress", "egress"] {
        let listed = Command::new("tc")
            .args(["-j", "filter", "show", "dev", iface, dir])
            .output();
        let filters = listed
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default();
        for f in filters {
            if let Some(name) = f["options"]["bpf_name"].as_str() {
                out.push((dir, name.to_string()));
            }
        }
    }
    out
}
