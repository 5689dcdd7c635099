//! 100 policy reloads under load (issue 12): wrk drives steady HTTP/1.1
//! keep-alive traffic (tiefighter → deathstar `POST /v1/request-landing`, which
//! every policy here allows) while weir's policy changes a hundred times —
//! through its watched policy file and directory (writes in place, editors'
//! renames, files added and removed), through SIGHUP and through `weir policy
//! apply` — alternating two valid policies with invalid ones in between.
//!
//! - wrk's own summary must show zero failed requests: no non-2xx answer, no
//!   socket error (and nginx logged none either);
//! - after each reload, requests only one policy allows (`GET /v1/only-a` and
//!   `/v1/only-b` from the tiefighter, and now and then the xwing, which policy
//!   A admits at L3/L4 and B does not) follow the policy now in force;
//! - an invalid policy changes nothing: the failure counter moves, the
//!   revision does not, the probes answer as before, and `weir status` shows
//!   the error with its `FILE:LINE:COL`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use weir_tests::{DEATHSTAR4, Scenario, lab, text};

/// Always in force (the `--policy` file): the landing every policy allows.
const BASE: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: landing}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: POST, path: /v1/request-landing}
"#;

/// Policy A's part (`toggle`): `/v1/only-a`, and the xwing admitted (at L3/L4,
/// with that one HTTP rule). Both parts allow the landing too, each with a
/// rule of its own, so the rules that allow it change at every reload.
const TOGGLE_A: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: toggle}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}, {matchLabels: {org: alliance}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: /v1/only-a}
        - {method: POST, path: /v1/request-landing}
"#;

/// Policy B's part: `/v1/only-b`; the xwing is not admitted at all.
const TOGGLE_B: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: toggle}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: /v1/only-b}
        - {method: POST|PUT, path: /v1/request-.*}
"#;

/// A policy that selects no endpoint: adding or removing it changes nothing.
const UNRELATED: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: unrelated}
spec:
  endpointSelector: {matchLabels: {class: probe-droid}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
"#;

/// Invalid YAML at line 4.
const BROKEN_SYNTAX: &str =
    "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: toggle}\nspec: [\n";

/// Valid YAML with two errors: a port out of range (line 9) and a field weir
/// does not know (line 10).
fn broken_field() -> String {
    TOGGLE_A
        .replace("      rules:", "      rulez:")
        .replace("port: \"80\"", "port: \"99999\"")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    A,
    B,
    /// The toggle policy in neither place (while it moves to the API).
    BaseOnly,
}

/// How a reload is caused.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Write the toggle file in place (watched directory).
    Write(State),
    /// Write a temporary file and rename it over the toggle file.
    Rename(State),
    /// Write the toggle file and send SIGHUP (the watcher reloads it again).
    Sighup(State),
    /// `weir policy apply -f` of the toggle policy.
    Apply(State),
    /// Add, then remove, a policy file that selects nothing.
    AddUnrelated,
    RemoveUnrelated,
    /// Invalid policies, each refused.
    BrokenSyntaxFile,
    BrokenFieldFile,
    BrokenApply,
    /// Applying a name that the directory already has.
    ConflictingApply,
    /// Removing the toggle file (the policy moves to the API).
    RemoveToggleFile,
}

struct Run<'a> {
    s: &'a mut Scenario,
    dir: PathBuf,
    state: State,
    success: u64,
    failure: u64,
    revision: u64,
    xwing_probes: usize,
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

impl Run<'_> {
    fn metrics(&self) -> (u64, u64, u64) {
        let m = self
            .s
            .run_in_node(&["curl", "-s", "http://127.0.0.1:9965/metrics"]);
        (
            metric(&m, "weir_policy_reloads_total{result=\"success\"}"),
            metric(&m, "weir_policy_reloads_total{result=\"failure\"}"),
            metric(&m, "weir_policy_revision"),
        )
    }

    /// Waits until weir has done `ok` more successful and `failed` more failed
    /// reloads, then checks the revision moved by exactly the successes.
    fn settle(&mut self, ok: u64, failed: u64, step: Step) {
        let want = (self.success + ok, self.failure + failed);
        let mut got = (0, 0, 0);
        let done = lab::wait_until(Duration::from_secs(10), || {
            got = self.metrics();
            (got.0, got.1) >= want
        });
        assert!(
            done.is_ok() && (got.0, got.1) == want,
            "{step:?}: reloads (success, failure) {:?}, wanted {want:?}\n{}",
            (got.0, got.1),
            tail(&self.s.weir_log_text())
        );
        assert_eq!(
            got.2,
            self.revision + ok,
            "{step:?}: each successful reload is one revision, a refused one none"
        );
        (self.success, self.failure, self.revision) = got;
    }

    fn toggle_file(&self) -> PathBuf {
        self.dir.join("toggle.yaml")
    }

    fn apply(&self, yaml: &str, name: &str) -> std::process::Output {
        let f = self.s.path(name);
        std::fs::write(&f, yaml).unwrap();
        self.s
            .lab
            .node
            .command(weir_tests::weir_bin().to_str().unwrap())
            .args(["policy", "apply", "-f"])
            .arg(&f)
            .arg("--api-socket")
            .arg(self.s.path("weir.sock"))
            .output()
            .expect("run weir policy apply")
    }

    fn do_step(&mut self, step: Step) {
        let toggle = |st: State| match st {
            State::A => TOGGLE_A,
            State::B => TOGGLE_B,
            State::BaseOnly => unreachable!("not a file's content"),
        };
        match step {
            Step::Write(st) => {
                std::fs::write(self.toggle_file(), toggle(st)).unwrap();
                self.settle(1, 0, step);
                self.state = st;
            }
            Step::Rename(st) => {
                let tmp = self.dir.join(".toggle.yaml.swp");
                std::fs::write(&tmp, toggle(st)).unwrap();
                std::fs::rename(&tmp, self.toggle_file()).unwrap();
                self.settle(1, 0, step);
                self.state = st;
            }
            Step::Sighup(st) => {
                std::fs::write(self.toggle_file(), toggle(st)).unwrap();
                lab::send_signal(self.s.weir().pid() as i32, libc::SIGHUP);
                // SIGHUP's reload, then the watcher's of the same files.
                self.settle(2, 0, step);
                self.state = st;
            }
            Step::Apply(st) => {
                let out = self.apply(toggle(st), "apply.yaml");
                assert!(out.status.success(), "{step:?}: {}", stderr(&out));
                self.settle(1, 0, step);
                self.state = st;
            }
            Step::AddUnrelated => {
                std::fs::write(self.dir.join("unrelated.yml"), UNRELATED).unwrap();
                self.settle(1, 0, step);
            }
            Step::RemoveUnrelated => {
                std::fs::remove_file(self.dir.join("unrelated.yml")).unwrap();
                self.settle(1, 0, step);
            }
            Step::RemoveToggleFile => {
                std::fs::remove_file(self.toggle_file()).unwrap();
                self.settle(1, 0, step);
                self.state = State::BaseOnly;
            }
            Step::BrokenSyntaxFile | Step::BrokenFieldFile => {
                // The syntax error is wherever the parser gives up; the
                // other file has errors on lines 9 and 10.
                let f = self.toggle_file().display().to_string();
                let (yaml, at) = match step {
                    Step::BrokenSyntaxFile => (BROKEN_SYNTAX.to_string(), vec![format!("{f}:")]),
                    _ => (broken_field(), vec![format!("{f}:9:"), format!("{f}:10:")]),
                };
                std::fs::write(self.toggle_file(), yaml).unwrap();
                self.settle(0, 1, step);
                for at in &at {
                    self.assert_last_error(at);
                }
                self.assert_one_log_line("reload failed; keeping the old policy", &at);
                // The running policy is still in force; put a valid file back
                // (the state it had) so that the next step starts clean.
                self.probe(step);
                let st = self.state;
                std::fs::write(self.toggle_file(), toggle(st)).unwrap();
                self.settle(1, 0, step);
            }
            Step::BrokenApply => {
                let out = self.apply(BROKEN_SYNTAX, "broken.yaml");
                assert!(!out.status.success(), "{step:?}: applied");
                let at = format!("{}:", self.s.path("broken.yaml").display());
                assert!(stderr(&out).contains(&at), "{step:?}: {}", stderr(&out));
                self.settle(0, 1, step);
                self.assert_last_error(&at);
                self.assert_one_log_line("policy apply refused", &[at]);
            }
            Step::ConflictingApply => {
                let out = self.apply(TOGGLE_A, "apply.yaml");
                assert!(!out.status.success(), "{step:?}: applied");
                self.settle(0, 1, step);
                self.assert_last_error(&format!("{}:", self.toggle_file().display()));
            }
        }
        self.probe(step);
    }

    /// weir's last log line with `msg` carries every error (`at`), on that
    /// one line.
    fn assert_one_log_line(&self, msg: &str, at: &[String]) {
        let log = self.s.weir_log_text();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains(msg))
            .unwrap_or_default();
        for at in at {
            assert!(
                line.contains(at.as_str()),
                "`{at}` is not on the line: {line}"
            );
        }
    }

    /// `weir status` names the refused reload's error at `at` (`FILE:LINE:`).
    fn assert_last_error(&self, at: &str) {
        let out = self
            .s
            .lab
            .node
            .command(weir_tests::weir_bin().to_str().unwrap())
            .args(["status", "-o", "json", "--api-socket"])
            .arg(self.s.path("weir.sock"))
            .output()
            .expect("run weir status");
        let v: Value = serde_json::from_str(&text(&out)).expect("status json");
        let last = &v["policy"]["last_reload"];
        assert_eq!(last["ok"], false, "{v:#}");
        assert!(
            last["errors"].as_array().is_some_and(|e| e
                .iter()
                .any(|e| e.as_str().is_some_and(|e| e.starts_with(at)))),
            "no error at {at}: {v:#}"
        );
        assert_eq!(v["policy"]["revision"], self.revision, "{v:#}");
    }

    /// The requests only one policy allows answer as the policy in force says.
    fn probe(&mut self, step: Step) {
        let url = |p: &str| format!("http://{DEATHSTAR4}{p}");
        let codes = text(&self.s.curl(
            "tiefighter",
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} ",
                &url("/v1/only-a"),
                "--next",
                "-s",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &url("/v1/only-b"),
            ],
        ));
        let want = match self.state {
            State::A => "200 403",
            State::B => "403 200",
            State::BaseOnly => "403 403",
        };
        assert_eq!(codes, want, "{step:?}: in state {:?}", self.state);
        // The xwing's probe costs a connect timeout when dropped: now and then.
        self.xwing_probes += 1;
        if self.xwing_probes.is_multiple_of(7) {
            let code = text(&self.s.curl(
                "xwing",
                &[
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--connect-timeout",
                    "1",
                    &url("/v1/only-a"),
                ],
            ));
            let want = if self.state == State::A { "200" } else { "000" };
            assert_eq!(code, want, "{step:?}: xwing in state {:?}", self.state);
        }
    }
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// wrk's summary: requests done, non-2xx/3xx answers, socket errors.
#[derive(Debug, PartialEq, Eq)]
struct WrkSummary {
    requests: u64,
    non_2xx: u64,
    socket_errors: u64,
}

fn parse_wrk(out: &str) -> Option<WrkSummary> {
    let requests = out.lines().find_map(|l| {
        let (n, rest) = l.trim().split_once(' ')?;
        rest.starts_with("requests in ")
            .then(|| n.parse::<u64>().ok())?
    })?;
    let non_2xx = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .map_or(Some(0), |n| n.trim().parse().ok())?;
    // `Socket errors: connect 0, read 1, write 0, timeout 0`
    let socket_errors = match out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
    {
        None => 0,
        Some(rest) => rest
            .split(',')
            .map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
            .sum::<Option<u64>>()?,
    };
    Some(WrkSummary {
        requests,
        non_2xx,
        socket_errors,
    })
}

#[test]
fn wrk_summaries_are_read_exactly() {
    let clean = "Running 2m test @ http://10.200.0.10/v1/request-landing\n  1 threads and 4 connections\n  4000 requests in 20.01s, 1.2MB read\nRequests/sec: 199.90\n";
    assert_eq!(
        parse_wrk(clean),
        Some(WrkSummary {
            requests: 4000,
            non_2xx: 0,
            socket_errors: 0
        })
    );
    let bad = "  4000 requests in 20.01s, 1.2MB read\n  Socket errors: connect 0, read 2, write 1, timeout 3\n  Non-2xx or 3xx responses: 7\n";
    assert_eq!(
        parse_wrk(bad),
        Some(WrkSummary {
            requests: 4000,
            non_2xx: 7,
            socket_errors: 6
        })
    );
    assert_eq!(parse_wrk("wrk: connection refused"), None);
}

/// The schedule: 100 reloads or more, about half of them through the watched
/// directory, alternating A and B with refused ones in between.
fn schedule() -> Vec<Step> {
    use State::{A, B};
    let mut steps = Vec::new();
    // Through the watched directory: 40 changes, 4 refused (each fixed by a
    // write, which is a reload too), a file added and removed.
    for i in 0..20 {
        steps.push(if i % 2 == 0 {
            Step::Write(B)
        } else {
            Step::Rename(A)
        });
        steps.push(if i % 2 == 0 {
            Step::Rename(A)
        } else {
            Step::Write(B)
        });
        match i {
            2 | 13 => steps.push(Step::BrokenSyntaxFile),
            5 | 17 => steps.push(Step::BrokenFieldFile),
            6 => steps.push(Step::AddUnrelated),
            7 => steps.push(Step::RemoveUnrelated),
            _ => {}
        }
    }
    // SIGHUP after a write (two reloads each).
    for st in [B, A, B, A, B, A] {
        steps.push(Step::Sighup(st));
    }
    // The toggle policy applied through the API while the file holds it:
    // refused; then it moves from the directory to the API.
    steps.push(Step::ConflictingApply);
    steps.push(Step::RemoveToggleFile);
    for i in 0..32 {
        steps.push(Step::Apply(if i % 2 == 0 { B } else { A }));
        if i % 6 == 3 {
            steps.push(Step::BrokenApply);
        }
    }
    steps
}

#[test]
fn a_hundred_reloads_under_load_drop_no_request_both_policies_allow() {
    let Some(mut s) = Scenario::star_wars("hot_reload") else {
        return;
    };
    s.start_deathstar(&[]);
    let dir = s.path("policies");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("toggle.yaml"), TOGGLE_A).unwrap();
    s.watch_policy = true;
    let dir_arg = dir.to_str().unwrap().to_string();
    s.start_weir(
        BASE,
        &[
            "--steering",
            "ebpf",
            "--policy",
            &dir_arg,
            "--watch-debounce",
            "50ms",
        ],
    );
    let mut run = Run {
        s: &mut s,
        dir: dir.clone(),
        state: State::A,
        success: 0,
        failure: 0,
        revision: 0,
        xwing_probes: 0,
    };
    let (ok, failed, revision) = run.metrics();
    (run.success, run.failure, run.revision) = (ok, failed, revision);
    assert_eq!((ok, failed, revision), (0, 0, 1), "a fresh weir");
    run.probe(Step::Write(State::A));

    // Steady keep-alive load that every policy allows: 4 connections, each
    // request 10 ms after the last answer (at most ~400 requests/s, so the
    // reloads are not starved of the two CPUs).
    let lua = run.s.path("landing.lua");
    std::fs::write(
        &lua,
        "wrk.method = \"POST\"\nfunction delay()\n  return 10\nend\n",
    )
    .unwrap();
    let wrk_out = run.s.path("wrk.out");
    let mut cmd = run.s.lab.workload("tiefighter").ns.command("wrk");
    cmd.args(["-t1", "-c4", "-d300s", "--timeout", "5s", "-s"])
        .arg(&lua)
        .arg(format!("http://{DEATHSTAR4}/v1/request-landing"))
        .stdout(std::fs::File::create(&wrk_out).unwrap())
        .stderr(Stdio::null());
    run.s.lab.spawn("wrk", cmd).expect("start wrk");
    let access_log = run.s.path("nginx/access.log");
    let landed = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("POST /v1/request-landing"))
            .count()
    };
    let warm = lab::wait_until(Duration::from_secs(10), || landed(&access_log) >= 100);
    assert!(warm.is_ok(), "wrk's requests do not arrive");

    let started = Instant::now();
    let (ok0, failed0) = (run.success, run.failure);
    let steps = schedule();
    for step in &steps {
        run.do_step(*step);
    }
    let reloads = (run.success - ok0) + (run.failure - failed0);
    let refused = run.failure - failed0;
    let took = started.elapsed();
    eprintln!(
        "{reloads} reloads ({refused} refused) in {:.1} s",
        took.as_secs_f64()
    );
    assert!(reloads >= 100, "only {reloads} reloads");
    assert!(refused >= 8, "only {refused} refused reloads");

    // Stop wrk (SIGINT: it prints its summary) and read it.
    let wrk = run
        .s
        .lab
        .processes
        .iter_mut()
        .find(|p| p.name == "wrk")
        .expect("wrk started");
    let status = wrk.stop_with(libc::SIGINT, Duration::from_secs(10));
    eprintln!("wrk stopped: {status:?}");
    let out = std::fs::read_to_string(&wrk_out).unwrap_or_default();
    let summary = parse_wrk(&out).unwrap_or_else(|| panic!("wrk's summary: {out}"));
    eprintln!("wrk: {summary:?}");
    assert_eq!(summary.non_2xx, 0, "failed requests:\n{out}");
    assert_eq!(summary.socket_errors, 0, "socket errors:\n{out}");
    // Steady: at least 20 requests a second over the reloads.
    let min = (took.as_secs() * 20).max(500);
    assert!(
        summary.requests >= min,
        "{} requests: {out}",
        summary.requests
    );
    // nginx saw every one of them answered 200, and nothing else.
    let log = s.access_log();
    let landing: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("POST /v1/request-landing"))
        .collect();
    let not_ok = landing.iter().filter(|l| !l.contains("\" 200 ")).count();
    assert_eq!(not_ok, 0, "nginx answered something else than 200");
    assert!(landing.len() as u64 >= summary.requests);
    // Every landing went through weir's HTTP proxy (decided per request),
    // and none was denied.
    let flows = s.flows();
    let landings: Vec<&Value> = flows
        .iter()
        .filter(|f| {
            f["l7"]["http"]["url"]
                .as_str()
                .is_some_and(|u| u.ends_with("/v1/request-landing"))
        })
        .collect();
    let denied = landings
        .iter()
        .filter(|f| f["verdict"] != "FORWARDED")
        .count();
    assert_eq!(denied, 0, "weir denied a landing");
    assert!(
        landings.len() as u64 >= summary.requests,
        "{} landing flows for {} requests: not all through the proxy",
        landings.len(),
        summary.requests
    );
}

/// A slow upstream on the deathstar (port 8080): it notes each request's path
/// in a file as it arrives, and answers `/slow...` only after `delay` seconds.
const SLOW_SERVER: &str = r#"
import http.server, sys, time
port, log, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        with open(log, "a") as f:
            f.write(self.path + "\n")
        if self.path.startswith("/slow"):
            time.sleep(delay)
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", port), H).serve_forever()
"#;

const SLOW_ALLOWED: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: slow}
spec:
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: /slow}
        - {method: GET, path: /fast}
"#;

/// What changes while a request is in flight, with the policy reloaded by
/// the watcher: the request admitted before the reload finishes (200) under
/// the policy that admitted it; a new connection's request sees the new
/// policy at once (403); on the in-flight request's own keep-alive
/// connection the next request is decided anew (403, never forwarded), and
/// one the new policy still allows passes on that same connection.
#[test]
fn an_in_flight_request_finishes_under_its_policy_and_the_next_is_decided_anew() {
    let Some(mut s) = Scenario::star_wars("inflight") else {
        return;
    };
    let script = s.path("slow.py");
    std::fs::write(&script, SLOW_SERVER).unwrap();
    let arrived = s.path("arrived.log");
    let mut server = s.lab.workload("deathstar").ns.command("python3");
    server.arg(&script).args(["8080"]).arg(&arrived).arg("3");
    s.lab
        .spawn("slow-server", server)
        .expect("start the slow server");
    s.lab
        .wait_for_tcp(DEATHSTAR4, 8080, Duration::from_secs(10))
        .expect("slow server listening");
    s.watch_policy = true;
    s.start_weir(
        SLOW_ALLOWED,
        &["--steering", "ebpf", "--watch-debounce", "50ms"],
    );
    let url = |p: &str| format!("http://{DEATHSTAR4}:8080{p}");
    // One curl, one connection: /slow (3 s), then /slow and /fast again.
    let out_file = s.path("keepalive.out");
    let mut curl = s.lab.workload("tiefighter").ns.command("curl");
    curl.args(["-s", "--max-time", "20"]);
    for p in ["/slow", "/slow", "/fast"] {
        curl.args(["-o", "/dev/null", "-w", "%{http_code} %{num_connects}\\n"])
            .arg(url(p));
    }
    curl.stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(Stdio::null());
    s.lab.spawn("curl", curl).expect("start curl");
    let paths = |f: &Path| -> Vec<String> {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    // Admitted and forwarded: the upstream has it, and takes 3 s to answer.
    let forwarded = lab::wait_until(Duration::from_secs(5), || !paths(&arrived).is_empty());
    assert!(forwarded.is_ok(), "the slow request did not arrive");

    // The policy file loses `/slow`; the watcher reloads it.
    std::fs::write(
        s.path("policy.yaml"),
        SLOW_ALLOWED.replace("        - {method: GET, path: /slow}\n", ""),
    )
    .unwrap();
    let metrics = |s: &Scenario| s.run_in_node(&["curl", "-s", "http://127.0.0.1:9965/metrics"]);
    let reloaded = lab::wait_until(Duration::from_secs(2), || {
        metric(
            &metrics(&s),
            "weir_policy_reloads_total{result=\"success\"}",
        ) == 1
    });
    assert!(reloaded.is_ok(), "no reload:\n{}", tail(&s.weir_log_text()));
    // A new connection's request, while the old one is still in flight.
    assert_eq!(s.status("tiefighter", "GET", &url("/slow")), "403");
    assert_eq!(s.status("tiefighter", "GET", &url("/fast")), "200");
    let curl = s
        .lab
        .processes
        .iter_mut()
        .find(|p| p.name == "curl")
        .expect("curl started");
    let still_running = curl.alive();
    assert!(
        still_running,
        "the slow request ended before the reload was checked"
    );
    let done = lab::wait_until(Duration::from_secs(10), || !curl.alive());
    assert!(done.is_ok(), "curl did not finish");
    assert_eq!(
        std::fs::read_to_string(&out_file).unwrap_or_default(),
        "200 1\n403 0\n200 0\n",
        "in flight: 200; then on the same connection: decided anew"
    );
    assert_eq!(
        paths(&arrived),
        ["/slow", "/fast", "/fast"],
        "the denied requests never reached the upstream"
    );
}

const STREAM: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: stream}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts:
    - ports: [{port: "7000", protocol: TCP}]
"#;

/// L3/L4 flows the kernel alone handles, across watched reloads: a change that
/// still allows an established stream (here the endpoints file: the xwing
/// joins the tiefighters' class) leaves it flowing on its connection, and the
/// new peer is admitted; a change that removes its rule stops it at once (the
/// conntrack entry's generation is older, so its next packet is decided
/// again).
#[test]
fn established_l4_flows_follow_the_generation_rule_across_watched_reloads() {
    let Some(mut s) = Scenario::star_wars("reload_l4") else {
        return;
    };
    // A server that sends a line every 50 ms for as long as the client is there
    // (the loop ends when a write fails, instead of logging the error forever).
    let mut server = s.lab.workload("deathstar").ns.command("socat");
    server.args([
        "TCP-LISTEN:7000,reuseaddr,fork",
        "SYSTEM:'while echo tick; do sleep 0.05; done'",
    ]);
    s.lab.spawn("ticker", server).unwrap();
    s.lab
        .wait_for_tcp(DEATHSTAR4, 7000, Duration::from_secs(5))
        .unwrap();
    s.watch_policy = true;
    s.start_weir(STREAM, &["--steering", "ebpf", "--watch-debounce", "50ms"]);
    let received = s.path("ticks.txt");
    let mut client = s.lab.workload("tiefighter").ns.command("socat");
    client.args([
        "-u",
        &format!("TCP:{DEATHSTAR4}:7000"),
        &format!("OPEN:{},creat,append", received.display()),
    ]);
    s.lab.spawn("ticks", client).unwrap();
    let ticks = || {
        std::fs::read_to_string(&received)
            .unwrap_or_default()
            .matches("tick")
            .count()
    };
    let flowing = lab::wait_until(Duration::from_secs(5), || ticks() >= 10);
    assert!(flowing.is_ok(), "the stream never flowed: {}", ticks());
    // A second of the stream from the xwing: ticks, or nothing (dropped).
    let xwing_ticks = |s: &Scenario| {
        let out = s
            .lab
            .workload("xwing")
            .ns
            .command("timeout")
            .args(["1", "socat", "-u"])
            .arg(format!("TCP:{DEATHSTAR4}:7000,connect-timeout=1"))
            .arg("STDOUT")
            .output()
            .expect("run socat");
        text(&out).contains("tick")
    };
    assert!(!xwing_ticks(&s), "the xwing is not a tiefighter yet");
    let metrics = |s: &Scenario| s.run_in_node(&["curl", "-s", "http://127.0.0.1:9965/metrics"]);
    let reloads =
        |s: &Scenario| metric(&metrics(s), "weir_policy_reloads_total{result=\"success\"}");

    // The endpoints file changes (watched too): the xwing joins the class.
    std::fs::write(
        s.path("endpoints.yaml"),
        weir_tests::ENDPOINTS.replace(
            "{org: alliance, class: xwing}",
            "{org: alliance, class: tiefighter}",
        ),
    )
    .unwrap();
    let reloaded = lab::wait_until(Duration::from_secs(3), || reloads(&s) == 1);
    assert!(reloaded.is_ok(), "no reload:\n{}", tail(&s.weir_log_text()));
    let at_reload = ticks();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        ticks() >= at_reload + 10,
        "the stream stalled after a reload that still allows it: {} → {}",
        at_reload,
        ticks()
    );
    let stream = s
        .lab
        .processes
        .iter_mut()
        .find(|p| p.name == "ticks")
        .expect("client started");
    assert!(stream.alive(), "the stream's connection ended");
    assert!(xwing_ticks(&s), "the new tiefighter is admitted");

    // The policy file loses the rule: the stream stops on its next packet.
    std::fs::write(
        s.path("policy.yaml"),
        STREAM.replace("class: tiefighter", "class: probe-droid"),
    )
    .unwrap();
    let reloaded = lab::wait_until(Duration::from_secs(3), || reloads(&s) == 2);
    assert!(reloaded.is_ok(), "no reload:\n{}", tail(&s.weir_log_text()));
    // Let packets in flight settle, then nothing more may arrive.
    std::thread::sleep(Duration::from_millis(300));
    let at_revoke = ticks();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        ticks(),
        at_revoke,
        "ticks kept arriving after the rule went"
    );
    assert!(!xwing_ticks(&s), "nor is a new connection admitted");
    // The kernel reported the stream's first packet after the revocation: the
    // server's (the flow's reply way: is_reply) or the client's ACK (not).
    let stream_drop = |f: &serde_json::Value| {
        f["verdict"] == "DROPPED"
            && f["Type"] == "L3_L4"
            && (f["l4"]["TCP"]["source_port"] == 7000 || f["l4"]["TCP"]["destination_port"] == 7000)
            && f["source"]["pod_name"] != "xwing"
            && f["destination"]["pod_name"] != "xwing"
    };
    let drops: Vec<serde_json::Value> = s.flows().into_iter().filter(stream_drop).collect();
    assert!(!drops.is_empty(), "no drop record for the revoked stream");
    for d in &drops {
        let from_server = d["l4"]["TCP"]["source_port"] == 7000;
        assert_eq!(d["is_reply"], from_server, "{d}");
    }
    eprintln!(
        "revoked stream: {} drop record(s), replies: {}",
        drops.len(),
        drops.iter().filter(|d| d["is_reply"] == true).count()
    );
}
