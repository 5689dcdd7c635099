//! Generates the local API's gRPC code from proto/ (needs `protoc`: Debian
//! `protobuf-compiler`, installed by `make deps`), and stamps the version with
//! the git revision and the build date (`WEIR_VERSION`, for `weir --version`
//! and `weir status`).

use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[
                "proto/weir/v1/endpoints.proto",
                "proto/weir/v1/fqdn.proto",
                "proto/weir/v1/observer.proto",
                "proto/weir/v1/status.proto",
                "proto/weir/v1/policy.proto",
            ],
            &["proto"],
        )?;
    let version = std::env::var("CARGO_PKG_VERSION")?;
    let date = build_date();
    println!(
        "cargo:rustc-env=WEIR_VERSION={}",
        match git_revision() {
            Some(rev) => format!("{version} (git {rev}, built {date})"),
            None => format!("{version} (built {date})"),
        }
    );
    // The date is this script's run: rerun it whenever this crate's sources
    // change, not only when HEAD moves.
    println!("cargo:rerun-if-changed=src");
    Ok(())
}

/// The build's UTC date (`YYYY-MM-DD`): `SOURCE_DATE_EPOCH` when set
/// (reproducible builds), else now.
fn build_date() -> String {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        });
    // Civil-from-days (H. Hinnant), as the flow records' times.
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `WEIR_GIT_REV` when set (builds from a tarball), else what git says; `None`
/// outside a checkout or without git: the version is then the crate's alone.
fn git_revision() -> Option<String> {
    println!("cargo:rerun-if-env-changed=WEIR_GIT_REV");
    if let Ok(rev) = std::env::var("WEIR_GIT_REV") {
        return Some(rev).filter(|r| !r.is_empty());
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let rev = git(&["rev-parse", "--short=12", "HEAD"])?;
    // Rebuild when HEAD moves: HEAD itself (a checkout) and the branch it names
    // (a commit). A worktree's HEAD is in its own git dir, refs in the common one.
    // (A path that does not exist would rerun this script at every build.)
    let watch = |p: PathBuf| {
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    };
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        watch(PathBuf::from(dir).join("HEAD"));
    }
    if let (Some(common), Some(head_ref)) = (
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
        git(&["symbolic-ref", "-q", "HEAD"]),
    ) {
        let common = PathBuf::from(common);
        watch(common.join(&head_ref));
        // A packed ref changes packed-refs instead.
        watch(common.join("packed-refs"));
    }
    Some(rev)
}
