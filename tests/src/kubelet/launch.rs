//! Starting `mesh-kubelet` on a node of a [`KubeCluster`], and running programs in its pods
//! the way `kubectl exec` does.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use super::sandbox::PodState;
use super::write_node_conflist;
use crate::kube::{KubeCluster, tool};
use crate::pod::{RunOutput, run_with_timeout, tail_of};
use crate::{ChildGuard, sys};

/// How long a kubelet may take to register its Node.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a kubelet may take to stop its pods on SIGTERM (`--cleanup-on-exit`): they stop
/// together, each within its grace period (at most 5 s) and a CNI DEL.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// mesh-kubelet plays kube-proxy with the node's credentials, so the nodes get kube-proxy's
/// role (the Node authorizer alone does not let a node read EndpointSlices).
const PROXIER_BINDING: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: mesh-kubelet-node-proxier}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: system:node-proxier}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:nodes"}]
"#;
/// The CNI reference plugins a node's CNI bin dir links to.
const CNI_PLUGINS: [&str; 5] = ["bridge", "host-local", "loopback", "ptp", "portmap"];

/// The `mesh-kubelet` binary: `$MESH_KUBELET_BIN`, else next to the running program or its
/// parent directory (cargo puts test binaries in `target/<profile>/deps`, binaries in
/// `target/<profile>`).
pub fn kubelet_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MESH_KUBELET_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().context("find the running program")?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("mesh-kubelet"))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "mesh-kubelet not found next to {} (build it with `cargo build -p mesh-tests --bin mesh-kubelet`, or set MESH_KUBELET_BIN)",
                exe.display()
            )
        })
}

/// A running `mesh-kubelet` for one node, in the node's netns and cgroup, with the node's
/// credentials. Its files live in `<cluster workdir>/<node>-kubelet/`: `state/` (its
/// `--state-dir`), `cni-conf/` (the node conflist, see [`write_node_conflist`]), `cni-bin/`
/// (links to the CNI reference plugins; an installer may add its plugin there), `hosts`, and
/// `kubelet.log`. Stopped on drop (SIGTERM: it stops its pods and removes their sandboxes).
pub struct KubeletProcess {
    guard: Option<ChildGuard>,
    node: String,
    dir: PathBuf,
    netns_prefix: String,
    /// Its command line, for a restart.
    args: Vec<OsString>,
}

impl KubeletProcess {
    /// Writes the node's CNI config (bridge + host-local, then `extra_plugins`) and starts the
    /// kubelet with `--cleanup-on-exit`; returns once it has registered its Node.
    pub fn start(kc: &KubeCluster, node: &str, extra_plugins: &[Value]) -> Result<Self> {
        let cluster = kc.cluster();
        let n = cluster.node(node)?;
        let dir = cluster.workdir().join(format!("{node}-kubelet"));
        let mut kubelet = KubeletProcess {
            guard: None,
            node: node.to_owned(),
            // `-pod`: apart from the names of the harness's own pods (`{id}-{node}-{pod}`).
            netns_prefix: format!("{}-{node}-pod", cluster.id()),
            dir,
            args: Vec::new(),
        };
        let (state, conf, bin) = (
            kubelet.state_dir(),
            kubelet.cni_conf_dir(),
            kubelet.cni_bin_dir(),
        );
        sys::mkdir_all(&state)?;
        link_cni_plugins(&bin)?;
        write_node_conflist(&conf, n.index(), &state.join("host-local"), extra_plugins)?;
        let kubeconfig = kc.control_plane().node_kubeconfig(node)?;
        let mut args: Vec<OsString> = vec!["--kubeconfig".into(), kubeconfig.into()];
        let flags = [
            ("--node", node.to_owned()),
            ("--node-ip", n.ipv4().to_string()),
            ("--node-ip6", n.ipv6().to_string()),
            ("--cgroup-root", n.cgroup().display().to_string()),
            (
                "--cgroup-driver",
                kc.cgroup_driver(node)?.as_str().to_owned(),
            ),
            ("--cni-bin-dir", bin.display().to_string()),
            ("--cni-conf-dir", conf.display().to_string()),
            ("--netns-prefix", kubelet.netns_prefix.clone()),
            ("--state-dir", state.display().to_string()),
            ("--hosts-file", kubelet.hosts_file().display().to_string()),
        ];
        for (flag, value) in flags {
            args.push(flag.into());
            args.push(value.into());
        }
        args.push("--cleanup-on-exit".into());
        kubelet.args = args;
        kc.control_plane().apply(PROXIER_BINDING)?;
        kubelet.launch(kc)?;
        Ok(kubelet)
    }

    /// Kills the kubelet (SIGKILL, as a crash: its pods keep running) and starts it again;
    /// the new one adopts the pods. Returns once it has registered its Node.
    pub fn crash_and_restart(&mut self, kc: &KubeCluster) -> Result<()> {
        if let Some(mut guard) = self.guard.take() {
            guard.kill();
        }
        self.launch(kc)
    }

    fn launch(&mut self, kc: &KubeCluster) -> Result<()> {
        let bin = kubelet_bin()?;
        let mut cmd = kc
            .cluster()
            .node_command(&self.node, &bin.to_string_lossy(), &self.args)?;
        let log_path = self.log_path();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let offset = log.metadata()?.len();
        cmd.stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().context("spawn mesh-kubelet")?;
        let guard = self.guard.insert(ChildGuard::new(
            child,
            format!("mesh-kubelet of {}", self.node),
        ));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = fs::read(&log_path).unwrap_or_default();
            let new = text.get(offset as usize..).unwrap_or_default();
            if String::from_utf8_lossy(new).contains("mesh-kubelet ready") {
                return Ok(());
            }
            if let Some(status) = guard.child_mut().try_wait()? {
                bail!(
                    "mesh-kubelet of {} exited ({status}) before it was ready; {}",
                    self.node,
                    tail_of(&log_path)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "mesh-kubelet of {} not ready after {READY_TIMEOUT:?}; {}",
                    self.node,
                    tail_of(&log_path)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }
    /// Its `--state-dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni-conf")
    }
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni-bin")
    }
    /// The node's pods' /etc/hosts.
    pub fn hosts_file(&self) -> PathBuf {
        self.dir.join("hosts")
    }
    /// Its log (every run appends to it).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("kubelet.log")
    }
    /// The last lines of its log, for messages.
    pub fn log_tail(&self) -> String {
        tail_of(&self.log_path())
    }

    /// The pod's state file, once its sandbox is up.
    pub fn pod_state(&self, uid: &str) -> Result<Option<PodState>> {
        PodState::read(&self.state_dir(), uid)
    }

    /// A `Command` that runs `program` in the pod as `kubectl exec` would: in its first
    /// container's cgroup and its netns, with its /etc/hosts.
    pub fn pod_command<I, S>(&self, uid: &str, program: &str, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let state = self
            .pod_state(uid)?
            .with_context(|| format!("pod {uid} has no sandbox on {}", self.node))?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        sys::place(&mut cmd, &state.container_cgroup, &state.netns)?;
        sys::with_hosts_file(&mut cmd, &self.hosts_file())?;
        Ok(cmd)
    }

    /// Runs `program` in the pod (see [`KubeletProcess::pod_command`]) to completion.
    pub fn exec<I, S>(
        &self,
        uid: &str,
        program: &str,
        args: I,
        timeout: Duration,
    ) -> Result<RunOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_with_timeout(&mut self.pod_command(uid, program, args)?, timeout)
            .with_context(|| format!("{program} in pod {uid}"))
    }

    /// SIGTERM, and waits until it has stopped its pods and exited.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut guard) = self.guard.take() else {
            bail!("mesh-kubelet of {} is not running", self.node);
        };
        let child = guard.child_mut();
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "mesh-kubelet of {} still running {STOP_TIMEOUT:?} after SIGTERM (killed); {}",
            self.node,
            self.log_tail()
        )
    }
}

impl Drop for KubeletProcess {
    fn drop(&mut self) {
        if self.guard.is_some()
            && let Err(e) = self.stop()
        {
            eprintln!("mesh-tests: {e:#}");
        }
        // Whatever a kubelet that failed to stop left (the cluster's teardown kills the
        // processes and removes the cgroups, but knows nothing of the pods' netns).
        let prefix = format!("{}-", self.netns_prefix);
        let leftovers = fs::read_dir(sys::NETNS_DIR).into_iter().flatten().flatten();
        for name in leftovers.filter_map(|e| e.file_name().into_string().ok()) {
            if name.starts_with(&prefix)
                && let Err(e) = sys::netns_del(&name)
            {
                eprintln!("mesh-tests: {e:#}");
            }
        }
    }
}

/// `dir` with a link to each CNI reference plugin (see [`crate::kube::tool`]).
fn link_cni_plugins(dir: &Path) -> Result<()> {
    sys::mkdir_all(dir)?;
    for plugin in CNI_PLUGINS {
        let link = dir.join(plugin);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(tool(plugin)?, &link)
                .with_context(|| format!("link {}", link.display()))?;
        }
    }
    Ok(())
}
