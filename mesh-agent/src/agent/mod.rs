//! One node's agent: install capture, follow the node's workloads, serve until told to stop.
//!
//! - this module: start-up, the main loop, shutdown;
//! - [`reconcile`]: each local workload's lifecycle.

mod reconcile;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
    time::MissedTickBehavior,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    admin::{AdminConfig, AdminServer, AdminState, Metrics},
    cni::{self, CniServer},
    ebpf::{self, Capture},
    identity::{
        CertificateAuthority, CertificateIssuer, IdentityStore, RemoteCa, SharedBundle, TrustBundle,
    },
    kubernetes::{self, MeshConfig},
    netns,
    policy::{PolicySet, PolicyWatcher, WorkloadRef},
    proxy::{
        hbone::HboneClient,
        inbound::{InboundContext, LocalTargets},
        limits::Limits,
        outbound::Mesh,
        record::Connections,
    },
    sources::{CLUSTER_FILE_POLL_INTERVAL, ClusterFileSource},
    state::StateStore,
    workload::{Cluster, Signer},
};
use reconcile::Reconciler;

const POLICY_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How often the node's workloads are looked at for recreated namespaces and cgroups (the
/// kernel guard keeps them closed meanwhile).
const RECONCILE_INTERVAL: Duration = Duration::from_millis(200);

/// Where the agent learns the mesh from.
pub enum Source {
    /// The cluster file (docs/cluster-file.md), watched for edits.
    ClusterFile(PathBuf),
    /// The Kubernetes API, with the mesh settings of `mesh.yaml` (docs/kubernetes.md); new pods
    /// also come from the CNI plugin.
    Kubernetes { mesh_config: PathBuf },
}

pub struct Config {
    pub source: Source,
    pub admin: AdminConfig,
    pub node: String,
    pub bpf_pin_dir: Option<PathBuf>,
    /// How long in-flight connections may take to finish after SIGTERM.
    pub drain_timeout: Duration,
    /// The node credential (`mesh-agent ca add-node`) the agent shows the CA service.
    pub ca_credential: Option<PathBuf>,
    /// Overrides `identity.ca.address` of the configuration (pointing the agents at istiod
    /// without editing mesh-config).
    pub ca_address: Option<String>,
}

/// Runs the agent until SIGTERM or SIGINT.
///
/// On the way out it closes its listeners and drains connections, but leaves the kernel
/// programs attached: the node's captured workloads then fail closed (their connections are
/// refused) until an agent runs again; `mesh-agent uninstall` removes them for good.
pub async fn run(config: Config) -> anyhow::Result<()> {
    netns::remember_home()?;
    let shutdown = CancellationToken::new();
    let metrics = Metrics::new();
    let origin = Origin::start(&config, &metrics, &shutdown).await?;
    let store = origin.store.clone();
    let state = store.load();
    let node = state.node();
    let pin_dir = config
        .bpf_pin_dir
        .clone()
        .unwrap_or_else(|| ebpf::default_pin_dir(node.name.as_str()));

    let running = NodeLock::shared(&pin_dir)?;
    let tracker = TaskTracker::new();
    let (identities, bundle) = start_identities(
        &state.cluster,
        config.ca_credential.as_deref(),
        config.ca_address.as_deref(),
        &metrics,
        &shutdown,
    )?;

    let mut capture = Capture::install(&pin_dir, &node.workload_cgroup)
        .context("installing the capture programs")?;
    capture.set_excluded_ports(&node.excluded_ports)?;
    exempt_own_cgroup(&mut capture, &node.workload_cgroup)?;

    let policy = match origin.policy.clone() {
        Some(policy) => policy,
        None => start_policy(&state.cluster, &metrics, &shutdown)?,
    };
    let connections = Connections::new(metrics.clone());
    let dump = ConfigDump {
        store: store.clone(),
        identities: identities.clone(),
        policy: policy.clone(),
        pin_dir: pin_dir.clone(),
    };
    let admin = start_admin(&config, &connections, dump, &shutdown).await?;
    let local = LocalTargets::default();
    let limits = Limits::new(&state.cluster.limits);
    tracker.spawn(connections.clone().flush_periodically(shutdown.clone()));
    let context = Arc::new(NodeContext {
        mesh: Arc::new(Mesh {
            state: store.clone(),
            hbone: HboneClient::new(
                identities.clone(),
                bundle.clone(),
                state.cluster.hbone.idle_timeout,
            ),
            connections: connections.clone(),
            local: local.clone(),
            limits: limits.clone(),
        }),
        identities,
        bundle,
        inbound: InboundContext {
            state: store.clone(),
            policy,
            connections: connections.clone(),
            max_concurrent_streams: state.cluster.hbone.max_concurrent_streams,
            local,
            limits,
        },
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    });
    let mut changes = store.subscribe();
    let mut issued = context.identities.issued();
    let (served, served_rx) = cni::served_channel();
    origin.follow(&config, served_rx, &shutdown)?;
    let mut reconciler = Reconciler::new(capture, context.clone());
    reconciler.start(&state)?;
    served.send_if_modified(|s| replace_if_changed(s, reconciler.served()));
    drop(state);
    let mut readiness = Readiness::new(admin.clone(), metrics.clone(), pin_dir.clone(), running);
    readiness.report(&reconciler, &context);

    let mut ticks = tokio::time::interval(RECONCILE_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stop = wait_for_stop_signal();
    tokio::pin!(stop);
    loop {
        let changed = tokio::select! {
            stopped = &mut stop => { stopped?; break; }
            _ = changes.changed() => true,
            // A workload waiting for its first certificate is served at once.
            _ = issued.changed() => false,
            _ = ticks.tick() => false,
        };
        let state = changes.borrow_and_update().clone();
        reconciler.sync(&state);
        served.send_if_modified(|s| replace_if_changed(s, reconciler.served()));
        readiness.report(&reconciler, &context);
        if changed {
            drop(state);
            release_freed_memory();
        }
    }
    admin.set_not_ready(vec!["stopping".to_owned()]);
    info!("stopping: closing listeners and draining connections");
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(config.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = tracker.len(),
            "drain timeout reached; closing the remaining connections"
        );
    }
    info!(
        pin_dir = %pin_dir.display(),
        "agent stopped; captured workloads fail closed until an agent runs again"
    );
    Ok(())
}

/// An agent run as a pod (the DaemonSet) lives below the workload cgroup root, where the guard
/// would drop its own traffic on the workloads' IPs: its cgroup is let through.
fn exempt_own_cgroup(capture: &mut Capture, workload_cgroup: &Path) -> anyhow::Result<()> {
    let Some(own) = ebpf::own_cgroup_below(workload_cgroup) else {
        return Ok(());
    };
    let id = ebpf::cgroup_id(&own)?;
    capture.exempt_agent_cgroup(id)?;
    info!(cgroup = %own.display(), cgroup_id = id, "the agent runs below the workload cgroup root; the guard lets its sockets through");
    Ok(())
}

/// Where the state (and, in Kubernetes, the policy) comes from, started before anything is
/// served: without a first complete view there is nothing to serve.
struct Origin {
    store: StateStore,
    /// The Kubernetes policy; `None`: from the files the cluster file names.
    policy: Option<watch::Receiver<Arc<PolicySet>>>,
    kubernetes: Option<(kubernetes::Sandboxes, PathBuf)>,
}

impl Origin {
    async fn start(
        config: &Config,
        metrics: &Metrics,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        match &config.source {
            Source::ClusterFile(path) => Ok(Self {
                store: StateStore::new(ClusterFileSource::load(path, &config.node)?),
                policy: None,
                kubernetes: None,
            }),
            Source::Kubernetes { mesh_config } => {
                let settings = MeshConfig::load(mesh_config)?;
                let started =
                    kubernetes::start(&settings, &config.node, metrics, shutdown.clone()).await?;
                Ok(Self {
                    store: started.store,
                    policy: Some(started.policy),
                    kubernetes: Some((started.sandboxes, settings.cni.socket)),
                })
            }
        }
    }

    /// Keeps following the source: the cluster file's edits, or (the API is followed already)
    /// the CNI plugin's new sandboxes.
    fn follow(
        self,
        config: &Config,
        served: watch::Receiver<cni::Served>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        match (&config.source, self.kubernetes) {
            (Source::ClusterFile(path), _) => {
                ClusterFileSource::spawn(
                    path,
                    &config.node,
                    self.store,
                    CLUSTER_FILE_POLL_INTERVAL,
                    shutdown.clone(),
                );
            }
            (Source::Kubernetes { .. }, Some((sandboxes, socket))) => {
                CniServer::bind(&socket)?.spawn(sandboxes, served, shutdown.clone());
            }
            (Source::Kubernetes { .. }, None) => {}
        }
        Ok(())
    }
}

/// Whether `new` differs from `current`, which it then replaces (for `send_if_modified`).
fn replace_if_changed<T: PartialEq>(current: &mut T, new: T) -> bool {
    if *current == new {
        return false;
    }
    *current = new;
    true
}

/// A new state replaces the old one, which can be tens of MiB (10,000 workloads) freed on
/// whichever threads held it last; glibc keeps freed memory in per-thread arenas unless told:
/// hand it back to the system (`malloc_trim`), so the agent's memory follows the state's size.
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free memory; it touches nothing the program uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Readiness follows the reconciler: ready once every local workload is served, with the reasons
/// on `/healthz/ready` otherwise; `agent ready` is logged each time it becomes ready. An agent
/// that a newer one of its node has taken over from is not ready: during an upgrade both answer
/// on the readiness port, and the kubelet must not take the old one's answer for the new pod's.
struct Readiness {
    admin: AdminState,
    metrics: Metrics,
    pin_dir: PathBuf,
    lock: NodeLock,
    ready: Option<bool>,
}

impl Readiness {
    fn new(admin: AdminState, metrics: Metrics, pin_dir: PathBuf, lock: NodeLock) -> Self {
        Self {
            admin,
            metrics,
            pin_dir,
            lock,
            ready: None,
        }
    }

    fn report(&mut self, reconciler: &Reconciler, context: &NodeContext) {
        self.admin.set_notes(context.identities.failing_renewals());
        let mut unserved = reconciler.unserved();
        self.metrics.set_unserved(unserved.len());
        self.metrics
            .set_attachments(ebpf::attachment_count(&self.pin_dir));
        self.metrics
            .set_hbone_connections(context.mesh.hbone.pooled_connections());
        if let Some(newer) = self.lock.superseded_by() {
            unserved.insert(
                0,
                format!("superseded by a newer agent of this node (pid {newer})"),
            );
        }
        let ready = unserved.is_empty();
        self.metrics.set_workloads(reconciler.served_count());
        if self.ready == Some(ready) {
            if !ready {
                self.admin.set_not_ready(unserved);
            }
            return;
        }
        self.ready = Some(ready);
        if ready {
            info!(
                workloads = reconciler.served_count(),
                guarded_ips = reconciler.guarded_count(),
                pin_dir = %self.pin_dir.display(),
                "agent ready"
            );
        } else {
            warn!(unserved = ?unserved, "agent not ready: workloads not served (their IPs stay guarded)");
        }
        self.admin.set_not_ready(unserved);
    }
}

/// What every workload's listeners share.
pub(crate) struct NodeContext {
    mesh: Arc<Mesh>,
    identities: IdentityStore,
    bundle: SharedBundle,
    inbound: InboundContext,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// Serves metrics (15020), readiness (15021), the config dump, the open connections and the
/// plaintext clients (127.0.0.1:15000) in the node's namespace; readiness turns on once every
/// workload is served.
async fn start_admin(
    config: &Config,
    connections: &Connections,
    dump: ConfigDump,
    shutdown: &CancellationToken,
) -> anyhow::Result<AdminState> {
    let (open, plaintext) = (connections.clone(), connections.clone());
    let state = AdminState::new(connections.metrics().clone(), move || dump.render())
        .with_json("/connections", move || {
            serde_json::to_value(open.list()).unwrap_or_default()
        })
        .with_json("/plaintext_clients", move || {
            serde_json::json!({
                "since": plaintext.started_at(),
                "clients": plaintext.plaintext_clients(),
            })
        });
    let server = AdminServer::bind(&config.admin).await?;
    let (state_for_server, shutdown) = (state.clone(), shutdown.clone());
    tokio::spawn(async move {
        if let Err(err) = server.run(state_for_server, shutdown).await {
            error!(error = format!("{err:#}"), "admin server failed");
        }
    });
    Ok(state)
}

/// What `GET /config_dump` shows: workloads (with the mTLS mode they accept), Services,
/// certificates (with their chains), policies and the eBPF attachments.
struct ConfigDump {
    store: StateStore,
    identities: IdentityStore,
    policy: watch::Receiver<Arc<PolicySet>>,
    pin_dir: PathBuf,
}

impl ConfigDump {
    fn render(&self) -> serde_json::Value {
        let state = self.store.load();
        let policy = self.policy.borrow().clone();
        let workloads: Vec<_> = state
            .local_workloads()
            .iter()
            .map(|w| {
                let mtls = policy.resolve_mtls(&WorkloadRef::from(&w.workload), 0);
                serde_json::json!({
                    "name": w.uid,
                    "serviceAccount": w.workload.service_account.as_str(),
                    "identity": w.identity.to_string(),
                    "ips": w.workload.ips,
                    "netns": w.workload.netns,
                    "cgroup": w.workload.cgroup,
                    "mtls": {
                        "mode": mtls.mode.as_str(),
                        "scope": mtls.scope.to_string(),
                        "policy": mtls.policy,
                    },
                })
            })
            .collect();
        let services: Vec<_> = state
            .services()
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.uid,
                    "hostname": s.hostname,
                    "addresses": s.service.addresses,
                    "ports": s.service.ports.iter().map(|p| serde_json::json!({"port": p.port, "targetPort": p.target()})).collect::<Vec<_>>(),
                    "endpoints": s.endpoints.iter().map(|e| e.uid.as_str()).collect::<Vec<_>>(),
                })
            })
            .collect();
        let certificates: Vec<_> = self
            .identities
            .identities()
            .into_iter()
            .filter_map(|id| {
                let cert = self.identities.current(&id)?;
                Some(serde_json::json!({
                    "identity": id.to_string(),
                    "serial": cert.serial(),
                    "notBefore": humantime::format_rfc3339_seconds(cert.not_before()).to_string(),
                    "notAfter": humantime::format_rfc3339_seconds(cert.not_after()).to_string(),
                    "chain": cert.chain_summary(),
                }))
            })
            .collect();
        let node = state.node();
        serde_json::json!({
            "node": node.name.as_str(),
            "trustDomain": state.cluster.trust_domain.as_str(),
            "workloads": workloads,
            "services": services,
            "certificates": certificates,
            "policy": {
                "files": policy.files(),
                "peerAuthentications": policy.peer_authentication_count(),
                "authorizationPolicies": policy.authorization_policy_count(),
            },
            "ebpf": {
                "pinDir": self.pin_dir,
                "workloadCgroup": node.workload_cgroup,
                "attachments": ebpf::attachments(&self.pin_dir, &node.workload_cgroup),
            },
        })
    }
}

/// Loads the policies the cluster file names and keeps them current; without a path, the mesh
/// runs with none (PERMISSIVE, everything allowed), as Istio does.
fn start_policy(
    cluster: &Cluster,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<watch::Receiver<Arc<PolicySet>>> {
    let root = &cluster.policy.root_namespace;
    match &cluster.policy.path {
        None => Ok(watch::channel(Arc::new(PolicySet::empty(root))).1),
        Some(path) => PolicyWatcher::spawn_counted(
            path,
            root,
            POLICY_POLL_INTERVAL,
            Some(metrics.clone()),
            shutdown.clone(),
        )
        .with_context(|| format!("loading policy from {}", path.display())),
    }
}

/// Sets up the issuer of the node's workload certificates (the CA service, or a CA key on the
/// node for a single-host trial) and the trust bundle, and keeps the certificates the
/// reconciler wants issued and renewed. A bundle read from a file follows the file's changes
/// (root rotation).
fn start_identities(
    cluster: &Cluster,
    ca_credential: Option<&Path>,
    ca_address: Option<&str>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<(IdentityStore, SharedBundle)> {
    let identity = &cluster.identity;
    let signer = identity.signer().map_err(|err| anyhow::anyhow!(err))?;
    let (issuer, bundle): (Arc<dyn CertificateIssuer>, Result<_, Arc<_>>) = match signer {
        Signer::Service(configured) => {
            let mut ca = configured.clone();
            if let Some(address) = ca_address {
                ca.address = address.to_owned();
            }
            let client = RemoteCa::new(&ca, ca_credential).context("setting up the CA client")?;
            info!(ca = %ca.address, "workload certificates come from the CA service");
            let file = identity.trust_bundle.clone().unwrap_or(ca.roots);
            (Arc::new(client), Ok(file))
        }
        Signer::Local { cert, key } => {
            if ca_address.is_some() {
                anyhow::bail!(
                    "--ca-address names a CA service, but identity has caCert/caKey and no ca"
                );
            }
            let ca =
                Arc::new(CertificateAuthority::load(cert, key).context("loading the mesh CA")?);
            warn!(
                ca_key = %key.display(),
                "this node holds the mesh's signing key: fine for a single-host trial, but whoever \
                 takes the node can mint any identity (docs/identity.md)"
            );
            let bundle = identity.trust_bundle.clone().ok_or_else(|| Arc::clone(&ca));
            (ca, bundle)
        }
    };
    let bundle = match bundle {
        Ok(file) => {
            let shared =
                SharedBundle::from(TrustBundle::load(&file).context("loading the trust bundle")?);
            shared.follow_file(&file, shutdown.clone());
            shared
        }
        Err(ca) => SharedBundle::from(TrustBundle::from_ca(&ca).context("the trust bundle")?),
    };
    let identities =
        IdentityStore::with_metrics(issuer, identity.certificate_lifetime, metrics.clone());
    identities.clone().spawn_renewal(shutdown.clone());
    Ok((identities, bundle))
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => info!(signal = "SIGINT", "signal received"),
    }
    Ok(())
}

/// Removes the node's pinned programs and maps; refused while an agent runs for the node, and
/// when nothing is installed there (a mistyped node name).
pub fn uninstall(pin_dir: &Path) -> anyhow::Result<()> {
    if !pin_dir.exists() {
        anyhow::bail!(
            "nothing is installed at {} (is the node name right?)",
            pin_dir.display()
        );
    }
    let _exclusive = NodeLock::exclusive(pin_dir)?;
    ebpf::uninstall(pin_dir)?;
    info!(pin_dir = %pin_dir.display(), "capture removed; workloads connect directly");
    Ok(())
}

/// Every agent of a node holds this lock shared for its whole run (two do during an upgrade);
/// `uninstall` needs it exclusively, so it cannot pull the capture from under a running agent.
/// It lives in /run, next to no pinned state, because bpffs holds no regular files.
struct NodeLock {
    #[allow(dead_code)]
    lock: nix::fcntl::Flock<std::fs::File>,
    /// `<lock>.newest`: the PID of the agent of the node that started last.
    newest: PathBuf,
}

const LOCK_DIR: &str = "/run/mesh-agent";

impl NodeLock {
    /// Taken by every running agent; it also records this one as the node's newest.
    fn shared(pin_dir: &Path) -> anyhow::Result<Self> {
        let lock = Self::take(pin_dir, nix::fcntl::FlockArg::LockSharedNonblock)
            .context("an uninstall is running for this node")?;
        let temporary = lock.newest.with_extension("newest.tmp");
        std::fs::write(&temporary, std::process::id().to_string())
            .and_then(|()| std::fs::rename(&temporary, &lock.newest))
            .with_context(|| format!("writing {}", lock.newest.display()))?;
        Ok(lock)
    }

    fn exclusive(pin_dir: &Path) -> anyhow::Result<Self> {
        Self::take(pin_dir, nix::fcntl::FlockArg::LockExclusiveNonblock).with_context(|| {
            format!(
                "an agent is running for {}: stop it first",
                pin_dir.display()
            )
        })
    }

    fn take(pin_dir: &Path, how: nix::fcntl::FlockArg) -> anyhow::Result<Self> {
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        let name = pin_dir.display().to_string().replace('/', "_");
        let path = Path::new(LOCK_DIR).join(format!("{name}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let lock = nix::fcntl::Flock::lock(file, how)
            .map_err(|(_, errno)| anyhow::anyhow!("{}: {errno}", path.display()))?;
        Ok(Self {
            lock,
            newest: path.with_extension("newest"),
        })
    }

    /// The PID of a newer agent of the node that still runs, if one took over.
    fn superseded_by(&self) -> Option<u32> {
        let text = std::fs::read_to_string(&self.newest).ok()?;
        let pid: u32 = text.trim().parse().ok()?;
        // The same command name: the PID of an agent that died may be another program's now.
        let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok();
        let alive = comm(&pid.to_string()).is_some_and(|c| Some(c) == comm("self"));
        (pid != std::process::id() && alive).then_some(pid)
    }
}
