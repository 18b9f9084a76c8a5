//! Kubernetes mode of the harness: a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, built from source by `cargo xtask setup`) next to
//! the usual nodes, so the mesh is tested against the real API, RBAC, admission and
//! controllers rather than an imitation of them.
//!
//! ```no_run
//! use mesh_tests::kube::{CgroupDriver, KubeCluster};
//! # fn main() -> anyhow::Result<()> {
//! let kc = KubeCluster::builder()
//!     .node("node-a", CgroupDriver::Systemd)
//!     .node("node-b", CgroupDriver::Cgroupfs)
//!     .build()?;
//! kc.control_plane().kubectl(["create", "namespace", "demo"])?;
//! # Ok(()) }
//! ```

mod ca;
mod control_plane;
mod istiod;
mod kubeconfig;
mod mesh;
mod pki;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

pub use control_plane::{
    API_SERVER_IPV4, API_SERVER_IPV6, API_SERVER_PORT, ControlPlane, SERVICE_ACCOUNT_ISSUER,
    SERVICE_CLUSTER_IP_RANGE, Startup,
};

pub use ca::{
    CA_AUDIENCE, CA_DEPLOYMENT, CA_GRPC_PORT, CA_ROOTS_CONFIGMAP, CA_SECRET, CA_SERVICE_ACCOUNT,
    KubeCa,
};
pub use istiod::{ISTIO_NAMESPACE, ISTIO_ROOTS_CONFIGMAP, ISTIOD_SERVER_NAME};
pub use mesh::{
    CaKind, KubeMesh, MESH_NAMESPACE, POD_READY_TIMEOUT, cni_plugin_bin, deploy_dir, two_nodes,
};

use crate::{Cluster, NodeSpec};

/// A Go-built test tool (`kube-apiserver`, `kubectl`, `etcd`, CNI plugins, ...): from
/// `$MESH_GO_TOOLS_BIN`, else `$HOME/.cache/mesh/go-tools/bin`, where `cargo xtask setup`
/// puts them (they are pinned versions built from source, not whatever the machine has).
pub fn tool(name: &str) -> Result<PathBuf> {
    let dir = tools_dir()?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{name} not found in {}: build the Kubernetes test tools with `cargo xtask setup` \
             (or point MESH_GO_TOOLS_BIN at a directory holding them)",
            dir.display()
        );
    }
    Ok(path)
}

fn tools_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MESH_GO_TOOLS_BIN") {
        return Ok(dir.into());
    }
    let home = std::env::var_os("HOME")
        .context("neither MESH_GO_TOOLS_BIN nor HOME is set: cannot find the Go-built tools")?;
    Ok(Path::new(&home).join(".cache/mesh/go-tools/bin"))
}

/// How a node's kubelet lays out pod cgroups (see the harness kubelet's `--cgroup-driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`.
    Systemd,
    /// `kubepods/<qos>/pod<uid>`.
    Cgroupfs,
}

impl CgroupDriver {
    /// The value of kubelet's `--cgroup-driver`.
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupDriver::Systemd => "systemd",
            CgroupDriver::Cgroupfs => "cgroupfs",
        }
    }
}

/// Describes a [`KubeCluster`]; [`KubeClusterBuilder::build`] makes it.
#[derive(Debug, Clone, Default)]
pub struct KubeClusterBuilder {
    nodes: Vec<(String, CgroupDriver)>,
}

impl KubeClusterBuilder {
    /// A node whose kubelet uses `driver`.
    pub fn node(mut self, name: &str, driver: CgroupDriver) -> Self {
        self.nodes.push((name.to_owned(), driver));
        self
    }

    /// Makes the nodes (no pods: in Kubernetes mode the kubelets make them) and starts the
    /// control plane. On error, whatever was made is torn down.
    pub fn build(self) -> Result<KubeCluster> {
        let cluster = self
            .nodes
            .iter()
            .fold(Cluster::builder(), |b, (name, _)| {
                b.node(NodeSpec::new(name))
            })
            .build()?;
        let control_plane = ControlPlane::start(&cluster)?;
        Ok(KubeCluster {
            control_plane,
            cluster,
            drivers: self.nodes.into_iter().collect(),
        })
    }
}

/// Nodes plus a control plane. Dropping it stops the control plane, then tears the nodes
/// down (also on panic).
pub struct KubeCluster {
    // Declared first: fields drop in order, and the control plane goes before the
    // cluster whose netns and cgroup it lives in.
    control_plane: ControlPlane,
    cluster: Cluster,
    drivers: BTreeMap<String, CgroupDriver>,
}

impl KubeCluster {
    pub fn builder() -> KubeClusterBuilder {
        KubeClusterBuilder::default()
    }

    /// The nodes (netns, cgroups, pin dirs), as in the harness's file mode.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// The cgroup driver of the node's kubelet.
    pub fn cgroup_driver(&self, node: &str) -> Result<CgroupDriver> {
        self.drivers
            .get(node)
            .copied()
            .ok_or_else(|| anyhow!("no node {node} in cluster {}", self.cluster.id()))
    }

    // To come (the harness kubelet's part): starts `mesh-kubelet` on every node, in the
    // node's netns and cgroup, with `control_plane().node_kubeconfig(node)`,
    // `--cgroup-root` = the node cgroup and `--cgroup-driver` = `cgroup_driver(node)`.
    // pub fn start_kubelets(&self) -> Result<()>
}
