//! HTTP rule matching whose cost stays flat as rules grow.
//!
//! Every rule's path regex is one pattern of a single multi-pattern regex. Each
//! pattern's literal prefix (what every match must start with, from regex-syntax's
//! literal extractor) goes into a byte trie; a request walks the trie along its
//! path and collects only the patterns whose prefix it has, then confirms each with
//! an anchored search for that pattern alone. Cost grows with the path length and
//! the few candidates, not with the number of rules. Patterns without a useful
//! prefix sit at the trie's root; when a request has too many candidates, one
//! overlapping scan of all patterns is cheaper and is used instead.

use http::HeaderMap;
use regex::{Regex, RegexBuilder};
use regex_automata::meta;
use regex_automata::{Anchored, Input, MatchKind, PatternID, PatternSet};
use regex_syntax::hir::literal::{ExtractKind, Extractor};
use thiserror::Error;
use weir_parsers::http::RequestFacts;

use crate::model::{HeaderRule, MismatchAction};

/// Policy regexes match the whole value, as in Cilium.
pub fn anchored(re: &str) -> String {
    format!("^(?:{re})$")
}

#[derive(Debug, Error)]
pub enum HttpCompileError {
    #[error("compiling HTTP rules: {0}")]
    Regex(#[from] regex::Error),
    #[error("compiling HTTP path rules: {0}")]
    Paths(#[from] Box<regex_automata::meta::BuildError>),
}

/// One HTTP rule, ready to match. `owner` says which L4 entry the rule belongs to;
/// only rules whose owner matched the connection's peer and port take part.
#[derive(Debug)]
pub struct HttpRuleSpec {
    pub owner: u32,
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub headers: Vec<HeaderRule>,
}

#[derive(Debug)]
struct CompiledRule {
    owner: u32,
    method: Option<Regex>,
    host: Option<Regex>,
    /// Conditions that deny on mismatch.
    headers: Vec<HeaderRule>,
    /// `headerMatches` with a `mismatch` action: never deny, act instead.
    actions: Vec<HeaderRule>,
    /// The rule's pattern in the path regex, if it has a path.
    path_pattern: Option<u32>,
}

/// A `headerMatches` entry with a `mismatch` action whose header did not have
/// the required value, and what is done about it. Recorded in the flow.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeaderMismatch {
    /// The header (lower-case).
    pub key: String,
    /// The value the rule requires; absent when it requires presence only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub required: Option<String>,
    /// What the request had (field lines joined with `,`); absent when missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
    pub action: MismatchAction,
}

/// The outcome of matching a request: the lowest allowing rule, and the header
/// actions of every allowing rule (in rule order) to apply before forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpMatch {
    pub rule: u32,
    pub mismatches: Vec<HeaderMismatch>,
}

/// A header's value as policy sees it: its field lines joined with `,` (as
/// Envoy does), `None` when absent. Compared byte for byte. `Cookie` lines (the
/// crumbs HTTP/2 splits a cookie into) join with `; ` (RFC 9113 §8.2.3).
pub fn joined_value(headers: &HeaderMap, name: &str) -> Option<Vec<u8>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let sep: &[u8] = if name.eq_ignore_ascii_case("cookie") {
        b"; "
    } else {
        b","
    };
    let mut out = first.as_bytes().to_vec();
    for v in values {
        out.extend_from_slice(sep);
        out.extend_from_slice(v.as_bytes());
    }
    Some(out)
}

fn header_matches(rule: &HeaderRule, headers: &HeaderMap) -> bool {
    match (&rule.value, joined_value(headers, &rule.name)) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(want), Some(have)) => have == want.as_bytes(),
    }
}

/// A rule without `method` allows every method but CONNECT: a CONNECT opens a
/// tunnel no later rule sees into, so only a rule that names it (a `method`
/// regex matching `CONNECT`) allows one. Cilium's Envoy refuses CONNECT
/// whatever the rules say (it configures no upgrades), so no Cilium policy
/// relied on a method-less rule allowing it.
fn method_matches(r: &CompiledRule, facts: &RequestFacts) -> bool {
    match &r.method {
        Some(m) => m.is_match(&facts.method),
        None => facts.method != "CONNECT",
    }
}

/// A request carrying `Upgrade` (the proxy keeps it only on a protocol switch
/// or when a rule names it) is allowed only by a rule with its own condition on
/// `Upgrade` (in `headers`, or a `headerMatches` entry without a `mismatch`
/// action), which must then match the request's value: after the switch the
/// connection carries opaque bytes no later rule sees, so a rule written for
/// plain GETs must not open one. Stricter than Cilium's rules read literally,
/// yet Cilium's Envoy refuses every upgrade, so no Cilium policy relied on it.
fn upgrade_allowed(r: &CompiledRule, headers: &HeaderMap) -> bool {
    !headers.contains_key(http::header::UPGRADE)
        || r.headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade"))
}

#[derive(Debug)]
pub struct HttpMatcher {
    rules: Vec<CompiledRule>,
    /// One pattern per path rule, `None` when no rule has a path.
    paths: Option<meta::Regex>,
    /// Pattern index → rule index (ascending).
    path_rules: Vec<u32>,
    prefixes: PrefixTrie,
    /// Rules without a path constraint, in rule order.
    pathless: Vec<u32>,
    /// Some rule has `mismatch` actions: every matching rule must be found.
    has_actions: bool,
    /// Every header a rule names (lower-case, sorted, unique).
    header_names: Vec<String>,
}

const REGEX_SIZE_LIMIT: usize = 512 << 20;
/// Above this many trie candidates one overlapping scan is cheaper.
const MAX_CANDIDATES: usize = 32;

/// Byte trie from literal path prefixes to the patterns that have them.
#[derive(Debug, Default)]
struct PrefixTrie {
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Default)]
struct TrieNode {
    /// Sorted by byte.
    edges: Vec<(u8, u32)>,
    patterns: Vec<u32>,
}

impl PrefixTrie {
    fn new() -> Self {
        PrefixTrie {
            nodes: vec![TrieNode::default()],
        }
    }

    fn insert(&mut self, prefix: &[u8], pattern: u32) {
        let mut node = 0usize;
        for b in prefix {
            let next = match self.nodes[node].edges.binary_search_by_key(b, |e| e.0) {
                Ok(i) => self.nodes[node].edges[i].1 as usize,
                Err(i) => {
                    let id = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    self.nodes[node].edges.insert(i, (*b, id as u32));
                    id
                }
            };
            node = next;
        }
        self.nodes[node].patterns.push(pattern);
    }

    /// Patterns whose prefix `path` starts with; `None` when there are more than `max`.
    fn candidates(&self, path: &[u8], max: usize, out: &mut Vec<u32>) -> bool {
        let mut node = 0usize;
        let mut i = 0;
        loop {
            let n = &self.nodes[node];
            out.extend_from_slice(&n.patterns);
            if out.len() > max {
                return false;
            }
            let Some(b) = path.get(i) else { return true };
            match n.edges.binary_search_by_key(b, |e| e.0) {
                Ok(e) => node = n.edges[e].1 as usize,
                Err(_) => return true,
            }
            i += 1;
        }
    }
}

/// What every match of `pattern` starts with (possibly nothing).
fn literal_prefix(pattern: &str) -> Vec<u8> {
    let Ok(hir) = regex_syntax::Parser::new().parse(pattern) else {
        return Vec::new();
    };
    let seq = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    seq.longest_common_prefix()
        .map(<[u8]>::to_vec)
        .unwrap_or_default()
}

impl HttpMatcher {
    pub fn new(specs: Vec<HttpRuleSpec>) -> Result<Self, HttpCompileError> {
        let mut rules = Vec::with_capacity(specs.len());
        let mut path_patterns = Vec::new();
        let mut path_rules = Vec::new();
        let mut pathless = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let idx = i as u32;
            let path_pattern = match &spec.path {
                Some(p) => {
                    path_patterns.push(anchored(p));
                    path_rules.push(idx);
                    Some(path_rules.len() as u32 - 1)
                }
                None => {
                    pathless.push(idx);
                    None
                }
            };
            let (actions, headers): (Vec<_>, Vec<_>) =
                spec.headers.into_iter().partition(|h| h.mismatch.is_some());
            rules.push(CompiledRule {
                owner: spec.owner,
                method: spec
                    .method
                    .as_deref()
                    .map(|m| Regex::new(&anchored(m)))
                    .transpose()?,
                host: spec
                    .host
                    .as_deref()
                    .map(|h| {
                        RegexBuilder::new(&anchored(h))
                            .case_insensitive(true)
                            .build()
                    })
                    .transpose()?,
                headers,
                actions,
                path_pattern,
            });
        }
        let has_actions = rules.iter().any(|r| !r.actions.is_empty());
        let mut header_names: Vec<String> = rules
            .iter()
            .flat_map(|r| r.headers.iter().chain(&r.actions))
            .map(|h| h.name.clone())
            .collect();
        header_names.sort_unstable();
        header_names.dedup();
        let mut prefixes = PrefixTrie::new();
        for (pid, p) in path_patterns.iter().enumerate() {
            prefixes.insert(&literal_prefix(p), pid as u32);
        }
        let paths = if path_patterns.is_empty() {
            None
        } else {
            Some(
                meta::Builder::new()
                    .configure(
                        meta::Config::new()
                            // `which_overlapping_matches` reports every matching
                            // pattern only under `All` (the leftmost-first default
                            // can stop at one that a later check rejects).
                            .match_kind(MatchKind::All)
                            .nfa_size_limit(Some(REGEX_SIZE_LIMIT))
                            .hybrid_cache_capacity(8 << 20),
                    )
                    .build_many(&path_patterns)
                    .map_err(Box::new)?,
            )
        };
        Ok(HttpMatcher {
            rules,
            paths,
            path_rules,
            prefixes,
            pathless,
            has_actions,
            header_names,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every header some rule names (lower-case, sorted, unique).
    pub fn header_names(&self) -> &[String] {
        &self.header_names
    }

    /// Whether rule `idx` (whose owner is in `owners`) allows the request,
    /// ignoring its `mismatch` actions (which never deny).
    fn rule_matches(
        &self,
        idx: u32,
        facts: &RequestFacts,
        headers: &HeaderMap,
        owners: &[u32],
    ) -> bool {
        let r = &self.rules[idx as usize];
        owners.binary_search(&r.owner).is_ok()
            && method_matches(r, facts)
            && upgrade_allowed(r, headers)
            && r.host
                .as_ref()
                .is_none_or(|h| facts.host.as_deref().is_some_and(|v| h.is_match(v)))
            && r.headers.iter().all(|hr| header_matches(hr, headers))
            && match (r.path_pattern, &self.paths) {
                (None, _) => true,
                (Some(pid), Some(re)) => re.is_match(
                    Input::new(facts.path.as_bytes())
                        .anchored(Anchored::Pattern(PatternID::new_unchecked(pid as usize))),
                ),
                (Some(_), None) => false,
            }
    }

    /// The lowest rule that allows the request and, when rules have `mismatch`
    /// actions, the mismatches of every allowing rule (Cilium runs the header
    /// actions of all matching rules, not only the first). Headers are matched
    /// as the request arrived; the actions apply afterwards, in rule order.
    pub fn evaluate(
        &self,
        facts: &RequestFacts,
        headers: &HeaderMap,
        owners: &[u32],
    ) -> Option<HttpMatch> {
        if !self.has_actions {
            return self
                .first_match(facts, headers, owners)
                .map(|rule| HttpMatch {
                    rule,
                    mismatches: Vec::new(),
                });
        }
        let mut first = None;
        let mut mismatches = Vec::new();
        for idx in 0..self.rules.len() as u32 {
            if !self.rule_matches(idx, facts, headers, owners) {
                continue;
            }
            first.get_or_insert(idx);
            for a in &self.rules[idx as usize].actions {
                let Some(action) = a.mismatch else { continue };
                if header_matches(a, headers) {
                    continue;
                }
                let found = joined_value(headers, &a.name)
                    .map(|v| String::from_utf8_lossy(&v).into_owned());
                // Envoy's DELETE only removes a header that is there with
                // another value; a presence rule has nothing to delete.
                if action == MismatchAction::Delete && (found.is_none() || a.value.is_none()) {
                    continue;
                }
                mismatches.push(HeaderMismatch {
                    key: a.name.clone(),
                    required: a.value.clone(),
                    found,
                    action,
                });
            }
        }
        first.map(|rule| HttpMatch { rule, mismatches })
    }

    /// The lowest-numbered rule that allows the request, among rules whose owner
    /// is in `owners` (sorted ascending).
    pub fn first_match(
        &self,
        facts: &RequestFacts,
        headers: &HeaderMap,
        owners: &[u32],
    ) -> Option<u32> {
        let rest_matches = |idx: u32| -> bool {
            let r = &self.rules[idx as usize];
            owners.binary_search(&r.owner).is_ok()
                && method_matches(r, facts)
                && upgrade_allowed(r, headers)
                && r.host
                    .as_ref()
                    .is_none_or(|h| facts.host.as_deref().is_some_and(|v| h.is_match(v)))
                && r.headers.iter().all(|hr| header_matches(hr, headers))
        };
        let from_paths = self.paths.as_ref().and_then(|re| {
            let path = facts.path.as_bytes();
            let mut cands = Vec::new();
            if self.prefixes.candidates(path, MAX_CANDIDATES, &mut cands) {
                // Pattern ids ascend with rule order, so the first hit is the lowest rule.
                cands.sort_unstable();
                cands.into_iter().find_map(|pid| {
                    let input = Input::new(path)
                        .anchored(Anchored::Pattern(PatternID::new_unchecked(pid as usize)));
                    let idx = self.path_rules[pid as usize];
                    (re.is_match(input) && rest_matches(idx)).then_some(idx)
                })
            } else {
                let mut set = PatternSet::new(re.pattern_len());
                re.which_overlapping_matches(&Input::new(path), &mut set);
                set.iter()
                    .map(|pid| self.path_rules[pid.as_usize()])
                    .find(|idx| rest_matches(*idx))
            }
        });
        let from_pathless = self.pathless.iter().copied().find(|idx| rest_matches(*idx));
        match (from_paths, from_pathless) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn facts(method: &str, path: &str, host: Option<&str>) -> RequestFacts {
        RequestFacts {
            method: method.into(),
            path: path.into(),
            host: host.map(Into::into),
        }
    }

    fn spec(owner: u32, method: Option<&str>, path: Option<&str>) -> HttpRuleSpec {
        HttpRuleSpec {
            owner,
            method: method.map(Into::into),
            path: path.map(Into::into),
            host: None,
            headers: vec![],
        }
    }

    #[test]
    fn and_within_rule_or_across_rules() {
        let m = HttpMatcher::new(vec![
            spec(0, Some("POST"), Some("/v1/request-landing")),
            spec(0, Some("GET"), None),
        ])
        .unwrap();
        let h = HeaderMap::new();
        assert_eq!(
            m.first_match(&facts("POST", "/v1/request-landing", None), &h, &[0]),
            Some(0)
        );
        assert_eq!(
            m.first_match(&facts("PUT", "/v1/request-landing", None), &h, &[0]),
            None
        );
        assert_eq!(
            m.first_match(&facts("GET", "/anything", None), &h, &[0]),
            Some(1)
        );
        // Rules of an owner that did not match the connection take no part.
        assert_eq!(
            m.first_match(&facts("GET", "/anything", None), &h, &[1]),
            None
        );
    }

    #[test]
    fn connect_needs_a_rule_that_names_it() {
        let m = HttpMatcher::new(vec![
            spec(0, None, None),
            spec(1, None, Some(".*")),
            spec(2, Some("GET|CONNECT"), Some(r"svc\.example:443")),
            spec(3, Some("CONNECT"), None),
        ])
        .unwrap();
        let h = HeaderMap::new();
        let connect = |path: &str| facts("CONNECT", path, Some("svc.example"));
        // Rules 0 and 1 allow any GET but no CONNECT.
        assert_eq!(
            m.first_match(&connect("svc.example:443"), &h, &[0, 1]),
            None
        );
        assert_eq!(
            m.first_match(&facts("GET", "/", None), &h, &[0, 1]),
            Some(0)
        );
        // The path of a CONNECT is its target: rule 2 pins the port.
        assert_eq!(
            m.first_match(&connect("svc.example:443"), &h, &[0, 1, 2]),
            Some(2)
        );
        assert_eq!(
            m.first_match(&connect("svc.example:22"), &h, &[0, 1, 2]),
            None
        );
        assert_eq!(m.first_match(&connect("svc.example:22"), &h, &[3]), Some(3));
        assert_eq!(
            m.evaluate(&connect("svc.example:22"), &h, &[0, 1])
                .map(|x| x.rule),
            None
        );
    }

    #[test]
    fn upgrade_needs_a_rule_that_names_it() {
        let cond = |name: &str, value: &str, mismatch| HeaderRule {
            name: name.into(),
            value: Some(value.into()),
            mismatch,
        };
        let with = |owner, headers| HttpRuleSpec {
            headers,
            ..spec(owner, Some("GET"), Some("/public/.*"))
        };
        let m = HttpMatcher::new(vec![
            spec(0, Some("GET"), Some("/public/.*")),
            with(1, vec![cond("upgrade", "websocket", None)]),
            // A `mismatch` action never denies, so it does not name the upgrade.
            with(
                2,
                vec![cond("upgrade", "websocket", Some(MismatchAction::Log))],
            ),
        ])
        .unwrap();
        let get = facts("GET", "/public/ws", None);
        let mut h = HeaderMap::new();
        assert_eq!(m.first_match(&get, &h, &[0, 1, 2]), Some(0));
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("connection", "upgrade".parse().unwrap());
        // A GET-only rule does not open a tunnel; one naming `Upgrade` does.
        assert_eq!(m.first_match(&get, &h, &[0]), None);
        assert_eq!(m.evaluate(&get, &h, &[0, 2]), None);
        assert_eq!(m.first_match(&get, &h, &[2]), None);
        assert_eq!(m.first_match(&get, &h, &[0, 1, 2]), Some(1));
        assert_eq!(m.evaluate(&get, &h, &[0, 1, 2]).map(|x| x.rule), Some(1));
        // Only for the protocol it names.
        h.insert("upgrade", "smtp".parse().unwrap());
        assert_eq!(m.first_match(&get, &h, &[0, 1, 2]), None);
    }

    #[test]
    fn headers_and_host() {
        let m = HttpMatcher::new(vec![HttpRuleSpec {
            owner: 0,
            method: None,
            path: None,
            host: Some("api\\.example\\.com".into()),
            headers: vec![
                HeaderRule {
                    name: "x-token".into(),
                    value: Some("s3cret".into()),
                    mismatch: None,
                },
                HeaderRule {
                    name: "x-present".into(),
                    value: None,
                    mismatch: None,
                },
            ],
        }])
        .unwrap();
        let mut h = HeaderMap::new();
        let f = facts("GET", "/", Some("API.example.com"));
        assert_eq!(m.first_match(&f, &h, &[0]), None);
        h.insert("x-token", "s3cret".parse().unwrap());
        assert_eq!(m.first_match(&f, &h, &[0]), None);
        h.insert("x-present", "".parse().unwrap());
        assert_eq!(m.first_match(&f, &h, &[0]), Some(0));
        assert_eq!(
            m.first_match(&facts("GET", "/", Some("api.example.com.evil")), &h, &[0]),
            None
        );
        assert_eq!(m.first_match(&facts("GET", "/", None), &h, &[0]), None);
    }

    #[test]
    fn literal_prefixes_are_safe() {
        assert_eq!(literal_prefix(&anchored("/api/v1/x/[0-9]+")), b"/api/v1/x/");
        // Alternation and optional pieces shorten the prefix to what is certain.
        assert_eq!(literal_prefix(&anchored("/a/b|/a/c")), b"/a/");
        assert_eq!(literal_prefix(&anchored("/ab?c")), b"/a");
        assert_eq!(literal_prefix(&anchored("(?i)/Admin")), b"/");
        assert_eq!(literal_prefix(&anchored(".*")), b"");
    }

    /// The naive meaning: the lowest-numbered rule whose regexes all match.
    fn naive(specs: &[(Option<String>, Option<String>)], method: &str, path: &str) -> Option<u32> {
        specs
            .iter()
            .position(|(m, p)| {
                m.as_ref()
                    .is_none_or(|m| Regex::new(&anchored(m)).unwrap().is_match(method))
                    && p.as_ref()
                        .is_none_or(|p| Regex::new(&anchored(p)).unwrap().is_match(path))
            })
            .map(|i| i as u32)
    }

    fn path_regex() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            "[ab]{1,2}".prop_map(|s| s),
            Just("[0-9]+".to_string()),
            Just(".*".to_string()),
            Just("(a|b/c)".to_string()),
            Just("x?".to_string()),
            Just("(?i)A".to_string()),
        ];
        proptest::collection::vec(piece, 1..4).prop_map(|v| format!("/{}", v.join("/")))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// The prefix index never changes the answer, whether a request has few
        /// candidates or enough to take the overlapping-scan fallback.
        #[test]
        fn index_agrees_with_naive_matching(
            specs in proptest::collection::vec(
                (proptest::option::of(prop_oneof![Just("GET".to_string()), Just("POST|PUT".to_string())]),
                 proptest::option::of(path_regex())),
                1..80),
            method in prop_oneof![Just("GET"), Just("PUT")],
            path in "/[ab0-9/]{0,8}",
        ) {
            let m = HttpMatcher::new(specs.iter().map(|(me, p)| spec(0, me.as_deref(), p.as_deref())).collect()).unwrap();
            let got = m.first_match(&facts(method, &path, None), &HeaderMap::new(), &[0]);
            prop_assert_eq!(got, naive(&specs, method, &path));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// With `mismatch` actions in play every rule is checked one by one; the
        /// deciding rule is still the one the indexed search finds, and actions
        /// never deny.
        #[test]
        fn evaluate_with_actions_agrees_with_first_match(
            specs in proptest::collection::vec(
                (proptest::option::of(prop_oneof![Just("GET".to_string()), Just("POST|PUT".to_string())]),
                 proptest::option::of(path_regex()),
                 proptest::option::of(prop_oneof![Just("blue"), Just("red,blue")]),
                 any::<bool>()),
                1..40),
            method in prop_oneof![Just("GET"), Just("PUT")],
            path in "/[ab0-9/]{0,8}",
            team in proptest::collection::vec(prop_oneof![Just("red"), Just("blue")], 0..3),
        ) {
            let build = |with_actions: bool| {
                HttpMatcher::new(specs.iter().map(|(me, p, want, act)| {
                    let mut s = spec(0, me.as_deref(), p.as_deref());
                    if let Some(w) = want {
                        s.headers.push(HeaderRule {
                            name: "x-team".into(),
                            value: Some((*w).to_string()),
                            mismatch: None,
                        });
                    }
                    if with_actions && *act {
                        s.headers.push(HeaderRule {
                            name: "x-added".into(),
                            value: Some("1".into()),
                            mismatch: Some(MismatchAction::Add),
                        });
                    }
                    s
                }).collect()).unwrap()
            };
            let mut h = HeaderMap::new();
            for t in &team {
                h.append("x-team", t.parse().unwrap());
            }
            let f = facts(method, &path, None);
            let plain = build(false).first_match(&f, &h, &[0]);
            let m = build(true);
            let got = m.evaluate(&f, &h, &[0]);
            prop_assert_eq!(got.as_ref().map(|g| g.rule), plain);
            prop_assert_eq!(m.first_match(&f, &h, &[0]), plain);
            // One ADD per allowing rule that has one, none when denied.
            let want_actions = match plain {
                None => 0,
                Some(_) => specs
                    .iter()
                    .enumerate()
                    .filter(|(i, (_, _, _, act))| *act && m.rule_matches(*i as u32, &f, &h, &[0]))
                    .count(),
            };
            prop_assert_eq!(got.map_or(0, |g| g.mismatches.len()), want_actions);
        }
    }

    #[test]
    fn cookie_crumbs_join_as_one_cookie() {
        let mut h = HeaderMap::new();
        h.append("cookie", "a=1".parse().unwrap());
        h.append("cookie", "b=2".parse().unwrap());
        h.append("x-team", "red".parse().unwrap());
        h.append("x-team", "blue".parse().unwrap());
        assert_eq!(joined_value(&h, "cookie").unwrap(), b"a=1; b=2");
        assert_eq!(joined_value(&h, "x-team").unwrap(), b"red,blue");
        assert_eq!(joined_value(&h, "x-none"), None);
    }

    proptest! {
        /// A literal path rule matches exactly that path: never a prefix, suffix or superstring.
        #[test]
        fn regexes_are_anchored(a in "/[a-z]{1,8}", extra in "[a-z/]{1,5}") {
            let m = HttpMatcher::new(vec![spec(0, None, Some(&regex::escape(&a)))]).unwrap();
            let h = HeaderMap::new();
            prop_assert_eq!(m.first_match(&facts("GET", &a, None), &h, &[0]), Some(0));
            let longer = format!("{a}{extra}");
            let prefixed = format!("/{extra}{a}");
            prop_assert_eq!(m.first_match(&facts("GET", &longer, None), &h, &[0]), None);
            prop_assert_eq!(m.first_match(&facts("GET", &prefixed, None), &h, &[0]), None);
        }

        /// Alternation inside a rule stays inside the anchors.
        #[test]
        fn alternation_is_anchored(a in "[a-z]{1,6}", b in "[a-z]{1,6}", junk in "[a-z]{1,4}") {
            let m = HttpMatcher::new(vec![spec(0, Some(&format!("{}|{}", a.to_uppercase(), b.to_uppercase())), None)]).unwrap();
            let h = HeaderMap::new();
            let ok_a = m.first_match(&facts(&a.to_uppercase(), "/", None), &h, &[0]);
            prop_assert_eq!(ok_a, Some(0));
            let with_junk = format!("{}{}", a.to_uppercase(), junk.to_uppercase());
            if with_junk != b.to_uppercase() {
                prop_assert_eq!(m.first_match(&facts(&with_junk, "/", None), &h, &[0]), None);
            }
        }
    }
}
