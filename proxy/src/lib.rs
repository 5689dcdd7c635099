//! weir's data plane: transparent listeners, protocol handlers, upstream pools.
//!
//! Layout follows the data path: `socket` (transparent sockets) → `listener`
//! (accept, original destination, L3/L4 verdict, dispatch) → a protocol handler
//! (`http` today; Kafka and DNS sit beside it) or `tcp` (plain splice for flows
//! policy allows without L7 rules) → upstream. `udp` is the datagram side: its own
//! transparent listener and per-flow sessions.

pub mod config;
pub mod flows;
pub mod http;
pub mod listener;
pub mod socket;
pub mod tcp;
pub mod udp;

use std::sync::Arc;

use arc_swap::ArcSwap;
use weir_policy::CompiledPolicy;

pub use config::ProxyConfig;
pub use flows::FlowSink;

/// State every connection handler shares. The policy is swapped whole; a handler
/// loads it once per connection and checks for a newer one before each request.
pub struct Shared {
    pub policy: ArcSwap<CompiledPolicy>,
    pub flows: FlowSink,
    pub config: ProxyConfig,
    pub upstream: http::Upstream,
    pub node_name: Arc<str>,
}

impl Shared {
    pub fn new(policy: Arc<CompiledPolicy>, flows: FlowSink, config: ProxyConfig) -> Arc<Self> {
        let upstream = http::Upstream::new(&config);
        Arc::new(Shared {
            policy: ArcSwap::new(policy),
            flows,
            node_name: Arc::from(config.node_name.as_str()),
            config,
            upstream,
        })
    }
}
