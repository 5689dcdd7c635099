//! gRPC request facts: which HTTP/2 requests are gRPC calls, their service and
//! method, their own deadline (`grpc-timeout`), and the status a response
//! carries. Sans-I/O: the proxy and the fuzz targets share it.

use std::time::Duration;

use http::{HeaderMap, header};

/// A gRPC call: `content-type: application/grpc` or `application/grpc+<codec>`
/// (with optional parameters). gRPC-Web (`application/grpc-web`) carries its
/// status in the body and is left to the HTTP path.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let ct = ct.as_bytes();
    let Some(rest) = strip_prefix_ignore_case(ct, b"application/grpc") else {
        return false;
    };
    matches!(rest.first(), None | Some(b'+' | b';' | b' '))
}

fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s.get(prefix.len()..).unwrap_or_default())
}

/// `/package.Service/Method` → (`package.Service`, `Method`). Anything else is
/// not a well-formed gRPC path (policy still matches the path as it is).
pub fn service_method(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    if service.is_empty() || method.is_empty() || method.contains(['/', '?']) {
        return None;
    }
    Some((service, method))
}

/// The call's deadline from `grpc-timeout` (1–8 digits and a unit: H, M, S, m,
/// u, n). A malformed value is ignored, as gRPC servers do.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `grpc-message` encoding: printable ASCII except `%` as is, every other byte
/// of the UTF-8 text as `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The status a response's headers or trailers carry.
pub fn status_of(headers: &HeaderMap) -> Option<(u32, Option<String>)> {
    let status = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(str::to_string);
    Some((status, message))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn h(name: &'static str, v: &'static str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(name, HeaderValue::from_static(v));
        m
    }

    #[test]
    fn grpc_calls_are_known_by_content_type() {
        assert!(is_grpc(&h("content-type", "application/grpc")));
        assert!(is_grpc(&h("content-type", "application/grpc+proto")));
        assert!(is_grpc(&h(
            "content-type",
            "Application/GRPC;charset=utf-8"
        )));
        assert!(!is_grpc(&h("content-type", "application/grpc-web")));
        assert!(!is_grpc(&h("content-type", "application/json")));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn paths_name_service_and_method() {
        assert_eq!(
            service_method("/pkg.Svc/Method"),
            Some(("pkg.Svc", "Method"))
        );
        assert_eq!(service_method("/Svc/M"), Some(("Svc", "M")));
        assert_eq!(service_method("/pkg.Svc"), None);
        assert_eq!(service_method("/pkg.Svc/"), None);
        assert_eq!(service_method("/a/b/c"), None);
        assert_eq!(service_method("pkg.Svc/M"), None);
    }

    #[test]
    fn grpc_timeouts_parse_and_bad_ones_are_ignored() {
        assert_eq!(
            timeout(&h("grpc-timeout", "250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            timeout(&h("grpc-timeout", "2S")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            timeout(&h("grpc-timeout", "1H")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            timeout(&h("grpc-timeout", "99999999n")),
            Some(Duration::from_nanos(99_999_999))
        );
        assert_eq!(timeout(&h("grpc-timeout", "123456789S")), None);
        assert_eq!(timeout(&h("grpc-timeout", "S")), None);
        assert_eq!(timeout(&h("grpc-timeout", "10x")), None);
        assert_eq!(timeout(&h("grpc-timeout", "-1S")), None);
        assert_eq!(timeout(&h("grpc-timeout", "")), None);
    }
}
