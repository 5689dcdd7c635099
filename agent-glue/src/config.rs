//! The cluster around the node, as `weir run` and `weir policy explain` take it:
//! the flags here only parse; what the ranges mean lives in
//! `weir_policy::model::ClusterConfig` (the `cluster`, `remote-node` and
//! `kube-apiserver` entities).

use std::net::IpAddr;

use clap::Args;
use weir_policy::model::{Cidr, ClusterConfig};

#[derive(Debug, Clone, Default, Args)]
pub struct ClusterArgs {
    /// The cluster's pod ranges (comma separated or repeated): their addresses
    /// that are not local endpoints are pods of other nodes, in the `cluster`
    /// entity and not `world`.
    #[arg(long = "cluster-cidr", value_delimiter = ',', value_parser = parse_cidr)]
    pub cluster_cidr: Vec<Cidr>,
    /// The other nodes' addresses: the `remote-node` entity (and `cluster`).
    #[arg(long = "remote-node-cidr", value_delimiter = ',', value_parser = parse_cidr)]
    pub remote_node_cidr: Vec<Cidr>,
    /// The Kubernetes API server's addresses: the `kube-apiserver` entity.
    #[arg(long = "kube-apiserver", value_delimiter = ',')]
    pub kube_apiserver: Vec<IpAddr>,
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    s.parse()
}

impl ClusterArgs {
    pub fn config(&self) -> ClusterConfig {
        ClusterConfig {
            cluster_cidrs: self.cluster_cidr.clone(),
            remote_node_cidrs: self.remote_node_cidr.clone(),
            kube_apiserver: self.kube_apiserver.clone(),
        }
    }
}
