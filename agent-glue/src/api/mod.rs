//! The local API on a unix socket (`--api-socket`): gRPC (tonic), root-only
//! (mode 0600). This issue serves endpoint registration; the observability work
//! adds its services here.

pub mod client;
pub mod commands;
pub mod observe;
pub mod server;

/// Generated from proto/weir/v1/ (endpoints, fqdn, observer).
pub mod pb {
    tonic::include_proto!("weir.v1");
}
