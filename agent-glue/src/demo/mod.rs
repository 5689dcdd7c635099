//! `weir demo`: the star-wars scenario from Cilium's getting-started guide, on one
//! machine. A node namespace, a deathstar (nginx), a tiefighter and an xwing;
//! weir enforces "only the empire may land, and only with POST
//! /v1/request-landing", and on gRPC only `Check` of gRPC's health service;
//! real curl and grpcio requests; a table of what happened.

mod grpc;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::lab::{self, Lab};

/// The HTTP part of the demo policy; [`grpc::POLICY_PORT`] follows it.
pub const DEMO_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rule1
spec:
  description: "Only the empire may land, only by POST /v1/request-landing, and only ask if the deathstar is up"
  endpointSelector:
    matchLabels: {org: empire, class: deathstar}
  ingress:
  - fromEndpoints:
    - matchLabels: {org: empire}
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - method: POST
          path: /v1/request-landing
"#;

/// An nginx config serving the deathstar API, everything under `dir`.
pub fn deathstar_nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"worker_processes 1;
daemon off;
user root;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/tmp-body;
  proxy_temp_path {d}/tmp-proxy;
  fastcgi_temp_path {d}/tmp-fastcgi;
  uwsgi_temp_path {d}/tmp-uwsgi;
  scgi_temp_path {d}/tmp-scgi;
  keepalive_requests 1000000;
  default_type text/plain;
  server {{
    listen 80;
    listen [::]:80;
    location = /v1/request-landing {{ return 200 "Ship landed\n"; }}
    location = /v1/exhaust-port {{ return 200 "Panic: deathstar exploded\n"; }}
    location /v1/static/ {{ alias {d}/static/; }}
    location / {{ return 200 "Deathstar API\n"; }}
  }}
}}
"#
    )
}

struct Row {
    from: &'static str,
    method: &'static str,
    path: &'static str,
    status: String,
    verdict: String,
    rule: String,
}

fn tmp_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(lab::unique_prefix("weir-demo"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn need(tool: &str, hint: &str) -> anyhow::Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        bail!("`{tool}` is not installed ({hint}); `make demo` installs everything the demo needs");
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The Python that runs the demo's gRPC server and client (it needs grpcio and
    /// grpcio-health-checking from PyPI; `make demo` passes its .venv). Without them
    /// the gRPC rows are left out, with a note.
    #[arg(long, default_value = "python3", value_name = "PATH")]
    pub python: String,
}

pub fn main(args: &DemoArgs) -> anyhow::Result<()> {
    if !crate::lab::is_root() {
        bail!("the demo creates network namespaces and needs root (try `sudo make demo`)");
    }
    for (tool, hint) in [
        ("nginx", "Debian package nginx-light"),
        ("curl", "Debian package curl"),
        ("nft", "Debian package nftables"),
        ("nsenter", "Debian package util-linux"),
        ("socat", "Debian package socat"),
    ] {
        need(tool, hint)?;
    }
    let python = match grpc::check_python(&args.python) {
        Ok(()) => Some(args.python.as_str()),
        Err(e) => {
            eprintln!("weir demo: leaving out the gRPC rows: {e:#}");
            None
        }
    };
    let dir = tmp_dir()?;
    let result = run_demo(&dir, python);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_demo(dir: &Path, python: Option<&str>) -> anyhow::Result<()> {
    let prefix = lab::unique_prefix("weirdemo");
    let mut lab = Lab::new(&prefix)?;
    let ds = lab
        .add_workload("deathstar", "10.200.0.10".parse()?, "fd00:200::10".parse()?)?
        .ip4;
    lab.add_workload(
        "tiefighter",
        "10.200.0.20".parse()?,
        "fd00:200::20".parse()?,
    )?;
    lab.add_workload("xwing", "10.200.0.30".parse()?, "fd00:200::30".parse()?)?;

    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, format!("{DEMO_POLICY}{}", grpc::POLICY_PORT))?;
    let endpoints = dir.join("endpoints.yaml");
    std::fs::write(
        &endpoints,
        "endpoints:
  - name: deathstar
    ips: [10.200.0.10, 'fd00:200::10']
    labels: {org: empire, class: deathstar}
  - name: tiefighter
    ips: [10.200.0.20, 'fd00:200::20']
    labels: {org: empire, class: tiefighter}
  - name: xwing
    ips: [10.200.0.30, 'fd00:200::30']
    labels: {org: alliance, class: xwing}
",
    )?;
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, deathstar_nginx_conf(dir))?;
    let mut nginx = lab.workload("deathstar").ns.command("nginx");
    nginx.args(["-c", &conf.display().to_string()]);
    lab.spawn("nginx", nginx)?;
    lab.wait_for_tcp(&ds.to_string(), 80, Duration::from_secs(10))
        .context("nginx (deathstar) did not start")?;
    if let Some(python) = python {
        grpc::start_server(&mut lab, python, dir, &ds.to_string())?;
    }

    let state = dir.join("state");
    let bpf_root = PathBuf::from(format!("/sys/fs/bpf/{}", lab::unique_prefix("weir-demo")));
    let flows = dir.join("flows.jsonl");
    let weir_log = dir.join("weir.log");
    let exe = std::env::current_exe().context("locating the weir binary")?;
    let mut weir = lab.node.command(&exe.display().to_string());
    weir.args(["run", "--policy"])
        .arg(&policy)
        .arg("--endpoints")
        .arg(&endpoints)
        .arg("--state-dir")
        .arg(&state)
        .arg("--flow-log")
        .arg(&flows)
        .arg("--node-name")
        .arg("demo-node")
        .arg("--bpf-root")
        .arg(&bpf_root)
        .arg("--api-socket")
        .arg(dir.join("weir.sock"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&weir_log)?);
    lab.spawn("weir", weir)?;
    let ready = crate::state::ready_file(&state);
    let waited = lab::wait_until(Duration::from_secs(15), || {
        ready.exists() || !lab.processes.last_mut().is_some_and(|p| p.alive())
    });
    if let Err(e) = waited.and_then(|()| lab::wait_for_file(&ready, Duration::ZERO)) {
        let log = std::fs::read_to_string(&weir_log).unwrap_or_default();
        bail!("weir did not become ready: {e}\n--- weir log ---\n{log}");
    }

    let log = std::fs::read_to_string(&weir_log).unwrap_or_default();
    let steering = if log.contains("steering: eBPF") {
        "eBPF datapath (tc on each endpoint's veth; L7 flows to the proxy by bpf_sk_assign)"
    } else {
        "nftables TPROXY (eBPF datapath unavailable here; see the weir log)"
    };
    println!("weir demo: deathstar (org=empire, class=deathstar) at {ds}, policy rule1:");
    println!("  only org=empire may reach port 80, and only with POST /v1/request-landing;");
    println!(
        "  port {}, gRPC: only grpc.health.v1.Health/Check",
        grpc::PORT
    );
    println!("  steering: {steering}\n");
    let plan: [(&str, &str, &str); 4] = [
        ("tiefighter", "POST", "/v1/request-landing"),
        ("tiefighter", "PUT", "/v1/exhaust-port"),
        ("xwing", "POST", "/v1/request-landing"),
        ("xwing", "PUT", "/v1/exhaust-port"),
    ];
    let mut rows = Vec::new();
    for (from, method, path) in plan {
        let before = line_count(&flows);
        let out = lab
            .workload(from)
            .ns
            .command("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                "-X",
                method,
            ])
            .arg(format!("http://{ds}{path}"))
            .output()
            .context("running curl")?;
        let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let (verdict, rule) =
            wait_flow(&flows, before).unwrap_or(("?".into(), "no flow record".into()));
        rows.push(Row {
            from: if from == "tiefighter" {
                "tiefighter"
            } else {
                "xwing"
            },
            method,
            path,
            status: if status == "000" {
                "dropped".into()
            } else {
                status
            },
            verdict,
            rule,
        });
    }
    if let Some(python) = python {
        let before = line_count(&flows);
        let calls = grpc::call(
            &lab,
            python,
            dir,
            "tiefighter",
            &ds.to_string(),
            &["Check", "Watch"],
        )?;
        for (i, c) in calls.into_iter().enumerate() {
            let (verdict, rule) =
                nth_l7_flow(&flows, before, i).unwrap_or(("?".into(), "no flow record".into()));
            rows.push(Row {
                from: "tiefighter",
                method: "gRPC",
                path: if c.method == "Check" {
                    "grpc.health.v1.Health/Check"
                } else {
                    "grpc.health.v1.Health/Watch"
                },
                status: if c.code == "OK" {
                    format!("OK:{}", c.detail)
                } else {
                    c.code
                },
                verdict,
                rule,
            });
        }
    }
    print_table(&rows);
    show_cli(&lab, &exe, &dir.join("weir.sock"))?;

    // Stop weir, then remove what it leaves running on purpose (the pinned
    // datapath), as an operator would with `weir cleanup`.
    if let Some(p) = lab.processes.iter_mut().find(|p| p.name == "weir") {
        p.stop_with(libc::SIGTERM, Duration::from_secs(10));
    }
    lab.node
        .run(&[
            &exe.display().to_string(),
            "cleanup",
            "--bpf-root",
            &bpf_root.display().to_string(),
            "--api-socket",
            &dir.join("weir.sock").display().to_string(),
        ])
        .context("weir cleanup")?;
    if bpf_root.exists() {
        bail!("weir cleanup left {} behind", bpf_root.display());
    }
    let leftover = lab
        .node
        .run(&["nft", "list", "tables"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())?;
    if leftover.contains("weir") {
        bail!("weir left its nft table behind");
    }
    println!(
        "\nweir stopped: its programs are detached, its ip rules and nft table removed; namespaces removed."
    );
    // The xwing is refused at L3/L4: dropped in the kernel (eBPF), or 403 from the
    // proxy (nftables fallback).
    let l4 = if steering.starts_with("eBPF") {
        "dropped"
    } else {
        "403"
    };
    let mut expected = vec!["200", "403", l4, l4];
    if python.is_some() {
        expected.extend(["OK:SERVING", "PERMISSION_DENIED"]);
    }
    let got: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    if got != expected {
        let log = std::fs::read_to_string(&weir_log).unwrap_or_default();
        bail!("unexpected statuses {got:?} (expected {expected:?})\n--- weir log ---\n{log}");
    }
    Ok(())
}

/// What an operator sees of the same run through the local API: the flows
/// (`weir observe`) and what weir has in place (`weir status`).
fn show_cli(lab: &Lab, exe: &Path, socket: &Path) -> anyhow::Result<()> {
    let socket = socket.display().to_string();
    for args in [
        vec!["observe", "--last", "8", "--type", "http"],
        vec!["observe", "--last", "2", "--type", "l3-l4"],
        vec!["status"],
    ] {
        let mut argv = vec![exe.to_str().context("the weir binary's path")?];
        argv.extend(&args);
        argv.extend(["--api-socket", &socket]);
        let out = lab
            .node
            .run(&argv)
            .with_context(|| format!("weir {}", args.join(" ")))?;
        println!("\n$ weir {}", args.join(" "));
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

fn line_count(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// The verdict and deciding rule for the request just made: its L7 record when
/// the proxy saw it, else the kernel's drop record.
fn wait_flow(path: &Path, after: usize) -> Option<(String, String)> {
    let pick = |v: &serde_json::Value| {
        (
            v["verdict"].as_str().unwrap_or("?").to_string(),
            v["policy"].as_str().unwrap_or("?").to_string(),
        )
    };
    for _ in 0..100 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let new: Vec<serde_json::Value> = text
            .lines()
            .skip(after)
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if let Some(v) = new.iter().find(|v| v["Type"] == "L7") {
            return Some(pick(v));
        }
        if let Some(v) = new.iter().find(|v| v["verdict"] == "DROPPED") {
            return Some(pick(v));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The verdict and deciding rule of the `n`th L7 record after line `after`
/// (the gRPC calls run in one client, one after the other).
fn nth_l7_flow(path: &Path, after: usize, n: usize) -> Option<(String, String)> {
    for _ in 0..100 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let found = text
            .lines()
            .skip(after)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["Type"] == "L7")
            .nth(n);
        if let Some(v) = found {
            return Some((
                v["verdict"].as_str().unwrap_or("?").to_string(),
                v["policy"].as_str().unwrap_or("?").to_string(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn print_table(rows: &[Row]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<11} {:<35} {:<17} {:<10} DECIDING RULE",
        "FROM", "REQUEST", "STATUS", "VERDICT"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<11} {:<35} {:<17} {:<10} {}",
            r.from,
            format!("{} {}", r.method, r.path),
            r.status,
            r.verdict,
            r.rule
        );
    }
}
