//! HTTP rules compiled from fuzzed regex text, matched against fuzzed requests:
//! compiling either fails cleanly or yields a matcher that never panics, and a
//! literal path rule matches its own path. Header rules (with and without
//! `mismatch` actions) against fuzzed field lines: `evaluate` agrees with
//! `first_match` on which rule decides, and never reports a mismatch for a
//! header that has the required value.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use weir_parsers::http::RequestFacts;
use weir_policy::http_match::{HttpMatcher, HttpRuleSpec, joined_value};
use weir_policy::model::{HeaderRule, MismatchAction};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.split('\n');
    let (Some(method_re), Some(path_re), Some(method), Some(path)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let spec = |m: &str, p: &str| HttpRuleSpec {
        owner: 0,
        method: (!m.is_empty()).then(|| m.to_string()),
        path: (!p.is_empty()).then(|| p.to_string()),
        host: parts.clone().next().map(str::to_string),
        headers: vec![],
    };
    let Ok(m) = HttpMatcher::new(vec![spec(method_re, path_re), spec("", &regex_escape(path))]) else {
        return;
    };
    let facts = RequestFacts { method: method.into(), path: path.into(), host: Some("h".into()) };
    let hit = m.first_match(&facts, &HeaderMap::new(), &[0]);
    let _ = m.first_match(&facts, &HeaderMap::new(), &[1]);
    if parts.clone().next().is_none() {
        assert!(hit.is_some(), "the literal rule must match its own path");
    }
    // Header rules: `name value action` lines after a blank line, then `name: value`
    // field lines.
    let mut rules = Vec::new();
    let mut fields = HeaderMap::new();
    for line in text.lines().skip_while(|l| !l.is_empty()).skip(1) {
        if let Some((n, v)) = line.split_once(": ") {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(v)) {
                fields.append(n, v);
            }
            continue;
        }
        let mut w = line.split(' ');
        let Some(name) = w.next().and_then(|n| HeaderName::from_bytes(n.as_bytes()).ok()) else {
            continue;
        };
        let value = w.next().filter(|v| !v.is_empty()).map(str::to_string);
        let mismatch = match w.next() {
            Some("LOG") => Some(MismatchAction::Log),
            Some("ADD") => Some(MismatchAction::Add),
            Some("DELETE") => Some(MismatchAction::Delete),
            Some("REPLACE") => Some(MismatchAction::Replace),
            _ => None,
        };
        rules.push(HeaderRule { name: name.as_str().to_string(), value, mismatch });
    }
    if rules.is_empty() {
        return;
    }
    let with_headers = |h: Vec<HeaderRule>| HttpRuleSpec {
        owner: 0,
        method: None,
        path: None,
        host: None,
        headers: h,
    };
    let plain: Vec<HeaderRule> = rules.iter().filter(|r| r.mismatch.is_none()).cloned().collect();
    let Ok(m) = HttpMatcher::new(vec![with_headers(rules.clone()), with_headers(plain)]) else {
        return;
    };
    let got = m.evaluate(&facts, &fields, &[0]);
    // Actions never deny: rule 0 decides exactly when its plain conditions hold
    // (rule 1 holds the same conditions).
    assert_eq!(got.as_ref().map(|g| g.rule), m.first_match(&facts, &fields, &[0]));
    for mm in got.iter().flat_map(|g| &g.mismatches) {
        let have = joined_value(&fields, &mm.key);
        match &mm.required {
            Some(want) => assert_ne!(have.as_deref(), Some(want.as_bytes())),
            None => assert!(have.is_none()),
        }
    }
});

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
