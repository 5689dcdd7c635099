//! Path normalisation: the one spelling of a path that policy regexes see.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PathError {
    #[error("path does not start with `/`: {0:?}")]
    NotAbsolute(String),
    #[error("path contains an encoded `/`, `\\` or NUL: {0:?}")]
    EncodedSeparator(String),
    #[error("path contains a bad percent-encoding: {0:?}")]
    BadPercentEncoding(String),
    #[error("path contains a backslash: {0:?}")]
    Backslash(String),
    #[error("path {raw:?} is not in normal form (normalised: {normalized:?})")]
    NotNormal { raw: String, normalized: String },
    #[error("path has a dot segment with `;` parameters (servers differ on it): {0:?}")]
    DotSegmentParameter(String),
}

/// Normalises an origin-form target (path plus optional query): decodes
/// percent-encoded unreserved characters, removes `.` and `..` segments
/// (RFC 3986 §5.2.4) and merges repeated slashes. The query is kept verbatim.
///
/// Encoded separators (`%2F`, `%5C`, `%00`) and raw backslashes are refused,
/// since servers disagree on what they mean.
pub fn normalize_path(target: &str) -> Result<String, PathError> {
    let (path, query) = match target.find('?') {
        Some(i) => (&target[..i], Some(&target[i..])),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute(target.to_string()));
    }
    if path.contains('\\') {
        return Err(PathError::Backslash(target.to_string()));
    }
    let decoded = decode_unreserved(path).map_err(|e| match e {
        DecodeError::Separator => PathError::EncodedSeparator(target.to_string()),
        DecodeError::Bad => PathError::BadPercentEncoding(target.to_string()),
    })?;
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    // `..;x` and `.;x` are dot segments to servers that strip path parameters
    // (Tomcat, Jetty, Spring) and plain names to the rest.
    if segments
        .iter()
        .any(|s| matches!(s.split_once(';'), Some((".." | ".", _))))
    {
        return Err(PathError::DotSegmentParameter(target.to_string()));
    }
    let last = segments.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "" => trailing_slash = i == last,
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut normalized = String::with_capacity(target.len());
    for seg in &out {
        normalized.push('/');
        normalized.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        normalized.push('/');
    }
    if let Some(q) = query {
        normalized.push_str(q);
    }
    Ok(normalized)
}

/// `target` with the hex digits of every percent-escape of its path (not its
/// query, which stays verbatim) upper-cased: the spelling RFC 3986 §6.2.2.1
/// calls normal (`%c3%a9` and `%C3%A9` are the same).
pub fn uppercase_escapes(target: &str) -> String {
    let (path, query) = match target.find('?') {
        Some(i) => (&target[..i], &target[i..]),
        None => (target, ""),
    };
    let mut out = String::with_capacity(target.len());
    let mut hex_left = 0u8;
    for c in path.chars() {
        if hex_left > 0 && c.is_ascii_hexdigit() {
            out.push(c.to_ascii_uppercase());
            hex_left -= 1;
            continue;
        }
        hex_left = 0;
        if c == '%' {
            hex_left = 2;
        }
        out.push(c);
    }
    out.push_str(query);
    out
}

enum DecodeError {
    Separator,
    Bad,
}

fn decode_unreserved(path: &str) -> Result<String, DecodeError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(DecodeError::Bad)?;
            let s = std::str::from_utf8(hex).map_err(|_| DecodeError::Bad)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(DecodeError::Bad);
            }
            let v = u8::from_str_radix(s, 16).map_err(|_| DecodeError::Bad)?;
            match v {
                b'/' | b'\\' | 0 => return Err(DecodeError::Separator),
                c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                    out.push(c as char)
                }
                _ => {
                    // Reserved or non-ASCII: keep it encoded, hex upper-cased (RFC 3986 §6.2.2.1).
                    out.push('%');
                    out.push_str(&s.to_ascii_uppercase());
                }
            }
            i += 3;
        } else {
            let end = (i + utf8_len(bytes[i])).min(bytes.len());
            out.push_str(path.get(i..end).ok_or(DecodeError::Bad)?);
            i = end;
        }
    }
    Ok(out)
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        let cases = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a//b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/../../b", "/b"),
            ("/a/b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/a?x=/../y", "/a?x=/../y"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a;b/c", "/a;b/c"),
            ("/a/..b;x", "/a/..b;x"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw).unwrap(), want, "{raw}");
        }
        assert!(matches!(
            normalize_path("/a%2Fb"),
            Err(PathError::EncodedSeparator(_))
        ));
        assert!(matches!(
            normalize_path("/a%5cb"),
            Err(PathError::EncodedSeparator(_))
        ));
        assert!(matches!(
            normalize_path("/a%zz"),
            Err(PathError::BadPercentEncoding(_))
        ));
        assert!(matches!(
            normalize_path("/a%+1"),
            Err(PathError::BadPercentEncoding(_))
        ));
        assert!(matches!(
            normalize_path("/a%2"),
            Err(PathError::BadPercentEncoding(_))
        ));
        assert!(matches!(
            normalize_path("/a\\b"),
            Err(PathError::Backslash(_))
        ));
        assert!(matches!(
            normalize_path("a"),
            Err(PathError::NotAbsolute(_))
        ));
        for p in [
            "/a/..;/admin",
            "/a/.;/b",
            "/..;jsessionid=1/admin",
            "/a/%2e%2e;x/admin",
            "/a/.%2e;/admin",
        ] {
            assert!(
                matches!(normalize_path(p), Err(PathError::DotSegmentParameter(_))),
                "{p}"
            );
        }
    }

    #[test]
    fn escapes_are_upper_cased() {
        assert_eq!(uppercase_escapes("/caf%c3%a9?q=%2f"), "/caf%C3%A9?q=%2f");
        assert_eq!(uppercase_escapes("/a%zz%4"), "/a%zz%4");
        assert_eq!(uppercase_escapes("/%%61b"), "/%%61b");
        assert_eq!(uppercase_escapes("/é%e9"), "/é%E9");
    }

    proptest! {
        #[test]
        fn normalisation_is_idempotent_and_clean(p in "(/[a-z.%2eE]{0,4}){1,6}(\\?[a-z/.]{0,5})?") {
            if let Ok(n) = normalize_path(&p) {
                prop_assert_eq!(normalize_path(&n).unwrap(), n.clone());
                let path_part = n.split('?').next().unwrap();
                prop_assert!(!path_part.contains("//"));
                prop_assert!(!path_part.split('/').any(|s| s == "." || s == ".."));
            }
        }
    }
}
