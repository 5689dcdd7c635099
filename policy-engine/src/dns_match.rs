//! DNS name matching with Cilium's `matchName` / `matchPattern` semantics, at a
//! cost that stays flat as the number of rules grows.
//!
//! Semantics (Cilium's `pkg/fqdn/matchpattern`, `ToAnchoredRegexp`):
//! - names and patterns compare lower-cased, with a trailing dot (`dns.FQDN`);
//! - `matchName` is the exact name;
//! - in a pattern, a run of `*` matches `[-a-zA-Z0-9_]*` inside one label;
//! - a leading run of two or more stars followed by `.` (`**.example.com`)
//!   matches one or more whole labels (`([-a-zA-Z0-9_]+([.][-a-zA-Z0-9_]+)*)[.]`):
//!   `a.example.com` and `a.b.example.com`, never `example.com`;
//! - a pattern made only of stars (optionally with a trailing dot: `*`, `**.`)
//!   matches every name made of non-empty labels of `[-a-zA-Z0-9_]`, and the
//!   root `.` (`(^([-a-zA-Z0-9_]+[.])+$)|(^[.]$)`);
//! - everything else in a pattern is literal.
//!
//! Since neither a star nor a literal can match a `.`, a name matches a pattern
//! exactly when both split into the same number of labels (after the `**.`
//! prefix has taken its labels) and each label matches its glob.
//!
//! Index: exact names go into a hash map; every other pattern is filed in a trie
//! of reversed labels under its literal suffix (`*.api.example.com` under
//! `com` → `example` → `api`). A lookup walks the name's labels from the right
//! and confirms only the patterns it meets on the way, so its cost grows with
//! the name's length and the candidates sharing its suffix, not with the number
//! of patterns. Patterns made only of stars are kept apart (they match every
//! valid name).

use std::collections::HashMap;

use thiserror::Error;

/// Cilium's limit on a `matchName` / `matchPattern` (`MaxFQDNLength`).
pub const MAX_FQDN_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DnsPatternError {
    #[error("empty `{0}`")]
    Empty(&'static str),
    #[error("`{field}` value `{text}` is longer than {MAX_FQDN_LEN} characters")]
    TooLong { field: &'static str, text: String },
    #[error(
        "`{field}` value `{text}` has invalid characters: only 0-9, a-z, A-Z, `.`, `-`, `_`{star} are allowed"
    )]
    Characters {
        field: &'static str,
        text: String,
        star: &'static str,
    },
}

/// One DNS rule or `toFQDNs` selector, as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DnsSelector {
    MatchName(String),
    MatchPattern(String),
}

impl DnsSelector {
    /// The form two selectors that mean the same compare equal in: names and
    /// patterns lower-cased with a trailing dot (patterns made only of stars
    /// stay as written, as Cilium's `Sanitize` leaves them).
    pub fn canonical(&self) -> DnsSelector {
        match self {
            DnsSelector::MatchName(n) => DnsSelector::MatchName(normalize_name(n.trim())),
            DnsSelector::MatchPattern(p) => {
                let p = p.trim().to_ascii_lowercase();
                if is_all_stars(&p) {
                    DnsSelector::MatchPattern(p)
                } else {
                    DnsSelector::MatchPattern(normalize_name(&p))
                }
            }
        }
    }
}

impl std::fmt::Display for DnsSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DnsSelector::MatchName(n) => write!(f, "matchName: {n}"),
            DnsSelector::MatchPattern(p) => write!(f, "matchPattern: {p}"),
        }
    }
}

fn is_dns_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}

/// Checks a `matchName` as Cilium does (`[-a-zA-Z0-9_.]+`, at most 255).
pub fn validate_name(text: &str) -> Result<(), DnsPatternError> {
    validate(text, "matchName", false)
}

/// Checks a `matchPattern` as Cilium does (`[-a-zA-Z0-9_.*]+`, at most 255).
pub fn validate_pattern(text: &str) -> Result<(), DnsPatternError> {
    validate(text, "matchPattern", true)
}

fn validate(text: &str, field: &'static str, star: bool) -> Result<(), DnsPatternError> {
    if text.is_empty() {
        return Err(DnsPatternError::Empty(field));
    }
    if text.len() > MAX_FQDN_LEN {
        return Err(DnsPatternError::TooLong {
            field,
            text: text.to_string(),
        });
    }
    let ok = text.bytes().all(|b| {
        b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' || (star && b == b'*')
    });
    if !ok {
        return Err(DnsPatternError::Characters {
            field,
            text: text.to_string(),
            star: if star { " and `*`" } else { "" },
        });
    }
    Ok(())
}

/// A name as policy compares it: ASCII lower-case, with a trailing dot.
/// (Go's `strings.ToLower` also folds non-ASCII letters, but no pattern or
/// name that validation admits contains any, so such a name matches nothing
/// either way.)
pub fn normalize_name(name: &str) -> String {
    let mut out = name.to_ascii_lowercase();
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

fn is_all_stars(p: &str) -> bool {
    let p = p.strip_suffix('.').unwrap_or(p);
    !p.is_empty() && p.bytes().all(|b| b == b'*')
}

/// A compiled pattern (not an exact name, not match-all).
#[derive(Debug, Clone)]
struct Glob {
    /// `**.` prefix: one or more whole labels before `labels`.
    multi: bool,
    /// The dot-separated pieces after the prefix, the last one (after the
    /// trailing dot) empty. Stars are collapsed to one.
    labels: Vec<Vec<u8>>,
}

impl Glob {
    fn matches(&self, name_labels: &[&[u8]]) -> bool {
        let n = self.labels.len();
        let skip = if self.multi {
            // At least one extra label, each non-empty and of DNS characters.
            if name_labels.len() <= n {
                return false;
            }
            let k = name_labels.len() - n;
            if !name_labels[..k]
                .iter()
                .all(|l| !l.is_empty() && l.iter().all(|b| is_dns_char(*b)))
            {
                return false;
            }
            k
        } else {
            if name_labels.len() != n {
                return false;
            }
            0
        };
        self.labels
            .iter()
            .zip(&name_labels[skip..])
            .all(|(p, l)| label_matches(p, l))
    }
}

/// `*` matches any run of `[-a-z0-9_]`; every other pattern byte is literal.
fn label_matches(pattern: &[u8], label: &[u8]) -> bool {
    // Pattern literals are DNS characters (validated), and a star matches only
    // DNS characters: a label with anything else cannot match a label that has
    // a star. Without a star it is a plain comparison.
    if !pattern.contains(&b'*') {
        return pattern == label;
    }
    if !label.iter().all(|b| is_dns_char(*b)) {
        return false;
    }
    // Classic wildcard match with one backtrack point (stars are collapsed).
    let (mut p, mut l) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while l < label.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, l));
            p += 1;
        } else if p < pattern.len() && pattern[p] == label[l] {
            p += 1;
            l += 1;
        } else if let Some((sp, sl)) = star {
            p = sp + 1;
            l = sl + 1;
            star = Some((sp, sl + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

/// A name's labels; on the stack for names of up to 16 labels (every query
/// is matched: no allocation for the usual ones).
type Labels<'a> = smallvec::SmallVec<[&'a [u8]; 16]>;

fn split_labels(name: &str) -> Labels<'_> {
    name.as_bytes().split(|b| *b == b'.').collect()
}

/// `name` normalised ([`normalize_name`]), borrowed when it already is (the
/// DNS proxy hands over question names lower-cased, with their dot).
fn normalized(name: &str) -> std::borrow::Cow<'_, str> {
    if name.ends_with('.') && !name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Borrowed(name)
    } else {
        std::borrow::Cow::Owned(normalize_name(name))
    }
}

#[derive(Debug)]
enum Compiled {
    Exact(String),
    All,
    Glob(Glob),
}

/// Turns a validated selector into its compiled form.
fn compile_one(sel: &DnsSelector) -> Result<Compiled, DnsPatternError> {
    match sel {
        DnsSelector::MatchName(n) => {
            validate_name(n)?;
            Ok(Compiled::Exact(normalize_name(n)))
        }
        DnsSelector::MatchPattern(p) => {
            validate_pattern(p)?;
            let p = p.to_ascii_lowercase();
            if is_all_stars(&p) {
                return Ok(Compiled::All);
            }
            let p = if p.ends_with('.') { p } else { format!("{p}.") };
            let stars = p.bytes().take_while(|b| *b == b'*').count();
            let (multi, rest) = if stars >= 2 && p.as_bytes().get(stars) == Some(&b'.') {
                (true, &p[stars + 1..])
            } else {
                (false, p.as_str())
            };
            if !rest.contains('*') && !multi {
                return Ok(Compiled::Exact(rest.to_string()));
            }
            let labels = rest
                .as_bytes()
                .split(|b| *b == b'.')
                .map(|l| {
                    let mut out = Vec::with_capacity(l.len());
                    for b in l {
                        if *b == b'*' && out.last() == Some(&b'*') {
                            continue;
                        }
                        out.push(*b);
                    }
                    out
                })
                .collect();
            Ok(Compiled::Glob(Glob { multi, labels }))
        }
    }
}

#[derive(Debug, Default)]
struct SuffixNode {
    children: HashMap<Box<[u8]>, u32>,
    /// Patterns whose literal suffix ends here, ascending (those whose next
    /// label has no literal head or tail, e.g. `*`, or a `**.` prefix).
    patterns: Vec<u32>,
    /// Patterns whose next label (leftwards) ends in a literal tail after its
    /// last star (`web*-1` → `-1`), by that tail: only a name label that ends
    /// so can match them.
    by_tail: HashMap<Box<[u8]>, Vec<u32>>,
    /// Likewise by the literal head before the first star, when the label
    /// ends in a star (`api-*` → `api-`).
    by_head: HashMap<Box<[u8]>, Vec<u32>>,
}

/// Every DNS rule of one table (or every `toFQDNs` selector of a policy set),
/// indexed. Rule indices are positions in the list given to [`DnsMatcher::new`].
#[derive(Debug)]
pub struct DnsMatcher {
    /// Normalised exact name → rules, ascending.
    exact: HashMap<String, Vec<u32>>,
    /// Match-all patterns, ascending.
    all: Vec<u32>,
    globs: Vec<(u32, Glob)>,
    /// Pattern index → position in `globs`.
    glob_of: HashMap<u32, u32>,
    nodes: Vec<SuffixNode>,
    len: usize,
}

impl DnsMatcher {
    pub fn new<'a>(
        selectors: impl IntoIterator<Item = &'a DnsSelector>,
    ) -> Result<Self, DnsPatternError> {
        let mut m = DnsMatcher {
            exact: HashMap::new(),
            all: Vec::new(),
            globs: Vec::new(),
            glob_of: HashMap::new(),
            nodes: vec![SuffixNode::default()],
            len: 0,
        };
        for (i, sel) in selectors.into_iter().enumerate() {
            let i = i as u32;
            m.len += 1;
            match compile_one(sel)? {
                Compiled::Exact(n) => m.exact.entry(n).or_default().push(i),
                Compiled::All => m.all.push(i),
                Compiled::Glob(g) => {
                    // The literal suffix: the trailing labels without a star
                    // (the final empty piece is the trailing dot, skipped).
                    let mut node = 0usize;
                    let body = &g.labels[..g.labels.len().saturating_sub(1)];
                    let mut next: Option<&[u8]> = None;
                    for l in body.iter().rev() {
                        if l.contains(&b'*') {
                            next = Some(l);
                            break;
                        }
                        let next = m.nodes.len() as u32;
                        let child = *m.nodes[node]
                            .children
                            .entry(l.clone().into_boxed_slice())
                            .or_insert(next);
                        if child == next {
                            m.nodes.push(SuffixNode::default());
                        }
                        node = child as usize;
                    }
                    let tail =
                        next.map(|l| &l[l.iter().rposition(|b| *b == b'*').map_or(0, |p| p + 1)..]);
                    let head = next.map(|l| &l[..l.iter().position(|b| *b == b'*').unwrap_or(0)]);
                    match (tail, head) {
                        (Some(t), _) if !t.is_empty() => {
                            m.nodes[node].by_tail.entry(t.into()).or_default().push(i)
                        }
                        (_, Some(h)) if !h.is_empty() => {
                            m.nodes[node].by_head.entry(h.into()).or_default().push(i)
                        }
                        _ => m.nodes[node].patterns.push(i),
                    }
                    m.glob_of.insert(i, m.globs.len() as u32);
                    m.globs.push((i, g));
                }
            }
        }
        Ok(m)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f` with every candidate list the name reaches (each ascending),
    /// and whether its members still need confirming.
    fn candidates<'s>(&'s self, name: &str, labels: &[&[u8]], mut f: impl FnMut(&'s [u32], bool)) {
        if let Some(ids) = self.exact.get(name) {
            f(ids, false);
        }
        if !self.all.is_empty() && match_all(name, labels) {
            f(&self.all, false);
        }
        let mut node = 0usize;
        let body = &labels[..labels.len().saturating_sub(1)];
        let mut i = body.len();
        loop {
            let n = &self.nodes[node];
            if !n.patterns.is_empty() {
                f(&n.patterns, true);
            }
            if i == 0 {
                break;
            }
            // The name's label just left of the literal suffix: only patterns
            // whose label there has one of its tails or heads can match.
            let next = body[i - 1];
            if !n.by_tail.is_empty() {
                for k in 1..=next.len() {
                    if let Some(ids) = n.by_tail.get(&next[next.len() - k..]) {
                        f(ids, true);
                    }
                }
            }
            if !n.by_head.is_empty() {
                for k in 1..=next.len() {
                    if let Some(ids) = n.by_head.get(&next[..k]) {
                        f(ids, true);
                    }
                }
            }
            i -= 1;
            match n.children.get(body[i]) {
                Some(c) => node = *c as usize,
                None => break,
            }
        }
    }

    fn confirm(&self, id: u32, labels: &[&[u8]]) -> bool {
        self.glob_of
            .get(&id)
            .is_some_and(|g| self.globs[*g as usize].1.matches(labels))
    }

    /// The lowest rule matching `name` for which `accept` holds.
    pub fn first_match(&self, name: &str, accept: impl Fn(u32) -> bool) -> Option<u32> {
        let name = normalized(name);
        let labels = split_labels(&name);
        let mut best: Option<u32> = None;
        self.candidates(&name, &labels, |ids, check| {
            for id in ids {
                if best.is_some_and(|b| b <= *id) {
                    break;
                }
                if accept(*id) && (!check || self.confirm(*id, &labels)) {
                    best = Some(*id);
                    break;
                }
            }
        });
        best
    }

    /// Every rule matching `name`, ascending.
    pub fn matching(&self, name: &str) -> Vec<u32> {
        let name = normalized(name);
        let labels = split_labels(&name);
        let mut out = Vec::new();
        self.candidates(&name, &labels, |ids, check| {
            out.extend(
                ids.iter()
                    .copied()
                    .filter(|id| !check || self.confirm(*id, &labels)),
            );
        });
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// `(^([-a-zA-Z0-9_]+[.])+$)|(^[.]$)` on a normalised name.
fn match_all(name: &str, labels: &[&[u8]]) -> bool {
    if name == "." {
        return true;
    }
    let body = &labels[..labels.len().saturating_sub(1)];
    !body.is_empty()
        && body
            .iter()
            .all(|l| !l.is_empty() && l.iter().all(|b| is_dns_char(*b)))
}

/// Cilium's regex for a selector (`ToAnchoredRegexp`, or the quoted name), for
/// tests that check the matcher against it.
pub fn cilium_regex(sel: &DnsSelector) -> String {
    const CHARS: &str = "[-a-zA-Z0-9_]";
    match sel {
        DnsSelector::MatchName(n) => format!("^{}$", regex::escape(&normalize_name(n))),
        DnsSelector::MatchPattern(p) => {
            let p = p.trim().to_ascii_lowercase();
            if is_all_stars(&p) {
                return format!("(^({CHARS}+[.])+$)|(^[.]$)");
            }
            let p = if p.ends_with('.') { p } else { format!("{p}.") };
            let b = p.as_bytes();
            let mut out = String::from("^");
            let stars = b.iter().take_while(|c| **c == b'*').count();
            let mut i = 0;
            if stars >= 2 && b.get(stars) == Some(&b'.') {
                out.push_str(&format!("({CHARS}+([.]{CHARS}+){{0,}})[.]"));
                i = stars + 1;
            }
            while i < b.len() {
                match b[i] {
                    b'.' => out.push_str("[.]"),
                    b'*' => {
                        while i + 1 < b.len() && b[i + 1] == b'*' {
                            i += 1;
                        }
                        out.push_str(CHARS);
                        out.push('*');
                    }
                    c => out.push(c as char),
                }
                i += 1;
            }
            out.push('$');
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pat(p: &str) -> DnsSelector {
        DnsSelector::MatchPattern(p.to_string())
    }
    fn name(n: &str) -> DnsSelector {
        DnsSelector::MatchName(n.to_string())
    }

    /// (selector, name, matches) — Cilium's documented examples and the edges
    /// of its regex translation.
    const TABLE: &[(&str, &str, bool)] = &[
        // matchName: exact, case-insensitive, trailing dot optional.
        ("=api.github.com", "api.github.com", true),
        ("=api.github.com", "API.GitHub.com.", true),
        ("=api.github.com.", "api.github.com", true),
        ("=api.github.com", "x.api.github.com", false),
        ("=api.github.com", "github.com", false),
        ("=cilium.io", "cilium.io", true),
        // `*` inside one label only.
        ("*.cilium.io", "www.cilium.io", true),
        ("*.cilium.io", "blog.cilium.io", true),
        ("*.cilium.io", "cilium.io", false),
        ("*.cilium.io", "a.b.cilium.io", false),
        ("*.cilium.io", "google.com", false),
        // `*` may match an empty run: `.cilium.io.` (empty label) matches, as
        // Cilium's regex does.
        ("*.cilium.io", ".cilium.io", true),
        ("*cilium.io", "cilium.io", true),
        ("*cilium.io", "www.cilium.io", false),
        ("*cilium.io", "wwwcilium.io", true),
        ("sub*.cilium.io", "sub.cilium.io", true),
        ("sub*.cilium.io", "subdomain.cilium.io", true),
        ("sub*.cilium.io", "www.cilium.io", false),
        ("sub*.cilium.io", "cilium.io", false),
        (
            "special*service.api.cilium.io",
            "special-foo-service.api.cilium.io",
            true,
        ),
        (
            "special*service.api.cilium.io",
            "specialservice.api.cilium.io",
            true,
        ),
        (
            "special*service.api.cilium.io",
            "special.service.api.cilium.io",
            false,
        ),
        ("*.GitHub.COM", "API.github.com", true),
        ("a*b*c.io", "abc.io", true),
        ("a*b*c.io", "axxbyyc.io", true),
        ("a*b*c.io", "axxbyy.io", false),
        ("a**b.io", "axyb.io", true),
        // A star matches DNS characters only.
        ("*.io", "a b.io", false),
        ("*.io", "a_b-c.io", true),
        // A leading dash is a DNS character too (the proxy reads such a name
        // bare, as Cilium does: `-foo.io.`, not hickory's `\-foo.io.`).
        ("*.io", "-foo.io", true),
        ("=-foo.io", "-foo.io", true),
        ("*.io", "\\-foo.io", false),
        // Leading `**.`: one or more whole labels, never none.
        ("**.example.com", "a.example.com", true),
        ("**.example.com", "a.b.c.example.com", true),
        ("**.example.com", "example.com", false),
        ("**.example.com", ".example.com", false),
        ("**.example.com", "a..example.com", false),
        ("***.example.com", "a.b.example.com", true),
        ("**.*.example.com", "x.y.example.com", true),
        ("**.*.example.com", "y.example.com", false),
        // `**` not followed by a dot is an ordinary star.
        ("**foo.com", "barfoo.com", true),
        ("**foo.com", "a.foo.com", false),
        ("a.**.com", "a.b.com", true),
        ("a.**.com", "a.b.c.com", false),
        // All stars: every valid name, and the root.
        ("*", "anything.example.com", true),
        ("*", "a", true),
        ("*", ".", true),
        ("**", "x.y.z", true),
        ("*.", "x.y.z", true),
        ("**.", "x.y.z", true),
        ("*", "a..b", false),
        ("*", "a b.com", false),
        ("*", "", true),
        // Literal patterns are exact names.
        ("cilium.io", "cilium.io", true),
        ("cilium.io", "www.cilium.io", false),
    ];

    fn sel(s: &str) -> DnsSelector {
        match s.strip_prefix('=') {
            Some(n) => name(n),
            None => pat(s),
        }
    }

    #[test]
    fn table() {
        for (s, n, want) in TABLE {
            let sel = sel(s);
            let m = DnsMatcher::new([&sel]).unwrap();
            let got = m.first_match(n, |_| true).is_some();
            assert_eq!(got, *want, "{sel} vs {n:?}");
            let re = regex::Regex::new(&cilium_regex(&sel)).unwrap();
            assert_eq!(
                re.is_match(&normalize_name(n)),
                *want,
                "Cilium regex {} vs {n:?}",
                cilium_regex(&sel)
            );
        }
    }

    #[test]
    fn validation() {
        assert!(validate_pattern("*.example.com").is_ok());
        assert!(validate_pattern("a_b-c.*").is_ok());
        assert!(validate_pattern("a[b].com").is_err());
        assert!(validate_pattern("a b.com").is_err());
        assert!(validate_pattern("").is_err());
        assert!(validate_name("*.example.com").is_err());
        assert!(validate_name("x.example.com").is_ok());
        assert!(validate_name(&"a".repeat(256)).is_err());
        assert!(DnsMatcher::new([&pat("a+b")]).is_err());
    }

    #[test]
    fn lowest_rule_wins_and_accept_filters() {
        let sels = [pat("*.example.com"), name("www.example.com"), pat("*")];
        let m = DnsMatcher::new(&sels).unwrap();
        assert_eq!(m.first_match("www.example.com", |_| true), Some(0));
        assert_eq!(m.first_match("www.example.com", |i| i != 0), Some(1));
        assert_eq!(m.first_match("www.example.com", |i| i == 2), Some(2));
        assert_eq!(m.first_match("other.org", |_| true), Some(2));
        assert_eq!(m.first_match("other.org", |i| i < 2), None);
        assert_eq!(m.matching("www.example.com"), vec![0, 1, 2]);
    }

    #[test]
    fn many_patterns_still_exact() {
        let sels: Vec<DnsSelector> = (0..100_000)
            .map(|i| match i % 3 {
                0 => name(&format!("host{i}.svc{}.example.com", i % 97)),
                1 => pat(&format!("*.svc{i}.example.com")),
                _ => pat(&format!("**.zone{i}.example.org")),
            })
            .collect();
        let m = DnsMatcher::new(&sels).unwrap();
        assert_eq!(m.first_match("a.svc4.example.com", |_| true), Some(4));
        assert_eq!(m.first_match("a.b.zone5.example.org", |_| true), Some(5));
        assert_eq!(
            m.first_match("host99999.svc89.example.com", |_| true),
            Some(99_999)
        );
        assert_eq!(m.first_match("nothing.example.net", |_| true), None);
    }

    fn label() -> impl Strategy<Value = String> {
        prop::string::string_regex("[a-cA-C0-9_*-]{0,4}").unwrap()
    }

    fn pattern() -> impl Strategy<Value = String> {
        (
            prop::sample::select(vec!["", "**.", "*.", "***."]),
            prop::collection::vec(label(), 1..4),
            any::<bool>(),
        )
            .prop_map(|(prefix, labels, dot)| {
                let mut p = format!("{prefix}{}", labels.join("."));
                if dot {
                    p.push('.');
                }
                p
            })
            .prop_filter("valid", |p| validate_pattern(p).is_ok())
    }

    fn dns_name() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(
                prop::string::string_regex("[a-cA-C0-9_ -]{0,4}").unwrap(),
                0..6,
            ),
            any::<bool>(),
        )
            .prop_map(|(labels, dot)| {
                let mut n = labels.join(".");
                if dot {
                    n.push('.');
                }
                n
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The matcher agrees with Cilium's regex translation, pattern by pattern.
        #[test]
        fn agrees_with_cilium_regex(p in pattern(), n in dns_name()) {
            let sel = pat(&p);
            let m = DnsMatcher::new([&sel]).unwrap();
            let re = regex::Regex::new(&cilium_regex(&sel)).unwrap();
            prop_assert_eq!(
                m.first_match(&n, |_| true).is_some(),
                re.is_match(&normalize_name(&n)),
                "pattern {:?} regex {} name {:?}", p, cilium_regex(&sel), n
            );
        }

        /// With many patterns, the index returns exactly the lowest one a naive
        /// scan of the regexes finds (the index never hides or invents a match).
        #[test]
        fn index_agrees_with_scan(
            pats in prop::collection::vec(pattern(), 1..24),
            names in prop::collection::vec(dns_name(), 1..8),
        ) {
            let sels: Vec<DnsSelector> = pats.iter().map(|p| pat(p)).collect();
            let m = DnsMatcher::new(&sels).unwrap();
            let res: Vec<regex::Regex> = sels
                .iter()
                .map(|s| regex::Regex::new(&cilium_regex(s)).unwrap())
                .collect();
            for n in &names {
                let norm = normalize_name(n);
                let all: Vec<u32> = (0..res.len() as u32)
                    .filter(|i| res[*i as usize].is_match(&norm))
                    .collect();
                prop_assert_eq!(m.matching(n), all.clone());
                prop_assert_eq!(m.first_match(n, |_| true), all.first().copied());
                prop_assert_eq!(
                    m.first_match(n, |i| i % 2 == 1),
                    all.iter().copied().find(|i| i % 2 == 1)
                );
            }
        }
    }
}
