//! The policy and endpoints loaders: any text either loads or yields positioned
//! errors; never a panic, and every error position lies inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // YAML breaks lines at \n, \r and \r\n; the end-of-input mark may sit one line past the last.
    let lines = text.bytes().filter(|b| *b == b'\n' || *b == b'\r').count() + 2;
    match weir_policy::parse_policies(text, "f.yaml") {
        Ok(policies) => {
            let _ = weir_policy::CompiledPolicy::compile(
                &policies,
                &[],
                &mut weir_policy::identity::IdentityAllocator::default(),
            );
        }
        Err(e) => {
            for err in &e.0 {
                assert!(err.line >= 1 && err.line <= lines, "{err} outside {lines} lines");
            }
        }
    }
    // Endpoints and services; errors inside the input too.
    if let Err(e) = weir_policy::parse_endpoints_file(text, "e.yaml") {
        for err in &e.0 {
            assert!(err.line >= 1 && err.line <= lines, "{err} outside {lines} lines");
        }
    }
});
