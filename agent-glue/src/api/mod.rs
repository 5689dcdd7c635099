//! The local API on a unix socket (`--api-socket`): gRPC (tonic). The socket
//! is mode 0600 and every call is checked against the caller's uid
//! (`SO_PEERCRED`: root, or `--api-allow-uid`).

pub mod access;
pub mod client;
pub mod commands;
pub mod observe;
pub mod policy;
pub mod server;
pub mod status;

/// Generated from proto/weir/v1/ (endpoints, fqdn, observer, status, policy).
pub mod pb {
    tonic::include_proto!("weir.v1");
}
