//! The story on the harness's file-based cluster: two nodes, `customer` and
//! `recommendation-v1` on node-a, `preference` and `recommendation-v2` on node-b, the `curl`
//! pod on node-a, not enrolled. Services `preference` and `recommendation` (virtual IPs; pods
//! resolve the names to them; the curl pod, outside the mesh, reaches preference through the
//! nodes' kube-proxy rules). The servers run the command lines of the tutorial's Deployments;
//! policies are files in the agents' policy directory.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use super::{Client, NAMESPACE, PORT, PREFERENCE_URL, PolicyChange, Stage, tutorial};
use crate::pod::{ChildGuard, run_with_timeout};
use crate::{Cluster, NodeSpec, Pod, PodSpec, RunOutput, ServiceSpec};

/// The running scenario: the cluster (agents started) and the application's servers.
pub struct Seed {
    /// Declared first: dropped (killed) before the cluster goes.
    _servers: Vec<ChildGuard>,
    pub cluster: Arc<Cluster>,
}

/// Builds the seed's two nodes and five pods; agents are not started yet.
pub fn build_cluster() -> Result<Cluster> {
    let pod = |name: &str, sa: &str, app: &str| {
        PodSpec::new(name)
            .namespace(NAMESPACE)
            .service_account(sa)
            .label("app", app)
    };
    let service = |name: &str| {
        ServiceSpec::new(name, name)
            .namespace(NAMESPACE)
            .port(PORT, PORT)
    };
    Cluster::builder()
        .service(service("preference"))
        .service(service("recommendation"))
        .node(
            NodeSpec::new("node-a")
                .pod(pod("customer", "customer", "customer"))
                .pod(
                    pod("recommendation-v1", "recommendation", "recommendation")
                        .label("version", "v1"),
                )
                .pod(pod("curl", "default", "curl").enrolled(false)),
        )
        .node(
            NodeSpec::new("node-b")
                .pod(pod("preference", "preference", "preference"))
                .pod(
                    pod("recommendation-v2", "recommendation", "recommendation")
                        .label("version", "v2"),
                ),
        )
        .build()
}

impl Seed {
    /// Builds the cluster and starts it: [`build_cluster`] then [`Seed::start`].
    pub fn new() -> Result<Seed> {
        Seed::start(Arc::new(build_cluster()?))
    }

    /// Starts the agents, then recommendation v1 and v2 and preference.
    pub fn start(cluster: Arc<Cluster>) -> Result<Seed> {
        cluster.start_agents()?;
        let servers = ["recommendation-v1", "recommendation-v2", "preference"]
            .into_iter()
            .map(|name| start_server(pod(&cluster, name)?))
            .collect::<Result<_>>()?;
        Ok(Seed {
            _servers: servers,
            cluster,
        })
    }
}

impl Stage for Seed {
    fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Every pod resolves the bare name, the curl pod too (it is in the namespace).
    fn url(&self, _client: Client) -> &'static str {
        PREFERENCE_URL
    }

    fn curl(&self, client: Client, url: &str) -> Result<RunOutput> {
        let pod = pod(&self.cluster, client.app())?;
        let max_time = super::CURL_MAX_TIME.as_secs().to_string();
        let mut cmd = pod.command("curl", ["-sS", "--max-time", &max_time, url])?;
        for proxy in ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"] {
            cmd.env_remove(proxy);
        }
        run_with_timeout(&mut cmd, super::CURL_MAX_TIME + Duration::from_secs(5))
    }

    /// Writes or removes `<name>.yaml` in the policy directory; the cluster waits for the
    /// agents' reload.
    fn change(&self, change: &PolicyChange) -> Result<()> {
        match change {
            PolicyChange::Apply(manifest) => {
                self.cluster.apply_policy(manifest.name, manifest.yaml)
            }
            PolicyChange::Delete { name, .. } => self.cluster.delete_policy(name),
        }
    }
}

/// A pod of the seed by name, wherever it runs.
pub fn pod<'c>(cluster: &'c Cluster, name: &str) -> Result<&'c Pod> {
    cluster
        .nodes()
        .iter()
        .flat_map(|n| n.pods())
        .find(|p| p.name() == name)
        .with_context(|| format!("no pod {name} in the seed cluster"))
}

/// Runs the command line of the pod's Deployment in the tutorial in the pod (output to a log
/// file in the cluster's scratch directory) and waits until it listens on [`PORT`].
fn start_server(pod: &Pod) -> Result<ChildGuard> {
    let line = tutorial::command_of(pod.name())?;
    let (program, args) = line.split_first().context("empty command line")?;
    let log_path = pod.workdir.join(format!("{}.log", pod.name()));
    let log = File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let mut cmd = pod.command(program, args)?;
    cmd.stdout(log.try_clone()?).stderr(log);
    let name = format!("{} server", pod.name());
    let child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
    let mut guard = ChildGuard { child, name };
    pod.wait_for_port(&mut guard, PORT)
        .with_context(|| crate::pod::tail_of(&log_path))?;
    Ok(guard)
}
