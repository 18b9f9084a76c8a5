//! The CA of a [`super::KubeMesh`]: the mesh's own, `mesh-agent ca serve` run as the Deployment
//! `mesh-ca` of deploy/ca/ runs it, or istiod ([`super::istiod`]). There is no pod network for
//! it here, so it runs in the control plane's network namespace (10.255.0.254 on the fabric,
//! reached by the agents at `https://10.255.0.254:15012`) and a cgroup of its own. The mesh's
//! CA runs with:
//!
//! - the arguments of the applied Deployment's container (`--config` pointing at this
//!   machine's copy of the ConfigMap's `ca.yaml`, JSON logs);
//! - the files its pod would mount (the Secret `mesh-ca`), written into its own directory;
//! - `serverNames` extended with 10.255.0.254, the address the agents dial here;
//! - the API credentials of ServiceAccount `mesh-system/mesh-ca`, so the shipped RBAC is
//!   exactly what it gets.
//!
//! The Deployment itself is scaled to 0, as the harness kubelets cannot run its pod. The
//! process goes with the mesh, also on panic (and with the cluster's cgroups, whatever
//! happens).

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::ca_service::{stop_process, wait_until_ready};
use crate::cluster::{read_log, wait_for_line};
use crate::pod::{run_with_timeout, tail_of};
use crate::sys;

/// The CA's Deployment, ServiceAccount and ConfigMap, as deploy/ca/ names them.
pub const CA_DEPLOYMENT: &str = "mesh-ca";
pub const CA_SERVICE_ACCOUNT: &str = "mesh-ca";
pub(super) const CA_CONFIGMAP: &str = "mesh-ca-config";
pub(super) const CA_CONFIG_KEY: &str = "ca.yaml";
/// The Secret with the signing certificate and key (`ca.crt`, `ca.key`).
pub const CA_SECRET: &str = "mesh-ca";
/// The ConfigMap with the roots the agents mount (`roots.pem`), made with the Secret.
pub const CA_ROOTS_CONFIGMAP: &str = "mesh-ca-root-cert";
pub const CA_ROOTS_KEY: &str = "roots.pem";
/// The audience of the agents' tokens (Istio's).
pub const CA_AUDIENCE: &str = "istio-ca";
/// The port of Istio's CA API, where the CA listens (`listen` of `ca.yaml`).
pub const CA_GRPC_PORT: u16 = 15012;

/// How the CA is run: for the mesh's, from the applied Deployment (see [`super::KubeMesh`]).
#[derive(Debug, Clone)]
pub(super) struct Launch {
    pub(super) program: PathBuf,
    /// With this machine's paths (`ca serve --config ...`).
    pub(super) args: Vec<OsString>,
    /// Its whole environment, nothing inherited.
    pub(super) env: Vec<(OsString, OsString)>,
    /// The readiness probe's port and path.
    pub(super) ready_port: u16,
    pub(super) ready_path: String,
}

/// The CA process of a [`super::KubeMesh`]; see the module documentation.
pub struct KubeCa {
    dir: PathBuf,
    cgroup: PathBuf,
    netns: PathBuf,
    launch: Mutex<Option<Launch>>,
    process: Mutex<Option<Child>>,
}

impl KubeCa {
    /// Names everything; nothing runs until [`KubeCa::start`].
    pub(super) fn new(dir: PathBuf, cgroup: PathBuf, netns: PathBuf) -> KubeCa {
        KubeCa {
            dir,
            cgroup,
            netns,
            launch: Mutex::new(None),
            process: Mutex::new(None),
        }
    }

    /// Its directory and working directory: `serve.log`; for the mesh's CA `ca.yaml` and the
    /// mounted Secret's files (`root/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This machine's `ca.yaml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CA_CONFIG_KEY)
    }

    /// Where the CA logs (JSON lines; every run appends).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("serve.log")
    }

    pub(super) fn configure(&self, launch: Launch) {
        *self.launch.lock().unwrap_or_else(|e| e.into_inner()) = Some(launch);
    }

    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.process.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the CA and waits until its readiness probe answers 200.
    pub fn start(&self) -> Result<()> {
        if self.running() {
            bail!("the CA service is running already");
        }
        let launch = self
            .launch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .context("the CA service is not set up")?;
        sys::mkdir_all(&self.dir)?;
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let mut cmd = Command::new(&launch.program);
        cmd.args(&launch.args)
            .env_clear()
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        sys::mkdir_all(&self.cgroup)?;
        sys::place(&mut cmd, &self.cgroup, &self.netns)?;
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", launch.program.display()))?;
        let url = format!(
            "http://127.0.0.1:{}{}",
            launch.ready_port, launch.ready_path
        );
        wait_until_ready(&mut child, &log_path, || self.http_status(&url))?;
        *self.lock() = Some(child);
        Ok(())
    }

    /// Stops the CA: SIGTERM, then waits (up to 10 s, then SIGKILL and an error).
    pub fn stop(&self) -> Result<ExitStatus> {
        stop_process(self.lock().take(), &self.log_path())
    }

    pub fn running(&self) -> bool {
        match self.lock().as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process at once (teardown); idempotent.
    pub(super) fn kill(&self) {
        if let Some(mut child) = self.lock().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every JSON line the CA has logged (all runs), fields flattened.
    pub fn logs(&self) -> Result<Vec<Value>> {
        read_log(&self.log_path(), 0)
    }

    /// The last lines of its log, for messages.
    pub fn log_tail(&self) -> String {
        tail_of(&self.log_path())
    }

    /// Polls the log until a line satisfies `pred`.
    pub fn wait_for_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        wait_for_line(&self.log_path(), pred, timeout).context("the CA")
    }

    /// The HTTP status of `GET url` from the CA's netns; `None` while nothing answers.
    fn http_status(&self, url: &str) -> Result<Option<u16>> {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "3",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(url)
        .stdin(Stdio::null());
        sys::place(&mut cmd, &self.cgroup, &self.netns)?;
        let out = run_with_timeout(&mut cmd, Duration::from_secs(8))
            .with_context(|| format!("curl {url}"))?;
        match out.code() {
            Some(0) => Ok(out.stdout_str().trim().parse().ok()),
            // Couldn't connect, timed out, empty reply, connection reset.
            Some(7 | 28 | 52 | 56) => Ok(None),
            _ => bail!(
                "curl {url} exited {}: {}",
                out.status,
                out.stderr_str().trim()
            ),
        }
    }
}

impl Drop for KubeCa {
    fn drop(&mut self) {
        if thread::panicking() && self.log_path().exists() {
            eprintln!("--- CA log ---\n{}", self.log_tail());
        }
        self.kill();
    }
}

/// The container's arguments for `mesh-agent` as the harness runs it: `--config` this
/// machine's `ca.yaml`, JSON logs whatever the Deployment says.
pub(super) fn ca_args(container: &Value, config: &Path) -> Result<Vec<OsString>> {
    let args = container["args"]
        .as_array()
        .context("the CA's container has no args")?;
    let mut words = args.iter().filter_map(Value::as_str);
    match (words.next(), words.next()) {
        (Some("ca"), Some("serve")) => {}
        other => bail!("the Deployment mesh-ca runs `mesh-agent {other:?}`, not `ca serve`"),
    }
    let mut out: Vec<OsString> = ["--log-format", "json", "ca", "serve"]
        .into_iter()
        .map(OsString::from)
        .collect();
    let mut configured = false;
    while let Some(word) = words.next() {
        match word {
            "--config" => {
                words.next();
                out.extend(["--config".into(), config.into()]);
                configured = true;
            }
            "--log-format" => {
                words.next();
            }
            other => out.push(other.into()),
        }
    }
    if !configured {
        bail!("the Deployment mesh-ca runs `ca serve` without --config");
    }
    Ok(out)
}

/// The readiness probe's (port, path), a named port resolved against the container's ports.
pub(super) fn readiness(container: &Value) -> Result<(u16, String)> {
    let probe = &container["readinessProbe"]["httpGet"];
    let path = probe["path"]
        .as_str()
        .context("the CA's container has no httpGet readiness probe")?;
    let port = match &probe["port"] {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64()),
        _ => None,
    }
    .and_then(|p| u16::try_from(p).ok())
    .context("the CA's readiness probe names no port of its container")?;
    Ok((port, path.to_owned()))
}
