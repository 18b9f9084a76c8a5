//! `mesh-kubelet`: the kubelet, container runtime and kube-proxy of one node of a test cluster
//! in Kubernetes mode ([`crate::kube`]). There is no containerd and no image: a container is
//! its `command` run from the host's filesystem, in a pod made the way kubelet and a CRI
//! runtime make one (a network namespace set up by the CNI plugins, cgroups at kubelet's
//! paths, a private /etc/hosts), so that what the mesh sees of a pod is what it sees on a real
//! node.
//!
//! One process per node, in the node's netns (so it reaches the API server and its pods'
//! host side) and the node's cgroup (outside `kubepods`). It
//! - registers its Node (Ready, pod CIDRs, capacity) and renews its Lease;
//! - runs the pods bound to it: sandbox, containers, restarts, readiness probes, status,
//!   deletion;
//! - plays kube-proxy for ClusterIP Services and keeps the node's hosts file;
//! - on SIGTERM/SIGINT stops watching and leaves the pods running (a new mesh-kubelet adopts
//!   them), unless `--cleanup-on-exit`.

pub(crate) mod cgroups;
mod cni;
mod container;
mod launch;
mod node;
mod pods;
mod probe;
mod proxy;
mod sandbox;
mod status;
mod worker;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::kube::CgroupDriver;

pub use cni::{NODE_CONFLIST, write_node_conflist};
pub use launch::{KubeletProcess, kubelet_bin};
pub use sandbox::{PodState, REQUESTED_IP_ANNOTATION};

/// The DNS domain of the cluster: Service names in the hosts file end in `svc.<domain>`.
const CLUSTER_DOMAIN: &str = "cluster.local";

/// mesh-kubelet's command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "mesh-kubelet",
    about = "The test harness's kubelet, container runtime and kube-proxy for one node"
)]
pub struct Config {
    /// Credentials for the API server (the node's: `system:node:<node>`).
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// The Node's name.
    #[arg(long)]
    pub node: String,
    /// The node's address on the fabric, 10.255.0.i; i numbers its pod CIDRs.
    #[arg(long)]
    pub node_ip: Ipv4Addr,
    #[arg(long)]
    pub node_ip6: Ipv6Addr,
    /// Kubelet's `--cgroup-root`: pods go below it (absolute path in the cgroup2 mount).
    #[arg(long)]
    pub cgroup_root: PathBuf,
    #[arg(long, value_parser = parse_driver)]
    pub cgroup_driver: CgroupDriver,
    #[arg(long)]
    pub cni_bin_dir: PathBuf,
    #[arg(long)]
    pub cni_conf_dir: PathBuf,
    /// Pods' network namespaces are `<prefix>-<first 8 characters of the pod's uid>`.
    #[arg(long)]
    pub netns_prefix: String,
    /// Pod state files, container logs, kube-proxy rules.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The node's pods' /etc/hosts, with the cluster's Service names.
    #[arg(long)]
    pub hosts_file: PathBuf,
    /// On SIGTERM/SIGINT, also stop the pods and remove what was made for them.
    #[arg(long)]
    pub cleanup_on_exit: bool,
}

fn parse_driver(name: &str) -> Result<CgroupDriver> {
    [CgroupDriver::Systemd, CgroupDriver::Cgroupfs]
        .into_iter()
        .find(|d| d.as_str() == name)
        .ok_or_else(|| anyhow!("unknown cgroup driver {name:?} (systemd or cgroupfs)"))
}

impl Config {
    /// `i` of the node's address 10.255.0.i: its pod CIDRs are 10.i.0.0/24 and fd00:i::/64.
    pub fn node_index(&self) -> Result<u8> {
        match self.node_ip.octets() {
            [10, 255, 0, i] if (1..=250).contains(&i) => Ok(i),
            _ => bail!("node ip {} is not 10.255.0.i (1 <= i <= 250)", self.node_ip),
        }
    }

    fn node_ips(&self) -> [IpAddr; 2] {
        [self.node_ip.into(), self.node_ip6.into()]
    }

    /// `<state-dir>/pods`: the [`PodState`] files.
    fn pods_dir(&self) -> PathBuf {
        self.state_dir.join("pods")
    }
}

/// What every part of the kubelet shares.
pub(crate) struct Ctx {
    pub config: Config,
    pub client: Client,
    pub recorder: Recorder,
}

/// Runs the kubelet until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
    config.node_index()?;
    for dir in [config.pods_dir(), sandbox::records_dir(&config)] {
        crate::sys::mkdir_all(&dir)?;
    }
    proxy::ensure_hosts_file(&config.hosts_file)?;
    let client = client_from(&config.kubeconfig).await?;
    let reporter = Reporter {
        controller: "kubelet".into(),
        instance: Some(config.node.clone()),
    };
    let ctx = Arc::new(Ctx {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        config,
    });
    let (stop_tx, stop) = watch::channel(false);
    let signalled = async {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name}: stopping");
        let _ = stop_tx.send(true);
    };
    // Each part runs until `stop` turns true, retrying what fails meanwhile (the API server
    // may be restarting).
    let ((), (), proxied, ran) = tokio::join!(
        signalled,
        node::run(&ctx, stop.clone()),
        proxy::run(&ctx, stop.clone()),
        pods::run(&ctx, stop),
    );
    proxied.and(ran)?;
    if ctx.config.cleanup_on_exit {
        clean_up(&ctx.config).await?;
    }
    Ok(())
}

/// For `--cleanup-on-exit`, once the pods are torn down: the kube-proxy rules and the
/// `kubepods` cgroups go too.
async fn clean_up(config: &Config) -> Result<()> {
    proxy::remove_rules(config).await?;
    let kubepods = cgroups::kubepods(&config.cgroup_root, config.cgroup_driver);
    blocking(move || crate::sys::kill_and_remove_cgroup(&kubepods)).await
}

/// A kube-rs client from a kubeconfig file.
async fn client_from(kubeconfig: &Path) -> Result<Client> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let file = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("read {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("load {}", kubeconfig.display()))?;
    Client::try_from(config).with_context(|| format!("make a client from {}", kubeconfig.display()))
}

/// Runs blocking work (`ip`, cgroup files, netns threads) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("blocking task failed: {e}"))?
}
