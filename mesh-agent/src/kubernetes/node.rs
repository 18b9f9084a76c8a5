//! Where a pod of this node lives in the kernel, found from its UID as the kubelet and the
//! container runtime lay it out: its cgroup (both cgroup drivers) and its network namespace
//! (from a process in the cgroup, through /proc, as istio-cni does).

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use super::config::{CgroupDriver, KubeletConfig};

/// Where cgroup v2 is mounted: `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts.
/// The one place the agent finds it.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_device, dir, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
            (fs_type == "cgroup2").then(|| PathBuf::from(dir))
        })
        .min_by_key(|dir| dir.components().count())
        .context("cgroup v2 is not mounted (the mesh needs it: /sys/fs/cgroup)")
}

/// The kubelet's layout of pod cgroups on this node.
#[derive(Debug, Clone)]
pub struct PodCgroups {
    /// `<cgroup2 mount>/<cgroup root>/kubepods[.slice]`: every pod is below; capture and the
    /// guard attach here.
    pods_root: PathBuf,
    driver: CgroupDriver,
}

/// QoS classes with a cgroup level of their own (Guaranteed pods sit directly in the root).
const QOS_LEVELS: [&str; 2] = ["burstable", "besteffort"];

impl PodCgroups {
    pub fn new(cgroup2: &Path, kubelet: &KubeletConfig) -> Self {
        let relative = kubelet
            .cgroup_root
            .strip_prefix("/")
            .unwrap_or(&kubelet.cgroup_root);
        let root = cgroup2.join(relative);
        let pods_root = match kubelet.cgroup_driver {
            CgroupDriver::Systemd => root.join("kubepods.slice"),
            CgroupDriver::Cgroupfs => root.join("kubepods"),
        };
        Self {
            pods_root,
            driver: kubelet.cgroup_driver,
        }
    }

    pub fn pods_root(&self) -> &Path {
        &self.pods_root
    }

    /// The pod's cgroup for `qos` (`Guaranteed`, `Burstable`, `BestEffort`, as in the pod's
    /// status), where the kubelet makes it.
    pub fn expected(&self, uid: &str, qos: Option<&str>) -> PathBuf {
        let level = qos
            .map(str::to_ascii_lowercase)
            .filter(|q| QOS_LEVELS.contains(&q.as_str()));
        self.path(uid, level.as_deref())
    }

    /// The pod's cgroup if it exists at any QoS level (a pod's class never changes, but the
    /// status may not say it yet), else where it would be for `qos`.
    pub fn find(&self, uid: &str, qos: Option<&str>) -> PathBuf {
        let candidates = std::iter::once(None).chain(QOS_LEVELS.map(Some));
        candidates
            .map(|level| self.path(uid, level))
            .find(|path| path.is_dir())
            .unwrap_or_else(|| self.expected(uid, qos))
    }

    fn path(&self, uid: &str, qos: Option<&str>) -> PathBuf {
        match (self.driver, qos) {
            (CgroupDriver::Systemd, None) => {
                let pod = format!("kubepods-pod{}.slice", systemd_escape(uid));
                self.pods_root.join(pod)
            }
            (CgroupDriver::Systemd, Some(qos)) => {
                let pod = format!("kubepods-{qos}-pod{}.slice", systemd_escape(uid));
                self.pods_root
                    .join(format!("kubepods-{qos}.slice"))
                    .join(pod)
            }
            (CgroupDriver::Cgroupfs, None) => self.pods_root.join(format!("pod{uid}")),
            (CgroupDriver::Cgroupfs, Some(qos)) => {
                self.pods_root.join(qos).join(format!("pod{uid}"))
            }
        }
    }
}

/// systemd slice names use `-` for nesting, so the kubelet writes a UID's dashes as `_`.
fn systemd_escape(uid: &str) -> String {
    uid.replace('-', "_")
}

/// Directories where runtimes bind-mount pods' network namespaces (containerd, CRI-O, and
/// `ip netns`).
const NETNS_DIRS: [&str; 2] = ["/var/run/netns", "/run/netns"];

/// The network namespace of a process of the pod: a stable name for it under /run/netns when
/// the runtime made one (a `/proc/<pid>` path would dangle when that process ends), else the
/// process's own `/proc/<pid>/ns/net`. `None` while the pod has no process.
pub fn pod_netns(pod_cgroup: &Path) -> Option<PathBuf> {
    let pid = first_process(pod_cgroup)?;
    let proc_path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let inode = fs::metadata(&proc_path).ok()?.ino();
    Some(named_netns(inode).unwrap_or(proc_path))
}

/// A process in the cgroup or below it (containers have cgroups of their own under the pod's).
fn first_process(cgroup: &Path) -> Option<u32> {
    let own = fs::read_to_string(cgroup.join("cgroup.procs")).ok()?;
    if let Some(pid) = own.lines().find_map(|l| l.trim().parse().ok()) {
        return Some(pid);
    }
    fs::read_dir(cgroup)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|entry| first_process(&entry.path()))
}

fn named_netns(inode: u64) -> Option<PathBuf> {
    NETNS_DIRS
        .iter()
        .filter_map(|dir| fs::read_dir(dir).ok())
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| fs::metadata(path).is_ok_and(|m| m.ino() == inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f6c2b1e-8d4a-4c1e-9b7a-2f1e3d4c5b6a";

    fn layout(driver: CgroupDriver, root: &str) -> PodCgroups {
        PodCgroups::new(
            Path::new("/sys/fs/cgroup"),
            &KubeletConfig {
                cgroup_root: PathBuf::from(root),
                cgroup_driver: driver,
            },
        )
    }

    #[test]
    fn systemd_paths_escape_the_uid() {
        let cgroups = layout(CgroupDriver::Systemd, "/");
        assert_eq!(
            cgroups.expected(UID, Some("BestEffort")),
            Path::new(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f6c2b1e_8d4a_4c1e_9b7a_2f1e3d4c5b6a.slice"
            )
        );
        assert_eq!(
            cgroups.expected(UID, Some("Guaranteed")),
            Path::new(
                "/sys/fs/cgroup/kubepods.slice/kubepods-pod0f6c2b1e_8d4a_4c1e_9b7a_2f1e3d4c5b6a.slice"
            )
        );
    }

    #[test]
    fn cgroupfs_paths_under_a_cgroup_root() {
        let cgroups = layout(CgroupDriver::Cgroupfs, "/mesh/node-a");
        assert_eq!(
            cgroups.pods_root(),
            Path::new("/sys/fs/cgroup/mesh/node-a/kubepods")
        );
        assert_eq!(
            cgroups.expected(UID, Some("Burstable")),
            Path::new(
                "/sys/fs/cgroup/mesh/node-a/kubepods/burstable/pod0f6c2b1e-8d4a-4c1e-9b7a-2f1e3d4c5b6a"
            )
        );
        assert_eq!(
            cgroups.expected(UID, None),
            Path::new(
                "/sys/fs/cgroup/mesh/node-a/kubepods/pod0f6c2b1e-8d4a-4c1e-9b7a-2f1e3d4c5b6a"
            )
        );
    }
}
