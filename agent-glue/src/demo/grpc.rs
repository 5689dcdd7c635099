//! The demo's gRPC service: gRPC's own health service (`grpc.health.v1.Health`,
//! from PyPI `grpcio-health-checking`) on the deathstar, asked by a grpcio client
//! from the tiefighter. Policy allows `Check` and not `Watch`: the client sees
//! `SERVING` for one and `PERMISSION_DENIED` with weir's message for the other.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::lab::Lab;

pub const PORT: u16 = 50051;

/// Appended to the demo policy's ingress rule: only `Check` on port 50051.
pub const POLICY_PORT: &str = r#"    - ports: [{port: "50051", protocol: TCP}]
      rules:
        http:
        - method: POST
          path: /grpc.health.v1.Health/Check
"#;

const SERVER: &str = r#"import sys
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
servicer = health.HealthServicer()
servicer.set("deathstar", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port("[::]:" + sys.argv[1])
server.start()
server.wait_for_termination()
"#;

/// One JSON line per call: the method, the gRPC status code's name, and the
/// serving status (allowed) or the status message (refused).
const CLIENT: &str = r#"import json, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(sys.argv[1]))
request = health_pb2.HealthCheckRequest(service="deathstar")
for method in sys.argv[2:]:
    try:
        if method == "Check":
            reply = stub.Check(request, timeout=5)
        else:
            reply = next(stub.Watch(request, timeout=5))
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(json.dumps({"method": method, "code": "OK", "detail": status}))
    except grpc.RpcError as e:
        print(json.dumps({"method": method, "code": e.code().name, "detail": e.details()}))
    sys.stdout.flush()
"#;

/// A Python that can import grpcio and the health service, or why not.
pub fn check_python(python: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new(python)
        .args(["-c", "import grpc, grpc_health.v1.health"])
        .output()
        .with_context(|| format!("running {python}"))?;
    if !out.status.success() {
        bail!(
            "{python} cannot import grpcio and grpcio-health-checking (PyPI); `make demo` installs them into .venv: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts the health service in the deathstar's namespace and waits for it.
pub fn start_server(lab: &mut Lab, python: &str, dir: &Path, ip: &str) -> anyhow::Result<()> {
    let script = dir.join("grpc_health_server.py");
    std::fs::write(&script, SERVER)?;
    let mut cmd = lab.workload("deathstar").ns.command(python);
    cmd.arg(&script)
        .arg(PORT.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("grpc-server.log"))?);
    lab.spawn("grpc-health", cmd)?;
    lab.wait_for_tcp(ip, PORT, Duration::from_secs(20))
        .context("the gRPC health service (deathstar) did not start")
}

pub struct Call {
    pub method: String,
    pub code: String,
    pub detail: String,
}

/// Calls `methods` of the health service from `from`'s namespace.
pub fn call(
    lab: &Lab,
    python: &str,
    dir: &Path,
    from: &str,
    ip: &str,
    methods: &[&str],
) -> anyhow::Result<Vec<Call>> {
    let script = dir.join("grpc_health_client.py");
    std::fs::write(&script, CLIENT)?;
    let out = lab
        .workload(from)
        .ns
        .command(python)
        .arg(&script)
        .arg(format!("{ip}:{PORT}"))
        .args(methods)
        .output()
        .context("running the grpcio client")?;
    let calls: Vec<Call> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| Call {
            method: v["method"].as_str().unwrap_or("?").to_string(),
            code: v["code"].as_str().unwrap_or("?").to_string(),
            detail: v["detail"].as_str().unwrap_or("").to_string(),
        })
        .collect();
    if calls.len() != methods.len() {
        bail!(
            "the grpcio client answered {} of {} calls: {}",
            calls.len(),
            methods.len(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(calls)
}
