//! Test harness for the mesh: a multi-node cluster on one machine.
//!
//! A cluster is made of network namespaces, veth pairs, bridges and cgroup v2
//! directories:
//!
//! - fabric netns `{id}-fab` with bridge `br0`;
//! - node *i* (1-based): netns `{id}-{node}`, `eth0` on the fabric with
//!   10.255.0.*i*/24 and fd00:ff::*i*/64, bridge `cbr0` with 10.*i*.0.1/24 and
//!   fd00:*i*::1/64, routes to the other nodes' pod CIDRs, forwarding on;
//!   cgroups `/sys/fs/cgroup/unified/mesh-tests/{id}/{node}/{agent,pods}`;
//!   pin dir `/sys/fs/bpf/{id}/{node}`;
//! - pod *j* on node *i*: netns `{id}-{node}-{pod}`, `eth0` (peer `p{j}` on
//!   `cbr0`) with 10.*i*.0.*j+1*/24 and fd00:*i*::*j+1*/64, cgroup
//!   `.../{node}/pods/{pod}`.
//!
//! With a central CA ([`ClusterBuilder::with_ca_service`]) a CA host netns `{id}-ca` joins the
//! fabric with 10.255.0.253/24 and fd00:ff::fd/64 and runs `mesh-agent ca serve`
//! ([`CaService`]); its files live outside the cluster's workdir, so no node sees its keys.
//!
//! In Kubernetes mode ([`kube::KubeCluster`]) a control-plane netns `{id}-cp` joins the fabric
//! with 10.255.0.254/24 and fd00:ff::fe/64 and runs a real etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler ([`kube::ControlPlane`]).
//!
//! `{id}` is `mt{pid}x{n}`, so clusters of parallel tests never collide and
//! leftovers of dead test processes can be found ([`sweep_stale`]).
//! Everything is removed when the [`Cluster`] is dropped, also on panic.
//!
//! A running cluster changes the way a kubelet and a container runtime change one:
//! [`Pod::recreate_netns`] (a pod restart: new netns and veth, same name and addresses),
//! [`Pod::recreate_cgroup`] (a container restart: a new cgroup id at the same path),
//! [`Pod::delete_netns`], and cluster file edits that the agents pick up live:
//! [`Cluster::add_pod`], [`Cluster::remove_pod`], [`Cluster::update_pod`] and, for bad edits,
//! [`Cluster::write_raw_cluster_file`].
//!
//! ```no_run
//! use mesh_tests::{Cluster, NodeSpec, PodSpec};
//! # fn main() -> anyhow::Result<()> {
//! let cluster = Cluster::builder()
//!     .node(NodeSpec::new("node-a").pod(PodSpec::new("client")))
//!     .node(NodeSpec::new("node-b").pod(PodSpec::new("web")))
//!     .build()?;
//! cluster.start_agents()?;
//! let web = cluster.pod("node-b", "web")?;
//! let _server = web.http_server(8080, cluster.workdir())?;
//! let out = cluster.pod("node-a", "client")?.curl(&mesh_tests::http_url(web.ipv4(), 8080))?;
//! assert!(out.success());
//! # Ok(()) }
//! ```

mod ca_service;
mod capture;
mod cluster;
pub mod interrupt;
pub mod kube;
pub mod kubelet;
mod pod;
mod prometheus;
pub mod seed;
mod services;
mod sweep;
pub mod sys;

pub use ca_service::{
    CA_IPV4, CA_IPV6, CA_ISSUED, CA_METRICS_PORT, CA_PORT, CA_REFUSED, CaAnswer, CaCaller,
    CaService, NODE_CERT_FILE, NODE_KEY_FILE, NODE_ROOTS_FILE, request_certificate_at,
};
pub use capture::{PacketCapture, Pcap};
pub use cluster::{
    CLUSTER_FILE_LOADED, CLUSTER_FILE_REJECTED, CONNECTION_CLOSED, Cluster, ClusterBuilder,
    ConnectionLog, Node, NodeSpec, PodSpec, Reload, agent_bin, is_connection_closed, scratch_root,
};
pub use pod::{ChildGuard, HttpServer, Pod, RunOutput, addr, http_url, run_with_timeout};
pub use prometheus::{AGENTS_JOB, PROMETHEUS_IPV4, Prometheus};
pub use services::{Service, ServiceSpec};
pub use sweep::{owner_pid, sweep_stale};
