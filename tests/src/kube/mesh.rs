//! The mesh installed on a [`KubeCluster`] as an operator installs it: `kubectl apply
//! --server-side -k deploy/`, the CA Secret, `mesh-cni install` into each node's CNI
//! directories, and per node one `mesh-agent` run as the DaemonSet runs it: its arguments from
//! the applied DaemonSet, its mesh settings from the applied ConfigMap, the API credentials of
//! its ServiceAccount (so the shipped RBAC is what it gets), and its process in a pod cgroup
//! below the node's kubepods, where the DaemonSet's pod would be.
//!
//! The harness kubelets (`mesh-kubelet`) play the kubelet and the runtime for every other pod.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use super::{CgroupDriver, KubeCluster};
use crate::kubelet::KubeletProcess;
use crate::kubelet::cgroups::{QosClass, container_cgroup, pod_cgroup};
use crate::pod::{RunOutput, run_with_timeout};
use crate::sys;

/// The agent's namespace and ServiceAccount, as deploy/ names them.
pub const MESH_NAMESPACE: &str = "mesh-system";
const AGENT_SERVICE_ACCOUNT: &str = "mesh-agent";
const AGENT_DAEMONSET: &str = "mesh-agent";
const MESH_CONFIGMAP: &str = "mesh-config";
/// How long a pod may take from creation to Ready (scheduling, sandbox, enrolment).
pub const POD_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The workspace's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives in the workspace")
        .join("deploy")
}

/// The `mesh-cni` binary, next to the agent's.
pub fn cni_plugin_bin() -> Result<PathBuf> {
    let agent = crate::agent_bin();
    let bin = agent.with_file_name("mesh-cni");
    if !bin.is_file() {
        bail!(
            "mesh-cni not found at {} (build it with `cargo build --release -p mesh-cni`)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A [`KubeCluster`] with the mesh installed, a harness kubelet per node, and the agents.
pub struct KubeMesh {
    // Fields drop in order: kubelets (they stop their pods) before the cluster.
    kubelets: Mutex<BTreeMap<String, KubeletProcess>>,
    kc: KubeCluster,
}

/// The UID of the pod `namespace/name` the kubelet runs, from its state files.
fn running_pod(kubelet: &KubeletProcess, namespace: &str, name: &str) -> Result<Option<String>> {
    let dir = kubelet.state_dir().join("pods");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(None);
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(uid) = entry
            .path()
            .file_stem()
            .and_then(OsStr::to_str)
            .map(str::to_owned)
        else {
            continue;
        };
        if let Some(state) = kubelet.pod_state(&uid)?
            && state.namespace == namespace
            && state.name == name
        {
            return Ok(Some(uid));
        }
    }
    Ok(None)
}

/// Which nodes and, per node, which cgroup driver its kubelet uses.
pub fn two_nodes() -> [(&'static str, CgroupDriver); 2] {
    [
        ("node-a", CgroupDriver::Systemd),
        ("node-b", CgroupDriver::Cgroupfs),
    ]
}

impl KubeMesh {
    /// The control plane, the mesh installed from deploy/, a kubelet per node with mesh-cni
    /// chained, and the agents started (ready).
    pub fn start(nodes: &[(&str, CgroupDriver)]) -> Result<Self> {
        let mesh = Self::without_agents(nodes)?;
        mesh.start_agents()?;
        Ok(mesh)
    }

    /// Like [`KubeMesh::start`], but no agent runs yet.
    pub fn without_agents(nodes: &[(&str, CgroupDriver)]) -> Result<Self> {
        let kc = nodes
            .iter()
            .fold(KubeCluster::builder(), |b, (name, driver)| {
                b.node(name, *driver)
            })
            .build()?;
        let mesh = Self {
            kubelets: Mutex::new(BTreeMap::new()),
            kc,
        };
        mesh.install()?;
        for (node, _) in nodes {
            mesh.start_kubelet(node)?;
        }
        Ok(mesh)
    }

    pub fn kube(&self) -> &KubeCluster {
        &self.kc
    }

    pub fn cluster(&self) -> &crate::Cluster {
        self.kc.cluster()
    }

    /// `kubectl ARGS` as admin; fails unless it exits 0.
    pub fn kubectl<I, S>(&self, args: I) -> Result<RunOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.kc.control_plane().kubectl(args)
    }

    /// `kubectl apply --server-side` of YAML text.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        self.kc.control_plane().apply(yaml)
    }

    /// deploy/ applied with kubectl's kustomize, server-side, and the CA Secret the DaemonSet
    /// mounts, made from the cluster's CA as docs/kubernetes.md says.
    fn install(&self) -> Result<()> {
        let deploy = deploy_dir();
        self.kubectl([
            OsStr::new("apply"),
            OsStr::new("--server-side"),
            OsStr::new("-k"),
            deploy.as_os_str(),
        ])?;
        let ca = self.cluster().ca_dir();
        let cert = format!("--from-file=ca.crt={}", ca.join("ca-cert.pem").display());
        let key = format!("--from-file=ca.key={}", ca.join("ca-key.pem").display());
        self.kubectl([
            "-n",
            MESH_NAMESPACE,
            "create",
            "secret",
            "generic",
            "mesh-ca",
            &cert,
            &key,
        ])?;
        Ok(())
    }

    /// Starts the node's harness kubelet and chains mesh-cni into its CNI config with the
    /// installer the DaemonSet's init container runs.
    fn start_kubelet(&self, node: &str) -> Result<()> {
        let kubelet = KubeletProcess::start(&self.kc, node, &[])?;
        let mut install = std::process::Command::new(cni_plugin_bin()?);
        install
            .arg("install")
            .arg("--cni-conf-dir")
            .arg(kubelet.cni_conf_dir())
            .arg("--cni-bin-dir")
            .arg(kubelet.cni_bin_dir())
            .arg("--agent-socket")
            .arg(self.cni_socket(node));
        let out = run_with_timeout(&mut install, Duration::from_secs(20))?;
        if !out.success() {
            bail!("mesh-cni install on {node} failed: {}", out.stderr_str());
        }
        self.kubelets
            .lock()
            .unwrap()
            .insert(node.to_owned(), kubelet);
        Ok(())
    }

    /// Where the node's agent listens for its CNI plugin.
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("cni.sock")
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.cluster().workdir().join(format!("{node}-mesh"))
    }

    pub fn start_agents(&self) -> Result<()> {
        for node in self.cluster().nodes() {
            self.start_agent(node.name())?;
        }
        Ok(())
    }

    /// Starts the node's agent as its DaemonSet pod would run (see the module's doc) and
    /// waits until it is ready.
    pub fn start_agent(&self, node: &str) -> Result<()> {
        let dir = self.node_dir(node);
        sys::mkdir_all(&dir)?;
        let mesh_config = dir.join("mesh.yaml");
        std::fs::write(&mesh_config, self.mesh_config(node)?)
            .with_context(|| format!("write {}", mesh_config.display()))?;
        let args = self.daemonset_args(node, &mesh_config)?;
        let kubeconfig = self
            .kc
            .control_plane()
            .service_account_kubeconfig(MESH_NAMESPACE, AGENT_SERVICE_ACCOUNT)?;
        let cgroup = self.agent_cgroup(node)?;
        sys::mkdir_all(&cgroup)?;
        self.cluster().spawn_agent_with_env(
            node,
            args,
            &cgroup,
            vec![("KUBECONFIG".to_owned(), kubeconfig.into_os_string())],
        )
    }

    pub fn stop_agent(&self, node: &str) -> Result<std::process::ExitStatus> {
        self.cluster().stop_agent(node)
    }

    /// The agent container's arguments from the applied DaemonSet, `$(NODE_NAME)` expanded,
    /// with the node's own mesh settings file, and without the log format and pin dir the
    /// harness sets itself.
    fn daemonset_args(&self, node: &str, mesh_config: &Path) -> Result<Vec<OsString>> {
        let ds = self.get_json(&["-n", MESH_NAMESPACE, "get", "daemonset", AGENT_DAEMONSET])?;
        let args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .context("the DaemonSet's agent container has no args")?;
        let mut out: Vec<OsString> = Vec::new();
        let mut words = args.iter().filter_map(Value::as_str);
        let first = words.next().context("empty args")?;
        if first != "run" {
            bail!("the DaemonSet runs `mesh-agent {first}`, not `run`");
        }
        while let Some(word) = words.next() {
            match word {
                "--mesh-config" => {
                    words.next();
                    out.extend(["--mesh-config".into(), mesh_config.into()]);
                }
                "--log-format" => {
                    words.next();
                }
                other => out.push(other.replace("$(NODE_NAME)", node).into()),
            }
        }
        Ok(out)
    }

    /// The applied ConfigMap's `mesh.yaml` with what differs on this machine: the CA files
    /// (the Secret's, which no kubelet mounts here), the node's cgroup root and driver (the
    /// nodes share one machine, so each has its own `--cgroup-root`) and its CNI socket.
    fn mesh_config(&self, node: &str) -> Result<String> {
        let cm = self.get_json(&["-n", MESH_NAMESPACE, "get", "configmap", MESH_CONFIGMAP])?;
        let text = cm["data"]["mesh.yaml"]
            .as_str()
            .context("the ConfigMap mesh-config has no mesh.yaml")?;
        let mut config: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).context("parse mesh.yaml of the ConfigMap")?;
        let ca = self.cluster().ca_dir();
        let n = self.cluster().node(node)?;
        let cgroup_root = n
            .cgroup()
            .strip_prefix(sys::cgroup2_mount())
            .with_context(|| format!("{} is not below the cgroup2 mount", n.cgroup().display()))?;
        let set = |config: &mut serde_yaml_ng::Value, path: &[&str], value: String| {
            let mut at = config;
            for key in &path[..path.len() - 1] {
                at = &mut at[*key];
            }
            at[path[path.len() - 1]] = serde_yaml_ng::Value::String(value);
        };
        set(
            &mut config,
            &["identity", "caCert"],
            ca.join("ca-cert.pem").display().to_string(),
        );
        set(
            &mut config,
            &["identity", "caKey"],
            ca.join("ca-key.pem").display().to_string(),
        );
        set(
            &mut config,
            &["kubelet", "cgroupRoot"],
            format!("/{}", cgroup_root.display()),
        );
        set(
            &mut config,
            &["kubelet", "cgroupDriver"],
            self.kc.cgroup_driver(node)?.as_str().to_owned(),
        );
        set(
            &mut config,
            &["cni", "socket"],
            self.cni_socket(node).display().to_string(),
        );
        serde_yaml_ng::to_string(&config).context("write mesh.yaml")
    }

    /// Where the DaemonSet's pod on `node` would have its container: a Burstable pod (requests,
    /// no limits) below the node's kubepods. The pod object is the DaemonSet controller's when
    /// it exists (its UID names the cgroup).
    fn agent_cgroup(&self, node: &str) -> Result<PathBuf> {
        let pods = self.get_json(&[
            "-n",
            MESH_NAMESPACE,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=mesh-agent",
            "--field-selector",
            &format!("spec.nodeName={node}"),
        ])?;
        let uid = pods["items"][0]["metadata"]["uid"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("00000000-0000-4000-8000-{:012}", node.len()));
        let driver = self.kc.cgroup_driver(node)?;
        let root = self.cluster().node(node)?.cgroup().to_owned();
        let pod = pod_cgroup(&root, driver, QosClass::Burstable, &uid);
        Ok(container_cgroup(&pod, driver, "mesh-agent"))
    }

    fn get_json(&self, args: &[&str]) -> Result<Value> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.kubectl(all)?;
        serde_json::from_slice(&out.stdout).context("kubectl printed no JSON")
    }

    /// The pod's UID and node.
    pub fn pod_placement(&self, namespace: &str, name: &str) -> Result<(String, String)> {
        let pod = self.get_json(&["-n", namespace, "get", "pod", name])?;
        let uid = pod["metadata"]["uid"].as_str().context("pod without uid")?;
        let node = pod["spec"]["nodeName"]
            .as_str()
            .with_context(|| format!("pod {namespace}/{name} is not scheduled"))?;
        Ok((uid.to_owned(), node.to_owned()))
    }

    /// Runs `program ARGS` in the pod, as `kubectl exec` does (its container's cgroup and its
    /// network namespace), to completion. The pod is found through the kubelets' own records,
    /// as a runtime's `exec` finds it, so this works while the API server is away.
    pub fn exec<I, S>(
        &self,
        namespace: &str,
        pod: &str,
        program: &str,
        args: I,
        timeout: Duration,
    ) -> Result<RunOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let kubelets = self.kubelets.lock().unwrap();
        for kubelet in kubelets.values() {
            if let Some(uid) = running_pod(kubelet, namespace, pod)? {
                return kubelet.exec(&uid, program, args, timeout);
            }
        }
        bail!("no kubelet runs a pod {namespace}/{pod}")
    }

    /// `curl URL` from the pod, at most `max_time`.
    pub fn curl(
        &self,
        namespace: &str,
        pod: &str,
        url: &str,
        max_time: Duration,
    ) -> Result<RunOutput> {
        let secs = format!("{:.1}", max_time.as_secs_f32());
        self.exec(
            namespace,
            pod,
            "curl",
            ["-sS", "--max-time", &secs, url],
            max_time + Duration::from_secs(5),
        )
    }

    /// The pod's IPv4 address, once its status has one.
    pub fn pod_ip(&self, namespace: &str, pod: &str) -> Result<String> {
        let pod = self.get_json(&["-n", namespace, "get", "pod", pod])?;
        pod["status"]["podIP"]
            .as_str()
            .map(str::to_owned)
            .context("the pod has no IP yet")
    }

    /// Waits until every pod matching `selector` in `namespace` is Ready.
    pub fn wait_ready(&self, namespace: &str, selector: &str) -> Result<()> {
        self.kc.control_plane().wait_for(
            "condition=Ready",
            ["pod", "-n", namespace, "-l", selector],
            POD_READY_TIMEOUT,
        )
    }

    /// Waits until `node`'s kube-proxy rules (in its kernel, not the file that loads them)
    /// send connections to `pod_ip`, an IPv4 Service endpoint: a pod is Ready before its
    /// EndpointSlice names it and before every node's rules follow, as in Kubernetes.
    pub fn wait_routed_to(&self, node: &str, pod_ip: &str) -> Result<()> {
        let needle = format!("{pod_ip} . ");
        let list = ["list", "table", "ip", "kubeproxy"];
        let cluster = self.cluster();
        let routed = crate::sys::poll(POD_READY_TIMEOUT, Duration::from_millis(100), || {
            cluster
                .run_in_node(node, "nft", list, Duration::from_secs(5))
                .is_ok_and(|out| out.success() && out.stdout_str().contains(&needle))
        });
        if !routed {
            bail!(
                "{node}'s kube-proxy rules do not route to {pod_ip} within {POD_READY_TIMEOUT:?}"
            );
        }
        Ok(())
    }

    /// Runs `f` with the node's kubelet.
    pub fn with_kubelet<T>(
        &self,
        node: &str,
        f: impl FnOnce(&mut KubeletProcess) -> Result<T>,
    ) -> Result<T> {
        let mut kubelets = self.kubelets.lock().unwrap();
        let kubelet = kubelets
            .get_mut(node)
            .ok_or_else(|| anyhow!("no harness kubelet on {node}"))?;
        f(kubelet)
    }

    /// What dropping the mesh does, for a signal handler that ends the process instead
    /// ([`crate::interrupt`]): stops the kubelets (each stops its pods and removes their
    /// sandboxes), then tears the nodes down, which stops the agents and kills the control
    /// plane with the cluster's cgroups. Idempotent.
    pub fn teardown(&self) {
        let kubelets =
            std::mem::take(&mut *self.kubelets.lock().unwrap_or_else(|p| p.into_inner()));
        drop(kubelets);
        self.cluster().teardown();
    }
}
