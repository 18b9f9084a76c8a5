//! Kernel side of the mesh: outbound capture of enrolled workloads' TCP connections.
//!
//! `cgroup/connect4` and `cgroup/connect6` run on every `connect()` in the node's workload
//! cgroup subtree. For an enrolled workload they record the original destination under the
//! socket's cookie and rewrite the destination to the agent's outbound listener on loopback in
//! the workload's own network namespace. Once the TCP handshake completes, `sock_ops` re-keys
//! that record by the client's address and namespace, which is what the agent sees when it
//! accepts the connection.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod capture;
#[cfg(target_arch = "bpf")]
mod guard;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The crate only has meaning for the BPF target; on the host it builds to an empty program so
/// that workspace-wide commands (`cargo test --workspace`, clippy) work.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
