//! `weir demo` prints the star-wars table, what `weir observe` and `weir status`
//! show of the run, and works twice in a row.

#[test]
fn demo_runs_twice_and_cleans_up() {
    if !weir_tests::require_root("demo_runs_twice_and_cleans_up") {
        return;
    }
    for run in 0..2 {
        let python = weir_tests::repo_root().join(".venv/bin/python");
        let out = weir_tests::weir_cli(&["demo", "--python", python.to_str().unwrap()]);
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
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains("weirdemo"),
        "demo left namespaces behind"
    );
}
