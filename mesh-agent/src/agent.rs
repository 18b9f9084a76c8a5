//! One node's agent: install capture, enrol the node's workloads, serve until told to stop.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    admin::{AdminConfig, AdminServer, AdminState, Metrics},
    ebpf::{self, Capture},
    identity::{CertificateAuthority, IdentityStore, SpiffeId, TrustBundle, server_config},
    netns,
    policy::{PolicySet, PolicyWatcher},
    proxy::{
        hbone::HboneClient,
        inbound::{Inbound, InboundContext},
        outbound::{Mesh, Outbound},
    },
    workload::{Cluster, IdentityConfig, Node, Workload},
};

const POLICY_POLL_INTERVAL: Duration = Duration::from_millis(500);

pub struct Config {
    pub cluster_file: PathBuf,
    pub admin: AdminConfig,
    pub node: String,
    pub bpf_pin_dir: Option<PathBuf>,
    /// How long in-flight connections may take to finish after SIGTERM.
    pub drain_timeout: Duration,
}

/// Runs the agent until SIGTERM or SIGINT.
///
/// On the way out it closes its listeners and drains connections, but leaves the kernel
/// programs attached: the node's captured workloads then fail closed (their connections are
/// refused) until an agent runs again; `mesh-agent uninstall` removes them for good.
pub async fn run(config: Config) -> anyhow::Result<()> {
    netns::remember_home()?;
    let cluster = Arc::new(Cluster::load(&config.cluster_file)?);
    let node = cluster.node(&config.node, &config.cluster_file)?;
    let pin_dir = config
        .bpf_pin_dir
        .clone()
        .unwrap_or_else(|| ebpf::default_pin_dir(node.name.as_str()));

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (identities, bundle) = start_identities(&cluster, node, &shutdown)?;

    let mut capture = Capture::install(&pin_dir, &node.workload_cgroup)
        .context("installing the capture programs")?;
    capture.set_excluded_ports(&node.excluded_ports)?;

    let metrics = Metrics::new();
    let policy = start_policy(&cluster, &shutdown)?;
    let admin = start_admin(
        &config,
        &metrics,
        &cluster,
        node,
        &identities,
        &policy,
        &shutdown,
    )
    .await?;
    let node_context = NodeContext {
        mesh: Arc::new(Mesh {
            cluster: cluster.clone(),
            hbone: HboneClient::new(
                identities.clone(),
                bundle.clone(),
                cluster.hbone.idle_timeout,
            ),
            metrics: metrics.clone(),
        }),
        identities,
        bundle,
        inbound: InboundContext {
            cluster: cluster.clone(),
            policy,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        },
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    };
    let enrolled = enrol_workloads(node, &mut capture, &node_context);
    capture.retain_enrolled(&enrolled)?;
    let local_ips: Vec<_> = node.workloads.iter().flat_map(|w| w.ips.clone()).collect();
    capture.retain_inbound(&local_ips)?;
    metrics.set_workloads(enrolled.len());
    admin.set_ready(true);
    info!(
        node = %node.name,
        workloads = enrolled.len(),
        pin_dir = %pin_dir.display(),
        "agent ready"
    );

    wait_for_stop_signal().await?;
    admin.set_ready(false);
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

/// What every workload's listeners share.
struct NodeContext {
    mesh: Arc<Mesh>,
    identities: IdentityStore,
    bundle: TrustBundle,
    inbound: InboundContext,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// Serves metrics (15020), readiness (15021) and the config dump (127.0.0.1:15000) in the node's
/// namespace; readiness turns on once every workload is served.
async fn start_admin(
    config: &Config,
    metrics: &Metrics,
    cluster: &Arc<Cluster>,
    node: &Node,
    identities: &IdentityStore,
    policy: &watch::Receiver<Arc<PolicySet>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<AdminState> {
    let dump = {
        let (cluster, node_name) = (cluster.clone(), node.name.clone());
        let (identities, policy) = (identities.clone(), policy.clone());
        move || config_dump(&cluster, &node_name, &identities, &policy.borrow())
    };
    let state = AdminState::new(metrics.clone(), dump);
    let server = AdminServer::bind(&config.admin).await?;
    let (state_for_server, shutdown) = (state.clone(), shutdown.clone());
    tokio::spawn(async move {
        if let Err(err) = server.run(state_for_server, shutdown).await {
            error!(error = format!("{err:#}"), "admin server failed");
        }
    });
    Ok(state)
}

/// What the agent serves, for `GET /config_dump`: workloads, certificates, policies.
fn config_dump(
    cluster: &Cluster,
    node: &crate::workload::Name,
    identities: &IdentityStore,
    policy: &PolicySet,
) -> serde_json::Value {
    let workloads: Vec<_> = cluster
        .nodes
        .iter()
        .filter(|n| &n.name == node)
        .flat_map(|n| &n.workloads)
        .map(|w| {
            serde_json::json!({
                "name": w.qualified_name(),
                "serviceAccount": w.service_account.as_str(),
                "ips": w.ips,
                "netns": w.netns,
                "cgroup": w.cgroup,
            })
        })
        .collect();
    let certificates: Vec<_> = identities
        .identities()
        .into_iter()
        .filter_map(|id| {
            let cert = identities.current(&id)?;
            Some(serde_json::json!({
                "identity": id.to_string(),
                "serial": cert.serial(),
                "notAfter": humantime::format_rfc3339_seconds(cert.not_after()).to_string(),
            }))
        })
        .collect();
    serde_json::json!({
        "node": node.as_str(),
        "trustDomain": cluster.trust_domain.as_str(),
        "workloads": workloads,
        "certificates": certificates,
        "policy": {
            "files": policy.files(),
            "peerAuthentications": policy.peer_authentication_count(),
            "authorizationPolicies": policy.authorization_policy_count(),
        },
    })
}

/// Loads the policies the cluster file names and keeps them current; without a path, the mesh
/// runs with none (PERMISSIVE, everything allowed), as Istio does.
fn start_policy(
    cluster: &Cluster,
    shutdown: &CancellationToken,
) -> anyhow::Result<watch::Receiver<Arc<PolicySet>>> {
    let root = &cluster.policy.root_namespace;
    match &cluster.policy.path {
        None => Ok(watch::channel(Arc::new(PolicySet::empty(root))).1),
        Some(path) => PolicyWatcher::spawn(path, root, POLICY_POLL_INTERVAL, shutdown.clone())
            .with_context(|| format!("loading policy from {}", path.display())),
    }
}

/// Loads the CA and the trust bundle, issues a certificate to every identity of the node's
/// workloads, and keeps them renewed.
fn start_identities(
    cluster: &Cluster,
    node: &Node,
    shutdown: &CancellationToken,
) -> anyhow::Result<(IdentityStore, TrustBundle)> {
    let IdentityConfig {
        ca_cert,
        ca_key,
        trust_bundle,
        certificate_lifetime,
    } = &cluster.identity;
    let ca = CertificateAuthority::load(ca_cert, ca_key).context("loading the mesh CA")?;
    let bundle = match trust_bundle {
        Some(path) => TrustBundle::load(path),
        None => TrustBundle::from_ca(&ca),
    }
    .context("loading the trust bundle")?;
    let identities = IdentityStore::new(Arc::new(ca), *certificate_lifetime);
    let ids: anyhow::Result<Vec<SpiffeId>> = node
        .workloads
        .iter()
        .map(|w| Ok(w.spiffe_id(&cluster.trust_domain)?))
        .collect();
    identities.issue_all(ids?)?;
    identities.clone().spawn_renewal(shutdown.clone());
    Ok((identities, bundle))
}

/// Opens each workload's listeners, then captures its cgroup. A workload whose namespace cannot
/// be entered is still captured when its cgroup exists: its connections fail rather than leave
/// the mesh unnoticed.
fn enrol_workloads(node: &Node, capture: &mut Capture, context: &NodeContext) -> HashSet<u64> {
    let mut enrolled = HashSet::new();
    for workload in &node.workloads {
        let name = workload.qualified_name();
        if let Err(err) = serve_workload(workload, capture, context) {
            error!(
                workload = %name,
                error = format!("{err:#}"),
                "cannot open the workload's listeners; its connections will be refused"
            );
        }
        match capture.enroll(&workload.cgroup) {
            Ok(id) => {
                info!(workload = %name, cgroup = %workload.cgroup.display(), cgroup_id = id, "workload enrolled");
                enrolled.insert(id);
            }
            Err(err) => error!(
                workload = %name,
                error = format!("{err:#}"),
                "cannot enrol the workload; its connections are not captured"
            ),
        }
    }
    enrolled
}

/// Outbound listeners (captured connections), inbound HBONE listeners (the workload's IPs, port
/// 15008) and inbound plaintext listeners (15006, fed by `sk_lookup`), all inside the workload's
/// namespace; inbound capture starts once they listen.
fn serve_workload(
    workload: &Workload,
    capture: &mut Capture,
    context: &NodeContext,
) -> anyhow::Result<()> {
    let trust_domain = &context.mesh.cluster.trust_domain;
    let identity = workload.spiffe_id(trust_domain)?;
    let outbound = Outbound::listen(
        workload,
        identity.clone(),
        capture.orig_dst_table(),
        context.mesh.clone(),
    )?;
    let identity_for_inbound = identity.clone();
    let tls = server_config(
        context.identities.clone(),
        identity,
        context.bundle.clone(),
        trust_domain.as_str(),
    )?;
    let inbound = Inbound::listen(workload, identity_for_inbound, tls, context.inbound.clone())?;
    capture
        .capture_inbound(inbound.netns(), &workload.ips, inbound.plaintext_listener())
        .context("capturing inbound connections")?;
    outbound.serve(&context.shutdown, &context.tracker);
    inbound.serve(&context.tracker);
    Ok(())
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "received"),
        _ = int.recv() => info!(signal = "SIGINT", "received"),
    }
    Ok(())
}

/// Removes the node's pinned programs and maps.
pub fn uninstall(pin_dir: &Path) -> anyhow::Result<()> {
    ebpf::uninstall(pin_dir)?;
    info!(pin_dir = %pin_dir.display(), "capture removed; workloads connect directly");
    Ok(())
}
