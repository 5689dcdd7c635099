//! Sans-I/O protocol inspection for weir.
//!
//! Every parser here takes bytes (or an already framed message head) and returns
//! typed facts, or a rejection that says exactly why. Nothing here does I/O, so the
//! same code serves the proxy, the policy explainer and the fuzz targets.

pub mod detect;
pub mod dns;
pub mod grpc;
pub mod http;
pub mod kafka;
