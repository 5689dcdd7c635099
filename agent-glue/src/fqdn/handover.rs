//! The FQDN cache across a planned restart (`weir run` taking over a running
//! weir, see `takeover.rs`).
//!
//! The new weir starts from the cache file the old one writes when it hands
//! over ([`FqdnState::hand_over_with_cache`]; the once-a-second write lags,
//! and the new weir's first sync removes from the maps what its cache lacks).
//! From the handover on, the old weir changes nothing that is the
//! new one's: it writes no identities and no cache file, its expiry stops, and a
//! DNS answer it still has to release (a query in flight at the handover) is
//! learned into the kernel only when that needs no more than ipcache entries for
//! identities the maps already know — anything else would rewrite maps the new
//! weir owns, so that answer gets SERVFAIL and the client asks again (the new
//! weir answers). When the old weir has drained it writes its cache to
//! `<state-dir>/handover/`, and the new weir merges that in
//! ([`FqdnState::merge_handed_over`]) when the old one says it has drained.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;

use tracing::{info, warn};
use weir_policy::CompiledPolicy;

use super::{FqdnDatapath, FqdnState, persist};
use crate::datapath::DatapathError;

impl FqdnState {
    /// Enters (or, after an abandoned takeover, leaves) the handed-over state.
    pub fn hand_over(&mut self, on: bool) {
        self.handed_over = on;
        // The new weir may change the datapath from now on: nothing here is
        // committed any more (and after a resume, the next learn recommits).
        let merged = self.view.clear(&mut self.cache);
        self.extended |= merged;
    }

    /// The old weir, when a new one asks for the listeners: stops answering
    /// from the view and writes the cache file the new weir starts from, so it
    /// holds every answer learned until now (the once-a-second write may lag
    /// up to two seconds, and the new weir's first sync would remove from the
    /// maps what its cache lacks). If the file cannot be written, nothing is
    /// handed over and the takeover is refused with the reason.
    pub fn hand_over_with_cache(&mut self) -> Result<(), String> {
        self.hand_over(true);
        match self.save_cache() {
            Ok(()) => Ok(()),
            Err(e) => {
                self.hand_over(false);
                Err(format!(
                    "could not write the FQDN cache for the new weir: {e}"
                ))
            }
        }
    }

    pub fn is_handed_over(&self) -> bool {
        self.handed_over
    }

    fn handover_dir(&self) -> Option<PathBuf> {
        self.state_dir.as_ref().map(|d| d.join("handover"))
    }

    /// The old weir, at the end of its drain: its cache, for the new weir.
    pub(super) fn persist_handed_over(&mut self) {
        let Some(dir) = self.handover_dir() else {
            return;
        };
        let written = std::fs::create_dir_all(&dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                persist::save(&dir, &self.cache)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        match written {
            Ok(()) => {
                self.dirty = false;
                self.extended = false;
            }
            Err(e) => {
                warn!(error = %e, dir = %dir.display(), "could not write the FQDN cache for the new weir")
            }
        }
    }

    /// The new weir, once the old one has drained: every entry the old weir's
    /// cache has and ours lacks (or holds for less long) joins ours, is learned
    /// into the installed `policy` and written to the datapath.
    pub fn merge_handed_over(
        &mut self,
        policy: &CompiledPolicy,
        dp: Option<&mut dyn FqdnDatapath>,
    ) {
        let Some(dir) = self.handover_dir() else {
            return;
        };
        if !dir.exists() {
            return;
        }
        let theirs = match persist::load(&dir, self.cache.limits) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "could not read the FQDN cache the old weir left; its last answers are not learned");
                let _ = std::fs::remove_dir_all(&dir);
                return;
            }
        };
        let mut merged = Vec::new();
        for (name, ips) in theirs.iter() {
            for (ip, entry) in ips {
                let ours = self.cache.get(name, *ip).copied();
                if ours.is_none_or(|o| o.expires_ms < entry.expires_ms) {
                    self.cache.set(name, *ip, Some(*entry));
                    merged.push((name.to_string(), *ip));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        if merged.is_empty() {
            return;
        }
        self.dirty = true;
        // Into the maps below: into the journal first (see `journal.rs`).
        self.journal_pairs(merged.iter().map(|(n, ip)| (n.as_str(), *ip)));
        self.learn_all_into(policy);
        if let Some(dp) = dp
            && let Err(e) = dp.sync(policy)
        {
            // The tick syncs again until it succeeds; the view stays off.
            self.resync = true;
            warn!(error = %e, "could not write the addresses the old weir learned while draining; retrying every second");
            return;
        }
        info!(
            entries = merged.len(),
            "merged the FQDN cache the old weir left"
        );
    }
}

/// The datapath as a handed-over weir may still touch it: ipcache entries for
/// identities the maps already know, nothing else.
pub struct HandedOverDatapath<'a>(pub &'a mut dyn FqdnDatapath);

fn refused(what: &str) -> DatapathError {
    DatapathError::Map {
        map: "weir_ipcache",
        detail: format!("{what}: a new weir owns the maps since the handover"),
    }
}

impl FqdnDatapath for HandedOverDatapath<'_> {
    fn has_fqdn_identity(&self, id: u32) -> bool {
        self.0.has_fqdn_identity(id)
    }
    fn write_learned(
        &mut self,
        policy: &CompiledPolicy,
        ips: &[(IpAddr, Option<u32>)],
    ) -> Result<(), DatapathError> {
        if ips.iter().any(|(_, id)| id.is_none()) {
            return Err(refused("removing a learned address"));
        }
        self.0.write_learned(policy, ips)
    }
    fn sync(&mut self, _policy: &CompiledPolicy) -> Result<(), DatapathError> {
        Err(refused("a full map sync"))
    }
    fn live_destinations(&self) -> Result<HashSet<IpAddr>, DatapathError> {
        self.0.live_destinations()
    }
}
