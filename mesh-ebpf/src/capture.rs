use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr, sk_action},
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use mesh_ebpf_common::{
    AF_INET, AF_INET6, Enrollment, HBONE_PORT, IpKey, MAX_CGROUP_DEPTH, OUTBOUND_PORT, PeerKey,
    PendingOrigDst, SockAddr,
};

/// `connect()` verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;
/// Refusing the connect (EPERM) is how the kernel side fails closed when it cannot record the
/// original destination: a captured workload never bypasses the agent.
const REFUSE: i32 = 0;

const SOCK_STREAM: u32 = 1;
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// `::ffff:0:0/96`, the IPv4-mapped prefix, as the third word in network byte order.
const V4_MAPPED_MARKER: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[map(name = "MESH_ENROLLED")]
static ENROLLED: HashMap<u64, Enrollment> = HashMap::pinned(16384, 0);

#[map(name = "MESH_EXCLUDED_PORTS")]
pub(crate) static EXCLUDED_PORTS: Array<u8> = Array::pinned(65536, 0);

#[map(name = "MESH_ORIG_BY_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, PendingOrigDst> = LruHashMap::pinned(65536, 0);

#[map(name = "MESH_ORIG_BY_PEER")]
static ORIG_BY_PEER: LruHashMap<PeerKey, SockAddr> = LruHashMap::pinned(65536, 0);

#[map(name = "MESH_INBOUND_ENROLLED")]
static INBOUND_ENROLLED: HashMap<IpKey, u32> = HashMap::pinned(16384, 0);

#[map(name = "MESH_INBOUND_LISTENERS")]
static INBOUND_LISTENERS: SockHash<IpKey> = SockHash::pinned(16384, 0);

pub(crate) const IPPROTO_TCP: u32 = 6;
/// The loopback device is interface 1 in every network namespace.
pub(crate) const LOOPBACK_IFINDEX: u32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel's context pointer; fields are copied to locals before use
    // because the verifier rejects map values that point into the context.
    let (sock_type, ip4, port) = unsafe {
        (
            (*sa).type_,
            (*sa).user_ip4,
            core::ptr::read_volatile(&(*sa).user_port),
        )
    };
    let orig_dst = SockAddr {
        family: AF_INET,
        port: u32::from(u16::from_be(port as u16)),
        addr: [ip4, 0, 0, 0],
    };
    if sock_type != SOCK_STREAM || is_loopback4(ip4) || !should_capture(&orig_dst) {
        return ALLOW;
    }
    if !remember_orig_dst(&ctx, orig_dst) {
        return REFUSE;
    }
    // SAFETY: writing the destination is what connect4 programs are for.
    unsafe {
        (*sa).user_ip4 = LOOPBACK4;
        (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4.
    let (sock_type, ip6, port) = unsafe {
        (
            (*sa).type_,
            read_user_ip6(sa),
            core::ptr::read_volatile(&(*sa).user_port),
        )
    };
    let orig_dst = SockAddr {
        family: AF_INET6,
        port: u32::from(u16::from_be(port as u16)),
        addr: ip6,
    };
    if sock_type != SOCK_STREAM || is_loopback6(ip6) || !should_capture(&orig_dst) {
        return ALLOW;
    }
    if !remember_orig_dst(&ctx, orig_dst) {
        return REFUSE;
    }
    // SAFETY: as in connect4; user_ip6 is written one 32-bit word at a time, as the verifier
    // requires.
    unsafe {
        (*sa).user_ip6[0] = LOOPBACK6[0];
        (*sa).user_ip6[1] = LOOPBACK6[1];
        (*sa).user_ip6[2] = LOOPBACK6[2];
        (*sa).user_ip6[3] = LOOPBACK6[3];
        (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
    }
    ALLOW
}

#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        rekey_by_peer(&ctx);
    }
    0
}

/// Moves the original destination of a captured connection from its socket cookie to the key
/// the agent can compute from the accepted connection: namespace and client address.
fn rekey_by_peer(ctx: &SockOpsContext) {
    // SAFETY: sock_ops contexts may ask for their socket cookie.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the entry is copied out at once; the map holds plain data.
    let Some(pending) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    let family = ctx.family();
    let (ip4, ip6) = local_addresses(ctx);
    let addr = if family == AF_INET {
        [ip4, 0, 0, 0]
    } else {
        ip6
    };
    let key = PeerKey {
        netns_cookie: pending.netns_cookie,
        peer: SockAddr {
            family,
            port: ctx.local_port(),
            addr,
        },
    };
    // A failed insert leaves the agent without a destination, and it resets the connection:
    // closed, not bypassed.
    let _ = ORIG_BY_PEER.insert(&key, &pending.orig_dst, 0);
    let _ = ORIG_BY_COOKIE.remove(&cookie);
}

/// Reads both address fields with one load each: when the compiler merges the IPv4 and IPv6
/// branches into a computed context pointer, the verifier rejects the program.
fn local_addresses(ctx: &SockOpsContext) -> (u32, [u32; 4]) {
    let ops = ctx.ops;
    // SAFETY: `ops` is the kernel's context pointer; every field is a plain u32 load.
    unsafe {
        (
            core::ptr::read_volatile(&(*ops).local_ip4),
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ],
        )
    }
}

fn remember_orig_dst(ctx: &SockAddrContext, orig_dst: SockAddr) -> bool {
    // SAFETY: both helpers are allowed in cgroup sock_addr programs (kernel >= 5.7).
    let (cookie, netns_cookie) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    let pending = PendingOrigDst {
        netns_cookie,
        orig_dst,
    };
    ORIG_BY_COOKIE.insert(&cookie, &pending, 0).is_ok()
}

/// Captured when the calling task belongs to an enrolled cgroup (the pod's, or one of its
/// ancestors when containers nest below it) and the port is not excluded.
fn should_capture(dst: &SockAddr) -> bool {
    let excluded = EXCLUDED_PORTS.get(dst.port).is_some_and(|flag| *flag != 0);
    !excluded && caller_is_enrolled()
}

fn caller_is_enrolled() -> bool {
    // Most callers sit directly in their pod's cgroup: one lookup instead of one per level from
    // the root down (measured by mesh-bench's eBPF statistics, docs/performance.md).
    // SAFETY: a plain helper call.
    let own = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: only presence is checked.
    if unsafe { ENROLLED.get(&own) }.is_some() {
        return true;
    }
    for level in 0..MAX_CGROUP_DEPTH {
        // SAFETY: a plain helper call; 0 means the task's cgroup is shallower than `level`.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        // SAFETY: only presence is checked.
        if unsafe { ENROLLED.get(&id) }.is_some() {
            return true;
        }
    }
    false
}

/// # Safety
/// `sa` must be the program's context pointer.
unsafe fn read_user_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    unsafe {
        [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ]
    }
}

fn is_loopback4(ip4: u32) -> bool {
    ip4.to_ne_bytes()[0] == 127
}

fn is_loopback6(ip6: [u32; 4]) -> bool {
    let v4_mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_MARKER;
    ip6 == LOOPBACK6 || (v4_mapped && is_loopback4(ip6[3]))
}

/// Inbound capture, attached to each enrolled workload's network namespace: every TCP connection
/// that arrives from outside the pod for one of the workload's IPs, on any port but HBONE's, is
/// handed to the agent's plaintext listener, which applies the workload's mTLS mode and policy.
/// Connections from inside the pod (loopback, including the agent's own deliveries) are not
/// touched. With the workload enrolled but no listener (no agent), the connection is refused.
#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    let lookup = ctx.lookup;
    // SAFETY: `lookup` is the kernel's context pointer; fields are copied out one load each.
    let (protocol, ifindex, local_port, family) = unsafe {
        (
            core::ptr::read_volatile(&(*lookup).protocol),
            core::ptr::read_volatile(&(*lookup).ingress_ifindex),
            core::ptr::read_volatile(&(*lookup).local_port),
            core::ptr::read_volatile(&(*lookup).family),
        )
    };
    if protocol != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX || local_port == u32::from(HBONE_PORT)
    {
        return sk_action::SK_PASS;
    }
    if EXCLUDED_PORTS
        .get(local_port)
        .is_some_and(|flag| *flag != 0)
    {
        return sk_action::SK_PASS;
    }
    let (local, remote) = lookup_addresses(&ctx, family);
    // From the pod's own address: the pod talking to itself, or the agent delivering a
    // connection it already admitted.
    if local == remote {
        return sk_action::SK_PASS;
    }
    let key = IpKey {
        family,
        addr: local,
    };
    // SAFETY: only presence is checked.
    if unsafe { INBOUND_ENROLLED.get(&key) }.is_none() {
        return sk_action::SK_PASS;
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => sk_action::SK_PASS,
        Err(_) => sk_action::SK_DROP,
    }
}

/// The local and remote addresses of a lookup, laid out as [`IpKey`] addresses.
fn lookup_addresses(ctx: &SkLookupContext, family: u32) -> ([u32; 4], [u32; 4]) {
    let lookup = ctx.lookup;
    // SAFETY: as above; every field is a plain u32 load.
    unsafe {
        if family == AF_INET {
            (
                [core::ptr::read_volatile(&(*lookup).local_ip4), 0, 0, 0],
                [core::ptr::read_volatile(&(*lookup).remote_ip4), 0, 0, 0],
            )
        } else {
            (
                [
                    core::ptr::read_volatile(&(*lookup).local_ip6[0]),
                    core::ptr::read_volatile(&(*lookup).local_ip6[1]),
                    core::ptr::read_volatile(&(*lookup).local_ip6[2]),
                    core::ptr::read_volatile(&(*lookup).local_ip6[3]),
                ],
                [
                    core::ptr::read_volatile(&(*lookup).remote_ip6[0]),
                    core::ptr::read_volatile(&(*lookup).remote_ip6[1]),
                    core::ptr::read_volatile(&(*lookup).remote_ip6[2]),
                    core::ptr::read_volatile(&(*lookup).remote_ip6[3]),
                ],
            )
        }
    }
}
