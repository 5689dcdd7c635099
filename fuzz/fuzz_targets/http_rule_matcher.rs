//! HTTP rules compiled from fuzzed regex text, matched against fuzzed requests:
//! compiling either fails cleanly or yields a matcher that never panics, and a
//! literal path rule matches its own path.
#![no_main]

use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use weir_parsers::http::RequestFacts;
use weir_policy::http_match::{HttpMatcher, HttpRuleSpec};

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
