//! End-to-end harness: scenarios that read like the situation they test.
//!
//! ```text
//! let Some(mut s) = Scenario::star_wars("keepalive") else { return };
//! s.start_deathstar();
//! s.start_weir(POLICY, &[]);
//! let out = s.curl("tiefighter", &["-X", "POST", &s.url("/v1/request-landing")]);
//! ```
//!
//! Everything a scenario creates (namespaces, veths, processes, files, nft rules in
//! its node namespace) is removed when it drops, also when the test panics.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub use weir_agent::lab::{self, Lab, Netns, Process};

/// True when the test may run. Without root it prints a loud skip and returns
/// false; with `CI=true` a skip is a failure.
pub fn require_root(test: &str) -> bool {
    if lab::is_root() {
        return true;
    }
    let msg = format!("{test}: needs root (network namespaces, nftables, transparent sockets)");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}, and CI=true forbids skipping");
    }
    eprintln!("\n*** SKIPPED *** {msg}\n");
    false
}

/// A directory removed on drop.
#[derive(Debug)]
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> ScratchDir {
        let p = std::env::temp_dir().join(lab::unique_prefix(&format!("weir-test-{tag}")));
        std::fs::create_dir_all(&p).expect("create scratch dir");
        ScratchDir(p)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::env::var_os("WEIR_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The weir binary cargo built for this package's integration tests
/// (`target/<profile>/weir-e2e`, beside the `deps/` directory the test runs from).
pub fn weir_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("weir-e2e");
    assert!(
        bin.exists(),
        "{} is missing; run the tests through cargo",
        bin.display()
    );
    bin
}

pub const ENDPOINTS: &str = "endpoints:
  - name: deathstar
    ips: [10.200.0.10, 'fd00:200::10']
    labels: {org: empire, class: deathstar}
  - name: tiefighter
    ips: [10.200.0.20, 'fd00:200::20']
    labels: {org: empire, class: tiefighter}
  - name: xwing
    ips: [10.200.0.30, 'fd00:200::30']
    labels: {org: alliance, class: xwing}
";

pub const DEATHSTAR4: &str = "10.200.0.10";
pub const DEATHSTAR6: &str = "fd00:200::10";

/// The star-wars node: deathstar, tiefighter, xwing around a node namespace.
pub struct Scenario {
    // Drop order matters: processes and namespaces go before the directory.
    pub lab: Lab,
    pub dir: ScratchDir,
    pub weir_log: PathBuf,
    pub flow_log: PathBuf,
    pub state_dir: PathBuf,
    /// This scenario's own pins, on bpffs.
    pub bpf_root: PathBuf,
    /// Whether weir watches its policy file (off unless a test turns it on:
    /// tests that rewrite the file and send SIGHUP count the reloads they
    /// cause, and a watcher would add its own).
    pub watch_policy: bool,
}

impl Drop for Scenario {
    fn drop(&mut self) {
        // Stop weir, then remove everything it left pinned or installed.
        self.lab.processes.retain(|p| p.name != "weir");
        let _ = self
            .lab
            .node
            .command(weir_bin().to_str().unwrap_or("weir"))
            .args(["cleanup", "--force", "--bpf-root"])
            .arg(&self.bpf_root)
            .arg("--api-socket")
            .arg(self.path("weir.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.bpf_root);
    }
}

impl Scenario {
    /// `None` (after a loud skip) when not root.
    pub fn star_wars(test: &str) -> Option<Scenario> {
        if !require_root(test) {
            return None;
        }
        let dir = ScratchDir::new(test);
        let mut lab = Lab::new(&lab::unique_prefix("wt")).expect("create node namespace");
        for (name, v4, v6) in [
            ("deathstar", DEATHSTAR4, DEATHSTAR6),
            ("tiefighter", "10.200.0.20", "fd00:200::20"),
            ("xwing", "10.200.0.30", "fd00:200::30"),
        ] {
            lab.add_workload(name, v4.parse().unwrap(), v6.parse().unwrap())
                .expect("add workload");
        }
        std::fs::write(dir.0.join("endpoints.yaml"), ENDPOINTS).unwrap();
        Some(Scenario {
            weir_log: dir.0.join("weir.log"),
            flow_log: dir.0.join("flows.jsonl"),
            state_dir: dir.0.join("state"),
            bpf_root: PathBuf::from(format!("/sys/fs/bpf/{}", lab::unique_prefix("weir-test"))),
            watch_policy: false,
            lab,
            dir,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// nginx on the deathstar, ports 80 (and any `extra_ports`), with an access log.
    pub fn start_deathstar(&mut self, extra_ports: &[u16]) {
        self.start_deathstar_with(extra_ports, |c| c);
    }

    /// As [`Scenario::start_deathstar`], with the nginx config edited by `edit`.
    pub fn start_deathstar_with(&mut self, extra_ports: &[u16], edit: impl Fn(String) -> String) {
        let d = self.dir.0.join("nginx");
        std::fs::create_dir_all(&d).unwrap();
        let mut conf = edit(weir_agent::demo::deathstar_nginx_conf(&d));
        for p in extra_ports {
            conf = conf.replace(
                "    listen 80;\n",
                &format!("    listen 80;\n    listen {p};\n    listen [::]:{p};\n"),
            );
        }
        let conf_path = d.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut cmd = self.lab.workload("deathstar").ns.command("nginx");
        cmd.args(["-c", conf_path.to_str().unwrap()]);
        self.lab.spawn("nginx", cmd).expect("start nginx");
        self.lab
            .wait_for_tcp(DEATHSTAR4, 80, Duration::from_secs(10))
            .expect("nginx listening");
    }

    /// nginx (the deathstar's config) in any namespace of the lab, its files in
    /// `<scratch>/nginx-<name>`; see [`Scenario::access_log_of`].
    pub fn start_nginx_in(&mut self, name: &str) {
        let d = self.dir.0.join(format!("nginx-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        let conf_path = d.join("nginx.conf");
        std::fs::write(&conf_path, weir_agent::demo::deathstar_nginx_conf(&d)).unwrap();
        let w = self.lab.workload(name);
        let ip4 = w.ip4.to_string();
        let mut cmd = w.ns.command("nginx");
        cmd.args(["-c", conf_path.to_str().unwrap()]);
        self.lab
            .spawn(&format!("nginx-{name}"), cmd)
            .expect("start nginx");
        let ok = lab::wait_until(Duration::from_secs(10), || {
            self.lab
                .workload(name)
                .ns
                .command("socat")
                .args(["-u", "OPEN:/dev/null", &format!("TCP:{ip4}:80")])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(ok.is_ok(), "nginx in {name} did not start");
    }

    /// The access log of an nginx started with [`Scenario::start_nginx_in`]
    /// (settled, as [`Scenario::access_log`]).
    pub fn access_log_of(&self, name: &str) -> Vec<String> {
        without_http2_probes(settled_lines(
            &self.dir.0.join(format!("nginx-{name}/access.log")),
        ))
    }

    /// Runs curl in the node's own namespace (the `host`); `-s` and a 10 s limit.
    pub fn curl_from_node(&self, args: &[&str]) -> Output {
        self.lab
            .node
            .command("curl")
            .args(["-s", "--max-time", "10"])
            .args(args)
            .output()
            .expect("run curl")
    }

    /// Replaces the policy file and sends weir SIGHUP; waits until the log says
    /// it was applied (or refused).
    pub fn reload(&mut self, policy: &str) {
        std::fs::write(self.path("policy.yaml"), policy).unwrap();
        self.sighup_and_wait_for_reload();
    }

    /// Rewrites the endpoints file and reloads weir (SIGHUP), waiting until applied.
    pub fn reload_endpoints(&mut self, endpoints: &str) {
        std::fs::write(self.path("endpoints.yaml"), endpoints).unwrap();
        self.sighup_and_wait_for_reload();
    }

    fn sighup_and_wait_for_reload(&mut self) {
        let before = self.weir_log_text().matches("policy reloaded").count();
        let pid = self.weir().pid() as i32;
        lab::send_signal(pid, libc::SIGHUP);
        let ok = lab::wait_until(Duration::from_secs(10), || {
            self.weir_log_text().matches("policy reloaded").count() > before
        });
        assert!(
            ok.is_ok(),
            "reload did not apply:\n{}",
            self.weir_log_text()
        );
    }

    /// Lines of nginx's access log (requests that reached the upstream). nginx
    /// writes a line after it has sent the response, so this waits until the log
    /// has stopped changing (100 ms apart, at most 3 s).
    ///
    /// weir forwards a request that came over HTTP/2 over HTTP/2 when the server
    /// speaks it, and finds out by sending the HTTP/2 preface: an HTTP/1-only
    /// nginx logs that as `"PRI * HTTP/2.0" 400` (at most once a minute per client address and
    /// destination). Those lines are no request and are left out.
    pub fn access_log(&self) -> Vec<String> {
        without_http2_probes(settled_lines(&self.dir.0.join("nginx/access.log")))
    }

    /// Starts `weir run` in the node namespace with `policy` and waits until ready.
    pub fn start_weir(&mut self, policy: &str, extra_args: &[&str]) {
        self.start_weir_wrapped(policy, extra_args, &[]);
    }

    /// As [`Scenario::start_weir`], run through `wrapper` (e.g. `setpriv
    /// --bounding-set ...`: weir with only some capabilities).
    pub fn start_weir_wrapped(&mut self, policy: &str, extra_args: &[&str], wrapper: &[&str]) {
        let pol = self.path("policy.yaml");
        std::fs::write(&pol, policy).unwrap();
        let ready = self.state_dir.join("ready");
        // A weir killed with SIGKILL leaves its ready file: it says nothing of
        // this one.
        let _ = std::fs::remove_file(&ready);
        let cmd = self.weir_run_command_wrapped(extra_args, &self.weir_log, wrapper);
        self.lab.spawn("weir", cmd).expect("start weir");
        let lab = &mut self.lab;
        let ok = lab::wait_until(Duration::from_secs(20), || {
            ready.exists() || !lab.processes.last_mut().is_some_and(|p| p.alive())
        });
        if ok.is_err() || !ready.exists() {
            panic!("weir did not become ready:\n{}", self.weir_log_text());
        }
    }

    /// Starts another `weir run` beside a running one (same files and sockets,
    /// logging to `<scratch>/<log>`), tracked like the first: `Some(pid)` once
    /// its pid is in the ready file, `None` if it exited first.
    pub fn start_next_weir(&mut self, extra_args: &[&str], log: &str) -> Option<u32> {
        let cmd = self.weir_run_command(extra_args, &self.path(log));
        let pid = self.lab.spawn("weir", cmd).expect("start weir").pid();
        let ready = self.state_dir.join("ready");
        let is_ready =
            || std::fs::read_to_string(&ready).is_ok_and(|s| s.trim() == pid.to_string());
        let _ = lab::wait_until(Duration::from_secs(60), || {
            is_ready() || !self.weir_with_pid(pid).is_some_and(|p| p.alive())
        });
        is_ready().then_some(pid)
    }

    /// A weir process this scenario started, by pid.
    pub fn weir_with_pid(&mut self, pid: u32) -> Option<&mut Process> {
        self.lab
            .processes
            .iter_mut()
            .find(|p| p.name == "weir" && p.pid() == pid)
    }

    fn weir_run_command(&self, extra_args: &[&str], log: &Path) -> Command {
        self.weir_run_command_wrapped(extra_args, log, &[])
    }

    fn weir_run_command_wrapped(
        &self,
        extra_args: &[&str],
        log: &Path,
        wrapper: &[&str],
    ) -> Command {
        let pol = self.path("policy.yaml");
        let bin = weir_bin();
        let bin = bin.to_str().expect("utf-8 path");
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = self.lab.node.command(prog);
                c.args(args).arg(bin);
                c
            }
            None => self.lab.node.command(bin),
        };
        cmd.arg("run")
            .arg("--policy")
            .arg(&pol)
            .arg("--endpoints")
            .arg(self.path("endpoints.yaml"))
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--flow-log")
            .arg(&self.flow_log)
            .arg("--bpf-root")
            .arg(&self.bpf_root)
            .args(["--api-socket", self.path("weir.sock").to_str().unwrap()])
            .args((!self.watch_policy).then_some("--no-watch-policy"))
            .args(extra_args)
            .env("WEIR_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        cmd
    }

    pub fn weir(&mut self) -> &mut Process {
        self.lab
            .processes
            .iter_mut()
            .find(|p| p.name == "weir")
            .expect("weir was started")
    }

    pub fn weir_log_text(&self) -> String {
        std::fs::read_to_string(&self.weir_log).unwrap_or_default()
    }

    /// Flow records written so far, once the log has settled (records reach it
    /// in batches: the kernel's every 20 ms, the proxy's every few ms).
    pub fn flows(&self) -> Vec<serde_json::Value> {
        settled_lines(&self.flow_log)
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Runs curl in a workload's namespace; `-s` and a 10 s limit are added.
    pub fn curl(&self, from: &str, args: &[&str]) -> Output {
        self.lab
            .workload(from)
            .ns
            .command("curl")
            .args(["-s", "--max-time", "10"])
            .args(args)
            .output()
            .expect("run curl")
    }

    /// `curl -X METHOD URL` from a namespace of the lab, 3 s at most: the status
    /// code, or `000` when nothing answered.
    pub fn status(&self, from: &str, method: &str, url: &str) -> String {
        text(&self.curl(
            from,
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "3",
                "-X",
                method,
                url,
            ],
        ))
    }

    /// One ping (1 s) from a namespace of the lab: whether it was answered.
    pub fn ping(&self, from: &str, dst: &str) -> bool {
        self.lab
            .workload(from)
            .ns
            .command("ping")
            .args(["-c", "1", "-W", "1", dst])
            .output()
            .expect("run ping")
            .status
            .success()
    }

    /// Sends raw bytes from a workload to `dst:port` and returns all that comes back
    /// before the server closes (or `wait` passes).
    pub fn raw(&self, from: &str, dst: &str, port: u16, bytes: &[u8], wait: Duration) -> Vec<u8> {
        let input = self.path(&lab::unique_prefix("raw"));
        std::fs::write(&input, bytes).unwrap();
        // A dropped SYN must not wait for the kernel's ~2 min of retries.
        let target = if dst.contains(':') {
            format!("TCP:[{dst}]:{port},connect-timeout=3")
        } else {
            format!("TCP:{dst}:{port},connect-timeout=3")
        };
        let out = self
            .lab
            .workload(from)
            .ns
            .command("socat")
            .args(["-t", &format!("{}", wait.as_secs_f64()), "-T", "10", "-"])
            .arg(target)
            .stdin(std::fs::File::open(&input).unwrap())
            .output()
            .expect("run socat");
        out.stdout
    }

    pub fn run_in_node(&self, argv: &[&str]) -> String {
        self.lab
            .node
            .run(argv)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// An access log without the lines weir's HTTP/2 probe leaves in an HTTP/1-only
/// nginx's (see [`Scenario::access_log`]).
pub fn without_http2_probes(lines: Vec<String>) -> Vec<String> {
    lines
        .into_iter()
        .filter(|l| !l.contains("\"PRI * HTTP/2.0\""))
        .collect()
}

/// The lines of a log file once it has stopped changing (100 ms apart, at most 3 s).
pub fn settled_lines(path: &Path) -> Vec<String> {
    let read = || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let mut last = read();
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// `stdout` of a command as text.
/// A process's resident memory (VmRSS, KiB; 0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The README's bound on weir's growth while it streams a 100 MB HTTP/2 body
/// either way: a window per stream and direction, the connection windows and
/// hyper's buffers are a few MiB; 16 MiB leaves room for the allocator and the
/// runtime (measured: about 3 MiB), a sixth of the body.
pub const RSS_GROWTH_BOUND_KIB: u64 = 16 * 1024;

pub fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the weir binary outside any namespace (for CLI tests that need no root).
pub fn weir_cli(args: &[&str]) -> Output {
    Command::new(weir_bin())
        .args(args)
        .output()
        .expect("run weir")
}

pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}
