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
            "redirect:weir_from_netdev",
            "redirect:weir_sk_lookup",
            "redirect:weir_to_endpoint",
            "redirect:weir_to_netdev",
            "sockmap:weir_sk_msg",
            "sockmap:weir_sockops"
        ]
    );
}

/// A program the verifier must reject: it reads packet data without a bounds check.
const UNSAFE_PROGRAM: &str = r#"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("classifier")
int weir_unchecked_read(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	return *(int *)(data + 100);
}

char LICENSE[] SEC("license") = "GPL";
"#;

#[test]
fn a_verifier_rejection_names_the_program_and_shows_the_log() {
    if !weir_tests::require_root("a_verifier_rejection_names_the_program_and_shows_the_log") {
        return;
    }
    let dir = weir_tests::ScratchDir::new("verifier");
    let src = dir.0.join("bad.bpf.c");
    let obj = dir.0.join("bad.bpf.o");
    std::fs::write(&src, UNSAFE_PROGRAM).unwrap();
    let built = std::process::Command::new("clang")
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-I/usr/include/x86_64-linux-gnu",
            "-c",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .status()
        .expect("clang");
    assert!(built.success());
    let bytes: &'static [u8] = Box::leak(std::fs::read(&obj).unwrap().into_boxed_slice());
    let err = load_and_verify(&weir_agent::ebpf::EmbeddedObject { name: "bad", bytes })
        .expect_err("the verifier must reject an unchecked packet read")
        .to_string();
    assert!(err.contains("weir_unchecked_read"), "{err}");
    assert!(err.contains("`bad`"), "names the object: {err}");
    // The verifier's own words, e.g. "invalid access to packet".
    assert!(
        err.contains("invalid access to packet") || err.contains("R1 "),
        "no verifier log in: {err}"
    );

    // A file that is not an eBPF object at all is a clear load error, too.
    let junk: &'static [u8] = b"\x7fELF but not really";
    let err = load_and_verify(&weir_agent::ebpf::EmbeddedObject {
        name: "junk",
        bytes: junk,
    })
    .expect_err("junk must not load")
    .to_string();
    assert!(err.contains("`junk`"), "{err}");
}
