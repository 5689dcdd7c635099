//! DNS `matchPattern` / `matchName` selectors compiled from fuzzed text and
//! matched against fuzzed names: compiling either refuses the text (as Cilium's
//! validation does) or yields a matcher that never panics and agrees, name by
//! name, with Cilium's own regex translation of every selector (`matching`
//! returns exactly the selectors whose regex matches; `first_match` the lowest).
//!
//! Input: selector lines (`=name` for matchName, else a pattern), a blank line,
//! then names to look up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_policy::dns_match::{DnsMatcher, DnsSelector, cilium_regex, normalize_name};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (sels, names) = text.split_once("\n\n").unwrap_or((text, ""));
    let sels: Vec<DnsSelector> = sels
        .lines()
        .take(64)
        .map(|l| match l.strip_prefix('=') {
            Some(n) => DnsSelector::MatchName(n.to_string()),
            None => DnsSelector::MatchPattern(l.to_string()),
        })
        .collect();
    let Ok(m) = DnsMatcher::new(&sels) else {
        return;
    };
    let res: Vec<regex::Regex> = sels
        .iter()
        .map(|s| regex::Regex::new(&cilium_regex(s)).expect("a valid selector's regex compiles"))
        .collect();
    for name in names.lines().take(16).chain(std::iter::once(names)) {
        let norm = normalize_name(name);
        let want: Vec<u32> = (0..res.len() as u32)
            .filter(|i| res[*i as usize].is_match(&norm))
            .collect();
        assert_eq!(m.matching(name), want, "name {name:?} selectors {sels:?}");
        assert_eq!(m.first_match(name, |_| true), want.first().copied());
        assert_eq!(
            m.first_match(name, |i| i % 2 == 1),
            want.iter().copied().find(|i| i % 2 == 1)
        );
        // A selector's canonical form means the same.
        for (i, s) in sels.iter().enumerate() {
            // The canonical form adds a trailing dot, which may pass the limit.
            let (DnsSelector::MatchName(t) | DnsSelector::MatchPattern(t)) = s;
            if t.len() >= weir_policy::dns_match::MAX_FQDN_LEN {
                continue;
            }
            let c = DnsMatcher::new([&s.canonical()]).expect("canonical form compiles");
            assert_eq!(c.first_match(name, |_| true).is_some(), want.contains(&(i as u32)));
        }
    }
});
