//! Who may use the API: the socket is mode 0600, and when an operator opens it
//! up, each call is still checked against the caller's uid (SO_PEERCRED). A
//! client run as `nobody` is refused with PERMISSION_DENIED unless weir runs
//! with `--api-allow-uid` for it; root always passes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use weir_tests::{Scenario, text};

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
"#;

/// `nobody`'s uid on this machine.
fn nobody_uid() -> u32 {
    let out = Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .expect("run id");
    text(&out).trim().parse().expect("nobody has a uid")
}

/// Makes the socket reachable for any user (the operator's side of allowing a
/// uid): the scratch directory traversable, the socket writable, and a copy of
/// the binary `nobody` may run.
fn open_up(s: &Scenario) -> PathBuf {
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    };
    mode(&s.dir.0, 0o755);
    mode(&s.path("weir.sock"), 0o666);
    let bin = s.path("weir-client");
    if !bin.exists() {
        std::fs::copy(weir_tests::weir_bin(), &bin).unwrap();
        mode(&bin, 0o755);
    }
    bin
}

/// `weir endpoint list` as `nobody` (or as root).
fn list(s: &Scenario, bin: &Path, as_nobody: bool) -> Output {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"])
            .arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(["endpoint", "list", "--api-socket"])
        .arg(s.path("weir.sock"))
        .output()
        .expect("run weir endpoint list")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_api_refuses_other_users_unless_allowed_and_always_admits_root() {
    let Some(mut s) = Scenario::star_wars("api_access") else {
        return;
    };
    let nobody = nobody_uid();
    s.start_weir(POLICY, &["--steering", "none"]);
    let m = std::fs::metadata(s.path("weir.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(m & 0o777, 0o600, "the socket is root's alone");

    let bin = open_up(&s);
    let refused = list(&s, &bin, true);
    assert!(!refused.status.success(), "nobody was let in");
    let msg = stderr(&refused);
    assert!(msg.contains("permission denied"), "{msg}");
    assert!(msg.contains(&format!("uid {nobody}")), "{msg}");
    assert!(msg.contains("--api-allow-uid"), "{msg}");
    let logged = weir_tests::lab::wait_until(Duration::from_secs(5), || {
        s.weir_log_text().contains("API call refused")
    });
    assert!(
        logged.is_ok(),
        "the refusal is logged:\n{}",
        s.weir_log_text()
    );
    // With its reason, on one line.
    let why = format!("uid {nobody} may not use weir's API");
    assert!(
        s.weir_log_text()
            .lines()
            .any(|l| l.contains("API call refused") && l.contains(&why)),
        "the refusal's reason is logged:\n{}",
        s.weir_log_text()
    );
    let root = list(&s, &bin, false);
    assert!(root.status.success(), "{}", stderr(&root));
    assert!(text(&root).contains("deathstar"), "{}", text(&root));

    // With --api-allow-uid the same caller gets in.
    let st = s.weir().stop_with(libc::SIGTERM, Duration::from_secs(10));
    assert!(st.is_some_and(|st| st.success()), "{}", s.weir_log_text());
    s.lab.processes.retain(|p| p.name != "weir");
    let uid = nobody.to_string();
    s.start_weir(POLICY, &["--steering", "none", "--api-allow-uid", &uid]);
    let bin = open_up(&s);
    let allowed = list(&s, &bin, true);
    assert!(allowed.status.success(), "{}", stderr(&allowed));
    assert!(text(&allowed).contains("deathstar"), "{}", text(&allowed));
}
