//! Pins under `--bpf-root`: maps and TCX links live in `<bpf-root>/v<layout>/`, so a
//! stopped weir leaves enforcement running and a restarted one adopts it. A
//! directory of another layout version is removed only once this version's
//! programs are attached everywhere (no interface is ever left unguarded), with a
//! log line; `weir cleanup` removes everything under the root.
//!
//! Pins outlive weir only where the rest of the machine sees them: a weir in a
//! private mount namespace (`ip netns exec` mounts its own `/sys`) pins into a
//! bpffs that goes away with it. [`visible_outside`] tells which.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use aya::programs::links::{FdLink, PinnedLink};
use tracing::{info, warn};

use super::maps::LAYOUT_VERSION;

/// `<bpf-root>/v<LAYOUT_VERSION>`.
pub fn layout_dir(root: &Path) -> PathBuf {
    root.join(format!("v{LAYOUT_VERSION}"))
}

pub fn maps_dir(root: &Path) -> PathBuf {
    layout_dir(root).join("maps")
}

pub fn links_dir(root: &Path) -> PathBuf {
    layout_dir(root).join("links")
}

fn is_bpffs(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, mnt, fstype) = (f.next(), f.next(), f.next());
        fstype == Some("bpf") && mnt.is_some_and(|m| path.starts_with(m))
    })
}

/// Makes sure `root` is on a bpffs (mounting /sys/fs/bpf when that is where it
/// lives) and prepares this layout's directories (other layouts stay until
/// [`remove_other_layouts`]).
pub fn prepare(root: &Path) -> io::Result<()> {
    if !is_bpffs(root) {
        if root.starts_with("/sys/fs/bpf") {
            info!("mounting bpffs at /sys/fs/bpf");
            let status = Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status()?;
            if !status.success() || !is_bpffs(root) {
                return Err(io::Error::other("could not mount bpffs at /sys/fs/bpf"));
            }
        } else {
            return Err(io::Error::other(format!(
                "--bpf-root {} is not on a bpf filesystem",
                root.display()
            )));
        }
    }
    std::fs::create_dir_all(root)?;
    std::fs::create_dir_all(maps_dir(root))?;
    std::fs::create_dir_all(links_dir(root))?;
    Ok(())
}

/// Removes the pins of other layout versions (after this version's programs are
/// attached); returns the directories removed.
pub fn remove_other_layouts(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(root)?.filter_map(Result::ok) {
        let p = entry.path();
        if p != layout_dir(root) {
            warn!(
                path = %p.display(),
                "pinned eBPF state of another layout version; removing it now that this version is attached"
            );
            remove_tree(&p)?;
            removed.push(p);
        }
    }
    Ok(removed)
}

/// Whether pins under `root` are visible outside this process's mount namespace:
/// the same bpffs directory as PID 1 sees at that path, or (where PID 1 cannot be
/// inspected, as in some sandboxes) as the process that started weir sees. `ip
/// netns exec` runs weir in a new mount namespace with its own bpffs, which goes
/// away with weir; `nsenter --net=` does not.
pub fn visible_outside(root: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(ours) = std::fs::metadata(root) else {
        return false;
    };
    let relative = root.strip_prefix("/").unwrap_or(root);
    let parent = std::os::unix::process::parent_id();
    for other in [
        PathBuf::from("/proc/1"),
        PathBuf::from(format!("/proc/{parent}")),
    ] {
        if let Ok(theirs) = std::fs::metadata(other.join("root").join(relative)) {
            return ours.dev() == theirs.dev() && ours.ino() == theirs.ino();
        }
        // Not there at all (while ours is): another bpffs, or none.
        if other.join("root").read_dir().is_ok() {
            return false;
        }
    }
    // Nothing could be inspected: say so rather than claim either way.
    warn!(
        bpf_root = %root.display(),
        "cannot tell whether the pins are visible outside this mount namespace"
    );
    true
}

/// This network namespace's identity (its inode), so link pins of different
/// namespaces with equal interface names never meet.
pub fn netns_id() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .ok()
        .and_then(|p| {
            let s = p.to_string_lossy().into_owned();
            s.strip_prefix("net:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Where the link of `iface`/`dir` in this namespace is pinned.
pub fn link_pin(root: &Path, iface: &str, dir: &str) -> PathBuf {
    links_dir(root).join(format!("{}-{iface}-{dir}", netns_id()))
}

/// A pinned link, if one is at `path`.
pub fn pinned_link(path: &Path) -> Option<FdLink> {
    PinnedLink::from_pin(path).ok().map(FdLink::from)
}

/// Detaches every pinned link under `dir` and removes all pins below it; returns
/// how many pins (links and maps) there were.
pub fn remove_tree(dir: &Path) -> io::Result<usize> {
    if !dir.exists() {
        return Ok(0);
    }
    let mut links = Vec::new();
    collect_files(dir, &mut links)?;
    for f in &links {
        // A pinned link detaches once its pin is gone and no process holds it.
        if let Ok(link) = PinnedLink::from_pin(f) {
            let _ = link.unpin();
        }
    }
    std::fs::remove_dir_all(dir)?;
    Ok(links.len())
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for e in std::fs::read_dir(dir)?.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}
