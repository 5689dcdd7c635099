//! Protocol detection: any first bytes, fed in any split, never panic; a
//! decision never changes when more bytes arrive (the proxy acts on the first
//! one), and every strict prefix of the HTTP/2 preface waits for more.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_parsers::detect::{Detected, H2_PREFACE, classify};

fuzz_target!(|data: &[u8]| {
    let mut first: Option<(usize, Detected)> = None;
    for n in 0..=data.len() {
        match (classify(&data[..n]), first) {
            (Some(d), None) => first = Some((n, d)),
            (Some(d), Some((_, f))) => assert_eq!(d, f, "decision changed at {n}"),
            (None, Some((at, f))) => panic!("decided {f:?} at {at}, undecided at {n}"),
            (None, None) => {}
        }
    }
    if data.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(data) {
        assert_eq!(classify(data), None);
    }
    if data.starts_with(H2_PREFACE) {
        assert_eq!(classify(data), Some(Detected::Http2));
    }
});
