//! The embedded eBPF objects load into this kernel and pass the verifier.

use weir_agent::ebpf::{OBJECTS, load_and_verify};

#[test]
fn embedded_objects_pass_the_verifier() {
    if !weir_tests::require_root("embedded_objects_pass_the_verifier") {
        return;
    }
    let _ = std::process::Command::new("sh")
        .args([
            "-c",
            "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf",
        ])
        .status();
    let mut loaded = Vec::new();
    for obj in OBJECTS {
        let names = load_and_verify(obj).unwrap_or_else(|e| panic!("{e}"));
        loaded.extend(names.into_iter().map(|n| format!("{}:{n}", obj.name)));
    }
    loaded.sort();
    assert_eq!(
        loaded,
        [
            "redirect:weir_from_endpoint",
            "redirect:weir_to_endpoint",
            "sockmap:weir_sk_msg",
            "sockmap:weir_sockops"
        ]
    );
}
