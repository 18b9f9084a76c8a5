//! Loading, attaching and pinning the kernel programs; enrolling workloads; reading back the
//! original destinations they record.
//!
//! Everything lives under one bpffs directory per node (see docs/agent.md, "Pinned state"):
//!
//! ```text
//! <pin-dir>/v1/maps/MESH_*          the maps, reused by the next agent
//! <pin-dir>/v1/links/mesh_connect4  cgroup attachments; they outlive the agent, so that
//! <pin-dir>/v1/links/mesh_connect6  captured workloads fail closed while it is away
//! <pin-dir>/v1/links/mesh_sock_ops
//! <pin-dir>/v1/links/mesh_guard_ingress  the fail-closed guard (docs/agent.md), keyed by the
//! <pin-dir>/v1/links/mesh_guard_egress   node's workload IPs in maps/MESH_GUARDED_IPS
//! <pin-dir>/v1/links/mesh_sk_lookup_<netns inode>   inbound capture, one per workload namespace
//! ```

use std::{
    collections::HashSet,
    fs::{self, File},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, SockHash},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SkLookup, SockOps,
        links::FdLink,
    },
};
use mesh_ebpf_common::{AF_INET, AF_INET6, Enrollment, IpKey, PeerKey, SockAddr, maps, programs};

use crate::netns::NetNs;

/// The compiled `mesh-ebpf` object, built by this crate's build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Bumped whenever a map's layout changes, so a new agent never reuses incompatible pins.
const PIN_LAYOUT: &str = "v1";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// The node's capture programs: outbound ones attached to its workload cgroup subtree, inbound
/// ones to each workload's network namespace.
pub struct Capture {
    ebpf: Ebpf,
    links_dir: PathBuf,
    enrolled: HashMap<MapData, u64, Enrollment>,
    excluded_ports: Array<MapData, u8>,
    orig_dst: OrigDstTable,
    inbound_enrolled: HashMap<MapData, IpKey, u32>,
    inbound_listeners: SockHash<MapData, IpKey>,
    guarded_ips: HashMap<MapData, IpKey, u32>,
    agent_cgroups: HashMap<MapData, u64, u32>,
}

/// Where the kernel recorded each captured connection's original destination.
#[derive(Clone)]
pub struct OrigDstTable(Arc<Mutex<HashMap<MapData, PeerKey, SockAddr>>>);

impl Capture {
    /// Loads the programs (reusing pinned maps), attaches them to `workload_cgroup`, and pins the
    /// attachments, replacing those of a previous agent without a moment uncaptured.
    pub fn install(pin_dir: &Path, workload_cgroup: &Path) -> anyhow::Result<Self> {
        ensure_bpffs(pin_dir)?;
        let layout = pin_dir.join(PIN_LAYOUT);
        let (maps_dir, links_dir) = (layout.join("maps"), layout.join("links"));
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let cgroup = File::open(workload_cgroup)
            .with_context(|| format!("opening workload cgroup {}", workload_cgroup.display()))?;

        for name in [programs::CONNECT4, programs::CONNECT6] {
            let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            program.load().with_context(|| format!("loading {name}"))?;
            let link_id = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", workload_cgroup.display()))?;
            let link: FdLink = program.take_link(link_id)?.try_into()?;
            replace_pinned_link(link, &links_dir.join(name))?;
        }
        let sock_ops: &mut SockOps = program_mut(&mut ebpf, programs::SOCK_OPS)?;
        sock_ops.load().context("loading sock_ops")?;
        let link_id = sock_ops
            .attach(&cgroup, CgroupAttachMode::Single)
            .with_context(|| format!("attaching sock_ops to {}", workload_cgroup.display()))?;
        let link: FdLink = sock_ops.take_link(link_id)?.try_into()?;
        replace_pinned_link(link, &links_dir.join(programs::SOCK_OPS))?;
        for (name, direction) in [
            (programs::GUARD_INGRESS, CgroupSkbAttachType::Ingress),
            (programs::GUARD_EGRESS, CgroupSkbAttachType::Egress),
        ] {
            let program: &mut CgroupSkb = program_mut(&mut ebpf, name)?;
            program.load().with_context(|| format!("loading {name}"))?;
            let link_id = program
                .attach(&cgroup, direction, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", workload_cgroup.display()))?;
            let link: FdLink = program.take_link(link_id)?.try_into()?;
            replace_pinned_link(link, &links_dir.join(name))?;
        }
        let sk_lookup: &mut SkLookup = program_mut(&mut ebpf, programs::SK_LOOKUP)?;
        sk_lookup.load().context("loading sk_lookup")?;

        Ok(Self {
            enrolled: take_map(&mut ebpf, maps::ENROLLED)?,
            excluded_ports: take_map(&mut ebpf, maps::EXCLUDED_PORTS)?,
            orig_dst: OrigDstTable(Arc::new(Mutex::new(take_map(
                &mut ebpf,
                maps::ORIG_BY_PEER,
            )?))),
            inbound_enrolled: take_map(&mut ebpf, maps::INBOUND_ENROLLED)?,
            inbound_listeners: take_map(&mut ebpf, maps::INBOUND_LISTENERS)?,
            guarded_ips: take_map(&mut ebpf, maps::GUARDED_IPS)?,
            agent_cgroups: take_map(&mut ebpf, maps::AGENT_CGROUPS)?,
            links_dir,
            ebpf,
        })
    }

    /// Captures every inbound TCP connection to the workload's `ips` from outside its pod:
    /// `sk_lookup` hands each to `listener` (the agent's dual-stack plaintext listener in the
    /// workload's namespace). While no listener is registered, for instance while no agent runs,
    /// such connections are refused.
    pub fn capture_inbound(
        &mut self,
        netns: &NetNs,
        ips: &[IpAddr],
        listener: &tokio::net::TcpListener,
    ) -> anyhow::Result<()> {
        for ip in ips {
            let key = ip_key(*ip);
            self.inbound_listeners
                .insert(key, std::os::fd::AsRawFd::as_raw_fd(listener), 0)
                .with_context(|| format!("registering the inbound listener for {ip}"))?;
            self.inbound_enrolled
                .insert(key, 1, 0)
                .with_context(|| format!("enrolling {ip} for inbound capture"))?;
        }
        let pin = self.sk_lookup_pin(netns.inode());
        let sk_lookup: &mut SkLookup = program_mut(&mut self.ebpf, programs::SK_LOOKUP)?;
        let link_id = sk_lookup
            .attach(netns)
            .with_context(|| format!("attaching sk_lookup to {}", netns.path().display()))?;
        let link: FdLink = sk_lookup.take_link(link_id)?.into();
        replace_pinned_link(link, &pin)
    }

    /// Stops capturing inbound connections to `ips` in the namespace with inode `netns_inode`
    /// (the workload is gone, or its namespace was recreated). The guard still holds for the
    /// IPs until [`Capture::retain_guarded`] drops them.
    pub fn release_inbound(&mut self, netns_inode: u64, ips: &[IpAddr]) -> anyhow::Result<()> {
        for ip in ips {
            let key = ip_key(*ip);
            // Absent entries are fine: the kernel drops a listener's entry when it closes.
            let _ = self.inbound_listeners.remove(&key);
            let _ = self.inbound_enrolled.remove(&key);
        }
        remove_pin(&self.sk_lookup_pin(netns_inode))
    }

    fn sk_lookup_pin(&self, netns_inode: u64) -> PathBuf {
        self.links_dir
            .join(format!("{}_{netns_inode}", programs::SK_LOOKUP))
    }

    /// Removes the inbound capture of namespaces not in `keep` (inodes): what a previous agent
    /// attached for workloads that are gone.
    pub fn retain_inbound_namespaces(&mut self, keep: &HashSet<u64>) -> anyhow::Result<()> {
        let prefix = format!("{}_", programs::SK_LOOKUP);
        for entry in fs::read_dir(&self.links_dir)
            .with_context(|| format!("listing {}", self.links_dir.display()))?
        {
            let path = entry?.path();
            let Some(inode) = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_prefix(&prefix))
                .and_then(|inode| inode.parse::<u64>().ok())
            else {
                continue;
            };
            if !keep.contains(&inode) {
                remove_pin(&path)?;
            }
        }
        Ok(())
    }

    /// The fail-closed guard holds for `ips` from now on (docs/agent.md).
    pub fn guard(&mut self, ips: &[IpAddr]) -> anyhow::Result<()> {
        for ip in ips {
            self.guarded_ips
                .insert(ip_key(*ip), 1, 0)
                .with_context(|| format!("guarding {ip}"))?;
        }
        Ok(())
    }

    /// Lets the sockets of the cgroup `id` (this agent's own, when it runs below the workload
    /// cgroup root) through the guard.
    pub fn exempt_agent_cgroup(&mut self, id: u64) -> anyhow::Result<()> {
        self.agent_cgroups
            .insert(id, 1, 0)
            .with_context(|| format!("exempting the agent's cgroup {id} from the guard"))
    }

    /// The guard stops holding for IPs not in `keep` (workloads gone from the node).
    pub fn retain_guarded(&mut self, keep: &[IpAddr]) -> anyhow::Result<()> {
        let keep: HashSet<IpKey> = keep.iter().map(|ip| ip_key(*ip)).collect();
        let stale: Vec<IpKey> = self
            .guarded_ips
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !keep.contains(key))
            .collect();
        for key in stale {
            self.guarded_ips.remove(&key)?;
        }
        Ok(())
    }

    /// How many IPs the guard holds for (the admin API reports it).
    pub fn guarded_count(&self) -> usize {
        self.guarded_ips.keys().filter_map(Result::ok).count()
    }

    /// Stops capturing inbound connections to IPs not in `keep`.
    pub fn retain_inbound(&mut self, keep: &[IpAddr]) -> anyhow::Result<()> {
        let keep: HashSet<IpKey> = keep.iter().map(|ip| ip_key(*ip)).collect();
        let stale: Vec<IpKey> = self
            .inbound_enrolled
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !keep.contains(key))
            .collect();
        for key in stale {
            self.inbound_enrolled.remove(&key)?;
        }
        Ok(())
    }

    /// Captures the connections of every process in `cgroup` and below.
    pub fn enroll(&mut self, cgroup: &Path) -> anyhow::Result<u64> {
        let id = cgroup_id(cgroup)?;
        self.enrolled
            .insert(id, Enrollment::default(), 0)
            .with_context(|| format!("enrolling cgroup {}", cgroup.display()))?;
        Ok(id)
    }

    /// Stops capturing the cgroup with this id.
    pub fn unenroll(&mut self, id: u64) -> anyhow::Result<()> {
        match self.enrolled.remove(&id) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(err))
                if err.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(err) => Err(err).with_context(|| format!("unenrolling cgroup id {id}")),
        }
    }

    /// Stops capturing every cgroup not in `keep` (workloads gone from the cluster file).
    pub fn retain_enrolled(&mut self, keep: &HashSet<u64>) -> anyhow::Result<()> {
        let stale: Vec<u64> = self
            .enrolled
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !keep.contains(id))
            .collect();
        for id in stale {
            self.enrolled
                .remove(&id)
                .with_context(|| format!("unenrolling cgroup id {id}"))?;
        }
        Ok(())
    }

    pub fn set_excluded_ports(&mut self, ports: &[u16]) -> anyhow::Result<()> {
        let wanted: HashSet<u16> = ports.iter().copied().collect();
        for port in 0..=u16::MAX {
            let flag = u8::from(wanted.contains(&port));
            let current = self.excluded_ports.get(&u32::from(port), 0)?;
            if current != flag {
                self.excluded_ports.set(u32::from(port), flag, 0)?;
            }
        }
        Ok(())
    }

    pub fn orig_dst_table(&self) -> OrigDstTable {
        self.orig_dst.clone()
    }
}

impl OrigDstTable {
    /// The original destination of the connection the agent accepted from `peer` on a listener
    /// in the namespace with `netns_cookie`; the entry is consumed.
    pub fn take(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = PeerKey {
            netns_cookie,
            peer: to_kernel(peer),
        };
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let orig = map.get(&key, 0).ok()?;
        // A stale entry would only be found again by a connection reusing the same port, which
        // re-records it first; failing to remove is harmless.
        let _ = map.remove(&key);
        from_kernel(&orig)
    }
}

/// Removes everything an agent pinned for its node: captured workloads connect directly again.
pub fn uninstall(pin_dir: &Path) -> anyhow::Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    fs::remove_dir_all(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))
}

/// How many attachments are pinned under `pin_dir`.
pub fn attachment_count(pin_dir: &Path) -> usize {
    fs::read_dir(pin_dir.join(PIN_LAYOUT).join("links")).map_or(0, |dir| dir.count())
}

/// The node's attachments, as pinned under `pin_dir` (what is pinned stays attached, with or
/// without an agent): where each program is attached and what it does.
pub fn attachments(pin_dir: &Path, workload_cgroup: &Path) -> Vec<serde_json::Value> {
    let links_dir = pin_dir.join(PIN_LAYOUT).join("links");
    let mut names: Vec<String> = fs::read_dir(&links_dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let cgroup = workload_cgroup.display().to_string();
    names
        .into_iter()
        .map(|name| {
            let (hook, target, role) = match name.as_str() {
                programs::CONNECT4 | programs::CONNECT6 => {
                    ("cgroup/connect", cgroup.clone(), "outbound capture")
                }
                programs::SOCK_OPS => ("sockops", cgroup.clone(), "original destinations"),
                programs::GUARD_INGRESS | programs::GUARD_EGRESS => {
                    ("cgroup_skb", cgroup.clone(), "fail-closed guard")
                }
                other => match other
                    .strip_prefix(programs::SK_LOOKUP)
                    .and_then(|rest| rest.strip_prefix('_'))
                {
                    Some(inode) => (
                        "sk_lookup",
                        format!("netns inode {inode}"),
                        "inbound capture",
                    ),
                    None => ("unknown", String::new(), "unknown"),
                },
            };
            serde_json::json!({"link": name, "hook": hook, "target": target, "role": role})
        })
        .collect()
}

pub fn default_pin_dir(node: &str) -> PathBuf {
    Path::new(DEFAULT_BPFFS).join("mesh").join(node)
}

/// A cgroup v2 directory's inode number is the cgroup id the kernel reports to programs.
/// The cgroup of this process when it is in `root`'s subtree (an agent run as a pod below
/// kubepods): found by looking for our PID in the subtree's `cgroup.procs`, which works whether
/// or not the process has a cgroup namespace of its own (then /proc/self/cgroup says only `/`).
pub fn own_cgroup_below(root: &Path) -> Option<PathBuf> {
    let pid = std::process::id().to_string();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.lines().any(|line| line.trim() == pid) {
            return Some(dir);
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        pending.extend(
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    None
}

pub fn cgroup_id(cgroup: &Path) -> anyhow::Result<u64> {
    Ok(fs::metadata(cgroup)
        .with_context(|| format!("reading cgroup {}", cgroup.display()))?
        .ino())
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} is missing from the eBPF object"))?;
    Ok(program.try_into()?)
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} is missing from the eBPF object"))?;
    Ok(T::try_from(map)?)
}

/// Pins `new` at `path`, replacing the previous pin in one step: `new` is attached and pinned
/// under a staging name first, then renamed over the old pin (bpffs replaces the target of a
/// rename atomically, which drops the old link). The cgroup is never without a capture program
/// and the pin's name never goes missing, whenever the agent dies.
fn replace_pinned_link(new: FdLink, path: &Path) -> anyhow::Result<()> {
    // bpffs refuses dots in names.
    let mut staging = path.as_os_str().to_owned();
    staging.push("_staged");
    let staging = PathBuf::from(staging);
    if staging.exists() {
        fs::remove_file(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    new.pin(&staging)
        .with_context(|| format!("pinning link at {}", staging.display()))?;
    fs::rename(&staging, path).with_context(|| format!("renaming pin to {}", path.display()))
}

fn remove_pin(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", path.display())),
    }
}

fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let existing = pin_dir
        .ancestors()
        .find(|dir| dir.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing)? {
        return Ok(());
    }
    if pin_dir.starts_with(DEFAULT_BPFFS) && existing == Path::new(DEFAULT_BPFFS) {
        tracing::info!(path = DEFAULT_BPFFS, "mounting bpffs");
        nix::mount::mount(
            Some("bpf"),
            DEFAULT_BPFFS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mounting bpffs at /sys/fs/bpf")?;
        return Ok(());
    }
    bail!(
        "{} is not on a BPF filesystem: mount one (mount -t bpf bpf DIR) or choose a --bpf-pin-dir under /sys/fs/bpf",
        pin_dir.display()
    )
}

fn is_bpffs(path: &Path) -> anyhow::Result<bool> {
    let stat =
        nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(stat.filesystem_type().0 == BPF_FS_MAGIC)
}

fn to_kernel(addr: SocketAddr) -> SockAddr {
    let IpKey {
        family,
        addr: words,
    } = ip_key(addr.ip());
    SockAddr {
        family,
        port: u32::from(addr.port()),
        addr: words,
    }
}

/// An address as the kernel lays it out: network byte order, IPv4 in the first word.
fn ip_key(ip: IpAddr) -> IpKey {
    match ip.to_canonical() {
        IpAddr::V4(ip) => IpKey {
            family: AF_INET,
            addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
        },
        IpAddr::V6(ip) => {
            let o = ip.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            IpKey {
                family: AF_INET6,
                addr: [word(0), word(4), word(8), word(12)],
            }
        }
    }
}

fn from_kernel(addr: &SockAddr) -> Option<SocketAddr> {
    let port = u16::try_from(addr.port).ok()?;
    let ip = match addr.family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(addr.addr[0].to_ne_bytes())),
        AF_INET6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(addr.addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Ipv6Addr::from(octets).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_addresses_round_trip() {
        for text in [
            "10.1.0.2:8080",
            "[fd00:2::2]:443",
            "127.0.0.1:40000",
            "[::1]:1",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(from_kernel(&to_kernel(addr)), Some(addr), "{text}");
        }
    }

    #[test]
    fn ipv4_is_laid_out_in_network_order() {
        let kernel = to_kernel("10.1.0.2:80".parse().unwrap());
        assert_eq!(kernel.addr[0].to_ne_bytes(), [10, 1, 0, 2]);
        assert_eq!(kernel.port, 80);
    }

    #[test]
    fn ipv4_mapped_destinations_read_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.2.0.2]:80".parse().unwrap();
        let mut kernel = to_kernel(mapped);
        kernel.family = AF_INET6;
        kernel.addr = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), kernel.addr[0]];
        assert_eq!(from_kernel(&kernel), Some("10.2.0.2:80".parse().unwrap()));
    }
}
