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

/// Holds `<ready>.lock` while the ready file is written or checked and removed.
/// A weir that took over writes its pid there while the weir it replaced may be
/// exiting and removing its own: without the lock, the old one could read its
/// own pid, the new one write, and the old one remove the new one's file.
fn lock_ready(ready: &Path) -> std::io::Result<std::fs::File> {
    let mut name = ready.as_os_str().to_owned();
    name.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(PathBuf::from(name))?;
    // Held for a write or a read-and-remove: never long.
    file.lock()?;
    Ok(file)
}

/// Writes this process's pid into the ready file. Written beside it and
/// renamed over it: whoever sees the file sees a whole pid, never the empty
/// file a plain write leaves between its create and its write.
pub fn write_ready(ready: &Path) -> std::io::Result<()> {
    let _lock = lock_ready(ready)?;
    let mut tmp = ready.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, std::process::id().to_string())?;
    std::fs::rename(&tmp, ready).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Removes the ready file unless a successor has written its own pid there.
pub fn remove_ready_if_ours(ready: &Path) {
    let mine = std::process::id().to_string();
    // Without the lock (the state dir went read-only?) the check still stands;
    // only the race it closes is open again.
    let _lock = lock_ready(ready);
    if std::fs::read_to_string(ready).is_ok_and(|s| s.trim() == mine) {
        let _ = std::fs::remove_file(ready);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ready file's pid is only ever removed by the process it names.
    #[test]
    fn only_the_named_process_removes_the_ready_file() {
        let dir = std::env::temp_dir().join(format!("weir-ready-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ready = ready_file(&dir);
        write_ready(&ready).unwrap();
        assert_eq!(
            std::fs::read_to_string(&ready).unwrap(),
            std::process::id().to_string()
        );
        // A successor's pid stays.
        std::fs::write(&ready, "1").unwrap();
        remove_ready_if_ours(&ready);
        assert_eq!(std::fs::read_to_string(&ready).unwrap(), "1");
        // Our own goes.
        write_ready(&ready).unwrap();
        remove_ready_if_ours(&ready);
        assert!(!ready.exists());
        // The lock is not held after either call.
        let lock = lock_ready(&ready).unwrap();
        drop(lock);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A reader polling the ready file (as scripts and tests do) sees it
    /// missing or holding the whole pid, never empty: a plain create-and-write
    /// fails this within a few thousand rewrites.
    #[test]
    fn the_ready_file_is_never_seen_half_written() {
        let dir = std::env::temp_dir().join(format!("weir-ready-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ready = ready_file(&dir);
        let pid = std::process::id().to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (ready, stop, pid) = (ready.clone(), stop.clone(), pid.clone());
            std::thread::spawn(move || {
                let mut seen = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(s) = std::fs::read_to_string(&ready) {
                        assert_eq!(s, pid, "after {seen} whole reads");
                        seen += 1;
                    }
                }
                seen
            })
        };
        for _ in 0..20_000 {
            let _ = std::fs::remove_file(&ready);
            write_ready(&ready).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = reader.join().expect("the reader saw only whole pids");
        assert!(seen > 0, "the reader never saw the file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
