//! HTTP/2 request facts: pseudo-headers (`:method`, `:scheme`, `:authority`,
//! `:path`) and a few regular headers, built into a request as an HTTP/2
//! server would, then to the facts policy matches (method, path, host) and the
//! gRPC facts (service/method, `grpc-timeout`). Never panics; an accepted path
//! is normalised (idempotent), and a gRPC path splits into service and method.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;
use weir_parsers::grpc;
use weir_parsers::http::{normalize_path, request_facts};

fuzz_target!(|data: &[u8]| {
    // Fields separated by 0xff: method, scheme, authority, path, then
    // name/value pairs of regular headers.
    let mut fields = data.split(|b| *b == 0xff);
    let (Some(method), Some(scheme), Some(authority), Some(path)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return;
    };
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    let mut uri = Uri::builder();
    if !scheme.is_empty() {
        uri = uri.scheme(scheme);
    }
    if !authority.is_empty() {
        uri = uri.authority(authority);
    }
    if !path.is_empty() {
        uri = uri.path_and_query(path);
    }
    let Ok(uri) = uri.build() else {
        return;
    };
    let mut headers = HeaderMap::new();
    while let (Some(n), Some(v)) = (fields.next(), fields.next()) {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) {
            headers.append(n, v);
        }
    }
    if let Ok(facts) = request_facts(&method, &uri, &headers, true) {
        assert_eq!(facts.method, method.as_str());
        if facts.path != "*" {
            assert_eq!(normalize_path(&facts.path).as_deref(), Ok(facts.path.as_str()));
        }
        if let Some((service, m)) = grpc::service_method(&facts.path) {
            assert!(!service.is_empty() && !m.is_empty());
            assert_eq!(format!("/{service}/{m}"), facts.path);
        }
    }
    let _ = grpc::is_grpc(&headers);
    let _ = grpc::timeout(&headers);
    let _ = grpc::status_of(&headers);
    if let Ok(s) = std::str::from_utf8(data) {
        let e = grpc::percent_encode(s);
        assert!(e.bytes().all(|b| (0x20..=0x7e).contains(&b)));
    }
});
