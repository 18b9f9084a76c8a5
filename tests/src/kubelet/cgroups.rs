//! Where kubelet puts pods' and containers' cgroups: below its `--cgroup-root`, by QoS class,
//! named the way its cgroup driver names them. The agent finds pods by these paths, so they
//! must be kubelet's exactly.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

pub(crate) use crate::kube::CgroupDriver;

/// A pod's QoS class (`status.qosClass`, set by the API server from the resources).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub(crate) fn parse(class: &str) -> Result<Self> {
        Ok(match class {
            "Guaranteed" => QosClass::Guaranteed,
            "Burstable" => QosClass::Burstable,
            "BestEffort" => QosClass::BestEffort,
            other => bail!("unknown QoS class {other:?}"),
        })
    }

    /// Its cgroup name part; Guaranteed pods sit right below `kubepods`, so it has none.
    fn dir(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

/// The cgroup of every pod, below the cgroup root (`kubepods.slice` or `kubepods`).
pub(crate) fn kubepods(root: &Path, driver: CgroupDriver) -> PathBuf {
    root.join(match driver {
        CgroupDriver::Systemd => "kubepods.slice",
        CgroupDriver::Cgroupfs => "kubepods",
    })
}

/// A pod's cgroup: systemd `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`
/// (a systemd unit name cannot hold `-` inside a part, so the uid's become `_`), cgroupfs
/// `kubepods/<qos>/pod<uid>`; Guaranteed pods without the QoS level.
pub(crate) fn pod_cgroup(root: &Path, driver: CgroupDriver, qos: QosClass, uid: &str) -> PathBuf {
    let base = kubepods(root, driver);
    match (driver, qos.dir()) {
        (CgroupDriver::Systemd, None) => {
            base.join(format!("kubepods-pod{}.slice", uid.replace('-', "_")))
        }
        (CgroupDriver::Systemd, Some(q)) => base
            .join(format!("kubepods-{q}.slice"))
            .join(format!("kubepods-{q}-pod{}.slice", uid.replace('-', "_"))),
        (CgroupDriver::Cgroupfs, None) => base.join(format!("pod{uid}")),
        (CgroupDriver::Cgroupfs, Some(q)) => base.join(q).join(format!("pod{uid}")),
    }
}

/// A container's cgroup below its pod's: containerd's `cri-containerd-<id>.scope` with the
/// systemd driver, `<id>` with cgroupfs.
pub(crate) fn container_cgroup(pod_cgroup: &Path, driver: CgroupDriver, id: &str) -> PathBuf {
    pod_cgroup.join(match driver {
        CgroupDriver::Systemd => format!("cri-containerd-{id}.scope"),
        CgroupDriver::Cgroupfs => id.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";

    #[test]
    fn systemd_paths_are_kubelets() {
        let root = Path::new("/cg");
        let systemd = CgroupDriver::Systemd;
        assert_eq!(
            pod_cgroup(root, systemd, QosClass::BestEffort, UID),
            Path::new(
                "/cg/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice"
            )
        );
        assert_eq!(
            pod_cgroup(root, systemd, QosClass::Guaranteed, UID),
            Path::new("/cg/kubepods.slice/kubepods-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice")
        );
        assert_eq!(
            container_cgroup(Path::new("/p"), systemd, "abc"),
            Path::new("/p/cri-containerd-abc.scope")
        );
    }

    #[test]
    fn cgroupfs_paths_are_kubelets() {
        let root = Path::new("/cg");
        let fs = CgroupDriver::Cgroupfs;
        assert_eq!(
            pod_cgroup(root, fs, QosClass::Burstable, UID),
            Path::new("/cg/kubepods/burstable/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
        assert_eq!(
            pod_cgroup(root, fs, QosClass::Guaranteed, UID),
            Path::new("/cg/kubepods/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
        assert_eq!(
            container_cgroup(Path::new("/p"), fs, "abc"),
            Path::new("/p/abc")
        );
    }
}
