//! `<state-dir>/fqdn-cache.json`: the name cache across restarts (a `kill -9`
//! included), so the first sync of the next weir keeps the learned addresses the
//! pinned maps still hold instead of deleting them. Expiries are wall-clock.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cache::{Cache, Entry, Limits};

const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    names: BTreeMap<String, BTreeMap<IpAddr, Entry>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a weir FQDN cache: {detail}")]
    Format { path: PathBuf, detail: String },
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("fqdn-cache.json")
}

/// Writes the cache atomically (a temporary file renamed over the old one).
pub fn save(state_dir: &Path, cache: &Cache) -> Result<(), PersistError> {
    let path = path(state_dir);
    let tmp = state_dir.join("fqdn-cache.json.tmp");
    let file = File {
        version: VERSION,
        names: cache
            .iter()
            .map(|(n, ips)| (n.to_string(), ips.clone()))
            .collect(),
    };
    let io = |source| PersistError::Io {
        path: path.clone(),
        source,
    };
    let bytes = serde_json::to_vec(&file).map_err(|e| io(std::io::Error::other(e)))?;
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// Reads the cache written by an earlier run; none is an empty cache. The
/// per-name limit applies again (the flag may have changed).
pub fn load(state_dir: &Path, limits: Limits) -> Result<Cache, PersistError> {
    let path = path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Cache::new(limits)),
        Err(source) => return Err(PersistError::Io { path, source }),
    };
    let file: File = serde_json::from_slice(&bytes).map_err(|e| PersistError::Format {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    if file.version != VERSION {
        return Err(PersistError::Format {
            path,
            detail: format!("version {} (this weir writes {VERSION})", file.version),
        });
    }
    let mut cache = Cache::new(limits);
    for (name, ips) in file.names {
        // Newest first, so the per-name limit keeps the newest.
        let mut ips: Vec<(IpAddr, Entry)> = ips.into_iter().collect();
        ips.sort_by_key(|(ip, e)| (std::cmp::Reverse(e.learned_ms), *ip));
        for (ip, e) in ips.into_iter().take(limits.max_ips_per_name.max(1)) {
            cache.set(&name, weir_policy::canonical_ip(ip), Some(e));
        }
    }
    Ok(cache)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fqdn::cache::Inserted;

    #[test]
    fn the_cache_round_trips_through_the_state_dir() {
        let dir = std::env::temp_dir().join(format!("weir-fqdn-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let limits = Limits::default();
        assert!(load(&dir, limits).unwrap().is_empty(), "no file: empty");
        let mut c = Cache::new(limits);
        let mut out = Inserted::default();
        c.insert(
            "api.example.com.",
            "192.0.2.1".parse().unwrap(),
            30,
            true,
            5_000,
            &mut out,
        )
        .unwrap();
        c.insert(
            "api.example.com.",
            "2001:db8::1".parse().unwrap(),
            60,
            true,
            6_000,
            &mut out,
        )
        .unwrap();
        c.insert(
            "cdn.example.net.",
            "192.0.2.1".parse().unwrap(),
            90,
            true,
            7_000,
            &mut out,
        )
        .unwrap();
        if let Some(e) = c.get_mut("cdn.example.net.", "192.0.2.1".parse().unwrap()) {
            e.kept = true;
        }
        save(&dir, &c).unwrap();
        assert!(!dir.join("fqdn-cache.json.tmp").exists());
        let back = load(&dir, limits).unwrap();
        let flat = |c: &Cache| -> Vec<(String, IpAddr, Entry)> {
            c.iter()
                .flat_map(|(n, ips)| ips.iter().map(move |(i, e)| (n.to_string(), *i, *e)))
                .collect()
        };
        assert_eq!(flat(&back), flat(&c));
        assert_eq!(back.names_of("192.0.2.1".parse().unwrap()).count(), 2);
        // A smaller limit on the next start keeps the newest.
        let one = load(
            &dir,
            Limits {
                max_ips_per_name: 1,
                ..limits
            },
        )
        .unwrap();
        assert!(
            one.get("api.example.com.", "2001:db8::1".parse().unwrap())
                .is_some()
        );
        assert!(
            one.get("api.example.com.", "192.0.2.1".parse().unwrap())
                .is_none()
        );
        std::fs::write(dir.join("fqdn-cache.json"), b"{").unwrap();
        assert!(matches!(
            load(&dir, limits),
            Err(PersistError::Format { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
