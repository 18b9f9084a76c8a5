//! The mesh installed on a [`KubeCluster`] as an operator installs it: `kubectl apply
//! --server-side -k deploy/`, the CA Secret and the roots ConfigMap, the CA service run as its
//! Deployment runs it ([`super::ca`]), `mesh-cni install` into each node's CNI directories, and
//! per node one `mesh-agent` run as the DaemonSet runs it: its arguments from the applied
//! DaemonSet, its mesh settings from the applied ConfigMap, the files its pod mounts (the roots
//! ConfigMap, and its projected token for the CA: a real TokenRequest bound to the node's
//! DaemonSet pod), the API credentials of its ServiceAccount (so the shipped RBAC is what it
//! gets), and its process in a pod cgroup below the node's kubepods, where the DaemonSet's pod
//! would be. No agent gets the signing key.
//!
//! With [`CaKind::Istiod`] it is installed as deploy/istiod/ says instead: the agents take
//! their certificates from a real istiod ([`super::istiod`]) and there is no mesh CA at all.
//!
//! The harness kubelets (`mesh-kubelet`) play the kubelet and the runtime for every other pod.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use super::ca::{
    self, CA_AUDIENCE, CA_CONFIG_KEY, CA_CONFIGMAP, CA_DEPLOYMENT, CA_GRPC_PORT,
    CA_ROOTS_CONFIGMAP, CA_ROOTS_KEY, CA_SECRET, KubeCa, Launch,
};
use super::istiod::{
    self, ISTIO_NAMESPACE, ISTIO_ROOTS_CONFIGMAP, ISTIO_ROOTS_KEY, ISTIOD_SERVER_NAME,
};
use super::{API_SERVER_IPV4, CgroupDriver, KubeCluster};
use crate::ca_service::{CaAnswer, CaCaller, request_certificate_at};
use crate::kubelet::KubeletProcess;
use crate::kubelet::cgroups::{QosClass, container_cgroup, pod_cgroup};
use crate::pod::{RunOutput, run_with_timeout};
use crate::sys;

/// How long the DaemonSet controller and the scheduler may take to give a new node its
/// agent pod.
const AGENT_POD_TIMEOUT: Duration = Duration::from_secs(10);
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

/// Which CA signs the workload certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    /// The mesh's CA service (deploy/ and its deploy/ca/).
    Mesh,
    /// istiod (deploy/istiod/ in place of deploy/agent/ and deploy/ca/).
    Istiod,
}

/// The env var of the agent's container that overrides `identity.ca.address`
/// (`mesh-agent run --ca-address`).
const CA_ADDRESS_ENV: &str = "MESH_CA_ADDRESS";

/// A [`KubeCluster`] with the mesh installed, a harness kubelet per node, and the agents.
pub struct KubeMesh {
    // Fields drop in order: kubelets (they stop their pods), then the CA, before the cluster.
    kubelets: Mutex<BTreeMap<String, KubeletProcess>>,
    ca: KubeCa,
    ca_kind: CaKind,
    kc: KubeCluster,
}

/// What a container finds at a path the kubelet mounts (see [`KubeMesh::mounted_file`]).
enum Mounted {
    /// A key of a ConfigMap or Secret.
    Data(Vec<u8>),
    /// A projected service account token.
    Token {
        audience: String,
        expiration: Duration,
    },
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
        Self::start_with(nodes, CaKind::Mesh)
    }

    /// Like [`KubeMesh::start`], with the certificates from `ca`.
    pub fn start_with(nodes: &[(&str, CgroupDriver)], ca: CaKind) -> Result<Self> {
        let mesh = Self::without_agents_with(nodes, ca)?;
        mesh.start_agents()?;
        Ok(mesh)
    }

    /// Like [`KubeMesh::start`], but no agent runs yet.
    pub fn without_agents(nodes: &[(&str, CgroupDriver)]) -> Result<Self> {
        Self::without_agents_with(nodes, CaKind::Mesh)
    }

    fn without_agents_with(nodes: &[(&str, CgroupDriver)], ca_kind: CaKind) -> Result<Self> {
        let kc = nodes
            .iter()
            .fold(KubeCluster::builder(), |b, (name, driver)| {
                b.node(name, *driver)
            })
            .build()?;
        let name = match ca_kind {
            CaKind::Mesh => "mesh-ca",
            CaKind::Istiod => "istiod",
        };
        let ca = KubeCa::new(
            kc.cluster().workdir().join(name),
            kc.cluster().cgroup_dir().join(name),
            kc.control_plane().netns_path(),
        );
        let mesh = Self {
            kubelets: Mutex::new(BTreeMap::new()),
            ca,
            ca_kind,
            kc,
        };
        match ca_kind {
            CaKind::Mesh => {
                mesh.install()?;
                mesh.set_up_ca().context("set up the CA service")?;
                mesh.ca.start().context("start the CA service")?;
            }
            CaKind::Istiod => mesh.install_with_istiod()?,
        }
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

    /// deploy/ applied with kubectl's kustomize, server-side, the CA Secret the CA's
    /// Deployment mounts and the roots ConfigMap the DaemonSet mounts, made from the cluster's
    /// CA as docs/kubernetes.md says.
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
            CA_SECRET,
            &cert,
            &key,
        ])?;
        let roots = format!(
            "--from-file={CA_ROOTS_KEY}={}",
            ca.join("ca-cert.pem").display()
        );
        self.kubectl([
            "-n",
            MESH_NAMESPACE,
            "create",
            "configmap",
            CA_ROOTS_CONFIGMAP,
            &roots,
        ])?;
        Ok(())
    }

    /// deploy/crds/ (the API server here has no Istio CRDs) and deploy/istiod/, applied as
    /// deploy/istiod/ says, after istiod runs and has published its root to mesh-system.
    fn install_with_istiod(&self) -> Result<()> {
        let deploy = deploy_dir();
        self.kubectl(["create", "namespace", ISTIO_NAMESPACE])?;
        for dir in ["crds", "istiod"] {
            self.kubectl([
                OsStr::new("apply"),
                OsStr::new("--server-side"),
                OsStr::new("-k"),
                deploy.join(dir).as_os_str(),
            ])?;
        }
        let trust_domain = self.mesh_settings()?["trustDomain"]
            .as_str()
            .unwrap_or("cluster.local")
            .to_owned();
        let admin = self.kc.control_plane().admin_kubeconfig().to_owned();
        self.ca
            .configure(istiod::launch(self.ca.dir(), &admin, &trust_domain)?);
        self.ca.start().context("start istiod")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let root = loop {
            let out = self.kc.control_plane().kubectl_output([
                "-n",
                MESH_NAMESPACE,
                "get",
                "configmap",
                ISTIO_ROOTS_CONFIGMAP,
                "-o",
                "json",
            ])?;
            if out.success() {
                let cm: Value = serde_json::from_slice(&out.stdout).context("parse ConfigMap")?;
                if let Some(root) = cm["data"][ISTIO_ROOTS_KEY].as_str() {
                    break root.to_owned();
                }
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "istiod published no {ISTIO_ROOTS_CONFIGMAP} in {MESH_NAMESPACE}; {}",
                    self.ca.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        sys::write_atomic(&self.ca_roots_path(), root.as_bytes())
    }

    /// Reads how the Deployment runs the CA (see [`super::ca`]), writes this machine's
    /// `ca.yaml` and the files its pod mounts, and scales the Deployment to 0 (the harness
    /// kubelets cannot run it; this process plays its pod).
    fn set_up_ca(&self) -> Result<()> {
        let deployment =
            self.get_json(&["-n", MESH_NAMESPACE, "get", "deployment", CA_DEPLOYMENT])?;
        self.kubectl([
            "-n",
            MESH_NAMESPACE,
            "scale",
            "deployment",
            CA_DEPLOYMENT,
            "--replicas=0",
        ])?;
        let spec = &deployment["spec"]["template"]["spec"];
        let container = &spec["containers"][0];
        let service_account = spec["serviceAccountName"]
            .as_str()
            .context("the CA's pod has no serviceAccountName")?;
        let cm = self.get_json(&["-n", MESH_NAMESPACE, "get", "configmap", CA_CONFIGMAP])?;
        let text = cm["data"][CA_CONFIG_KEY]
            .as_str()
            .with_context(|| format!("the ConfigMap {CA_CONFIGMAP} has no {CA_CONFIG_KEY}"))?;
        let mut config: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).context("parse ca.yaml of the ConfigMap")?;
        let root = self.ca.dir().join("root");
        for key in ["signingCert", "signingKey", "trustBundle"] {
            let Some(path) = config[key].as_str().map(str::to_owned) else {
                continue;
            };
            let Mounted::Data(data) = self.mounted_file(spec, container, &path)? else {
                bail!("ca.yaml's {key} {path} is not a ConfigMap's or Secret's file");
            };
            let local = local_copy(&root, &path, &data)?;
            config[key] = serde_yaml_ng::Value::String(local.display().to_string());
        }
        config["serverNames"]
            .as_sequence_mut()
            .context("ca.yaml has no serverNames")?
            .push(API_SERVER_IPV4.to_string().into());
        let config_path = self.ca.config_path();
        let text = serde_yaml_ng::to_string(&config).context("write ca.yaml")?;
        sys::write_atomic(&config_path, text.as_bytes())?;
        let (ready_port, ready_path) = ca::readiness(container)?;
        let kubeconfig = self
            .kc
            .control_plane()
            .service_account_kubeconfig(MESH_NAMESPACE, service_account)?;
        self.ca.configure(Launch {
            program: crate::agent_bin(),
            args: ca::ca_args(container, &config_path)?,
            env: vec![
                ("KUBECONFIG".into(), kubeconfig.into_os_string()),
                ("PATH".into(), "/usr/bin:/bin".into()),
            ],
            ready_port,
            ready_path,
        });
        Ok(())
    }

    /// The CA ([`super::ca`], or istiod): its logs, its files.
    pub fn ca(&self) -> &KubeCa {
        &self.ca
    }

    /// A CA outage: stops `ca serve` (SIGTERM, then waits for it to exit).
    pub fn stop_ca(&self) -> Result<std::process::ExitStatus> {
        self.ca.stop()
    }

    /// Starts the CA service again (same configuration) and waits until it is ready.
    pub fn start_ca(&self) -> Result<()> {
        self.ca.start()
    }

    /// Where the agents reach the CA here: `https://10.255.0.254:15012`.
    pub fn ca_address(&self) -> String {
        format!("https://{API_SERVER_IPV4}:{CA_GRPC_PORT}")
    }

    /// The roots the CA's serving certificate chains to: the mesh's root, or istiod's (as it
    /// published it).
    pub fn ca_roots_path(&self) -> PathBuf {
        match self.ca_kind {
            CaKind::Mesh => self.cluster().ca_dir().join("ca-cert.pem"),
            CaKind::Istiod => self.ca.dir().join("roots.pem"),
        }
    }

    /// The name the CA's serving certificate is checked against when dialled at
    /// [`KubeMesh::ca_address`] (the mesh's CA has the address on it).
    fn ca_server_name(&self) -> Option<&'static str> {
        match self.ca_kind {
            CaKind::Mesh => None,
            CaKind::Istiod => Some(ISTIOD_SERVER_NAME),
        }
    }

    /// A fresh token for the CA as the node's agent has it: ServiceAccount
    /// `mesh-system/mesh-agent`, audience `istio-ca`, valid an hour, bound to the node's
    /// DaemonSet pod (to its Node object if there is no such pod).
    pub fn agent_ca_token(&self, node: &str) -> Result<String> {
        self.agent_token(node, CA_AUDIENCE, Duration::from_secs(3600))
    }

    fn agent_token(&self, node: &str, audience: &str, expiration: Duration) -> Result<String> {
        let pod = self.agent_pod(node)?;
        let bound = match &pod {
            Some((name, _)) => ("Pod", name.as_str()),
            None => ("Node", node),
        };
        self.kc.control_plane().bound_service_account_token(
            MESH_NAMESPACE,
            AGENT_SERVICE_ACCOUNT,
            audience,
            Some(bound),
            expiration,
        )
    }

    /// One `CreateCertificate` for `identity` from inside `node`'s netns, as the node's agent
    /// makes it, with `token` as its bearer token (`None`: no credential).
    pub fn request_certificate(
        &self,
        node: &str,
        token: Option<&str>,
        identity: &str,
    ) -> Result<CaAnswer> {
        let netns = self.cluster().node(node)?.netns_path();
        let caller = token.map_or(CaCaller::Anonymous, CaCaller::Token);
        request_certificate_at(
            &netns,
            &self.ca_address(),
            &self.ca_roots_path(),
            self.ca_server_name(),
            caller,
            identity,
        )
        .with_context(|| format!("ask the CA for {identity} from node {node}"))
    }

    /// What the container of `spec` (a PodSpec, as JSON) finds at `path`: the volume mounted
    /// at the longest prefix of it, and in it the file `path` names, as the kubelet makes it
    /// (ConfigMap, Secret and projected service account token volumes).
    fn mounted_file(&self, spec: &Value, container: &Value, path: &str) -> Result<Mounted> {
        let (mount, file) = container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let at = m["mountPath"].as_str()?.trim_end_matches('/');
                let file = path.strip_prefix(at)?.strip_prefix('/')?;
                Some((m, file, at.len()))
            })
            .max_by_key(|(_, _, len)| *len)
            .map(|(m, file, _)| (m, file))
            .with_context(|| format!("no volume of the container is mounted above {path}"))?;
        let name = mount["name"]
            .as_str()
            .context("a volumeMount without name")?;
        let volume = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .with_context(|| format!("no volume {name} for the mount of {path}"))?;
        // The key of a ConfigMap's or Secret's `items`, if they map this file.
        let key_of = |source: &Value| -> String {
            source["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|i| i["path"] == file)
                .and_then(|i| i["key"].as_str())
                .unwrap_or(file)
                .to_owned()
        };
        if let Some(cm) = volume.get("configMap") {
            let cm_name = cm["name"]
                .as_str()
                .context("a configMap volume without name")?;
            let key = key_of(cm);
            let obj = self.get_json(&["-n", MESH_NAMESPACE, "get", "configmap", cm_name])?;
            let data = obj["data"][&key]
                .as_str()
                .with_context(|| format!("the ConfigMap {cm_name} has no key {key} ({path})"))?;
            return Ok(Mounted::Data(data.as_bytes().to_vec()));
        }
        if let Some(secret) = volume.get("secret") {
            use base64::Engine as _;
            let secret_name = secret["secretName"]
                .as_str()
                .context("a secret volume without secretName")?;
            let key = key_of(secret);
            let obj = self.get_json(&["-n", MESH_NAMESPACE, "get", "secret", secret_name])?;
            let data = obj["data"][&key]
                .as_str()
                .with_context(|| format!("the Secret {secret_name} has no key {key} ({path})"))?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(data)
                .with_context(|| format!("the Secret {secret_name}'s {key}"))?;
            return Ok(Mounted::Data(data));
        }
        if let Some(projected) = volume.get("projected") {
            let token = projected["sources"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.get("serviceAccountToken"))
                .find(|t| t["path"] == file)
                .with_context(|| {
                    format!("the projected volume {name} has no serviceAccountToken {file}")
                })?;
            let audience = token["audience"]
                .as_str()
                .with_context(|| format!("the token {path} has no audience"))?;
            let expiration = token["expirationSeconds"].as_u64().unwrap_or(3600);
            return Ok(Mounted::Token {
                audience: audience.to_owned(),
                expiration: Duration::from_secs(expiration),
            });
        }
        bail!("volume {name} (mounted for {path}) is of a kind the harness does not mount")
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

    /// This machine's copy of what the node's agent container finds at `path` (a file its
    /// pod mounts, as [`KubeMesh::start_agent`] wrote it).
    pub fn agent_file(&self, node: &str, path: &str) -> PathBuf {
        below(&self.node_dir(node).join("root"), path)
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
        let mut env = vec![("KUBECONFIG".to_owned(), kubeconfig.into_os_string())];
        if ca_address_env(&self.agent_container()?).is_some() {
            env.push((CA_ADDRESS_ENV.to_owned(), self.ca_address().into()));
        }
        self.cluster()
            .spawn_agent_with_env(node, args, &cgroup, env)
    }

    /// The agent container of the applied DaemonSet.
    fn agent_container(&self) -> Result<Value> {
        let ds = self.get_json(&["-n", MESH_NAMESPACE, "get", "daemonset", AGENT_DAEMONSET])?;
        Ok(ds["spec"]["template"]["spec"]["containers"][0].clone())
    }

    pub fn stop_agent(&self, node: &str) -> Result<std::process::ExitStatus> {
        self.cluster().stop_agent(node)
    }

    /// The agent container's arguments from the applied DaemonSet, `$(NODE_NAME)` expanded,
    /// with the node's own mesh settings file, and without the log format and pin dir the
    /// harness sets itself.
    fn daemonset_args(&self, node: &str, mesh_config: &Path) -> Result<Vec<OsString>> {
        let container = self.agent_container()?;
        let args = container["args"]
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

    /// The applied ConfigMap's `mesh.yaml` with what differs on this machine: the CA's
    /// address (10.255.0.254, see [`super::ca`]; given to the agent as `MESH_CA_ADDRESS`
    /// instead when the container sets that), the name to check on the CA's certificate (the
    /// host of the address the operator gave), the files of `identity` (written into the
    /// node's directory as the kubelet would mount them into the DaemonSet's pod: the roots
    /// ConfigMap, the projected token made by a TokenRequest bound to the node's pod), the
    /// node's cgroup root and driver (the nodes share one machine, so each has its own
    /// `--cgroup-root`) and its CNI socket.
    fn mesh_config(&self, node: &str) -> Result<String> {
        let mut config = self.mesh_settings()?;
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
        let identity = &config["identity"];
        if identity.get("caCert").is_some() || identity.get("caKey").is_some() {
            bail!("mesh-config gives the agents a signing key (identity.caCert/caKey)");
        }
        if !identity["ca"].is_mapping() {
            bail!("mesh-config names no CA service (identity.ca)");
        }
        let ds = self.get_json(&["-n", MESH_NAMESPACE, "get", "daemonset", AGENT_DAEMONSET])?;
        let spec = &ds["spec"]["template"]["spec"];
        let container = &spec["containers"][0];
        // Where the agent would dial, by name; here it dials the CA's address and checks
        // that name on its certificate, as a resolver would have it.
        let overridden = ca_address_env(container);
        let named = overridden
            .or(identity["ca"]["address"].as_str())
            .context("mesh-config's identity.ca has no address")?;
        let host = host_of(named)
            .with_context(|| format!("the CA address {named} names no host"))?
            .to_owned();
        if identity["ca"].get("serverName").is_none() {
            set(&mut config, &["identity", "ca", "serverName"], host);
        }
        // With the container's override, the agent gets the dial address through it
        // ([`KubeMesh::start_agent`]) and mesh-config keeps a name that does not resolve here.
        if overridden.is_none() {
            set(
                &mut config,
                &["identity", "ca", "address"],
                self.ca_address(),
            );
        }
        let root = self.node_dir(node).join("root");
        for key in [
            &["identity", "ca", "roots"][..],
            &["identity", "ca", "token"],
            &["identity", "trustBundle"],
        ] {
            let mut at = &config;
            for k in key {
                at = &at[*k];
            }
            let Some(path) = at.as_str().map(str::to_owned) else {
                continue;
            };
            let data = match self.mounted_file(spec, container, &path)? {
                Mounted::Data(data) => data,
                Mounted::Token {
                    audience,
                    expiration,
                } => self.agent_token(node, &audience, expiration)?.into_bytes(),
            };
            let local = local_copy(&root, &path, &data)?;
            set(&mut config, key, local.display().to_string());
        }
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

    /// The applied ConfigMap's `mesh.yaml`.
    fn mesh_settings(&self) -> Result<serde_yaml_ng::Value> {
        let cm = self.get_json(&["-n", MESH_NAMESPACE, "get", "configmap", MESH_CONFIGMAP])?;
        let text = cm["data"]["mesh.yaml"]
            .as_str()
            .context("the ConfigMap mesh-config has no mesh.yaml")?;
        serde_yaml_ng::from_str(text).context("parse mesh.yaml of the ConfigMap")
    }

    /// Where the DaemonSet's pod on `node` would have its container: a Burstable pod (requests,
    /// no limits) below the node's kubepods. The pod object is the DaemonSet controller's when
    /// it exists (its UID names the cgroup).
    fn agent_cgroup(&self, node: &str) -> Result<PathBuf> {
        let uid = match self.agent_pod(node)? {
            Some((_, uid)) => uid,
            None => format!("00000000-0000-4000-8000-{:012}", node.len()),
        };
        let driver = self.kc.cgroup_driver(node)?;
        let root = self.cluster().node(node)?.cgroup().to_owned();
        let pod = pod_cgroup(&root, driver, QosClass::Burstable, &uid);
        Ok(container_cgroup(&pod, driver, "mesh-agent"))
    }

    /// The name and UID of the DaemonSet's pod on `node`, once the DaemonSet controller made
    /// it and the scheduler bound it (waiting a few seconds for that); `None` if it does not.
    fn agent_pod(&self, node: &str) -> Result<Option<(String, String)>> {
        let selector = format!("spec.nodeName={node}");
        let deadline = std::time::Instant::now() + AGENT_POD_TIMEOUT;
        loop {
            let pods = self.get_json(&[
                "-n",
                MESH_NAMESPACE,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=mesh-agent",
                "--field-selector",
                &selector,
            ])?;
            let pod = &pods["items"][0]["metadata"];
            if let (Some(name), Some(uid)) = (pod["name"].as_str(), pod["uid"].as_str()) {
                return Ok(Some((name.to_owned(), uid.to_owned())));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
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
        self.ca.kill();
        self.cluster().teardown();
    }
}

/// The CA address the agent container's env gives, overriding mesh-config's.
fn ca_address_env(container: &Value) -> Option<&str> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == CA_ADDRESS_ENV)
        .and_then(|e| e["value"].as_str())
}

/// Where [`local_copy`] puts what a pod finds at `path`.
fn below(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// The host of `https://host:port/...`.
fn host_of(address: &str) -> Option<&str> {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    let authority = rest.split('/').next()?;
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => authority,
    };
    Some(host.trim_start_matches('[').trim_end_matches(']')).filter(|h| !h.is_empty())
}

/// Writes `data`, what a pod finds at `path`, below `root` (at `root/<path>`, private to
/// root), and returns where.
fn local_copy(root: &Path, path: &str, data: &[u8]) -> Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let local = below(root, path);
    if let Some(dir) = local.parent() {
        sys::mkdir_all(dir)?;
    }
    let tmp = local.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    file.write_all(data)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &local).with_context(|| format!("rename to {}", local.display()))?;
    Ok(local)
}
