//! weir's control side: loads policy and endpoints, compiles them, runs the proxy,
//! installs steering, and drives the demo. The `weir` binary is a thin CLI on top.

pub mod admin;
pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod datapath;
pub mod demo;
pub mod ebpf;
pub mod endpoints;
pub mod explain;
pub mod fqdn;
pub mod lab;
pub mod log_writer;
pub mod registry;
pub mod run;
pub mod state;
pub mod steering;
pub mod takeover;
pub mod watch;

/// The crate version with the git revision it was built from, when known
/// (`0.1.0 (git 0123456789ab)`); set by build.rs.
pub const VERSION: &str = env!("WEIR_VERSION");
