//! `<state-dir>/fqdn-cache.json`: the name cache across restarts (a `kill -9`
//! included), so the first sync of the next weir keeps the learned addresses the
//! pinned maps still hold instead of deleting them. Expiries are wall-clock.
//!
//! The file is rewritten at most once a second; what changed since is in the
//! journal (`journal.rs`), which loading replays: only its lines of the file's
//! `epoch`, a number each write draws afresh.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::cache::{Cache, Entry, Limits};
use super::journal;

const VERSION: u32 = 1;

#[derive(Deserialize)]
struct File {
    version: u32,
    /// Which journal lines follow this file ([`NO_EPOCH`] in files written
    /// before the journal existed).
    #[serde(default = "no_epoch")]
    epoch: u64,
    names: BTreeMap<String, BTreeMap<IpAddr, Entry>>,
}

/// The epoch of a file written before the journal existed: no line has it.
pub const NO_EPOCH: u64 = u64::MAX;

fn no_epoch() -> u64 {
    NO_EPOCH
}

/// The epoch while no cache file exists: lines written then replay when
/// there is still none.
pub const NO_FILE_EPOCH: u64 = 0;

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

/// Writes the cache atomically (a temporary file renamed over the old one),
/// readable by its owner only (it tells which names the workloads resolve),
/// under a fresh epoch, which it returns: journal lines written before it no
/// longer replay over it, even if emptying the journal fails.
pub fn save(state_dir: &Path, cache: &Cache) -> Result<u64, PersistError> {
    let path = path(state_dir);
    let tmp = state_dir.join("fqdn-cache.json.tmp");
    let epoch = fresh_epoch();
    let io = |source| PersistError::Io {
        path: path.clone(),
        source,
    };
    write_new(&tmp, |w| render(cache, epoch, w)).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    // The rename itself reaches the disk with the directory (best effort:
    // the file is whole either way).
    if let Ok(d) = std::fs::File::open(state_dir) {
        let _ = d.sync_all();
    }
    Ok(epoch)
}

/// A number no earlier write drew: wall-clock nanoseconds, made unique within
/// this process by a counter; never [`NO_FILE_EPOCH`] nor [`NO_EPOCH`].
pub fn fresh_epoch() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static DRAWN: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    nanos
        .wrapping_add(DRAWN.fetch_add(1, Ordering::Relaxed))
        .clamp(1, NO_EPOCH - 1)
}

/// Writes the file's JSON (what [`File`] reads) for `cache` to `w`, straight
/// from the cache (no copy of it, no buffer of the whole file), offering the
/// CPU as it goes ([`super::offer_cpu`]: 25 000 names written in one go took
/// the control thread ~12 ms, and DNS answers due meanwhile waited).
fn render(cache: &Cache, epoch: u64, w: &mut impl std::io::Write) -> std::io::Result<()> {
    write!(w, r#"{{"version":{VERSION},"epoch":{epoch},"names":{{"#)?;
    for (i, (name, ips)) in cache.iter().enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        super::offer_cpu(i);
        serde_json::to_writer(&mut *w, name)?;
        w.write_all(b":")?;
        serde_json::to_writer(&mut *w, ips)?;
    }
    w.write_all(b"}}")
}

/// Creates `tmp` afresh (mode 0600; never through a symlink or into a file
/// someone else prepared: O_EXCL|O_NOFOLLOW) with what `write` writes, on disk
/// before it is renamed. A temporary file a crash left behind is removed first.
fn write_new(
    tmp: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)?;
    let mut w = std::io::BufWriter::with_capacity(64 * 1024, &f);
    write(&mut w)?;
    w.flush()?;
    drop(w);
    f.sync_all()
}

/// Reads the cache written by an earlier run; none is an empty cache. The
/// limits apply again (the flags may have changed); the file is not trusted
/// further than the proxy would be: names are canonical (lower-case, trailing
/// dot), no expiry lies beyond now + `--fqdn-max-ttl` and no first-learned
/// time in the future, and entries already expired are dropped — except those
/// kept for a live connection when they were written, which the first tick
/// checks against conntrack again.
pub fn load(state_dir: &Path, limits: Limits) -> Result<Cache, PersistError> {
    load_at(state_dir, limits, super::now_ms())
}

/// [`load`], and the epoch the journal's next lines must carry to replay over
/// the file read.
pub fn load_with_epoch(state_dir: &Path, limits: Limits) -> Result<(Cache, u64), PersistError> {
    load_parts(state_dir, limits, super::now_ms())
}

fn load_at(state_dir: &Path, limits: Limits, now_ms: u64) -> Result<Cache, PersistError> {
    load_parts(state_dir, limits, now_ms).map(|(c, _)| c)
}

fn load_parts(state_dir: &Path, limits: Limits, now_ms: u64) -> Result<(Cache, u64), PersistError> {
    let path = path(state_dir);
    let (epoch, mut file_names) = match std::fs::read(&path) {
        Ok(bytes) => {
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
            (file.epoch, file.names)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (NO_FILE_EPOCH, BTreeMap::new()),
        Err(source) => return Err(PersistError::Io { path, source }),
    };
    journal::replay(state_dir, epoch, &mut file_names);
    let max_expiry = now_ms.saturating_add(u64::from(limits.max_ttl_secs) * 1000);
    // Canonical names first: two spellings of one name become one.
    let mut names: BTreeMap<String, BTreeMap<IpAddr, Entry>> = BTreeMap::new();
    for (name, ips) in file_names {
        let merged = names
            .entry(weir_policy::dns_match::normalize_name(&name))
            .or_default();
        for (ip, e) in ips {
            let e = Entry {
                expires_ms: e.expires_ms.min(max_expiry),
                learned_ms: e.learned_ms.min(now_ms),
                kept: e.kept,
                owner: e.owner,
            };
            if e.expires_ms <= now_ms && !e.kept {
                continue;
            }
            let ip = weir_policy::canonical_ip(ip);
            let slot = merged.entry(ip).or_insert(e);
            if e.expires_ms > slot.expires_ms {
                *slot = e;
            }
        }
    }
    let mut cache = Cache::new(limits);
    for (name, ips) in names {
        if ips.is_empty() {
            continue;
        }
        if cache.name_count() >= limits.max_names.max(1) {
            break;
        }
        // Newest first, so the per-name limit keeps the newest.
        let mut ips: Vec<(IpAddr, Entry)> = ips.into_iter().collect();
        ips.sort_by_key(|(ip, e)| (std::cmp::Reverse(e.learned_ms), *ip));
        for (ip, e) in ips.into_iter().take(limits.max_ips_per_name.max(1)) {
            if !cache.has_ip(ip) && cache.ip_count() >= limits.max_ips.max(1) {
                continue;
            }
            cache.set(&name, ip, Some(e));
        }
    }
    Ok((cache, epoch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fqdn::cache::Inserted;

    /// The file as serde writes the structure [`File`] reads: what
    /// [`render`] writes by hand, slice by slice, must be exactly that.
    #[derive(serde::Serialize)]
    struct FileRef<'a> {
        version: u32,
        epoch: u64,
        names: BTreeMap<&'a str, &'a BTreeMap<IpAddr, Entry>>,
    }

    #[test]
    fn the_file_written_in_slices_is_what_serde_writes() {
        let mut c = Cache::new(Limits::default());
        let mut out = Inserted::default();
        for i in 0..(super::super::WALK_SLICE * 2 + 3) {
            let name = format!("h{i}.ex\\\"a\u{e9}mple.com.");
            for ip in [format!("192.0.2.{}", i % 250), format!("2001:db8::{i:x}")] {
                c.insert(&name, ip.parse().unwrap(), 30, i % 2 == 0, 5_000, &mut out)
                    .unwrap();
            }
        }
        for cache in [Cache::new(Limits::default()), c] {
            let mut mine = Vec::new();
            render(&cache, 42, &mut mine).unwrap();
            let serde = serde_json::to_vec(&FileRef {
                version: VERSION,
                epoch: 42,
                names: cache.iter().collect(),
            })
            .unwrap();
            assert_eq!(
                String::from_utf8(mine).unwrap(),
                String::from_utf8(serde).unwrap()
            );
        }
    }

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
        // Loaded as at 7 s (the entries' times are small).
        let back = load_at(&dir, limits, 7_000).unwrap();
        let flat = |c: &Cache| -> Vec<(String, IpAddr, Entry)> {
            c.iter()
                .flat_map(|(n, ips)| ips.iter().map(move |(i, e)| (n.to_string(), *i, *e)))
                .collect()
        };
        assert_eq!(flat(&back), flat(&c));
        assert_eq!(back.names_of("192.0.2.1".parse().unwrap()).count(), 2);
        // A smaller limit on the next start keeps the newest.
        let one = load_at(
            &dir,
            Limits {
                max_ips_per_name: 1,
                ..limits
            },
            7_000,
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

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weir-fqdn-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_file_is_private_and_never_written_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("mode");
        let mut c = Cache::new(Limits::default());
        c.insert(
            "a.",
            "192.0.2.1".parse().unwrap(),
            60,
            true,
            super::super::now_ms(),
            &mut Inserted::default(),
        )
        .unwrap();
        // A symlink planted where the temporary file goes is replaced, not followed.
        let victim = dir.join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("fqdn-cache.json.tmp")).unwrap();
        save(&dir, &c).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        let mode = std::fs::metadata(path(&dir)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            load(&dir, Limits::default())
                .unwrap()
                .get("a.", "192.0.2.1".parse().unwrap())
                .is_some()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loading_canonicalises_names_clamps_expiries_and_drops_expired_entries() {
        let dir = scratch("load");
        let now = 1_000_000_000u64;
        let day = 86_400_000u64;
        std::fs::write(
            path(&dir),
            serde_json::json!({"version": 1, "names": {
                "API.Example.com": {
                    "192.0.2.1": {"expires_ms": now + 1000 * day, "learned_ms": now + day},
                    "192.0.2.2": {"expires_ms": now - 1, "learned_ms": now - 10},
                    "192.0.2.3": {"expires_ms": now - 1, "learned_ms": now - 10, "kept": true}
                },
                "api.example.com.": {
                    "192.0.2.4": {"expires_ms": now + 60_000, "learned_ms": now}
                },
                "gone.example.com.": {
                    "192.0.2.5": {"expires_ms": now, "learned_ms": now - 10}
                }
            }})
            .to_string(),
        )
        .unwrap();
        let c = load_at(&dir, Limits::default(), now).unwrap();
        let names: Vec<&str> = c.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["api.example.com."]);
        let e = c
            .get("api.example.com.", "192.0.2.1".parse().unwrap())
            .unwrap();
        assert_eq!(e.expires_ms, now + day, "at most now + --fqdn-max-ttl");
        assert_eq!(e.learned_ms, now, "never learned in the future");
        assert!(
            c.get("api.example.com.", "192.0.2.2".parse().unwrap())
                .is_none(),
            "expired"
        );
        assert!(
            c.get("api.example.com.", "192.0.2.3".parse().unwrap())
                .is_some(),
            "kept for a connection: the tick checks it"
        );
        assert!(
            c.get("api.example.com.", "192.0.2.4".parse().unwrap())
                .is_some()
        );
        assert!(!c.has_ip("192.0.2.5".parse().unwrap()));
        // The total limits apply too.
        let one = load_at(
            &dir,
            Limits {
                max_ips: 1,
                ..Limits::default()
            },
            now,
        )
        .unwrap();
        assert_eq!(one.ips().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Whose answer brought an entry is saved: a pod at its share before a
    /// restart (a crash, an upgrade) is at it after, not handed a fresh one
    /// while the selected entries it brought stay (review of the shares).
    #[test]
    fn a_restart_does_not_hand_a_client_a_fresh_share() {
        use crate::fqdn::cache::{Full, Inserted};
        use weir_proxy::fqdn::DnsClient;
        let dir = std::env::temp_dir().join(format!("weir-share-restart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let limits = Limits {
            max_entries_per_client: 2,
            max_ips: 4,
            ..Limits::default()
        };
        let pod = DnsClient(IpAddr::from([10, 0, 0, 7]));
        let mut c = Cache::new(limits);
        let mut out = Inserted::default();
        for i in 1..=2u8 {
            let name = format!("n{i}.example.");
            c.insert_for(
                Some(pod),
                &name,
                IpAddr::from([192, 0, 2, i]),
                3600,
                true,
                1_000,
                &mut out,
            )
            .unwrap();
        }
        save(&dir, &c).unwrap();
        let mut back = load_at(&dir, limits, 2_000).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let _ = back.mark_selected(|_| true);
        assert_eq!(back.share(pod), 2);
        let mut out = Inserted::default();
        assert_eq!(
            back.insert_for(
                Some(pod),
                "n3.example.",
                IpAddr::from([192, 0, 2, 3]),
                3600,
                true,
                2_000,
                &mut out
            ),
            Err(Full::Client)
        );
    }
}
