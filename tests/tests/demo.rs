//! `weir demo` prints the star-wars table, what `weir observe` and `weir status`
//! show of the run, and works twice in a row.

#[test]
fn demo_runs_twice_and_cleans_up() {
    if !weir_tests::require_root("demo_runs_twice_and_cleans_up") {
        return;
    }
    let mut demo_pids = Vec::new();
    for run in 0..2 {
        let python = weir_tests::repo_root().join(".venv/bin/python");
        let child = std::process::Command::new(weir_tests::weir_bin())
            .args(["demo", "--python", python.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run weir demo");
        demo_pids.push(child.id());
        let out = child.wait_with_output().expect("wait for weir demo");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "run {run}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Vec<Vec<&str>> = stdout
            .lines()
            .filter(|l| l.starts_with("tiefighter") || l.starts_with("xwing"))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows.len(), 6, "{stdout}");
        assert_eq!(
            rows[0][..5],
            [
                "tiefighter",
                "POST",
                "/v1/request-landing",
                "200",
                "FORWARDED"
            ]
        );
        assert_eq!(
            rows[1][..5],
            ["tiefighter", "PUT", "/v1/exhaust-port", "403", "DROPPED"]
        );
        // On the eBPF datapath the xwing's packets are dropped in the kernel.
        assert_eq!(
            rows[2][..5],
            ["xwing", "POST", "/v1/request-landing", "dropped", "DROPPED"]
        );
        // gRPC's own health service (grpcio) behind weir: Check is allowed,
        // Watch gets PERMISSION_DENIED from weir and never reaches the server.
        assert_eq!(
            rows[4][..5],
            [
                "tiefighter",
                "gRPC",
                "grpc.health.v1.Health/Check",
                "OK:SERVING",
                "FORWARDED"
            ],
            "{stdout}"
        );
        assert_eq!(
            rows[5][..5],
            [
                "tiefighter",
                "gRPC",
                "grpc.health.v1.Health/Watch",
                "PERMISSION_DENIED",
                "DROPPED"
            ],
            "{stdout}"
        );
        assert!(
            stdout.contains("rule1 spec.ingress[0].toPorts[1].rules.http[0]"),
            "{stdout}"
        );
        assert!(stdout.contains("steering: eBPF datapath"), "{stdout}");
        assert!(
            stdout.contains("no rule matched (ingress, L3/L4)"),
            "{stdout}"
        );
        assert!(stdout.contains("rule1 spec.ingress[0].toPorts[0].rules.http[0]"));
        // The same run through the API: `weir observe` and `weir status`.
        assert!(
            stdout.contains(
                "http-request DROPPED (HTTP/1.1 PUT http://10.200.0.10/v1/exhaust-port => 403)"
            ),
            "{stdout}"
        );
        assert!(
            stdout.contains("default/xwing:") && stdout.contains("policy-verdict:TCP DROPPED"),
            "{stdout}"
        );
        assert!(
            stdout.contains("Steering:        eBPF datapath"),
            "{stdout}"
        );
        assert!(
            stdout.contains("Policy:          revision 1, 1 policies, 3 endpoints"),
            "{stdout}"
        );
    }
    // The demo names its namespaces `weirdemo-<pid>-<n>-*` and its pinned maps
    // `/sys/fs/bpf/weir-demo-<pid>-<n>`: look for exactly what these two runs made,
    // so a leftover of some other (killed) run on the machine cannot fail this test.
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let netns = String::from_utf8_lossy(&netns.stdout);
    let pinned: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for pid in demo_pids {
        let ns_prefix = format!("weirdemo-{pid}-");
        assert!(
            !netns.lines().any(|l| l.starts_with(&ns_prefix)),
            "demo {pid} left namespaces behind:\n{netns}"
        );
        let bpf_prefix = format!("weir-demo-{pid}-");
        assert!(
            !pinned.iter().any(|name| name.starts_with(&bpf_prefix)),
            "demo {pid} left pinned BPF objects behind: {pinned:?}"
        );
    }
}
