//! Types and constants shared by the kernel programs (`mesh-ebpf`) and the agent (`mesh-agent`).
//!
//! Every type here is `#[repr(C)]` without implicit padding, because it crosses the kernel
//! boundary as raw bytes in BPF maps.
#![no_std]

/// Port of the agent's outbound listener inside each enrolled workload's network namespace.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the agent's inbound plaintext listener inside each workload's namespace: where
/// `sk_lookup` steers every inbound connection that is not HBONE.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Port of the agent's HBONE (mutual TLS) listener on every workload IP.
pub const HBONE_PORT: u16 = 15008;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// How many cgroup levels the capture program walks up from the calling task to find the
/// enrolled pod cgroup (containers nest below their pod's cgroup).
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Map names, shared so that the agent opens exactly what the kernel side declares.
pub mod maps {
    /// cgroup id -> [`super::Enrollment`]: the workloads whose connections are captured.
    pub const ENROLLED: &str = "MESH_ENROLLED";
    /// destination port -> 1 when connections to it are never captured.
    pub const EXCLUDED_PORTS: &str = "MESH_EXCLUDED_PORTS";
    /// socket cookie -> [`super::PendingOrigDst`], written at connect time.
    pub const ORIG_BY_COOKIE: &str = "MESH_ORIG_BY_COOKIE";
    /// [`super::PeerKey`] -> [`super::SockAddr`], written once the source port is known.
    pub const ORIG_BY_PEER: &str = "MESH_ORIG_BY_PEER";
    /// [`super::IpKey`] of a workload IP -> 1: inbound connections to it are captured.
    pub const INBOUND_ENROLLED: &str = "MESH_INBOUND_ENROLLED";
    /// [`super::IpKey`] of a workload IP -> the agent's plaintext listener in its namespace.
    pub const INBOUND_LISTENERS: &str = "MESH_INBOUND_LISTENERS";
    /// [`super::IpKey`] of a workload IP -> 1: the fail-closed guard holds for it (see
    /// `mesh-ebpf/src/guard.rs`), whatever the agent knows of its namespace and cgroup.
    pub const GUARDED_IPS: &str = "MESH_GUARDED_IPS";
    /// Cgroup ids of the agents' own processes when they run inside the workload cgroup root
    /// (a DaemonSet pod lives below kubepods): the guard lets their sockets through.
    pub const AGENT_CGROUPS: &str = "MESH_AGENT_CGROUPS";
}

/// Program names (the Rust function names in `mesh-ebpf`).
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const SOCK_OPS: &str = "mesh_sock_ops";
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    pub const GUARD_INGRESS: &str = "mesh_guard_ingress";
    pub const GUARD_EGRESS: &str = "mesh_guard_egress";
}

/// A TCP endpoint as the kernel sees it. `addr` holds the address in network byte order as the
/// kernel lays it out in `bpf_sock_addr`/`bpf_sock_ops` (IPv4 in `addr[0]`, the rest zero);
/// `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr {
    pub family: u32,
    pub port: u32,
    pub addr: [u32; 4],
}

/// The original destination of a captured connect, before its source port exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PendingOrigDst {
    /// Network namespace of the connecting socket: the agent's listener in that namespace is the
    /// one that accepts the redirected connection.
    pub netns_cookie: u64,
    pub orig_dst: SockAddr,
}

/// Key under which the original destination is found once the connection is established: the
/// client's own address as the agent's listener sees it as peer, qualified by network namespace
/// because every workload connects from the same loopback addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerKey {
    pub netns_cookie: u64,
    pub peer: SockAddr,
}

/// A workload IP, laid out as in [`SockAddr`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    pub family: u32,
    pub addr: [u32; 4],
}

/// Value of the enrollment map. `flags` is reserved for per-workload capture options.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Enrollment {
    pub flags: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data structs without padding or pointers (see the size tests below).
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::PendingOrigDst {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::Enrollment {}
    unsafe impl aya::Pod for super::IpKey {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    #[test]
    fn map_types_have_no_padding() {
        assert_eq!(size_of::<super::SockAddr>(), 24);
        assert_eq!(size_of::<super::PendingOrigDst>(), 32);
        assert_eq!(size_of::<super::PeerKey>(), 32);
        assert_eq!(size_of::<super::IpKey>(), 20);
    }
}
