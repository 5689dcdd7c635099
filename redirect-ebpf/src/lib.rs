//! The compiled redirect eBPF object, embedded. `build.rs` compiles `bpf/*.bpf.c`.

/// The ELF object of `bpf/redirect.bpf.c`, with BTF.
pub static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/redirect.bpf.o"));

#[cfg(test)]
mod tests {
    const PROGRAMS: &[&str] = &[
        "weir_from_endpoint",
        "weir_from_netdev",
        "weir_sk_lookup",
        "weir_to_endpoint",
        "weir_to_netdev",
    ];
    const MAPS: &[&str] = &[
        "weir_counters",
        "weir_endpoints",
        "weir_ipcache",
        "weir_policy",
        "weir_ct",
        "weir_config",
        "weir_events",
    ];

    #[test]
    fn object_has_programs_maps_and_btf() {
        let obj = aya_obj::Object::parse(super::OBJECT).expect("object parses");
        let mut programs: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        programs.sort();
        assert_eq!(programs, PROGRAMS);
        for m in MAPS {
            assert!(obj.maps.contains_key(*m), "map {m} missing");
        }
        assert!(obj.btf.is_some(), "object lost its BTF (built without -g?)");
    }
}
