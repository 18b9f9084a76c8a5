//! The story on Kubernetes: the mesh installed on a [`KubeMesh`], the tutorial applied from
//! `deploy/examples/tutorial/` with `kubectl apply -k`, its policies applied and deleted with
//! `kubectl`, the load run in the pods as `kubectl exec` runs it. The scheduler places the
//! pods; the curl pod lives in the namespace [`OUTSIDE_NAMESPACE`], which is not in the mesh.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Client, NAMESPACE, PREFERENCE_URL, PolicyChange, Stage, tutorial};
use crate::kube::{KubeMesh, POD_READY_TIMEOUT};
use crate::{Cluster, RunOutput};

/// The curl pod's namespace (`deploy/examples/tutorial/curl.yaml`).
pub const OUTSIDE_NAMESPACE: &str = "outside";
/// The tutorial's Deployments and their pods, in both namespaces.
pub const APP_SELECTOR: &str = "app in (customer, preference, recommendation, curl)";
/// preference as the curl pod calls it: a bare Service name resolves in the caller's own
/// namespace only.
const PREFERENCE_FROM_OUTSIDE: &str = "http://preference.tutorial:8080";

/// The tutorial running on a [`KubeMesh`].
pub struct KubeSeed {
    pub mesh: Arc<KubeMesh>,
    /// Per client, its namespace and the pod its curl runs in.
    pods: BTreeMap<Client, (&'static str, String)>,
    /// The Deployment of each of the tutorial's pods, by pod name.
    deployments: BTreeMap<String, String>,
}

impl KubeSeed {
    /// Applies the tutorial (`kubectl apply -k deploy/examples/tutorial`), waits until its
    /// Deployments are available, and finds their pods.
    pub fn start(mesh: Arc<KubeMesh>) -> Result<KubeSeed> {
        let mut apply = vec![OsString::from("apply"), "-k".into()];
        apply.push(tutorial::dir().into_os_string());
        mesh.kubectl(apply)?;
        mesh.kube().control_plane().wait_for(
            "condition=Available",
            ["deployment", "-A", "-l", APP_SELECTOR],
            POD_READY_TIMEOUT,
        )?;
        let mut deployments = BTreeMap::new();
        for namespace in [NAMESPACE, OUTSIDE_NAMESPACE] {
            deployments.extend(pod_deployments(&mesh, namespace)?);
        }
        let pods = Client::ALL
            .into_iter()
            .map(|client| {
                Ok((
                    client,
                    (namespace_of(client), pod_of(&deployments, client)?),
                ))
            })
            .collect::<Result<_>>()?;
        Ok(KubeSeed {
            mesh,
            pods,
            deployments,
        })
    }
}

impl Stage for KubeSeed {
    fn cluster(&self) -> &Cluster {
        self.mesh.cluster()
    }

    fn url(&self, client: Client) -> &'static str {
        match client {
            Client::CurlPod => PREFERENCE_FROM_OUTSIDE,
            Client::Customer => PREFERENCE_URL,
        }
    }

    fn curl(&self, client: Client, url: &str) -> Result<RunOutput> {
        let (namespace, pod) = &self.pods[&client];
        self.mesh.curl(namespace, pod, url, super::CURL_MAX_TIME)
    }

    /// Runs the change's `kubectl` command; the agents see it through their watch.
    fn change(&self, change: &PolicyChange) -> Result<()> {
        self.cluster().change_policies(|_| {
            self.mesh
                .kubectl(change.kubectl_args(&tutorial::dir()))
                .map(drop)
        })
    }

    fn workload_of(&self, pod: &str) -> String {
        self.deployments
            .get(pod)
            .cloned()
            .unwrap_or_else(|| pod.to_owned())
    }
}

fn namespace_of(client: Client) -> &'static str {
    match client {
        Client::CurlPod => OUTSIDE_NAMESPACE,
        Client::Customer => NAMESPACE,
    }
}

/// The pod of the client's Deployment (its `app`).
fn pod_of(deployments: &BTreeMap<String, String>, client: Client) -> Result<String> {
    let mut pods = deployments
        .iter()
        .filter(|(_, deployment)| *deployment == client.app())
        .map(|(pod, _)| pod.clone());
    match (pods.next(), pods.next()) {
        (Some(pod), None) => Ok(pod),
        (None, _) => bail!("no pod of the Deployment {}", client.app()),
        (Some(_), Some(_)) => bail!("more than one pod of the Deployment {}", client.app()),
    }
}

/// The namespace's pods that belong to a Deployment, and its name.
fn pod_deployments(mesh: &KubeMesh, namespace: &str) -> Result<BTreeMap<String, String>> {
    let out = mesh.kubectl(["get", "pods", "-n", namespace, "-o", "json"])?;
    let list: Value = serde_json::from_slice(&out.stdout).context("kubectl printed no JSON")?;
    let items = list["items"]
        .as_array()
        .context("kubectl's pod list has no items")?;
    Ok(items
        .iter()
        .filter_map(|pod| {
            let name = pod["metadata"]["name"].as_str()?;
            Some((name.to_owned(), deployment_of(pod)?))
        })
        .collect())
}

/// A pod's Deployment: its ReplicaSet's name without the pod template's hash, as the
/// Deployment controller names ReplicaSets (`<deployment>-<pod-template-hash>`).
fn deployment_of(pod: &Value) -> Option<String> {
    let hash = pod["metadata"]["labels"]["pod-template-hash"].as_str()?;
    let owners = pod["metadata"]["ownerReferences"].as_array()?;
    let replica_set = owners.iter().find(|o| o["kind"] == "ReplicaSet")?;
    let name = replica_set["name"].as_str()?;
    Some(name.strip_suffix(hash)?.strip_suffix('-')?.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_belongs_to_the_deployment_of_its_replica_set() {
        let pod = serde_json::json!({"metadata": {
            "name": "recommendation-v1-5d9f8c7b6-x2k4q",
            "labels": {"app": "recommendation", "pod-template-hash": "5d9f8c7b6"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "recommendation-v1-5d9f8c7b6"}],
        }});
        assert_eq!(deployment_of(&pod).as_deref(), Some("recommendation-v1"));
        let bare = serde_json::json!({"metadata": {"name": "curl", "labels": {"app": "curl"}}});
        assert_eq!(deployment_of(&bare), None);
    }
}
