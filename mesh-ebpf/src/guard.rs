//! The fail-closed guard: attached (ingress and egress) to the node's workload cgroup root, it
//! holds for every guarded workload IP whatever the agent knows yet, because it is keyed by
//! neither network namespace nor cgroup id (both change when a pod or a container restarts):
//!
//! - a TCP packet for a guarded IP that arrives at a workload's own socket from anywhere but
//!   loopback is dropped: the only way in is through the agent, which delivers over the pod's
//!   loopback (its own sockets are outside the subtree, or in a cgroup it exempts);
//! - a TCP packet from a guarded IP that a workload's socket sends out of any device but
//!   loopback is dropped: a connection that was not captured (a recreated cgroup the agent has
//!   not enrolled yet) never leaves the pod.
//!
//! Ports in `excludedPorts` pass, as they do for capture, and so do the agent's own sockets
//! when the agent runs inside the subtree (as a DaemonSet pod, below kubepods): their cgroup
//! ids are in `MESH_AGENT_CGROUPS`.

use aya_ebpf::{
    helpers::bpf_skb_cgroup_id,
    macros::{cgroup_skb, map},
    maps::{HashMap, LruHashMap},
    programs::SkBuffContext,
};
use mesh_ebpf_common::{AF_INET, AF_INET6, IpKey};

use crate::capture::{EXCLUDED_PORTS, IPPROTO_TCP, LOOPBACK_IFINDEX};

const PASS: i32 = 1;
const DROP: i32 = 0;

const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_UDP: u8 = 17;
const IPV6_HEADER_LEN: usize = 40;

#[map(name = "MESH_GUARDED_IPS")]
static GUARDED_IPS: HashMap<IpKey, u32> = HashMap::pinned(16384, 0);

/// LRU: each agent adds its cgroup at start and never removes it (an upgraded agent overlaps
/// the old one); ids of cgroups long gone age out.
#[map(name = "MESH_AGENT_CGROUPS")]
static AGENT_CGROUPS: LruHashMap<u64, u32> = LruHashMap::pinned(64, 0);

/// What the guard needs of a packet: the workload's side of it and the peer's port.
struct Packet {
    /// TCP, or an IPv6 packet whose transport is not known to be harmless.
    tcp: bool,
    src: IpKey,
    dst: IpKey,
    src_port: u32,
    dst_port: u32,
}

#[cgroup_skb(ingress)]
pub fn mesh_guard_ingress(ctx: SkBuffContext) -> i32 {
    if arrived_on_loopback(&ctx) || from_agent(&ctx) {
        return PASS;
    }
    let Some(packet) = parse(&ctx) else {
        return PASS;
    };
    if !packet.tcp || !is_guarded(&packet.dst) {
        return PASS;
    }
    // A service on an excluded port, or the reply to the workload's own connection to one (its
    // socket is connected to that port: a listener's remote port is 0, so a caller cannot pass
    // by choosing an excluded source port).
    if is_excluded(packet.dst_port) || is_excluded(socket_remote_port(&ctx)) {
        return PASS;
    }
    DROP
}

#[cgroup_skb(egress)]
pub fn mesh_guard_egress(ctx: SkBuffContext) -> i32 {
    if arrived_on_loopback(&ctx) || from_agent(&ctx) {
        return PASS;
    }
    let Some(packet) = parse(&ctx) else {
        return PASS;
    };
    if !packet.tcp || !is_guarded(&packet.src) {
        return PASS;
    }
    if is_excluded(packet.dst_port) || is_excluded(packet.src_port) {
        return PASS;
    }
    DROP
}

/// Whether the packet's socket belongs to an agent.
fn from_agent(ctx: &SkBuffContext) -> bool {
    // SAFETY: allowed in cgroup_skb programs; the cgroup of the socket the packet belongs to.
    let cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    // SAFETY: only presence is checked.
    unsafe { AGENT_CGROUPS.get(&cgroup) }.is_some()
}

/// On ingress the device it came in on, on egress the one it goes out of.
fn arrived_on_loopback(ctx: &SkBuffContext) -> bool {
    // SAFETY: `skb` is the kernel's context pointer; a plain u32 load.
    let ifindex = unsafe { core::ptr::read_volatile(&(*ctx.skb.skb).ifindex) };
    ifindex == LOOPBACK_IFINDEX
}

/// The socket's remote port (`__sk_buff.remote_port` is in network order, in the upper half on
/// little-endian machines).
fn socket_remote_port(ctx: &SkBuffContext) -> u32 {
    // SAFETY: as above.
    let raw = unsafe { core::ptr::read_volatile(&(*ctx.skb.skb).remote_port) };
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u32::from(u16::from_be(be as u16))
}

fn is_guarded(ip: &IpKey) -> bool {
    // SAFETY: only presence is checked.
    unsafe { GUARDED_IPS.get(ip) }.is_some()
}

fn is_excluded(port: u32) -> bool {
    port != 0 && EXCLUDED_PORTS.get(port).is_some_and(|flag| *flag != 0)
}

/// Reads the IP header (cgroup_skb programs see the packet from its network header on).
fn parse(ctx: &SkBuffContext) -> Option<Packet> {
    let first: u8 = ctx.load(0).ok()?;
    match first >> 4 {
        4 => parse_ipv4(ctx, usize::from(first & 0x0f) * 4),
        6 => parse_ipv6(ctx),
        _ => None,
    }
}

fn parse_ipv4(ctx: &SkBuffContext, header_len: usize) -> Option<Packet> {
    let protocol: u8 = ctx.load(9).ok()?;
    let src: u32 = ctx.load(12).ok()?;
    let dst: u32 = ctx.load(16).ok()?;
    let tcp = u32::from(protocol) == IPPROTO_TCP;
    let (src_port, dst_port) = if tcp { ports(ctx, header_len)? } else { (0, 0) };
    Some(Packet {
        tcp,
        src: IpKey {
            family: AF_INET,
            addr: [src, 0, 0, 0],
        },
        dst: IpKey {
            family: AF_INET,
            addr: [dst, 0, 0, 0],
        },
        src_port,
        dst_port,
    })
}

fn parse_ipv6(ctx: &SkBuffContext) -> Option<Packet> {
    let next_header: u8 = ctx.load(6).ok()?;
    let src: [u32; 4] = ctx.load(8).ok()?;
    let dst: [u32; 4] = ctx.load(24).ok()?;
    let tcp = u32::from(next_header) == IPPROTO_TCP;
    let (src_port, dst_port) = if tcp {
        ports(ctx, IPV6_HEADER_LEN)?
    } else {
        (0, 0)
    };
    Some(Packet {
        // Extension headers could hide TCP behind them: only transports known to be harmless
        // pass unexamined.
        tcp: tcp || (next_header != IPPROTO_UDP && next_header != IPPROTO_ICMPV6),
        src: IpKey {
            family: AF_INET6,
            addr: src,
        },
        dst: IpKey {
            family: AF_INET6,
            addr: dst,
        },
        src_port,
        dst_port,
    })
}

fn ports(ctx: &SkBuffContext, offset: usize) -> Option<(u32, u32)> {
    let src: u16 = ctx.load(offset).ok()?;
    let dst: u16 = ctx.load(offset + 2).ok()?;
    Some((u32::from(u16::from_be(src)), u32::from(u16::from_be(dst))))
}
