//! The mesh settings of a Kubernetes node agent (the `mesh-config` ConfigMap, `mesh.yaml`):
//! what the cluster file says besides its nodes, workloads and Services, which the API gives.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::workload::{
    DEFAULT_TRUST_DOMAIN, HboneConfig, IdentityConfig, LimitsConfig, Name, PolicyConfig,
    SameNodeConfig,
};

/// Where the kubelet puts pods' cgroups: its `--cgroup-root` and `--cgroup-driver`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeletConfig {
    /// The kubelet's `--cgroup-root`, relative to the cgroup v2 mount; `/` by default.
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: PathBuf,
    #[serde(default)]
    pub cgroup_driver: CgroupDriver,
}

impl Default for KubeletConfig {
    fn default() -> Self {
        Self {
            cgroup_root: default_cgroup_root(),
            cgroup_driver: CgroupDriver::default(),
        }
    }
}

fn default_cgroup_root() -> PathBuf {
    PathBuf::from("/")
}

/// The kubelet's cgroup driver: where it puts a pod of a QoS class with a UID.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice` (most distributions).
    #[default]
    Systemd,
    /// `kubepods/<qos>/pod<uid>`.
    Cgroupfs,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CniConfig {
    /// The unix socket on which `mesh-cni` hands new pods to the agent.
    #[serde(default = "default_cni_socket")]
    pub socket: PathBuf,
}

impl Default for CniConfig {
    fn default() -> Self {
        Self {
            socket: default_cni_socket(),
        }
    }
}

pub const DEFAULT_CNI_SOCKET: &str = "/var/run/mesh/cni.sock";

fn default_cni_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CNI_SOCKET)
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfig {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: Name,
    pub identity: IdentityConfig,
    #[serde(default)]
    pub hbone: HboneConfig,
    #[serde(default)]
    pub same_node: SameNodeConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Only `rootNamespace`: policies come from the API.
    #[serde(default)]
    pub policy: PolicyRoot,
    #[serde(default)]
    pub kubelet: KubeletConfig,
    /// Ports never captured (e.g. 22, so SSH into a pod works without the mesh).
    #[serde(default)]
    pub excluded_ports: Vec<u16>,
    #[serde(default)]
    pub cni: CniConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRoot {
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
}

impl Default for PolicyRoot {
    fn default() -> Self {
        Self {
            root_namespace: default_root_namespace(),
        }
    }
}

fn default_root_namespace() -> String {
    PolicyConfig::default().root_namespace
}

fn default_trust_domain() -> Name {
    Name::try_from(DEFAULT_TRUST_DOMAIN.to_owned()).expect("the default trust domain is a name")
}

impl MeshConfig {
    /// Reads `mesh.yaml`; relative paths in it are relative to its directory.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| anyhow::anyhow!("cannot read mesh config {}: {err}", path.display()))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        let mut config: Self = serde_yaml_ng::from_str(text)
            .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.identity.resolve_paths(base);
        config
            .identity
            .signer()
            .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
        Ok(config)
    }

    /// The settings the state and the policy modules read, as a cluster file would give them.
    pub fn policy_config(&self) -> PolicyConfig {
        PolicyConfig {
            path: None,
            root_namespace: self.policy.root_namespace.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_relative_paths() {
        let config = MeshConfig::parse(
            "identity: {caCert: ca/ca.crt, caKey: /abs/ca.key}\nkubelet: {cgroupDriver: cgroupfs}\n",
            Path::new("/etc/mesh/mesh.yaml"),
        )
        .unwrap();
        assert_eq!(
            config.identity.ca_cert.as_deref(),
            Some(Path::new("/etc/mesh/ca/ca.crt"))
        );
        assert_eq!(
            config.identity.ca_key.as_deref(),
            Some(Path::new("/abs/ca.key"))
        );
        assert_eq!(config.kubelet.cgroup_driver, CgroupDriver::Cgroupfs);
        assert_eq!(config.kubelet.cgroup_root, Path::new("/"));
        assert_eq!(config.trust_domain.as_str(), "cluster.local");
        assert_eq!(config.policy.root_namespace, "istio-system");
        assert_eq!(config.cni.socket, Path::new(DEFAULT_CNI_SOCKET));
    }

    #[test]
    fn unknown_fields_are_refused_with_their_line() {
        let err = MeshConfig::parse(
            "identity: {caCert: a, caKey: b}\nkubelet: {cgroupDriver: cgroupfs, root: x}\n",
            Path::new("mesh.yaml"),
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("mesh.yaml") && message.contains("line 2"),
            "{message}"
        );
    }
}
