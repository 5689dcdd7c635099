//! HTTP request facts: the values policy matches on, after the checks that stop
//! path, host and framing confusion from becoming a policy bypass.

mod h1_framing;
mod path;

pub use h1_framing::{HeadCheck, RequestTracker};
pub use path::{PathError, normalize_path, uppercase_escapes};

use http::{HeaderMap, Method, Uri, header};
use thiserror::Error;

/// What policy sees of one HTTP request. `path` is normalised and includes the
/// query string; `host` is lower-cased without a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFacts {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
}

/// Why a request head was refused before policy was consulted. Each of these is
/// answered with 400 and the connection is closed: the peer and weir may disagree
/// about where this request ends, so nothing after it can be trusted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestReject {
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("Host header is not valid: {0:?}")]
    InvalidHost(String),
    #[error("request authority {0:?} has userinfo")]
    UserinfoInAuthority(String),
    #[error("request target authority {target:?} disagrees with Host {host:?}")]
    HostMismatch { target: String, host: String },
    #[error("both Content-Length and Transfer-Encoding are present")]
    ContentLengthWithTransferEncoding,
    #[error("more than one Content-Length header")]
    DuplicateContentLength,
    #[error("Content-Length is not a plain decimal number")]
    InvalidContentLength,
    #[error("Transfer-Encoding other than a single `chunked`: {0:?}")]
    UnsupportedTransferEncoding(String),
    #[error("request target is not origin-form or absolute-form: {0:?}")]
    UnsupportedTarget(String),
    #[error("invalid chunked body framing")]
    BadChunk,
    #[error("malformed request head")]
    MalformedHead,
    #[error("request framing could not be verified (after an upgrade or an over-long head)")]
    Unverified,
    #[error("path: {0}")]
    Path(#[from] PathError),
}

/// Checks an HTTP/1.1 request head and extracts the facts policy matches on.
///
/// `http2` relaxes nothing about the path, but skips the HTTP/1 framing headers
/// (HTTP/2 framing is done by the frame layer, and the h2 crate already rejects
/// connection-specific headers).
pub fn request_facts(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    http2: bool,
) -> Result<RequestFacts, RequestReject> {
    if !http2 {
        check_framing(headers)?;
    }
    let authority_form = uri.scheme().is_none() && uri.authority().is_some();
    if *method == Method::CONNECT {
        return connect_facts(uri, headers, authority_form && !http2);
    }
    // Authority-form (`host:port`) is CONNECT's alone (RFC 9112 §3.2.3): for any
    // other method it has no path for policy to check, and a server would be
    // sent one policy never saw.
    if authority_form {
        return Err(RequestReject::UnsupportedTarget(uri.to_string()));
    }
    let host = request_host(uri, headers)?;
    let raw_path = match uri.path_and_query() {
        Some(pq) => pq.as_str(),
        None if *method == Method::OPTIONS => "*",
        None => "/",
    };
    let path = if raw_path == "*" && *method == Method::OPTIONS {
        "*".to_string()
    } else {
        let normalized = normalize_path(raw_path)?;
        // Lower-case hex in an escape is the same escape: accepted, and policy
        // (and the server, see the proxy) get the upper-case spelling.
        if normalized != raw_path && normalized != uppercase_escapes(raw_path) {
            return Err(PathError::NotNormal {
                raw: raw_path.to_string(),
                normalized,
            }
            .into());
        }
        normalized
    };
    Ok(RequestFacts {
        method: method.as_str().to_string(),
        path,
        host,
    })
}

/// A CONNECT's facts. Its target must be authority-form with a port (RFC 9112
/// §3.2.3; anything else, and any CONNECT over HTTP/2, is refused: weir tunnels
/// HTTP/1 CONNECT only). It has no path (Envoy gives it no
/// `:path`), so its `path` is the target, lower-cased `host:port`: a rule's
/// `path` regex then decides the port too. `host` is the host without the port,
/// as for every request, and a Host header beside it must agree.
fn connect_facts(
    uri: &Uri,
    headers: &HeaderMap,
    authority_form: bool,
) -> Result<RequestFacts, RequestReject> {
    let target = match uri.authority() {
        Some(a) if authority_form && a.port_u16().is_some() && uri.path_and_query().is_none() => a,
        _ => return Err(RequestReject::UnsupportedTarget(uri.to_string())),
    };
    let host = request_host(uri, headers)?;
    Ok(RequestFacts {
        method: Method::CONNECT.as_str().to_string(),
        path: target.as_str().to_ascii_lowercase(),
        host,
    })
}

/// RFC 9112 §6.3: a message with both framing headers, several lengths, or a
/// transfer coding other than one final `chunked` is a smuggling shape.
fn check_framing(headers: &HeaderMap) -> Result<(), RequestReject> {
    let te: Vec<_> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    let cl: Vec<_> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if !te.is_empty() && !cl.is_empty() {
        return Err(RequestReject::ContentLengthWithTransferEncoding);
    }
    if cl.len() > 1 {
        return Err(RequestReject::DuplicateContentLength);
    }
    if let Some(v) = cl.first() {
        let ok = v.as_bytes().iter().all(u8::is_ascii_digit) && !v.is_empty() && v.len() <= 19;
        if !ok {
            return Err(RequestReject::InvalidContentLength);
        }
    }
    if !te.is_empty() {
        let joined = te
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        if !joined.trim().eq_ignore_ascii_case("chunked") {
            return Err(RequestReject::UnsupportedTransferEncoding(joined));
        }
    }
    Ok(())
}

fn request_host(uri: &Uri, headers: &HeaderMap) -> Result<Option<String>, RequestReject> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(RequestReject::DuplicateHost);
    }
    let host_header = match host_header {
        Some(v) => {
            let s = v.to_str().map_err(|_| {
                RequestReject::InvalidHost(String::from_utf8_lossy(v.as_bytes()).into())
            })?;
            let auth: http::uri::Authority = s
                .parse()
                .map_err(|_| RequestReject::InvalidHost(s.to_string()))?;
            if auth.as_str().contains('@') {
                return Err(RequestReject::InvalidHost(s.to_string()));
            }
            Some(auth)
        }
        None => None,
    };
    if let Some(target) = uri.authority() {
        // Userinfo in the target (HTTP/1 absolute-form, HTTP/2 `:authority`):
        // policy would see the host after `@`, a server might use all of it.
        if target.as_str().contains('@') {
            return Err(RequestReject::UserinfoInAuthority(target.to_string()));
        }
        // Absolute-form target: it must name the same authority as Host.
        match &host_header {
            Some(h) if eq_authority(h, target) => {}
            Some(h) => {
                return Err(RequestReject::HostMismatch {
                    target: target.to_string(),
                    host: h.to_string(),
                });
            }
            None => {}
        }
        return Ok(Some(target.host().to_ascii_lowercase()));
    }
    Ok(host_header.map(|h| h.host().to_ascii_lowercase()))
}

fn eq_authority(a: &http::uri::Authority, b: &http::uri::Authority) -> bool {
    a.host().eq_ignore_ascii_case(b.host()) && a.port_u16() == b.port_u16()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn facts(
        method: &str,
        target: &str,
        hdrs: &[(&str, &str)],
    ) -> Result<RequestFacts, RequestReject> {
        let mut h = HeaderMap::new();
        for (k, v) in hdrs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let uri: Uri = target.parse().unwrap();
        request_facts(&m, &uri, &h, false)
    }

    #[test]
    fn connect_target_is_its_path() {
        let f = facts("CONNECT", "Svc.Example:443", &[("host", "svc.example:443")]).unwrap();
        assert_eq!(f.method, "CONNECT");
        assert_eq!(f.path, "svc.example:443");
        assert_eq!(f.host.as_deref(), Some("svc.example"));
        // A Host naming another authority, a target without a port, userinfo,
        // or any form but authority-form is refused.
        assert!(matches!(
            facts("CONNECT", "svc.example:443", &[("host", "other:443")]),
            Err(RequestReject::HostMismatch { .. })
        ));
        for target in ["/", "http://svc.example:443/", "*"] {
            assert!(
                matches!(
                    facts("CONNECT", target, &[]),
                    Err(RequestReject::UnsupportedTarget(_))
                ),
                "{target}"
            );
        }
        assert!(facts("CONNECT", "u@svc.example:443", &[]).is_err());
        // weir tunnels HTTP/1 CONNECT only.
        let uri: Uri = "svc.example:443".parse().unwrap();
        assert!(matches!(
            request_facts(&Method::CONNECT, &uri, &HeaderMap::new(), true),
            Err(RequestReject::UnsupportedTarget(_))
        ));
    }

    #[test]
    fn authority_form_is_refused_for_every_other_method() {
        for (m, target) in [("OPTIONS", "deathstar:80"), ("GET", "svc.example:80")] {
            assert!(
                matches!(
                    facts(m, target, &[]),
                    Err(RequestReject::UnsupportedTarget(_))
                ),
                "{m} {target}"
            );
        }
        assert_eq!(facts("OPTIONS", "*", &[("host", "d")]).unwrap().path, "*");
    }

    #[test]
    fn plain_request() {
        let f = facts("GET", "/a/b?x=1", &[("host", "Example.COM:8080")]).unwrap();
        assert_eq!(f.path, "/a/b?x=1");
        assert_eq!(f.host.as_deref(), Some("example.com"));
        assert_eq!(f.method, "GET");
    }

    #[test]
    fn smuggling_shapes_are_rejected() {
        assert_eq!(
            facts(
                "POST",
                "/",
                &[
                    ("host", "a"),
                    ("content-length", "3"),
                    ("transfer-encoding", "chunked")
                ]
            ),
            Err(RequestReject::ContentLengthWithTransferEncoding)
        );
        assert_eq!(
            facts(
                "POST",
                "/",
                &[
                    ("host", "a"),
                    ("content-length", "3"),
                    ("content-length", "3")
                ]
            ),
            Err(RequestReject::DuplicateContentLength)
        );
        assert_eq!(
            facts("POST", "/", &[("host", "a"), ("content-length", "+3")]),
            Err(RequestReject::InvalidContentLength)
        );
        assert!(matches!(
            facts(
                "POST",
                "/",
                &[("host", "a"), ("transfer-encoding", "gzip, chunked")]
            ),
            Err(RequestReject::UnsupportedTransferEncoding(_))
        ));
    }

    #[test]
    fn host_confusion_is_rejected() {
        assert_eq!(
            facts("GET", "/", &[("host", "a"), ("host", "b")]),
            Err(RequestReject::DuplicateHost)
        );
        assert!(matches!(
            facts("GET", "http://evil.example/x", &[("host", "good.example")]),
            Err(RequestReject::HostMismatch { .. })
        ));
        let f = facts("GET", "http://Good.example/x", &[("host", "good.example")]).unwrap();
        assert_eq!(f.host.as_deref(), Some("good.example"));
        assert_eq!(f.path, "/x");
    }

    #[test]
    fn userinfo_in_the_authority_is_rejected() {
        for target in [
            "http://evil.example@svc.example/x",
            "http://u:p@svc.example/x",
        ] {
            assert!(
                matches!(
                    facts("GET", target, &[]),
                    Err(RequestReject::UserinfoInAuthority(_))
                ),
                "{target}"
            );
        }
        // HTTP/2: `:authority` is the URI's authority, and no Host is needed.
        let uri: Uri = "http://evil.example@svc.example/x".parse().unwrap();
        assert!(matches!(
            request_facts(&Method::GET, &uri, &HeaderMap::new(), true),
            Err(RequestReject::UserinfoInAuthority(_))
        ));
        let uri: Uri = "http://svc.example:8080/x".parse().unwrap();
        let f = request_facts(&Method::GET, &uri, &HeaderMap::new(), true).unwrap();
        assert_eq!(f.host.as_deref(), Some("svc.example"));
    }

    #[test]
    fn host_facts_drop_the_port() {
        for (host, want) in [
            ("svc.example:8080", "svc.example"),
            ("SVC.example", "svc.example"),
            ("[fd00::10]:80", "[fd00::10]"),
            ("10.0.0.1:80", "10.0.0.1"),
        ] {
            let f = facts("GET", "/", &[("host", host)]).unwrap();
            assert_eq!(f.host.as_deref(), Some(want), "{host}");
        }
    }

    #[test]
    fn lower_case_escapes_are_the_upper_case_ones() {
        let f = facts("GET", "/caf%c3%a9?q=%2f", &[("host", "a")]).unwrap();
        assert_eq!(f.path, "/caf%C3%A9?q=%2f");
        let f = facts("GET", "/caf%C3%A9", &[("host", "a")]).unwrap();
        assert_eq!(f.path, "/caf%C3%A9");
        // Still refused: an escape of an unreserved character, and dot tricks.
        assert!(facts("GET", "/%61dmin", &[("host", "a")]).is_err());
        assert!(facts("GET", "/a/%2e%2e/b", &[("host", "a")]).is_err());
    }

    #[test]
    fn non_normal_paths_are_rejected() {
        for p in [
            "/a/../admin",
            "//admin",
            "/a/./b",
            "/%2e%2e/admin",
            "/a%2fb",
            "/a/..;/admin",
            "/a/.;/b",
            "/a/..;x=1/admin",
        ] {
            assert!(facts("GET", p, &[("host", "a")]).is_err(), "{p} accepted");
        }
    }
}
