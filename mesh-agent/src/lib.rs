//! The node agent of the mesh: one per node, it captures its workloads' connections through
//! eBPF and relays them.
//!
//! - [`workload`]: the cluster file's schema (nodes, workloads, Services);
//! - [`state`]: the node's live view of the mesh, as immutable snapshots;
//! - [`sources`]: where that view comes from: the cluster file (watched), or
//!   [`kubernetes`] (the API, watched) with [`cni`] (new pods from the CNI plugin);
//! - [`ebpf`]: the kernel programs: load, attach, pin, enrol, original destinations;
//! - [`proxy`]: where connections are accepted and forwarded;
//! - [`agent`]: one node's agent, reconciling each local workload;
//! - [`ca`]: the CA service (`mesh-agent ca serve`), which signs only identities of the asking
//!   node's workloads;
//! - [`netns`]: sockets inside workloads' network namespaces;
//! - [`logging`]: the log's format, and its level changed at run time.

pub mod admin;
pub mod agent;
pub mod ca;
pub mod cni;
pub mod ebpf;
mod fswatch;
pub mod identity;
pub mod kubernetes;
pub mod logging;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod sources;
pub mod state;
pub mod workload;
