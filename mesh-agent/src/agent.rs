//! One node's agent: install capture, enrol the node's workloads, serve until told to stop.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    ebpf::{self, Capture},
    netns,
    proxy::outbound::Outbound,
    workload::{Cluster, Node, Workload},
};

pub struct Config {
    pub cluster_file: PathBuf,
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
    let cluster = Cluster::load(&config.cluster_file)?;
    let node = cluster.node(&config.node, &config.cluster_file)?;
    let pin_dir = config
        .bpf_pin_dir
        .clone()
        .unwrap_or_else(|| ebpf::default_pin_dir(node.name.as_str()));

    let mut capture = Capture::install(&pin_dir, &node.workload_cgroup)
        .context("installing the capture programs")?;
    capture.set_excluded_ports(&node.excluded_ports)?;

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let enrolled = enrol_workloads(node, &mut capture, &shutdown, &tracker);
    capture.retain_enrolled(&enrolled)?;
    info!(
        node = %node.name,
        workloads = enrolled.len(),
        pin_dir = %pin_dir.display(),
        "agent ready"
    );

    wait_for_stop_signal().await?;
    info!("stopping: closing listeners and draining connections");
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(config.drain_timeout, tracker.wait()).await.is_err() {
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

/// Opens each workload's listeners, then captures its cgroup. A workload whose namespace cannot
/// be entered is still captured when its cgroup exists: its connections fail rather than leave
/// the mesh unnoticed.
fn enrol_workloads(
    node: &Node,
    capture: &mut Capture,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> HashSet<u64> {
    let mut enrolled = HashSet::new();
    for workload in &node.workloads {
        let name = workload.qualified_name();
        match Outbound::listen(workload, capture.orig_dst_table()) {
            Ok(outbound) => outbound.serve(shutdown, tracker),
            Err(err) => error!(
                workload = %name,
                error = format!("{err:#}"),
                "cannot open the workload's listeners; its captured connections will be refused"
            ),
        }
        match enrol(capture, workload) {
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

fn enrol(capture: &mut Capture, workload: &Workload) -> anyhow::Result<u64> {
    capture.enroll(&workload.cgroup)
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
