//! The `rule_id`s the kernel's policy entries carry, and what they name.
//!
//! A verdict event is read up to 20 ms after the kernel decided it, and a reload
//! may have happened in between. If ids were positions in each generation's rule
//! list, an event decided under the old policy would be named after whatever rule
//! the new list has at that position. So an id, once given to a rule, keeps naming
//! that rule: it is reused only after `KEEP_SYNCS` syncs without it, long after any
//! event that could carry it has been read.

use std::collections::HashMap;

use weir_policy::RuleRef;

/// How many syncs an unused id keeps naming its rule before it may be reused.
const KEEP_SYNCS: u64 = 8;

#[derive(Debug, Default)]
pub struct RuleIds {
    /// id → the rule it names (`None`: free).
    names: Vec<Option<RuleRef>>,
    by_rule: HashMap<RuleRef, u32>,
    /// id → the sync that last used it.
    last_used: Vec<u64>,
    free: Vec<u32>,
    sync: u64,
}

impl RuleIds {
    /// Starts a sync: ids handed out from now on are used by it.
    pub fn begin_sync(&mut self) {
        self.sync += 1;
    }

    /// The id of `rule`, the same as in earlier syncs while it stayed in use.
    pub fn id(&mut self, rule: &RuleRef) -> u32 {
        if let Some(&id) = self.by_rule.get(rule) {
            self.last_used[id as usize] = self.sync;
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id as usize] = Some(rule.clone());
                self.last_used[id as usize] = self.sync;
                id
            }
            None => {
                self.names.push(Some(rule.clone()));
                self.last_used.push(self.sync);
                (self.names.len() - 1) as u32
            }
        };
        self.by_rule.insert(rule.clone(), id);
        id
    }

    /// Frees the ids no sync has used for `KEEP_SYNCS` syncs.
    pub fn collect(&mut self) {
        for (id, used) in self.last_used.iter().enumerate() {
            if self.sync.saturating_sub(*used) >= KEEP_SYNCS
                && let Some(rule) = self.names[id].take()
            {
                self.by_rule.remove(&rule);
                self.free.push(id as u32);
            }
        }
    }

    /// id → rule, for naming the rules of verdict events.
    pub fn names(&self) -> Vec<Option<RuleRef>> {
        self.names.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(path: &str) -> RuleRef {
        RuleRef {
            policy: "p".into(),
            rule: path.into(),
        }
    }

    #[test]
    fn an_id_keeps_naming_its_rule_across_reloads_that_reorder_rules() {
        let mut ids = RuleIds::default();
        ids.begin_sync();
        let a = ids.id(&rule("spec.ingress[0]"));
        let b = ids.id(&rule("spec.ingress[1]"));
        ids.collect();
        // The next policy drops ingress[0]; the old ingress[1] is now ingress[0].
        ids.begin_sync();
        let moved = ids.id(&rule("spec.ingress[0]"));
        assert_eq!(moved, a, "same rule reference, same id");
        let c = ids.id(&rule("spec.egress[0]"));
        assert!(c != a && c != b);
        ids.collect();
        let names = ids.names();
        // An event decided under the first policy with id `b` still names the
        // rule that decided it.
        assert_eq!(names[b as usize], Some(rule("spec.ingress[1]")));
    }

    #[test]
    fn unused_ids_are_reused_only_after_a_while() {
        let mut ids = RuleIds::default();
        ids.begin_sync();
        let old = ids.id(&rule("old"));
        for n in 0..KEEP_SYNCS {
            ids.collect();
            ids.begin_sync();
            let fresh = ids.id(&rule(&format!("new{n}")));
            assert_ne!(fresh, old, "sync {n}: still naming `old`");
        }
        ids.collect();
        assert_eq!(ids.names()[old as usize], None);
        ids.begin_sync();
        assert_eq!(ids.id(&rule("newest")), old);
    }
}
