//! HTTP rule matching whose cost stays flat as rules grow: every rule's path regex
//! goes into one `RegexSet`, so a request is scanned once, and only the rules whose
//! path matched (plus the few without a path) are checked further.

use http::HeaderMap;
use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use thiserror::Error;
use weir_parsers::http::RequestFacts;

use crate::model::HeaderRule;

/// Policy regexes match the whole value, as in Cilium.
pub fn anchored(re: &str) -> String {
    format!("^(?:{re})$")
}

#[derive(Debug, Error)]
#[error("compiling HTTP rules: {0}")]
pub struct HttpCompileError(#[from] regex::Error);

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
    headers: Vec<HeaderRule>,
}

#[derive(Debug)]
pub struct HttpMatcher {
    rules: Vec<CompiledRule>,
    paths: RegexSet,
    /// RegexSet pattern index → rule index.
    path_rules: Vec<u32>,
    /// Rules without a path constraint, in rule order.
    pathless: Vec<u32>,
}

const REGEX_SIZE_LIMIT: usize = 512 << 20;

impl HttpMatcher {
    pub fn new(specs: Vec<HttpRuleSpec>) -> Result<Self, HttpCompileError> {
        let mut rules = Vec::with_capacity(specs.len());
        let mut path_patterns = Vec::new();
        let mut path_rules = Vec::new();
        let mut pathless = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let idx = i as u32;
            match &spec.path {
                Some(p) => {
                    path_patterns.push(anchored(p));
                    path_rules.push(idx);
                }
                None => pathless.push(idx),
            }
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
                headers: spec.headers,
            });
        }
        let paths = RegexSetBuilder::new(&path_patterns)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()?;
        Ok(HttpMatcher {
            rules,
            paths,
            path_rules,
            pathless,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
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
                && r.method.as_ref().is_none_or(|m| m.is_match(&facts.method))
                && r.host
                    .as_ref()
                    .is_none_or(|h| facts.host.as_deref().is_some_and(|v| h.is_match(v)))
                && r.headers.iter().all(|hr| {
                    let mut values = headers.get_all(hr.name.as_str()).iter();
                    match &hr.value {
                        None => values.next().is_some(),
                        Some(want) => values.any(|v| v.as_bytes() == want.as_bytes()),
                    }
                })
        };
        let from_paths = if self.paths.is_empty() {
            None
        } else {
            self.paths
                .matches(&facts.path)
                .iter()
                .map(|i| self.path_rules[i])
                .find(|idx| rest_matches(*idx))
        };
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
                },
                HeaderRule {
                    name: "x-present".into(),
                    value: None,
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
