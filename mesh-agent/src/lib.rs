//! The node agent of the mesh: one per node, it captures its workloads' connections through
//! eBPF and relays them.
//!
//! - [`workload`]: the node's view of the mesh, from the cluster file;
//! - [`ebpf`]: the kernel programs: load, attach, pin, enrol, original destinations;
//! - [`proxy`]: where connections are accepted and forwarded;
//! - [`agent`]: one node's agent, tying them together;
//! - [`netns`]: sockets inside workloads' network namespaces.

pub mod admin;
pub mod agent;
pub mod ebpf;
pub mod identity;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod workload;
