//! The per-connection context every protocol handler works from: who the client
//! is, where it was going, and the policy decision the connection is under
//! (recomputed only when a new policy has been swapped in). New protocol
//! handlers attach here, not to the accept loop.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use weir_policy::flow::{Flow, FlowPeers};
use weir_policy::{CompiledPolicy, ConnectionVerdict, Protocol};

use crate::socket::UpstreamSource;
use crate::{Shared, http};

/// A connection, and the policy decision it is under. The decision is cached and
/// recomputed only when a new policy has been swapped in.
pub struct ConnContext {
    pub shared: Arc<Shared>,
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
    pub protocol: Protocol,
    cached: Mutex<Option<Decision>>,
    /// Where this connection's upstream connections leave from.
    pub upstream_source: UpstreamSource,
    /// This client connection's own upstream connections.
    pub upstream: http::UpstreamConns,
}

#[derive(Clone)]
pub struct Decision {
    pub policy: Arc<CompiledPolicy>,
    pub verdict: Arc<ConnectionVerdict>,
    pub peers: Arc<FlowPeers>,
}

impl ConnContext {
    pub fn new(shared: Arc<Shared>, client: SocketAddr, orig_dst: SocketAddr) -> Self {
        Self::with_protocol(shared, client, orig_dst, Protocol::Tcp)
    }

    pub fn with_protocol(
        shared: Arc<Shared>,
        client: SocketAddr,
        orig_dst: SocketAddr,
        protocol: Protocol,
    ) -> Self {
        let upstream_source = match shared.config.upstream_mark {
            Some(mark) => UpstreamSource::Client(client.ip(), mark),
            None => UpstreamSource::Node,
        };
        let upstream = http::UpstreamConns::new(shared.config.upstream_conns_per_client);
        ConnContext {
            shared,
            client,
            orig_dst,
            protocol,
            cached: Mutex::new(None),
            upstream_source,
            upstream,
        }
    }

    /// The decision under the current policy.
    pub fn decide(&self) -> Decision {
        let current = self.shared.policy.load();
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = cached.as_ref()
            && Arc::ptr_eq(&d.policy, &current)
        {
            return d.clone();
        }
        let policy = arc_swap::Guard::into_inner(current);
        let verdict = policy.connection(
            self.client.ip(),
            self.orig_dst.ip(),
            self.protocol,
            self.orig_dst.port(),
        );
        let peers = FlowPeers::new(
            &policy,
            &verdict.src,
            &verdict.dst,
            self.shared.node_name.clone(),
        );
        let d = Decision {
            policy,
            verdict: Arc::new(verdict),
            peers: Arc::new(peers),
        };
        *cached = Some(d.clone());
        d
    }

    pub fn flow(&self, d: &Decision, verdict: &weir_policy::Verdict) -> Flow {
        self.flow_with_policy(d, verdict, verdict.reason())
    }

    /// [`ConnContext::flow`] with the record's `policy` text given (rendered
    /// once per DNS query and kept for its records).
    pub fn flow_with_policy(
        &self,
        d: &Decision,
        verdict: &weir_policy::Verdict,
        policy: String,
    ) -> Flow {
        let flow = Flow::with_peers_and_policy(
            &d.peers,
            (d.verdict.src.ip, self.client.port()),
            (d.verdict.dst.ip, self.orig_dst.port()),
            verdict,
            policy,
        );
        match self.protocol {
            Protocol::Udp => flow.over_udp(),
            _ => flow,
        }
    }
}

pub(crate) fn is_unspecified_or_local(ip: IpAddr) -> bool {
    ip.is_unspecified() || ip.is_loopback()
}
