//! A node on one machine: a "node" network namespace with a veth to each workload's
//! own namespace, routed like a CNI would (per-endpoint /32 and /128 routes, the
//! host side answering as the gateway 169.254.1.1 / fe80::1). Used by `weir demo`
//! and by every end-to-end test. Everything is removed on drop, also on panic.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LabError {
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

pub type Result<T> = std::result::Result<T, LabError>;

const GATEWAY4: &str = "169.254.1.1";
const GATEWAY6: &str = "fe80::1";

/// Runs a command and fails with its stderr when it does not succeed.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let text = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Command {
            cmd: text.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: text,
            detail: format!(
                "{} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out)
}

/// A named network namespace under /run/netns, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Netns> {
        // A leftover of a crashed run with the same name would make `add` fail.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command that runs inside this namespace (nsenter keeps /sys as it is,
    /// unlike `ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path()))
            .arg("--")
            .arg(program);
        c
    }

    pub fn run(&self, argv: &[&str]) -> Result<Output> {
        let (prog, args) = argv.split_first().ok_or_else(|| LabError::Command {
            cmd: String::new(),
            detail: "empty command".into(),
        })?;
        run(self.command(prog).args(args))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A process in its own process group, terminated (then killed) on drop.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    child: Child,
}

impl Process {
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Process> {
        let text = format!("{cmd:?}");
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| LabError::Command {
                cmd: text,
                detail: e.to_string(),
            })?;
        Ok(Process {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` to the process group and waits up to `grace` for it to exit.
    pub fn stop_with(&mut self, signal: i32, grace: Duration) -> Option<std::process::ExitStatus> {
        let pgid = self.child.id() as i32;
        send_signal(-pgid, signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        send_signal(-pgid, libc::SIGKILL);
        self.child.wait().ok()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.alive() {
            self.stop_with(libc::SIGTERM, Duration::from_secs(5));
        }
    }
}

/// A workload: its namespace, addresses, and the host-side interface in the node.
#[derive(Debug)]
pub struct Workload {
    pub name: String,
    pub ns: Netns,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub host_if: String,
}

/// A node namespace plus workloads. Fields drop in order: processes first, then
/// workloads, then the node.
#[derive(Debug)]
pub struct Lab {
    pub processes: Vec<Process>,
    pub workloads: Vec<Workload>,
    pub node: Netns,
    prefix: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for netns tooling.
pub fn unique_prefix(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{tag}-{}-{n}", std::process::id())
}

impl Lab {
    /// Creates the node namespace `<prefix>-node` with forwarding on.
    pub fn new(prefix: &str) -> Result<Lab> {
        let node = Netns::create(&format!("{prefix}-node"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        Ok(Lab {
            processes: Vec::new(),
            workloads: Vec::new(),
            node,
            prefix: prefix.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Adds a workload namespace `<prefix>-<name>` with the given addresses.
    pub fn add_workload(&mut self, name: &str, ip4: Ipv4Addr, ip6: Ipv6Addr) -> Result<&Workload> {
        let ns = Netns::create(&format!("{}-{name}", self.prefix))?;
        let host_if = format!("weirv{}", self.workloads.len());
        let (ip4s, ip6s) = (ip4.to_string(), ip6.to_string());
        self.node.run(&[
            "ip",
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        ns.run(&["ip", "addr", "add", &format!("{ip4s}/32"), "dev", "eth0"])?;
        ns.run(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{ip6s}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.run(&["ip", "link", "set", "eth0", "up"])?;
        ns.run(&[
            "ip", "route", "add", GATEWAY4, "dev", "eth0", "scope", "link",
        ])?;
        ns.run(&[
            "ip", "route", "add", "default", "via", GATEWAY4, "dev", "eth0",
        ])?;
        ns.run(&[
            "ip", "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0",
        ])?;
        self.node.run(&[
            "ip",
            "addr",
            "add",
            &format!("{GATEWAY4}/32"),
            "dev",
            &host_if,
        ])?;
        self.node.run(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{GATEWAY6}/64"),
            "dev",
            &host_if,
            "nodad",
        ])?;
        self.node.run(&["ip", "link", "set", &host_if, "up"])?;
        self.node
            .run(&["ip", "route", "add", &format!("{ip4s}/32"), "dev", &host_if])?;
        self.node.run(&[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{ip6s}/128"),
            "dev",
            &host_if,
        ])?;
        self.workloads.push(Workload {
            name: name.to_string(),
            ns,
            ip4,
            ip6,
            host_if,
        });
        Ok(self.workloads.last().expect("just pushed"))
    }

    /// Adds a peer that is not a local endpoint: namespace `<prefix>-<name>`
    /// behind its own node device `weirx<subnet>` (not an endpoint veth), on
    /// 10.201.<subnet>.1/24 and fd00:201:<subnet>::1/64, the node being .254 and
    /// ::fe — the world, a CIDR peer, another node.
    pub fn add_outside(&mut self, name: &str, subnet: u8) -> Result<&Workload> {
        let ns = Netns::create(&format!("{}-{name}", self.prefix))?;
        let host_if = format!("weirx{subnet}");
        let ip4: Ipv4Addr = Ipv4Addr::new(10, 201, subnet, 1);
        let ip6: Ipv6Addr = format!("fd00:201:{subnet}::1").parse().expect("valid");
        let (node4, node6) = (
            format!("10.201.{subnet}.254"),
            format!("fd00:201:{subnet}::fe"),
        );
        self.node.run(&[
            "ip",
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        // No duplicate address detection on either end: while the node's
        // link-local address is tentative (about 1 s) the kernel solicits no
        // neighbour for a packet from an address that is not the node's (the
        // proxy's transparent upstream sockets), and the first such packet waits
        // for a retransmit.
        self.node
            .sysctl(&format!("net.ipv6.conf.{host_if}.accept_dad"), "0")?;
        ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0")?;
        ns.run(&["ip", "addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
        ns.run(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.run(&["ip", "link", "set", "eth0", "up"])?;
        ns.run(&["ip", "route", "add", "default", "via", &node4])?;
        ns.run(&["ip", "-6", "route", "add", "default", "via", &node6])?;
        self.node
            .run(&["ip", "addr", "add", &format!("{node4}/24"), "dev", &host_if])?;
        self.node.run(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{node6}/64"),
            "dev",
            &host_if,
            "nodad",
        ])?;
        self.node.run(&["ip", "link", "set", &host_if, "up"])?;
        self.workloads.push(Workload {
            name: name.to_string(),
            ns,
            ip4,
            ip6,
            host_if,
        });
        Ok(self.workloads.last().expect("just pushed"))
    }

    pub fn workload(&self, name: &str) -> &Workload {
        self.workloads
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no workload {name} in this lab"))
    }

    /// Starts a long-running process in a namespace; it is stopped when the lab drops.
    pub fn spawn(&mut self, name: &str, cmd: Command) -> Result<&mut Process> {
        self.processes.push(Process::spawn(name, cmd)?);
        Ok(self.processes.last_mut().expect("just pushed"))
    }

    /// Waits until a TCP port accepts connections, probing from the node namespace.
    pub fn wait_for_tcp(&self, addr: &str, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let target = format!("{addr}:{port}");
        while Instant::now() < deadline {
            let ok = self
                .node
                .command("socat")
                .args(["-u", "OPEN:/dev/null", &format!("TCP:{}", bracket(&target))])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(LabError::Timeout(timeout, format!("{target} to accept")))
    }
}

/// socat wants IPv6 addresses in brackets; `a:b` with several colons is IPv6.
fn bracket(target: &str) -> String {
    match target.rsplit_once(':') {
        Some((host, port)) if host.contains(':') && !host.starts_with('[') => {
            format!("[{host}]:{port}")
        }
        _ => target.to_string(),
    }
}

/// Waits until `path` exists (checks at least once).
pub fn wait_for_file(path: &std::path::Path, timeout: Duration) -> Result<()> {
    wait_until(timeout, || path.exists())
        .map_err(|_| LabError::Timeout(timeout, format!("{} to appear", path.display())))
}

/// Polls `done` every 20 ms until it is true (checks at least once).
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LabError::Timeout(timeout, "a condition".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` to `pid` (a negative pid: that process group) with kill(1), so
/// no unsafe code is needed for it.
pub fn send_signal(pid: i32, signal: i32) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(pid.to_string())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this process runs as root (the owner of /proc/self is the effective uid).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
