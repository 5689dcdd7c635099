//! The HTTP/1 request stream tracker and path normalisation: arbitrary bytes never
//! panic, nothing is followed after a protocol switch, normalisation is
//! idempotent, leaves no dot segment (with or without `;` parameters), and
//! ignores the case of escapes' hex digits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_parsers::http::{RequestTracker, normalize_path, uppercase_escapes};

fuzz_target!(|data: &[u8]| {
    let mut t = RequestTracker::new(8192);
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    t.feed(&data[..split]);
    // The second byte's low bit: the connection switched protocols (a 101 or a
    // CONNECT's 2xx) between the two reads.
    let switched = data.get(1).is_some_and(|b| b & 1 == 1);
    if switched {
        t.switched();
        while t.next_check().is_some() {}
    }
    t.feed(&data[split..]);
    if switched {
        assert_eq!(t.next_check(), None);
    }
    while t.next_check().is_some() {}
    if let Ok(text) = std::str::from_utf8(data) {
        let up = uppercase_escapes(text);
        assert_eq!(up.len(), text.len());
        if let Ok(n) = normalize_path(text) {
            assert_eq!(normalize_path(&n).as_deref(), Ok(n.as_str()));
            assert_eq!(normalize_path(&up).as_deref(), Ok(n.as_str()));
            let path = n.split('?').next().unwrap_or("");
            assert!(!path.split('/').any(|s| {
                let s = s.split(';').next().unwrap_or(s);
                s == "." || s == ".."
            }));
        }
    }
});
