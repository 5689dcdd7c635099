//! `<state-dir>/fqdn-journal`: what changed in the FQDN cache since the cache
//! file was last written. The file is rewritten at most once a second; an
//! answer's addresses are in the maps before it is released, and the next
//! weir's first sync removes from the maps what its cache lacks — so without
//! the journal a `kill -9` made the next weir cut the last second's answers.
//!
//! One JSON line per changed (name, address): the entry after the change, or
//! none when it left. An answer's lines go out in one `write` before the answer
//! is released (a killed process leaves all of it; no fsync, the page cache
//! outlives the process). Every line carries the epoch of the cache file it
//! follows, and replay takes only that file's lines: a journal older than its
//! file (a crash between the rename and emptying it, an emptying that failed)
//! never rolls newer entries back. Emptied by each file write; capped at
//! [`MAX_BYTES`] (a full journal logs, and a crash then forgets what it lacks).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::cache::Entry;
use super::persist::PersistError;

/// The most the journal holds: about 100 000 lines, far more than a second of
/// answers; only a cache file that cannot be written lets it fill.
pub const MAX_BYTES: u64 = 16 << 20;

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("fqdn-journal")
}

#[derive(Serialize, Deserialize)]
struct Line<'a> {
    epoch: u64,
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    ip: IpAddr,
    entry: Option<Entry>,
}

/// The journal of one weir, opened for appending on the first change.
pub struct Journal {
    path: PathBuf,
    file: Option<File>,
    /// The epoch of the cache file these lines follow.
    epoch: u64,
    /// The file's length as this weir wrote it (a failed write is cut back to it).
    len: u64,
}

impl Journal {
    /// The journal following the cache file of `epoch` (as loaded).
    pub fn new(state_dir: &Path, epoch: u64) -> Self {
        Journal {
            path: path(state_dir),
            file: None,
            epoch,
            len: 0,
        }
    }

    fn io(&self, source: std::io::Error) -> PersistError {
        PersistError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn file(&mut self) -> std::io::Result<&mut File> {
        if self.file.is_none() {
            let f = open(&self.path, true)?;
            self.len = f.metadata()?.len();
            self.file = Some(f);
        }
        self.file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the journal is not open"))
    }

    /// Appends `changes` in one write; a write that fails is cut back, so no
    /// torn line stays in front of later ones.
    pub fn append<'a>(
        &mut self,
        changes: impl Iterator<Item = (&'a str, IpAddr, Option<Entry>)>,
    ) -> Result<(), PersistError> {
        let mut bytes = Vec::new();
        for (name, ip, entry) in changes {
            let line = Line {
                epoch: self.epoch,
                name: name.into(),
                ip,
                entry,
            };
            serde_json::to_writer(&mut bytes, &line)
                .map_err(|e| self.io(std::io::Error::other(e)))?;
            bytes.push(b'\n');
        }
        if bytes.is_empty() {
            return Ok(());
        }
        // Opened first: the length of a journal an earlier run left is known.
        let opened = self.file().map(|_| ());
        opened.map_err(|e| self.io(e))?;
        if self.len.saturating_add(bytes.len() as u64) > MAX_BYTES {
            return Err(self.io(std::io::Error::other(format!(
                "the journal is at its cap of {MAX_BYTES} bytes (is the cache file failing to write?)"
            ))));
        }
        let len = self.len;
        let written = self.file().and_then(|f| match f.write_all(&bytes) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = f.set_len(len);
                Err(e)
            }
        });
        written.map_err(|e| self.io(e))?;
        self.len = len + bytes.len() as u64;
        Ok(())
    }

    /// The cache file was written under `epoch`: later lines carry it, and
    /// the journal is emptied (earlier lines would not replay over that file
    /// even if this fails).
    pub fn restart(&mut self, epoch: u64) -> Result<(), PersistError> {
        self.epoch = epoch;
        let cleared = self.file().and_then(|f| f.set_len(0));
        cleared.map_err(|e| self.io(e))?;
        self.len = 0;
        Ok(())
    }
}

/// Opens the journal (creating it mode 0600 when `create`), refusing anything
/// but a regular file of this user with one link: it is truncated as root.
fn open(path: &Path, create: bool) -> std::io::Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut opts = std::fs::OpenOptions::new();
    if create {
        opts.append(true).create(true).mode(0o600);
    } else {
        opts.read(true);
    }
    let f = opts
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let m = f.metadata()?;
    let euid = nix::unistd::geteuid().as_raw();
    if !m.file_type().is_file() || m.nlink() != 1 || m.uid() != euid {
        return Err(std::io::Error::other(
            "not a regular file of weir's user with a single link; left alone",
        ));
    }
    Ok(f)
}

/// Replays the journal's lines of `epoch` over the cache file's `names`, in
/// order. Lines that do not parse (a write torn by a power cut) are skipped.
pub fn replay(state_dir: &Path, epoch: u64, names: &mut BTreeMap<String, BTreeMap<IpAddr, Entry>>) {
    let path = path(state_dir);
    let mut bytes = Vec::new();
    let read = open(&path, false).and_then(|f| f.take(MAX_BYTES).read_to_end(&mut bytes));
    match read {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "could not read the FQDN journal; the cache file alone is loaded");
            return;
        }
    }
    let (mut replayed, mut torn, mut older) = (0usize, 0usize, 0usize);
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(l) = serde_json::from_slice::<Line>(line) else {
            torn += 1;
            continue;
        };
        if l.epoch != epoch {
            older += 1;
            continue;
        }
        let ips = names.entry(l.name.into_owned()).or_default();
        match l.entry {
            Some(e) => {
                ips.insert(l.ip, e);
            }
            None => {
                ips.remove(&l.ip);
            }
        }
        replayed += 1;
    }
    if torn > 0 {
        warn!(path = %path.display(), torn, replayed, "skipped FQDN journal lines that do not parse");
    }
    tracing::debug!(replayed, older, "replayed the FQDN journal");
}

#[cfg(test)]
mod tests {
    use super::super::cache::{Cache, Limits};
    use super::super::persist::{load, save};
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("weir-fqdn-journal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn entry(now: u64, secs: u64) -> Entry {
        Entry {
            expires_ms: now + secs * 1000,
            learned_ms: now,
            kept: false,
            owner: None,
        }
    }

    /// Lines replay in order over the file of their epoch: a later line wins,
    /// a removal removes, a torn line in the middle is skipped and the lines
    /// after it still count.
    #[test]
    fn the_journal_replays_in_order_over_its_file() {
        let d = dir("order");
        let limits = Limits::default();
        let now = super::super::now_ms();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut c = Cache::new(limits);
        c.set("a.example.", a, Some(entry(now, 30)));
        c.set("b.example.", b, Some(entry(now, 30)));
        let epoch = save(&d, &c).unwrap();
        let mut j = Journal::new(&d, epoch);
        j.append([("a.example.", a, Some(entry(now, 90)))].into_iter())
            .unwrap();
        let mut raw = std::fs::OpenOptions::new()
            .append(true)
            .open(path(&d))
            .unwrap();
        raw.write_all(b"{\"epoch\":1,\"name\":\"d.exa\n").unwrap();
        j.len += 26;
        j.append(
            [
                ("b.example.", b, None),
                ("c.example.", b, Some(entry(now, 60))),
            ]
            .into_iter(),
        )
        .unwrap();
        let back = load(&d, limits).unwrap();
        assert_eq!(
            back.get("a.example.", a).map(|e| e.expires_ms),
            Some(now + 90_000)
        );
        assert_eq!(back.get("b.example.", b), None);
        assert_eq!(
            back.get("c.example.", b).map(|e| e.expires_ms),
            Some(now + 60_000)
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A journal older than its file never rolls the file back: after a new
    /// file write, the old lines do not replay even when emptying the journal
    /// did not happen (a crash right after the rename).
    #[test]
    fn lines_of_an_older_file_do_not_replay() {
        let d = dir("older");
        let limits = Limits::default();
        let now = super::super::now_ms();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mut c = Cache::new(limits);
        c.set("a.example.", a, Some(entry(now, 30)));
        let first = save(&d, &c).unwrap();
        let mut j = Journal::new(&d, first);
        // Learned after the first write: in the journal only.
        j.append([("a.example.", a, Some(entry(now, 60)))].into_iter())
            .unwrap();
        assert_eq!(
            load(&d, limits)
                .unwrap()
                .get("a.example.", a)
                .map(|e| e.expires_ms),
            Some(now + 60_000)
        );
        // The file is written again with the entry extended; the journal is
        // not emptied (the crash): its line must not shorten the entry.
        c.set("a.example.", a, Some(entry(now, 120)));
        save(&d, &c).unwrap();
        assert_eq!(
            load(&d, limits)
                .unwrap()
                .get("a.example.", a)
                .map(|e| e.expires_ms),
            Some(now + 120_000)
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Before any cache file exists, lines replay over none; a full journal
    /// refuses more; emptying it lets appends go on under the new epoch.
    #[test]
    fn the_journal_works_before_the_first_file_and_stops_at_its_cap() {
        let d = dir("cap");
        let limits = Limits::default();
        let now = super::super::now_ms();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let (_, epoch) = super::super::persist::load_with_epoch(&d, limits).unwrap();
        let mut j = Journal::new(&d, epoch);
        j.append([("a.example.", a, Some(entry(now, 60)))].into_iter())
            .unwrap();
        assert!(load(&d, limits).unwrap().get("a.example.", a).is_some());
        j.len = MAX_BYTES;
        assert!(
            j.append([("b.example.", a, Some(entry(now, 60)))].into_iter())
                .is_err()
        );
        let mut c = Cache::new(limits);
        c.set("a.example.", a, Some(entry(now, 60)));
        let epoch = save(&d, &c).unwrap();
        j.restart(epoch).unwrap();
        assert_eq!(std::fs::metadata(path(&d)).unwrap().len(), 0);
        j.append([("b.example.", a, Some(entry(now, 60)))].into_iter())
            .unwrap();
        assert!(load(&d, limits).unwrap().get("b.example.", a).is_some());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A journal that is a hard link to another file is neither read nor
    /// truncated.
    #[test]
    fn a_hard_linked_journal_is_left_alone() {
        let d = dir("link");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::hard_link(&victim, path(&d)).unwrap();
        let mut j = Journal::new(&d, 1);
        assert!(j.restart(2).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let _ = std::fs::remove_dir_all(&d);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Whatever the journal holds — lines of this file's epoch or another,
        /// names in any spelling, removals, expiries far out, torn bytes —
        /// loading never fails and yields a cache within its limits: canonical
        /// names, no expiry beyond now + the maximum TTL, nothing expired.
        #[test]
        fn any_journal_loads_into_a_cache_within_its_limits(
            lines in proptest::collection::vec(
                (
                    proptest::bool::ANY,
                    "[a-zA-Z0-9.*-]{0,12}",
                    0u8..4,
                    proptest::option::of((0u64..200_000_000, proptest::bool::ANY)),
                ),
                0..40,
            ),
            junk in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let d = dir("prop");
            let limits = Limits { max_ips_per_name: 2, max_ips: 6, max_names: 5, max_ttl_secs: 3600, ..Limits::default() };
            let now = super::super::now_ms();
            let mut c = Cache::new(limits);
            c.set("seed.example.", "192.0.2.9".parse().unwrap(), Some(entry(now, 60)));
            let epoch = save(&d, &c).unwrap();
            let mut bytes = Vec::new();
            for (ours, name, host, e) in &lines {
                let line = Line {
                    epoch: if *ours { epoch } else { epoch ^ 1 },
                    name: name.as_str().into(),
                    ip: IpAddr::from([192, 0, 2, *host]),
                    entry: e.map(|(ms, kept)| Entry {
                        expires_ms: now.saturating_sub(100_000_000) + ms * 100,
                        learned_ms: now.saturating_sub(ms),
                        kept,
                        owner: None,
                    }),
                };
                bytes.extend(serde_json::to_vec(&line).unwrap());
                bytes.push(b'\n');
            }
            bytes.extend(&junk);
            std::fs::write(path(&d), &bytes).unwrap();
            let back = load(&d, limits).unwrap();
            proptest::prop_assert!(back.name_count() <= limits.max_names);
            proptest::prop_assert!(back.ip_count() <= limits.max_ips);
            for (name, ips) in back.iter() {
                let canonical = weir_policy::dns_match::normalize_name(name);
                proptest::prop_assert_eq!(name, canonical.as_str());
                proptest::prop_assert!(ips.len() <= limits.max_ips_per_name);
                for e in ips.values() {
                    proptest::prop_assert!(e.expires_ms <= now + 3_600_000 + 1_000);
                    proptest::prop_assert!(e.kept || e.expires_ms > now.saturating_sub(1_000));
                }
            }
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}
