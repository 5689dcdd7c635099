//! Watching the `--policy` files and directories (and the `--endpoints` file)
//! with inotify: a change reloads them the way SIGHUP does.
//!
//! Two plain threads, never a proxy runtime thread: one blocks reading inotify
//! events and keeps those that concern a watched file, the other waits for the
//! events to stop (`debounce` after the last, at most [`MAX_DELAY`] after the
//! first) and then asks for one reload. An editor's save (write in place, or
//! write a temporary file and rename it over the old one) and a file added to
//! or removed from a policy directory are each one reload, not several.
//!
//! What is watched:
//! - a policy *file* or the endpoints file: its directory, for events naming
//!   the file (so a rename over it counts, which a watch on the file's own inode
//!   would miss);
//! - a policy *directory*: the directory, for events naming a `*.yaml` /
//!   `*.yml` file or `..data` (the symlink a Kubernetes ConfigMap volume swaps
//!   on update), and its parent, for the directory itself being replaced.
//!
//! A new file counts when it is closed after writing, not when it is created
//! (a symlink when it is created: it has no other event).
//! The mask leaves out `IN_MODIFY` on purpose: a directory that also holds a
//! busy file (the flow log beside the policy) would otherwise wake the watcher
//! at every write. A save ends with `IN_CLOSE_WRITE` or a rename either way.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tracing::{debug, info, warn};

/// Default quiet time after the last event before reloading.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(200);

/// A stream of events never postpones a reload longer than this.
pub const MAX_DELAY: Duration = Duration::from_secs(2);

fn mask() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

/// What a watched directory's events are looked at for.
#[derive(Debug, Clone, Default)]
struct Interest {
    /// These entries of the directory (policy and endpoints files).
    names: Vec<OsString>,
    /// Entries that are policy directories: replaced, they are watched anew.
    dirs: Vec<OsString>,
    /// The directory is a policy directory: any `*.yaml` / `*.yml` in it.
    policies: bool,
}

impl Interest {
    fn concerns(&self, name: Option<&OsStr>, mask: EventMask) -> bool {
        if mask.intersects(EventMask::Q_OVERFLOW) {
            // Events were lost: one of them may have been ours.
            return true;
        }
        let Some(name) = name else {
            // The directory itself went away (or was renamed).
            return self.policies && mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF);
        };
        self.names.iter().any(|n| n == name)
            || self.dirs.iter().any(|n| n == name)
            || (self.policies && is_policy_entry(name))
    }
}

/// A name in a policy directory whose change changes the policy.
fn is_policy_entry(name: &OsStr) -> bool {
    let p = Path::new(name);
    // The files `weir_policy::policy_files` reads, and the ConfigMap swap.
    name == "..data" || matches!(p.extension().and_then(OsStr::to_str), Some("yaml" | "yml"))
}

/// The watches of one weir: inotify watch descriptors and what each is for.
struct Watched {
    watches: Watches,
    entries: Vec<(WatchDescriptor, PathBuf, Interest)>,
}

impl Watched {
    /// Adds (or widens) the watch on `dir`.
    fn add(&mut self, dir: &Path, edit: impl FnOnce(&mut Interest)) -> std::io::Result<()> {
        let wd = self.watches.add(dir, mask())?;
        match self.entries.iter_mut().find(|(w, _, _)| *w == wd) {
            Some((_, _, interest)) => edit(interest),
            None => {
                let mut interest = Interest::default();
                edit(&mut interest);
                self.entries.push((wd, dir.to_path_buf(), interest));
            }
        }
        Ok(())
    }

    fn watch_policy_dir(&mut self, dir: &Path) -> std::io::Result<()> {
        self.add(dir, |i| i.policies = true)
    }

    /// Stops looking at `wd` as a policy directory (and stops watching it when
    /// nothing else is looked for there).
    fn forget_policy_dir(&mut self, wd: &WatchDescriptor) {
        let Some(i) = self.entries.iter().position(|(w, _, _)| w == wd) else {
            return;
        };
        let interest = &mut self.entries[i].2;
        interest.policies = false;
        if interest.names.is_empty() && interest.dirs.is_empty() {
            let (wd, _, _) = self.entries.swap_remove(i);
            // Gone with a deleted directory already; nothing to undo then.
            let _ = self.watches.remove(wd);
        }
    }
}

/// The directory and file name a file path is watched as.
fn split(path: &Path) -> (PathBuf, OsString) {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = abs
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let name = abs.file_name().map(OsStr::to_os_string).unwrap_or_default();
    (dir, name)
}

/// Starts watching `policy` (files and directories) and `endpoints`; `changed`
/// is called (on the debounce thread) once per settled change.
pub fn spawn(
    policy: &[PathBuf],
    endpoints: Option<&Path>,
    debounce: Duration,
    changed: impl Fn() + Send + 'static,
) -> std::io::Result<()> {
    let mut inotify = Inotify::init()?;
    let mut watched = Watched {
        watches: inotify.watches(),
        entries: Vec::new(),
    };
    for path in policy {
        if path.is_dir() {
            watched.watch_policy_dir(path)?;
            let (parent, name) = split(path);
            watched.add(&parent, |i| i.dirs.push(name))?;
        } else {
            let (dir, name) = split(path);
            watched.add(&dir, |i| i.names.push(name))?;
        }
    }
    if let Some(path) = endpoints {
        let (dir, name) = split(path);
        watched.add(&dir, |i| i.names.push(name))?;
    }
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("weir-watch".into())
        .spawn(move || read_events(&mut inotify, &mut watched, &tx))?;
    std::thread::Builder::new()
        .name("weir-watch-debounce".into())
        .spawn(move || settle(&rx, debounce, changed))?;
    Ok(())
}

/// Reads inotify events for good, passing on those that concern a watched file.
fn read_events(inotify: &mut Inotify, watched: &mut Watched, tx: &mpsc::Sender<()>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let events = match inotify.read_events_blocking(&mut buf) {
            Ok(ev) => ev,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(error = %e, "reading inotify events failed; policy files are no longer watched (SIGHUP still reloads)");
                return;
            }
        };
        let mut relevant = false;
        let mut rewatch: Vec<PathBuf> = Vec::new();
        let mut moved_away: Vec<WatchDescriptor> = Vec::new();
        for ev in events {
            let entry = watched.entries.iter().find(|(wd, _, _)| *wd == ev.wd);
            let concerns = match entry {
                Some((_, dir, interest)) => {
                    let yes = interest.concerns(ev.name, ev.mask)
                        && !(ev.mask.contains(EventMask::CREATE)
                            && !ev.mask.contains(EventMask::ISDIR)
                            && ev.name.is_some_and(|n| !is_symlink(&dir.join(n))));
                    // A policy directory created or renamed into place.
                    if let Some(name) = ev.name
                        && interest.dirs.iter().any(|d| d == name)
                        && ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO)
                    {
                        rewatch.push(dir.join(name));
                    }
                    // A policy directory moved or deleted: what is there now
                    // is not the --policy path any more.
                    if interest.policies
                        && ev
                            .mask
                            .intersects(EventMask::MOVE_SELF | EventMask::DELETE_SELF)
                    {
                        moved_away.push(ev.wd.clone());
                    }
                    yes
                }
                None => ev.mask.intersects(EventMask::Q_OVERFLOW),
            };
            debug!(mask = ?ev.mask, name = ?ev.name, concerns, "inotify event");
            relevant |= concerns;
        }
        for wd in moved_away {
            watched.forget_policy_dir(&wd);
        }
        for dir in rewatch {
            match watched.watch_policy_dir(&dir) {
                Ok(()) => {
                    info!(dir = %dir.display(), "policy directory replaced; watching the new one")
                }
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "cannot watch the new policy directory")
                }
            }
        }
        if relevant && tx.send(()).is_err() {
            return;
        }
    }
}

/// A new regular file is read once it is closed after writing
/// (`IN_CLOSE_WRITE`), never at its creation, when it may still be empty or
/// half written; a new symlink has no such event, so its creation counts.
fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Waits for a change, then for quiet, then calls `changed`; for good.
fn settle(rx: &mpsc::Receiver<()>, debounce: Duration, changed: impl Fn()) {
    while rx.recv().is_ok() {
        let first = Instant::now();
        loop {
            let wait = debounce.min(MAX_DELAY.saturating_sub(first.elapsed()));
            match rx.recv_timeout(wait) {
                Ok(()) if first.elapsed() < MAX_DELAY => continue,
                Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        info!("policy files changed; reloading");
        changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::Receiver;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weir-watch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const DEBOUNCE: Duration = Duration::from_millis(100);

    fn start(policy: &[PathBuf], endpoints: Option<&Path>) -> Receiver<Instant> {
        let (tx, rx) = mpsc::channel();
        spawn(policy, endpoints, DEBOUNCE, move || {
            let _ = tx.send(Instant::now());
        })
        .unwrap();
        rx
    }

    /// One reload for the change, and none after it.
    fn one_reload(rx: &Receiver<Instant>, what: &str) {
        assert!(
            rx.recv_timeout(Duration::from_secs(3)).is_ok(),
            "{what}: no reload"
        );
        assert!(
            rx.recv_timeout(Duration::from_millis(400)).is_err(),
            "{what}: more than one reload"
        );
    }

    fn none(rx: &Receiver<Instant>, what: &str) {
        assert!(
            rx.recv_timeout(Duration::from_millis(400)).is_err(),
            "{what}: reloaded"
        );
    }

    #[test]
    fn a_policy_file_is_watched_through_its_directory() {
        let d = scratch("file");
        let policy = d.join("policy.yaml");
        let eps = d.join("endpoints.yaml");
        std::fs::write(&policy, "a").unwrap();
        std::fs::write(&eps, "a").unwrap();
        let rx = start(std::slice::from_ref(&policy), Some(&eps));
        std::fs::write(&policy, "b").unwrap();
        one_reload(&rx, "write in place");
        // An editor's save: a temporary file renamed over the policy.
        std::fs::write(d.join(".policy.yaml.swp"), "c").unwrap();
        std::fs::rename(d.join(".policy.yaml.swp"), &policy).unwrap();
        one_reload(&rx, "atomic rename");
        std::fs::write(&eps, "b").unwrap();
        one_reload(&rx, "endpoints file");
        // Other files beside it: the flow log, written and rotated.
        let mut log = std::fs::File::create(d.join("flows.jsonl")).unwrap();
        for _ in 0..100 {
            std::io::Write::write_all(&mut log, b"{}\n").unwrap();
        }
        drop(log);
        std::fs::rename(d.join("flows.jsonl"), d.join("flows.jsonl.1")).unwrap();
        none(&rx, "other files");
        // A burst of writes is one reload — plus one per pause of about a
        // debounce between two writes, after which the watcher rightly
        // reloads (a loaded CI machine once held this thread that long).
        let mut pauses = 0;
        let mut last = Instant::now();
        for i in 0..20 {
            std::fs::write(&policy, format!("{i}")).unwrap();
            let now = Instant::now();
            if i > 0 && now - last >= DEBOUNCE * 8 / 10 {
                pauses += 1;
            }
            last = now;
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut reloads = 0;
        let mut wait = Duration::from_secs(3);
        while rx.recv_timeout(wait).is_ok() {
            reloads += 1;
            wait = Duration::from_millis(400);
        }
        assert!(
            (1..=1 + pauses).contains(&reloads),
            "burst: {reloads} reloads for 20 writes with {pauses} pauses"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Files that never stay quiet still reload, at most `MAX_DELAY` after
    /// the first change.
    #[test]
    fn a_stream_of_changes_reloads_within_the_max_delay() {
        let d = scratch("stream");
        let policy = d.join("policy.yaml");
        std::fs::write(&policy, "a").unwrap();
        let rx = start(std::slice::from_ref(&policy), None);
        let start = Instant::now();
        let until = start + MAX_DELAY + Duration::from_millis(800);
        let mut i = 0;
        while Instant::now() < until {
            std::fs::write(&policy, format!("{i}")).unwrap();
            i += 1;
            std::thread::sleep(Duration::from_millis(30));
        }
        let first = rx.try_recv().expect("a reload while the writes went on");
        assert!(first < until, "{:?}", first - start);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_policy_directory_reloads_on_new_changed_and_removed_files() {
        let d = scratch("dir");
        let pdir = d.join("policies");
        std::fs::create_dir_all(&pdir).unwrap();
        std::fs::write(pdir.join("a.yaml"), "a").unwrap();
        let rx = start(std::slice::from_ref(&pdir), None);
        std::fs::write(pdir.join("b.yml"), "b").unwrap();
        one_reload(&rx, "new file");
        std::fs::write(pdir.join("a.yaml"), "a2").unwrap();
        one_reload(&rx, "changed file");
        std::fs::remove_file(pdir.join("b.yml")).unwrap();
        one_reload(&rx, "removed file");
        std::fs::rename(pdir.join("a.yaml"), pdir.join("a.yaml.off")).unwrap();
        one_reload(&rx, "renamed away");
        // A file written slowly is read once, when it is closed.
        let mut slow = std::fs::File::create(pdir.join("slow.yaml")).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        std::io::Write::write_all(&mut slow, b"s").unwrap();
        none(&rx, "a file created, not yet closed");
        drop(slow);
        one_reload(&rx, "a new file closed");
        std::os::unix::fs::symlink(pdir.join("slow.yaml"), pdir.join("link.yaml")).unwrap();
        one_reload(&rx, "a new symlink");
        std::fs::write(pdir.join("notes.txt"), "x").unwrap();
        std::fs::write(pdir.join(".a.yaml.swp"), "x").unwrap();
        std::fs::write(pdir.join("a.yaml~"), "x").unwrap();
        none(&rx, "not a policy file");
        // The directory replaced by another (renamed into place).
        let next = d.join("policies.new");
        std::fs::create_dir_all(&next).unwrap();
        std::fs::write(next.join("c.yaml"), "c").unwrap();
        std::fs::rename(&pdir, d.join("policies.old")).unwrap();
        std::fs::rename(&next, &pdir).unwrap();
        one_reload(&rx, "directory replaced");
        std::fs::write(pdir.join("d.yaml"), "d").unwrap();
        one_reload(&rx, "a file in the new directory");
        std::fs::write(d.join("policies.old").join("e.yaml"), "e").unwrap();
        none(&rx, "the directory moved away");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn names_that_count_in_a_policy_directory() {
        for (name, yes) in [
            ("a.yaml", true),
            ("b.yml", true),
            ("..data", true),
            ("a.yaml~", false),
            (".a.yaml.swp", false),
            ("4913", false),
            ("README", false),
        ] {
            assert_eq!(is_policy_entry(OsStr::new(name)), yes, "{name}");
        }
    }
}
