//! A real Kubernetes control plane for a test cluster: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler, in a network namespace `{id}-cp` of their own
//! that is attached to the cluster's fabric, so nodes reach the API server at
//! 10.255.0.254:6443 like a real cluster's.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::kubeconfig::{self, Credentials};
use super::pki::{CertFiles, FRONT_PROXY_CLIENT, Pki};
use super::tool;
use crate::pod::{RunOutput, run_with_timeout, tail_of};
use crate::sys;
use crate::{Cluster, Node};

/// The API server's address on the fabric (the nodes are 10.255.0.1, .2, ...).
pub const API_SERVER_IPV4: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 254);
/// The API server's IPv6 address on the fabric.
pub const API_SERVER_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, 0xfe);
pub const API_SERVER_PORT: u16 = 6443;
/// ClusterIPs of Services; the first one, 10.96.0.1, is the `kubernetes` Service's.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";
/// The `iss` of ServiceAccount tokens, as on a cluster with the default DNS domain.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// kube-controller-manager without what needs a cloud: node IPAM (pod CIDRs are the
/// harness's), cloud node lifecycle, load balancers and routes. Node lifecycle runs: it lifts
/// the `not-ready` taint a new Node gets once its kubelet reports Ready and renews its Lease.
const CONTROLLERS: &str = "*,-node-ipam-controller,\
    -cloud-node-lifecycle-controller,-service-lb-controller,-node-route-controller";
const CONTROLLER_MANAGER_PORT: u16 = 10257;
const API_SERVER: &str = "kube-apiserver";
const SCHEDULER_PORT: u16 = 10259;

/// A cold kube-apiserver on a busy 2-core machine takes several seconds; far more means it
/// is stuck.
const API_SERVER_READY_TIMEOUT: Duration = Duration::from_secs(90);
const CONTROLLERS_READY_TIMEOUT: Duration = Duration::from_secs(60);
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The Go-built programs, found before anything is made so a missing one fails at once.
struct Tools {
    etcd: PathBuf,
    apiserver: PathBuf,
    controller_manager: PathBuf,
    scheduler: PathBuf,
    kubectl: PathBuf,
}

impl Tools {
    fn find() -> Result<Tools> {
        Ok(Tools {
            etcd: tool("etcd")?,
            apiserver: tool("kube-apiserver")?,
            controller_manager: tool("kube-controller-manager")?,
            scheduler: tool("kube-scheduler")?,
            kubectl: tool("kubectl")?,
        })
    }
}

/// How long the start took, from [`ControlPlane::start`] being called.
#[derive(Debug, Clone, Copy)]
pub struct Startup {
    /// Until kube-apiserver answered `/readyz` with 200.
    pub api_server_ready: Duration,
    /// Until kube-controller-manager and kube-scheduler were healthy and the controllers had
    /// done their first work (the `default` ServiceAccount and the `kube-root-ca.crt`
    /// ConfigMap exist in namespace `default`, which creating pods there needs).
    pub controllers_ready: Duration,
}

/// One control plane process.
struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// What goes when the control plane goes: its processes (and whatever else runs in its
/// cgroup, like a `kubectl` still running) and its network namespace. Made before anything
/// else, so that a start that fails half-way leaves nothing behind.
struct Running {
    netns: String,
    cgroup: PathBuf,
    /// Behind a lock: a test may stop and start the API server of a shared control plane.
    components: Mutex<Vec<Component>>,
}

impl Running {
    /// Fails, with its log's tail, if a component has exited.
    fn check_alive(&self) -> Result<()> {
        for c in self.lock().iter_mut() {
            if let Some(status) = c.child.try_wait()? {
                bail!("{} exited ({status}); {}", c.name, tail_of(&c.log));
            }
        }
        Ok(())
    }

    fn log_tails(&self) -> String {
        self.lock()
            .iter()
            .map(|c| tail_of(&c.log))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Running {
    fn lock(&self) -> MutexGuard<'_, Vec<Component>> {
        self.components.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut components = self.lock();
        if thread::panicking() {
            for c in components.iter() {
                eprintln!("--- {} log ---\n{}", c.name, tail_of(&c.log));
            }
        }
        for c in components.iter_mut() {
            let _ = c.child.kill();
        }
        if let Err(e) = sys::kill_and_remove_cgroup(&self.cgroup) {
            eprintln!("mesh-tests: stopping the control plane: {e:#}");
        }
        for c in components.iter_mut() {
            let _ = c.child.wait();
        }
        drop(components);
        if let Err(e) = sys::netns_del(&self.netns) {
            eprintln!("mesh-tests: removing the control plane's netns: {e:#}");
        }
    }
}

/// A running control plane. Stopped (processes killed, netns removed) on drop, also on
/// panic; its files (certificates, kubeconfigs, logs, etcd data) live in the cluster's
/// workdir, removed with the cluster.
pub struct ControlPlane {
    running: Running,
    dir: PathBuf,
    kubectl: PathBuf,
    pki: Pki,
    admin_kubeconfig: PathBuf,
    node_kubeconfigs: BTreeMap<String, PathBuf>,
    /// Numbers the manifests [`ControlPlane::apply`] writes.
    manifests: AtomicU32,
    startup: Startup,
}

impl ControlPlane {
    /// Starts a control plane for `cluster` and waits until it works (see [`Startup`]).
    /// Every node gets a kubeconfig of its own ([`ControlPlane::node_kubeconfig`]).
    pub fn start(cluster: &Cluster) -> Result<ControlPlane> {
        let began = Instant::now();
        let tools = Tools::find()?;
        if cluster.node("cp").is_ok() {
            bail!("a node called `cp` would share the control plane's netns name");
        }
        let dir = cluster.workdir().join("control-plane");
        let pki_dir = dir.join("pki");
        sys::mkdir_all(&pki_dir)?;
        let pki = Pki::generate(&pki_dir, cluster.nodes().iter().map(Node::name))
            .context("make the control plane's certificates")?;
        let mut cp = ControlPlane {
            running: Running {
                netns: format!("{}-cp", cluster.id()),
                cgroup: cluster.cgroup_dir().join("cp"),
                components: Mutex::new(Vec::new()),
            },
            admin_kubeconfig: kubeconfig_in(&dir, "admin"),
            node_kubeconfigs: BTreeMap::new(),
            dir,
            kubectl: tools.kubectl.clone(),
            pki,
            manifests: AtomicU32::new(0),
            startup: Startup {
                api_server_ready: Duration::ZERO,
                controllers_ready: Duration::ZERO,
            },
        };
        sys::mkdir_all(&cp.running.cgroup)?;
        cp.connect(cluster)
            .context("attach the control plane's netns to the fabric")?;
        cp.write_kubeconfigs()?;
        cp.boot(&tools, began)
            .with_context(|| format!("start the control plane of cluster {}", cluster.id()))?;
        Ok(cp)
    }

    /// The netns, with `eth0` on the fabric bridge.
    fn connect(&self, cluster: &Cluster) -> Result<()> {
        cluster.add_fabric_host(&self.running.netns, "cp0", API_SERVER_IPV4, API_SERVER_IPV6)
    }

    fn write_kubeconfigs(&mut self) -> Result<()> {
        let server = self.server_url();
        let ca = &self.pki.ca.cert;
        let write = |name: &str, user: &str, files: &CertFiles| -> Result<PathBuf> {
            let path = kubeconfig_in(&self.dir, name);
            kubeconfig::write(
                &path,
                &server,
                ca,
                user,
                Credentials::ClientCertificate(files),
            )
            .with_context(|| format!("write {}", path.display()))?;
            Ok(path)
        };
        write("admin", "admin", &self.pki.admin)?;
        write(
            "controller-manager",
            "system:kube-controller-manager",
            &self.pki.controller_manager,
        )?;
        write("scheduler", "system:kube-scheduler", &self.pki.scheduler)?;
        let nodes = self
            .pki
            .nodes
            .iter()
            .map(|(node, files)| {
                let path = write(
                    &format!("node-{node}"),
                    &format!("system:node:{node}"),
                    files,
                )?;
                Ok((node.clone(), path))
            })
            .collect::<Result<_>>()?;
        self.node_kubeconfigs = nodes;
        Ok(())
    }

    /// Starts the components in order and waits for each stage. kube-controller-manager and
    /// kube-scheduler start only once the API server is ready: before its RBAC bootstrap
    /// policy exists, they are refused the configmap their authentication needs, and exit.
    fn boot(&mut self, tools: &Tools, began: Instant) -> Result<()> {
        self.spawn("etcd", &tools.etcd, self.etcd_args())?;
        self.spawn(API_SERVER, &tools.apiserver, self.apiserver_args())?;
        let readyz = format!("{}/readyz", self.server_url());
        self.wait_until("kube-apiserver /readyz", API_SERVER_READY_TIMEOUT, |cp| {
            Ok(cp.https_status(&readyz, true)? == Some(200))
        })?;
        self.startup.api_server_ready = began.elapsed();

        self.spawn(
            "kube-controller-manager",
            &tools.controller_manager,
            self.controller_manager_args(),
        )?;
        self.spawn("kube-scheduler", &tools.scheduler, self.scheduler_args())?;
        let api = self.server_url();
        let checks = [
            (
                format!("https://127.0.0.1:{CONTROLLER_MANAGER_PORT}/healthz"),
                false,
            ),
            (format!("https://127.0.0.1:{SCHEDULER_PORT}/readyz"), false),
            (
                format!("{api}/api/v1/namespaces/default/serviceaccounts/default"),
                true,
            ),
            (
                format!("{api}/api/v1/namespaces/default/configmaps/kube-root-ca.crt"),
                true,
            ),
        ];
        for (url, as_admin) in checks {
            self.wait_until(&format!("GET {url}"), CONTROLLERS_READY_TIMEOUT, |cp| {
                Ok(cp.https_status(&url, as_admin)? == Some(200))
            })?;
        }
        self.startup.controllers_ready = began.elapsed();
        Ok(())
    }

    fn etcd_args(&self) -> Vec<OsString> {
        let data = self.dir.join("etcd");
        vec![
            "--name=cp".into(),
            flag("--data-dir", &data),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=cp=http://127.0.0.1:2380".into(),
            // The data dies with the test: durability buys nothing and costs seconds.
            "--unsafe-no-fsync".into(),
        ]
    }

    fn apiserver_args(&self) -> Vec<OsString> {
        let p = &self.pki;
        vec![
            // All addresses of its own netns: the fabric's (v4 and v6) and loopback, as the
            // serving certificate names them.
            "--bind-address=::".into(),
            format!("--secure-port={API_SERVER_PORT}").into(),
            format!("--advertise-address={API_SERVER_IPV4}").into(),
            "--etcd-servers=http://127.0.0.1:2379".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            flag("--client-ca-file", &p.ca.cert),
            flag("--tls-cert-file", &p.apiserver.cert),
            flag("--tls-private-key-file", &p.apiserver.key),
            flag("--requestheader-client-ca-file", &p.front_proxy_ca.cert),
            format!("--requestheader-allowed-names={FRONT_PROXY_CLIENT}").into(),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            flag("--proxy-client-cert-file", &p.front_proxy_client.cert),
            flag("--proxy-client-key-file", &p.front_proxy_client.key),
            flag("--kubelet-client-certificate", &p.kubelet_client.cert),
            flag("--kubelet-client-key", &p.kubelet_client.key),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}").into(),
            flag("--service-account-key-file", &p.service_account_pub),
            flag("--service-account-signing-key-file", &p.service_account_key),
            format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}").into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
        ]
    }

    fn controller_manager_args(&self) -> Vec<OsString> {
        let p = &self.pki;
        let kubeconfig = kubeconfig_in(&self.dir, "controller-manager");
        vec![
            flag("--kubeconfig", &kubeconfig),
            flag("--authentication-kubeconfig", &kubeconfig),
            flag("--authorization-kubeconfig", &kubeconfig),
            flag("--service-account-private-key-file", &p.service_account_key),
            flag("--root-ca-file", &p.ca.cert),
            flag("--cluster-signing-cert-file", &p.ca.cert),
            flag("--cluster-signing-key-file", &p.ca.key),
            "--use-service-account-credentials=true".into(),
            // Each controller gets its ServiceAccount and token through the API at start; at
            // the default 20 requests/s that alone takes seconds.
            "--kube-api-qps=200".into(),
            "--kube-api-burst=400".into(),
            format!("--controllers={CONTROLLERS}").into(),
            // Tests stop the API server or cut nodes off it for tens of seconds; with the
            // default grace (50 s) their nodes would be marked NotReady meanwhile and their
            // pods taken out of the Services' endpoints, which is not what they test.
            "--node-monitor-grace-period=300s".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={CONTROLLER_MANAGER_PORT}").into(),
            flag("--tls-cert-file", &p.controller_manager_serving.cert),
            flag("--tls-private-key-file", &p.controller_manager_serving.key),
            "--profiling=false".into(),
        ]
    }

    fn scheduler_args(&self) -> Vec<OsString> {
        let p = &self.pki;
        let kubeconfig = kubeconfig_in(&self.dir, "scheduler");
        vec![
            flag("--kubeconfig", &kubeconfig),
            flag("--authentication-kubeconfig", &kubeconfig),
            flag("--authorization-kubeconfig", &kubeconfig),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={SCHEDULER_PORT}").into(),
            flag("--tls-cert-file", &p.scheduler_serving.cert),
            flag("--tls-private-key-file", &p.scheduler_serving.key),
            "--profiling=false".into(),
        ]
    }

    /// Starts a component in the control plane's netns and cgroup, its output going to
    /// `<name>.log` (see [`ControlPlane::log_path`]).
    fn spawn(&self, name: &'static str, program: &Path, args: Vec<OsString>) -> Result<()> {
        let log = self.log_path(name);
        let file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        self.place(&mut cmd)?;
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", program.display()))?;
        self.running.lock().push(Component { name, child, log });
        Ok(())
    }

    /// Makes `cmd` run in the control plane's netns and cgroup.
    fn place(&self, cmd: &mut Command) -> Result<()> {
        sys::place(cmd, &self.running.cgroup, &self.netns_path())
    }

    /// Polls `ready` until it holds; fails when a component exits or `timeout` passes, with
    /// the logs' tails.
    fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready(self)? {
                return Ok(());
            }
            self.running
                .check_alive()
                .with_context(|| format!("waiting for {what}"))?;
            if Instant::now() >= deadline {
                bail!(
                    "{what}: not ready after {timeout:?}; {}",
                    self.running.log_tails()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The HTTP status of `GET url` from inside the netns, the server verified with the
    /// cluster CA, as `admin` or anonymous. `None` while nothing answers yet (refused, timed
    /// out, closed); any other curl failure (a certificate problem, say) is an error.
    fn https_status(&self, url: &str, as_admin: bool) -> Result<Option<u16>> {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(&self.pki.ca.cert)
        .stdin(Stdio::null());
        if as_admin {
            cmd.arg("--cert")
                .arg(&self.pki.admin.cert)
                .arg("--key")
                .arg(&self.pki.admin.key);
        }
        cmd.arg(url);
        self.place(&mut cmd)?;
        let out = run_with_timeout(&mut cmd, Duration::from_secs(10))
            .with_context(|| format!("curl {url}"))?;
        match out.code() {
            Some(0) => {
                let code = out.stdout_str();
                let code = code
                    .trim()
                    .parse()
                    .with_context(|| format!("curl {url}: HTTP status {code:?}"))?;
                Ok(Some(code))
            }
            // Couldn't connect, timed out, empty reply, connection reset.
            Some(7 | 28 | 52 | 56) => Ok(None),
            _ => bail!(
                "curl {url} exited {}: {}",
                out.status,
                out.stderr_str().trim()
            ),
        }
    }

    // ------------------------------------------------------------ accessors

    /// How long [`ControlPlane::start`] took.
    pub fn startup(&self) -> Startup {
        self.startup
    }

    /// `https://10.255.0.254:6443`.
    pub fn server_url(&self) -> String {
        format!("https://{API_SERVER_IPV4}:{API_SERVER_PORT}")
    }

    /// The cluster CA's certificate (PEM): it signed the API server's serving certificate.
    pub fn ca_cert_path(&self) -> &Path {
        &self.pki.ca.cert
    }

    /// A kubeconfig for `admin` (group `system:masters`: allowed everything).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// A kubeconfig for the node's kubelet: user `system:node:<node>` in group
    /// `system:nodes`, so the Node authorizer and NodeRestriction hold it to its own Node
    /// and the pods bound to it.
    pub fn node_kubeconfig(&self, node: &str) -> Result<&Path> {
        self.node_kubeconfigs
            .get(node)
            .map(PathBuf::as_path)
            .ok_or_else(|| anyhow!("no node {node} in the cluster of this control plane"))
    }

    /// The control plane's network namespace (name): `{cluster id}-cp`.
    pub fn netns_name(&self) -> &str {
        &self.running.netns
    }

    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.running.netns)
    }

    /// The cgroup of every control plane process (and of `kubectl` runs): `cp` in the
    /// cluster's cgroup directory.
    pub fn cgroup(&self) -> &Path {
        &self.running.cgroup
    }

    /// The directory of its files: `pki/`, kubeconfigs, `etcd/`, logs, applied manifests.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a component (`etcd`, `kube-apiserver`, `kube-controller-manager`,
    /// `kube-scheduler`) logs.
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.dir.join(format!("{component}.log"))
    }

    /// The resident memory (VmRSS) of each component now, in bytes.
    pub fn resident_memory(&self) -> Result<Vec<(&'static str, u64)>> {
        self.running
            .lock()
            .iter()
            .map(|c| Ok((c.name, vm_rss(c.child.id()).with_context(|| c.name)?)))
            .collect()
    }

    /// An API server outage: stops kube-apiserver (SIGTERM, then waits for it to exit); etcd,
    /// the controllers and everything on the nodes keep running.
    pub fn stop_api_server(&self) -> Result<()> {
        let mut components = self.running.lock();
        let k = components
            .iter()
            .position(|c| c.name == API_SERVER)
            .context("kube-apiserver is not running")?;
        let mut c = components.remove(k);
        let pid = nix::unistd::Pid::from_raw(c.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        c.child.wait().context("wait for kube-apiserver to exit")?;
        Ok(())
    }

    /// Starts kube-apiserver again (same flags, same etcd) and waits until it is ready.
    pub fn start_api_server(&self) -> Result<()> {
        let tools = Tools::find()?;
        self.spawn(API_SERVER, &tools.apiserver, self.apiserver_args())?;
        let readyz = format!("{}/readyz", self.server_url());
        let deadline = Instant::now() + API_SERVER_READY_TIMEOUT;
        while self.https_status(&readyz, true)? != Some(200) {
            self.running.check_alive()?;
            if Instant::now() >= deadline {
                bail!(
                    "kube-apiserver not ready again after {API_SERVER_READY_TIMEOUT:?}; {}",
                    tail_of(&self.log_path(API_SERVER))
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
        Ok(())
    }

    // ------------------------------------------------------------ credentials

    /// A fresh token (valid 24 h) of ServiceAccount `namespace/sa`, from the TokenRequest
    /// API (`kubectl create token`).
    pub fn service_account_token(&self, namespace: &str, sa: &str) -> Result<String> {
        let out = self.kubectl(["create", "token", sa, "-n", namespace, "--duration", "24h"])?;
        let token = out.stdout_str().trim().to_owned();
        if token.is_empty() {
            bail!("kubectl create token {sa} -n {namespace} printed no token");
        }
        Ok(token)
    }

    /// A token of ServiceAccount `namespace/sa` from the TokenRequest API (`kubectl create
    /// token`) for `audience`, valid `duration` (the API's minimum is 10 minutes), bound to the
    /// object `bound` = (kind, name) in the same namespace (`Pod`) or cluster-wide (`Node`): it
    /// stops authenticating when that object is gone, and the API server names in it the
    /// object (and for a Pod, its node).
    pub fn bound_service_account_token(
        &self,
        namespace: &str,
        sa: &str,
        audience: &str,
        bound: Option<(&str, &str)>,
        duration: Duration,
    ) -> Result<String> {
        let duration = format!("{}s", duration.as_secs());
        let mut args = vec![
            "create",
            "token",
            sa,
            "-n",
            namespace,
            "--audience",
            audience,
            "--duration",
            &duration,
        ];
        if let Some((kind, name)) = bound {
            args.extend(["--bound-object-kind", kind, "--bound-object-name", name]);
        }
        let out = self.kubectl(&args)?;
        let token = out.stdout_str().trim().to_owned();
        if token.is_empty() {
            bail!("kubectl create token {sa} -n {namespace} printed no token");
        }
        Ok(token)
    }

    /// What the API server says of `token` for `audience` (a TokenReview, as the CA service
    /// makes one): its `status` (`authenticated`, `user.username`, `user.extra`, `audiences`,
    /// `error`).
    pub fn token_review(&self, token: &str, audience: &str) -> Result<serde_json::Value> {
        let dir = self.dir.join("manifests");
        sys::mkdir_all(&dir)?;
        let n = self.manifests.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{n:03}-tokenreview.json"));
        let review = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]},
        });
        fs::write(&path, review.to_string())
            .with_context(|| format!("write {}", path.display()))?;
        let out = self.kubectl([
            OsStr::new("create"),
            OsStr::new("-o"),
            OsStr::new("json"),
            OsStr::new("-f"),
            path.as_os_str(),
        ])?;
        let answer: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("a TokenReview that is not JSON")?;
        Ok(answer["status"].clone())
    }

    /// `token` (a ServiceAccount JWT the API server issued) with its claims changed by `edit`
    /// and signed again with the cluster's ServiceAccount signing key (ES256), as the API
    /// server itself would sign those claims: for tokens the TokenRequest API will not make
    /// (one that expired already, say).
    pub fn resign_service_account_token(
        &self,
        token: &str,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> Result<String> {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("not a JWT (three dot-separated parts)");
        };
        let head: serde_json::Value =
            serde_json::from_slice(&B64.decode(header)?).context("the JWT's header is not JSON")?;
        if head["alg"] != "ES256" {
            bail!("the token is signed with {}, not ES256", head["alg"]);
        }
        let mut claims: serde_json::Value = serde_json::from_slice(&B64.decode(claims)?)
            .context("the JWT's claims are not JSON")?;
        edit(&mut claims);
        let signed = format!("{header}.{}", B64.encode(claims.to_string()));
        let pem = fs::read_to_string(&self.pki.service_account_key)
            .with_context(|| format!("read {}", self.pki.service_account_key.display()))?;
        let pkcs8 = rcgen::KeyPair::from_pem(&pem)
            .context("the ServiceAccount signing key")?
            .serialize_der();
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8,
            &rng,
        )
        .map_err(|e| anyhow!("the ServiceAccount signing key is not P-256: {e}"))?;
        let signature = key
            .sign(&rng, signed.as_bytes())
            .map_err(|e| anyhow!("sign the token: {e}"))?;
        Ok(format!("{signed}.{}", B64.encode(signature.as_ref())))
    }

    /// A kubeconfig that acts as ServiceAccount `namespace/sa` (a fresh token, see
    /// [`ControlPlane::service_account_token`]), so a program run with it gets exactly the
    /// RBAC granted to that ServiceAccount. Written as `sa-<namespace>-<sa>.kubeconfig`.
    pub fn service_account_kubeconfig(&self, namespace: &str, sa: &str) -> Result<PathBuf> {
        let token = self.service_account_token(namespace, sa)?;
        let path = kubeconfig_in(&self.dir, &format!("sa-{namespace}-{sa}"));
        let user = format!("system:serviceaccount:{namespace}:{sa}");
        kubeconfig::write(
            &path,
            &self.server_url(),
            &self.pki.ca.cert,
            &user,
            Credentials::Token(&token),
        )
        .with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    // ------------------------------------------------------------ kubectl

    /// `kubectl` as `admin`, in the control plane's netns and cgroup (killed with the control
    /// plane), with a discovery cache of this cluster's own: every cluster's API server has
    /// the same address, and a shared cache would mix their CRDs up.
    fn kubectl_command<I, S>(&self, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig")
            .arg(&self.admin_kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args)
            .stdin(Stdio::null());
        self.place(&mut cmd)?;
        Ok(cmd)
    }

    /// Runs `kubectl ARGS` as `admin` (see [`ControlPlane::kubectl`]) and returns what it
    /// did, whatever its exit status: for commands whose failure is the answer (`auth
    /// can-i` exits 1 for "no").
    pub fn kubectl_output<I, S>(&self, args: I) -> Result<RunOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_kubectl(&collect(args), KUBECTL_TIMEOUT)
    }

    /// Runs `kubectl ARGS` as `admin` inside the control plane's netns; fails with its stderr
    /// unless it exits 0.
    pub fn kubectl<I, S>(&self, args: I) -> Result<RunOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.kubectl_checked(&collect(args), KUBECTL_TIMEOUT)
    }

    fn kubectl_checked(&self, args: &[OsString], timeout: Duration) -> Result<RunOutput> {
        self.run_kubectl(args, timeout)?
            .check()
            .with_context(|| format!("kubectl {}", shown(args)))
    }

    fn run_kubectl(&self, args: &[OsString], timeout: Duration) -> Result<RunOutput> {
        run_with_timeout(&mut self.kubectl_command(args)?, timeout)
            .with_context(|| format!("kubectl {}", shown(args)))
    }

    /// `kubectl apply --server-side` of `yaml` (one or more documents). The text is kept as
    /// `manifests/<n>.yaml` in [`ControlPlane::dir`], to look at after a failure.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let dir = self.dir.join("manifests");
        sys::mkdir_all(&dir)?;
        let n = self.manifests.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{n:03}.yaml"));
        fs::write(&path, yaml).with_context(|| format!("write {}", path.display()))?;
        self.apply_file(&path)
    }

    /// `kubectl apply --server-side -f PATH` (a file or a directory of manifests).
    pub fn apply_file(&self, path: &Path) -> Result<()> {
        self.kubectl([
            OsStr::new("apply"),
            OsStr::new("--server-side"),
            OsStr::new("-f"),
            path.as_os_str(),
        ])
        .map(drop)
    }

    /// `kubectl delete ARGS` (which waits until the objects are gone).
    pub fn delete<I, S>(&self, args: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args = std::iter::once(OsString::from("delete"))
            .chain(collect(args))
            .collect::<Vec<_>>();
        self.kubectl_checked(&args, KUBECTL_TIMEOUT).map(drop)
    }

    /// `kubectl wait --for=CONDITION --timeout=TIMEOUT ARGS`, e.g.
    /// `wait_for("condition=Available", ["deployment/web", "-n", "demo"], 60 s)`.
    pub fn wait_for<I, S>(&self, condition: &str, args: I, timeout: Duration) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let head = [
            "wait".to_owned(),
            format!("--for={condition}"),
            format!("--timeout={}ms", timeout.as_millis()),
        ];
        let args = head
            .into_iter()
            .map(OsString::from)
            .chain(collect(args))
            .collect::<Vec<_>>();
        // kubectl gives up by itself at `timeout`; the margin is for it to say so.
        self.kubectl_checked(&args, timeout + Duration::from_secs(10))
            .map(drop)
    }

    // ------------------------------------------------------------ kube-rs

    /// Runs `work` with a kube-rs client acting as `admin`; see [`ControlPlane::block_on_as`].
    pub fn block_on<T, F, Fut>(&self, work: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(::kube::Client) -> Fut + Send,
        Fut: Future<Output = Result<T>>,
    {
        self.block_on_as(&self.admin_kubeconfig, work)
    }

    /// Runs `work` with a kube-rs client made from `kubeconfig`, to completion. Its sockets
    /// must be made inside the control plane's netns (the host netns has no route to the API
    /// server), so it runs on a thread of its own that joins the netns and drives a tokio
    /// current-thread runtime; the caller blocks meanwhile.
    pub fn block_on_as<T, F, Fut>(&self, kubeconfig: &Path, work: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(::kube::Client) -> Fut + Send,
        Fut: Future<Output = Result<T>>,
    {
        sys::in_netns(&self.netns_path(), || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("build a tokio runtime")?;
            runtime.block_on(async {
                let client = client_from(kubeconfig).await?;
                work(client).await
            })
        })?
    }
}

/// A kube-rs client from a kubeconfig file.
async fn client_from(kubeconfig: &Path) -> Result<::kube::Client> {
    use ::kube::config::{KubeConfigOptions, Kubeconfig};
    let file = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("read {}", kubeconfig.display()))?;
    let config = ::kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("load {}", kubeconfig.display()))?;
    ::kube::Client::try_from(config)
        .with_context(|| format!("make a client from {}", kubeconfig.display()))
}

fn collect<I, S>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    args.into_iter().map(|a| a.as_ref().to_owned()).collect()
}

/// A command line's arguments, for messages.
fn shown(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where the kubeconfig called `name` goes.
fn kubeconfig_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.kubeconfig"))
}

/// `--name=value` for a path value.
fn flag(name: &str, value: &Path) -> OsString {
    let mut arg = OsString::from(format!("{name}="));
    arg.push(value);
    arg
}

/// VmRSS of a process, in bytes.
fn vm_rss(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .ok_or_else(|| anyhow!("no VmRSS in {path}"))?
        .trim()
        .parse::<u64>()
        .with_context(|| format!("VmRSS in {path}"))?;
    Ok(kib * 1024)
}
