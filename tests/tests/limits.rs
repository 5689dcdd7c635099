//! `weir run` raises its open-files limit: every proxied connection holds two
//! sockets and every UDP session two more, and the usual soft limit of 1024 would
//! refuse them long before anything else runs out.

use std::time::Duration;

use weir_tests::lab::{self, Netns, Process};
use weir_tests::{ScratchDir, require_root, weir_bin};

#[test]
fn weir_raises_a_low_open_files_limit_to_the_hard_limit() {
    if !require_root("limits") {
        return;
    }
    let d = ScratchDir::new("limits");
    let ns = Netns::create(&lab::unique_prefix("wlim")).unwrap();
    std::fs::write(d.0.join("p.yaml"), "").unwrap();
    let state = d.0.join("state");
    let script = format!(
        "ulimit -Sn 1024; exec {} run --policy {} --steering none --state-dir {} --api-socket {}",
        weir_bin().display(),
        d.0.join("p.yaml").display(),
        state.display(),
        d.0.join("weir.sock").display()
    );
    let mut cmd = ns.command("sh");
    cmd.args(["-c", &script])
        .stderr(std::process::Stdio::null());
    let mut weir = Process::spawn("weir", cmd).unwrap();
    let ready = state.join("ready");
    lab::wait_until(Duration::from_secs(10), || ready.exists()).expect("weir ready");
    let pid = std::fs::read_to_string(&ready).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", pid.trim())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert_eq!(soft, hard, "{line}");
    assert_ne!(soft, "1024", "{line}");
    weir.stop_with(libc::SIGTERM, Duration::from_secs(5));
}
