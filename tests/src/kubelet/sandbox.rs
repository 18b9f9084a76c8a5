//! Pod sandboxes, as a CRI runtime makes them: the pod cgroup, a network namespace that the
//! CNI plugins wire up, and a record of both on disk, so a restarted kubelet adopts the pod
//! instead of making it again, and can always tear down what it made.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::cgroups::{QosClass, pod_cgroup};
use super::cni::{self, Attachment};
use super::{Config, blocking};
use crate::sys;

/// `<state-dir>/pods/<uid>.json`, written once a pod's sandbox is up and its first container
/// made (removed when the pod goes): what a test needs to run a program in the pod the way
/// `kubectl exec` does, in `container_cgroup` and `netns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub netns: PathBuf,
    pub pod_cgroup: PathBuf,
    /// The cgroup of the pod's first container (a new one after each restart of it).
    pub container_cgroup: PathBuf,
    pub ips: Vec<IpAddr>,
}

impl PodState {
    /// The state file of pod `uid` in a kubelet's state dir.
    pub fn path(state_dir: &Path, uid: &str) -> PathBuf {
        state_dir.join("pods").join(format!("{uid}.json"))
    }

    /// The pod's state file, if its sandbox is up.
    pub fn read(state_dir: &Path, uid: &str) -> Result<Option<PodState>> {
        read_json(&Self::path(state_dir, uid))
    }
}

/// What the runtime keeps of a sandbox (`<state-dir>/sandboxes/<uid>.json`): written before
/// anything is made, so even a kubelet killed half-way leaves enough to undo it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxRecord {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The sandbox id: CNI's container id (host-local keys its leases by it).
    pub id: String,
    /// The network namespace's name (in /run/netns).
    pub netns: String,
    pub pod_cgroup: PathBuf,
    /// The network config list the ADD used; DEL uses it too (libcni caches it for that), so
    /// a conflist changed meanwhile (mesh-cni installed or removed) tears down what was set up.
    pub network: Value,
    /// The ADD's result; None until it succeeded.
    pub cni_result: Option<Value>,
    /// The address the pod asks IPAM for ([`REQUESTED_IP_ANNOTATION`]).
    #[serde(default)]
    pub requested_ip: Option<String>,
    /// By container name.
    pub containers: BTreeMap<String, ContainerRecord>,
}

/// A pod annotation naming the IPv4 address it gets from host-local (`CNI_ARGS` `IP=`), as
/// Calico's `cni.projectcalico.org/ipAddrs` does: lets a test give a new pod the address a
/// deleted one had.
pub const REQUESTED_IP_ANNOTATION: &str = "mesh-kubelet/requested-ip";

/// A container's history in its sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ContainerRecord {
    pub restart_count: i32,
    /// How its last run ended.
    pub last: Option<ContainerStateTerminated>,
    /// Its current run.
    pub run: Option<RunRecord>,
}

/// One run of a container: the processes in `cgroup`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RunRecord {
    pub id: String,
    pub cgroup: PathBuf,
    pub started_at: Time,
    pub image_id: String,
}

/// `<state-dir>/sandboxes`.
pub(crate) fn records_dir(config: &Config) -> PathBuf {
    config.state_dir.join("sandboxes")
}

/// The uids of the pods with a sandbox record (made by this kubelet or an earlier run).
pub(crate) fn recorded_uids(config: &Config) -> Result<Vec<String>> {
    let dir = records_dir(config);
    let entries = std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))?;
    let mut uids = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("read {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "json")
            && let Some(uid) = path.file_stem().and_then(|s| s.to_str())
        {
            uids.push(uid.to_owned());
        }
    }
    Ok(uids)
}

impl SandboxRecord {
    fn path(config: &Config, uid: &str) -> PathBuf {
        records_dir(config).join(format!("{uid}.json"))
    }

    pub(crate) fn load(config: &Config, uid: &str) -> Result<Option<Self>> {
        read_json(&Self::path(config, uid))
    }

    pub(crate) fn save(&self, config: &Config) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).context("serialize the sandbox record")?;
        sys::write_atomic(&Self::path(config, &self.uid), &text)
    }

    pub(crate) fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.netns)
    }

    /// The pod's addresses (IPv4 first), once the network is set up.
    pub(crate) fn ips(&self) -> Result<Vec<IpAddr>> {
        let result = self
            .cni_result
            .as_ref()
            .ok_or_else(|| anyhow!("the network of sandbox {} is not set up", self.id))?;
        cni::result_ips(result)
    }

    /// Writes the pod's [`PodState`], with `container_cgroup` as the first container's.
    pub(crate) fn publish(&self, config: &Config, container_cgroup: &Path) -> Result<()> {
        let state = PodState {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            node: config.node.clone(),
            netns: self.netns_path(),
            pod_cgroup: self.pod_cgroup.clone(),
            container_cgroup: container_cgroup.to_owned(),
            ips: self.ips()?,
        };
        let text = serde_json::to_vec_pretty(&state).context("serialize the pod state")?;
        sys::write_atomic(&PodState::path(&config.state_dir, &self.uid), &text)
    }

    fn attachment<'a>(&'a self, config: &'a Config, netns: &'a Path) -> Attachment<'a> {
        Attachment {
            bin_dir: &config.cni_bin_dir,
            container_id: &self.id,
            netns,
            if_name: "eth0",
            args: [
                ("K8S_POD_NAMESPACE", self.namespace.clone()),
                ("K8S_POD_NAME", self.name.clone()),
                ("K8S_POD_INFRA_CONTAINER_ID", self.id.clone()),
                ("K8S_POD_UID", self.uid.clone()),
            ]
            .into_iter()
            .chain(self.requested_ip.clone().map(|ip| ("IP", ip)))
            .collect(),
        }
    }
}

/// Makes the pod's sandbox: record, pod cgroup (at kubelet's path for its QoS class), network
/// namespace with `lo` up, then CNI ADD. If anything fails, whatever was made is undone (CNI
/// DEL included) before the error is returned, and the caller tries again later.
pub(crate) async fn create(config: &Config, pod: &Pod, uid: &str) -> Result<SandboxRecord> {
    let qos = pod
        .status
        .as_ref()
        .and_then(|s| s.qos_class.as_deref())
        .ok_or_else(|| anyhow!("the pod has no status.qosClass yet"))?;
    let id = new_id()?;
    let record = SandboxRecord {
        uid: uid.to_owned(),
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        netns: format!("{}-{}", config.netns_prefix, uid.get(..8).unwrap_or(uid)),
        pod_cgroup: pod_cgroup(
            &config.cgroup_root,
            config.cgroup_driver,
            QosClass::parse(qos)?,
            uid,
        ),
        network: cni::load_network_list(&config.cni_conf_dir)?,
        cni_result: None,
        requested_ip: pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REQUESTED_IP_ANNOTATION))
            .cloned(),
        containers: BTreeMap::new(),
        id,
    };
    record.save(config)?;
    match set_up(config, record.clone()).await {
        Ok(record) => Ok(record),
        Err(e) => match destroy(config, &record).await {
            Ok(()) => Err(e),
            Err(undo) => Err(anyhow!("{e:#}; undoing it failed too: {undo:#}")),
        },
    }
}

async fn set_up(config: &Config, mut record: SandboxRecord) -> Result<SandboxRecord> {
    let (cgroup, netns) = (record.pod_cgroup.clone(), record.netns.clone());
    blocking(move || {
        sys::mkdir_all(&cgroup)?;
        sys::netns_add(&netns)?;
        sys::ip_in(&netns, &["link", "set", "lo", "up"])
    })
    .await?;
    let netns = record.netns_path();
    let result = cni::add(&record.network, &record.attachment(config, &netns)).await?;
    if cni::result_ips(&result)?.is_empty() {
        bail!("the CNI result gives the pod no address: {result}");
    }
    record.cni_result = Some(result);
    record.save(config)?;
    Ok(record)
}

/// Tears the sandbox down: CNI DEL (every plugin, in reverse), then the network namespace,
/// the pod cgroup with whatever still runs in it, and the records. If the DEL of a network
/// that was set up fails, nothing else is removed, so that trying again runs the DEL again
/// with all it needs; after an ADD that never completed the DEL is best effort (as in
/// containerd's cleanup of a failed sandbox), or a plugin failing both would keep the
/// sandbox forever.
pub(crate) async fn destroy(config: &Config, record: &SandboxRecord) -> Result<()> {
    let netns = record.netns_path();
    let attachment = record.attachment(config, &netns);
    let del = cni::del(&record.network, &attachment, record.cni_result.as_ref())
        .await
        .with_context(|| format!("CNI DEL of sandbox {}", record.id));
    match del {
        Err(e) if record.cni_result.is_some() => return Err(e),
        Err(e) => tracing::warn!(pod = %record.uid, "{e:#} (the ADD never completed; going on)"),
        Ok(()) => {}
    }
    let (cgroup, name) = (record.pod_cgroup.clone(), record.netns.clone());
    blocking(move || {
        sys::kill_and_remove_cgroup(&cgroup)?;
        sys::netns_del(&name)
    })
    .await?;
    for path in [
        SandboxRecord::path(config, &record.uid),
        PodState::path(&config.state_dir, &record.uid),
    ] {
        remove_file(&path)?;
    }
    Ok(())
}

/// A JSON file, None if there is none.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(text) => serde_json::from_slice(&text)
            .map(Some)
            .with_context(|| format!("parse {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Removes a file that may be gone already.
pub(crate) fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// A new sandbox or container id: 64 hex digits, as containerd's.
pub(crate) fn new_id() -> Result<String> {
    let mut bytes = [0u8; 32];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if usize::try_from(n).ok() != Some(bytes.len()) {
        return Err(std::io::Error::last_os_error()).context("getrandom");
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
