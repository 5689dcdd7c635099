//! Machine-wide paths (all behind flags so tests run side by side) and state kept
//! across restarts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use weir_policy::identity::IdentityAllocator;

/// Loads identity assignments from `<state-dir>/identities.json`, so a label set
/// keeps its identity even if a hash collision was resolved differently once.
pub fn load_identities(state_dir: &Path) -> IdentityAllocator {
    let path = state_dir.join("identities.json");
    let earlier: BTreeMap<String, u32> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    IdentityAllocator::with_assignments(earlier)
}

pub fn save_identities(state_dir: &Path, ids: &IdentityAllocator) -> std::io::Result<()> {
    let map: BTreeMap<&str, u32> = ids.assignments().collect();
    let path = state_dir.join("identities.json");
    let tmp = state_dir.join("identities.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&map)?)?;
    std::fs::rename(tmp, path)
}

pub fn ready_file(state_dir: &Path) -> PathBuf {
    state_dir.join("ready")
}
