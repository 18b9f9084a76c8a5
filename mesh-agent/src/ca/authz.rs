//! Which identities each node may obtain certificates for: those of the workloads running on
//! it now, per the cluster file (standalone) or the Pods of the Kubernetes API. Either way the
//! answer comes from an index built when the source changes, not per request.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::fswatch::Fingerprint;
use crate::identity::SpiffeId;
use crate::workload::Cluster;

/// How many watch events are applied before the index is published again: one rebuild for a
/// burst (a relist, a Deployment scaled up) instead of one per Pod.
const POD_EVENT_BATCH: usize = 512;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthzError {
    #[error("node {0} is not in the cluster file")]
    UnknownNode(String),
    #[error("no workload with identity {identity} runs on node {node}")]
    NotOnNode { identity: String, node: String },
    #[error("identity {identity} is not of this CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: String,
        trust_domain: String,
    },
    /// The Pods are not listed yet: the caller should retry.
    #[error("the Kubernetes Pods are not synchronized yet")]
    NotSynced,
}

/// Node → identities of the workloads on it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeIndex {
    by_node: HashMap<String, HashSet<SpiffeId>>,
}

impl NodeIndex {
    /// Each workload's identity exactly as the agent derives it (the cluster file's trust
    /// domain, the workload's namespace and service account).
    pub fn from_cluster(cluster: &Cluster) -> anyhow::Result<Self> {
        let mut index = Self::default();
        for node in &cluster.nodes {
            let identities = index.by_node.entry(node.name.to_string()).or_default();
            for workload in &node.workloads {
                let id = workload
                    .spiffe_id(&cluster.trust_domain)
                    .with_context(|| format!("workload {}", workload.qualified_name()))?;
                identities.insert(id);
            }
        }
        Ok(index)
    }

    fn check(&self, node: &str, identity: &SpiffeId, unknown_node: bool) -> Result<(), AuthzError> {
        match self.by_node.get(node) {
            Some(ids) if ids.contains(identity) => Ok(()),
            None if unknown_node => Err(AuthzError::UnknownNode(node.to_owned())),
            _ => Err(AuthzError::NotOnNode {
                identity: identity.to_string(),
                node: node.to_owned(),
            }),
        }
    }
}

/// The authorization source.
pub enum Authorizer {
    ClusterFile(ClusterFileIndex),
    Kubernetes(Arc<PodWatch>),
}

impl Authorizer {
    /// Whether a workload with `identity` runs on `node` now.
    pub fn check(
        &self,
        trust_domain: &str,
        node: &str,
        identity: &SpiffeId,
    ) -> Result<(), AuthzError> {
        if identity.trust_domain() != trust_domain {
            return Err(AuthzError::ForeignTrustDomain {
                identity: identity.to_string(),
                trust_domain: trust_domain.to_owned(),
            });
        }
        match self {
            Self::ClusterFile(file) => file.current().check(node, identity, true),
            Self::Kubernetes(pods) => pods.check(node, identity),
        }
    }

    /// Why requests cannot be decided yet, if so.
    pub fn not_ready(&self) -> Option<String> {
        match self {
            Self::ClusterFile(_) => None,
            Self::Kubernetes(pods) => {
                (!pods.is_synced()).then(|| "the Kubernetes Pods are not listed yet".to_owned())
            }
        }
    }
}

/// The cluster file's index, rebuilt when the file changes (checked with one `stat` per
/// request). A file that no longer loads keeps the last good index, as the agents keep their
/// last good state, and is reported.
pub struct ClusterFileIndex {
    path: PathBuf,
    cached: Mutex<(Fingerprint, Arc<NodeIndex>)>,
}

impl ClusterFileIndex {
    /// Loads the file now; a CA that cannot read it does not start.
    pub fn load(path: &Path, trust_domain: &str) -> anyhow::Result<Self> {
        let seen = fingerprint(path);
        let cluster = Cluster::load(path)?;
        if cluster.trust_domain.as_str() != trust_domain {
            warn!(
                cluster_file = %path.display(),
                cluster_trust_domain = %cluster.trust_domain,
                trust_domain,
                "the cluster file's trust domain is not the CA's: no identity of it will be granted"
            );
        }
        let index =
            NodeIndex::from_cluster(&cluster).with_context(|| format!("{}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            cached: Mutex::new((seen, Arc::new(index))),
        })
    }

    pub fn current(&self) -> Arc<NodeIndex> {
        let seen = fingerprint(&self.path);
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if cached.0 != seen {
            let loaded = Cluster::load(&self.path)
                .map_err(anyhow::Error::from)
                .and_then(|cluster| NodeIndex::from_cluster(&cluster));
            match loaded {
                Ok(index) => {
                    info!(cluster_file = %self.path.display(), "cluster file reloaded");
                    cached.1 = Arc::new(index);
                }
                Err(err) => error!(
                    cluster_file = %self.path.display(),
                    error = format!("{err:#}"),
                    "cannot reload the cluster file; authorizing with the last one read"
                ),
            }
            cached.0 = seen;
        }
        Arc::clone(&cached.1)
    }
}

fn fingerprint(path: &Path) -> Fingerprint {
    Fingerprint::of(path, |path| Ok(vec![path.to_owned()]))
}

/// What is kept of a Pod that counts: scheduled, neither finished nor being deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodFacts {
    node: String,
    service_account: String,
    uid: Option<String>,
}

impl PodFacts {
    fn of(pod: &Pod) -> Option<Self> {
        if pod.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return None;
        }
        let spec = pod.spec.as_ref()?;
        let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
        // The API server's admission sets "default" when a Pod names none.
        let service_account = spec
            .service_account_name
            .clone()
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        Some(Self {
            node,
            service_account,
            uid: pod.metadata.uid.clone(),
        })
    }
}

type PodKey = (String, String);

/// The Pods' index: identities per node, and where each running pod is (for tokens naming
/// their pod).
#[derive(Debug, Default)]
struct PodSnapshot {
    nodes: NodeIndex,
    pods: HashMap<PodKey, PodFacts>,
}

impl PodSnapshot {
    fn build(trust_domain: &str, pods: &HashMap<PodKey, PodFacts>) -> Self {
        let mut nodes = NodeIndex::default();
        for ((namespace, name), facts) in pods {
            match SpiffeId::new(
                trust_domain,
                namespace.as_str(),
                facts.service_account.as_str(),
            ) {
                Ok(id) => {
                    nodes
                        .by_node
                        .entry(facts.node.clone())
                        .or_default()
                        .insert(id);
                }
                Err(err) => {
                    warn!(pod = %format!("{namespace}/{name}"), error = %err, "pod has no valid identity")
                }
            }
        }
        Self {
            nodes,
            pods: pods.clone(),
        }
    }
}

/// The Kubernetes Pods, followed with a watch; readers see an immutable snapshot.
#[derive(Default)]
pub struct PodWatch {
    snapshot: ArcSwap<PodSnapshot>,
    synced: AtomicBool,
}

impl PodWatch {
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    fn check(&self, node: &str, identity: &SpiffeId) -> Result<(), AuthzError> {
        if !self.is_synced() {
            return Err(AuthzError::NotSynced);
        }
        self.snapshot.load().nodes.check(node, identity, false)
    }

    /// The node of running pod `namespace/name` (and, when given, with that UID).
    pub fn node_of_pod(&self, namespace: &str, name: &str, uid: Option<&str>) -> Option<String> {
        let snapshot = self.snapshot.load();
        let facts = snapshot
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))?;
        match (uid, facts.uid.as_deref()) {
            (Some(wanted), Some(actual)) if wanted != actual => None,
            _ => Some(facts.node.clone()),
        }
    }

    fn publish(&self, trust_domain: &str, pods: &HashMap<PodKey, PodFacts>) {
        self.snapshot
            .store(Arc::new(PodSnapshot::build(trust_domain, pods)));
    }

    /// Follows every Pod until `shutdown`. A broken watch reconnects with backoff and relists;
    /// meanwhile the last snapshot keeps answering.
    pub async fn run(
        self: Arc<Self>,
        client: kube::Client,
        trust_domain: String,
        shutdown: CancellationToken,
    ) {
        let api: Api<Pod> = Api::all(client);
        // A consistent (not cached) list: authorization must not start from a stale view.
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .ready_chunks(POD_EVENT_BATCH)
            .boxed();
        let mut pods: HashMap<PodKey, PodFacts> = HashMap::new();
        // A relist in progress: pods listed so far, swapped in when it completes.
        let mut relist: Option<HashMap<PodKey, PodFacts>> = None;
        loop {
            let batch = tokio::select! {
                () = shutdown.cancelled() => return,
                batch = events.next() => batch,
            };
            let Some(batch) = batch else {
                warn!("the Pod watch ended");
                return;
            };
            let mut changed = false;
            for event in batch {
                match event {
                    Ok(event) => changed |= self.apply(event, &mut pods, &mut relist),
                    Err(err) => warn!(error = %err, "Pod watch failed; retrying"),
                }
            }
            if changed {
                self.publish(&trust_domain, &pods);
            }
        }
    }

    /// Applies one event; says whether `pods` changed.
    fn apply(
        &self,
        event: watcher::Event<Pod>,
        pods: &mut HashMap<PodKey, PodFacts>,
        relist: &mut Option<HashMap<PodKey, PodFacts>>,
    ) -> bool {
        match event {
            watcher::Event::Init => {
                *relist = Some(HashMap::new());
                false
            }
            watcher::Event::InitApply(pod) => {
                if let (Some(listed), Some(key)) = (relist.as_mut(), pod_key(&pod))
                    && let Some(facts) = PodFacts::of(&pod)
                {
                    listed.insert(key, facts);
                }
                false
            }
            watcher::Event::InitDone => {
                *pods = relist.take().unwrap_or_default();
                if !self.synced.swap(true, Ordering::AcqRel) {
                    info!(pods = pods.len(), "Kubernetes Pods listed");
                }
                true
            }
            watcher::Event::Apply(pod) => {
                let Some(key) = pod_key(&pod) else {
                    return false;
                };
                match PodFacts::of(&pod) {
                    Some(facts) => pods.insert(key, facts.clone()) != Some(facts),
                    None => pods.remove(&key).is_some(),
                }
            }
            watcher::Event::Delete(pod) => {
                pod_key(&pod).is_some_and(|key| pods.remove(&key).is_some())
            }
        }
    }
}

fn pod_key(pod: &Pod) -> Option<PodKey> {
    Some((pod.metadata.namespace.clone()?, pod.metadata.name.clone()?))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

    use crate::ca::tests::CLUSTER;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "demo", sa).expect("valid")
    }

    pub(crate) fn write_cluster(dir: &Path) -> PathBuf {
        let path = dir.join("cluster.yaml");
        std::fs::write(&path, CLUSTER).expect("write cluster file");
        path
    }

    #[test]
    fn cluster_file_grants_only_the_nodes_own_workloads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_cluster(dir.path());
        let authz =
            Authorizer::ClusterFile(ClusterFileIndex::load(&path, "cluster.local").expect("load"));
        assert_eq!(authz.check("cluster.local", "node-a", &id("sleep")), Ok(()));
        assert!(matches!(
            authz.check("cluster.local", "node-a", &id("httpbin")),
            Err(AuthzError::NotOnNode { .. })
        ));
        assert_eq!(
            authz.check("cluster.local", "node-z", &id("sleep")),
            Err(AuthzError::UnknownNode("node-z".to_owned()))
        );
        let foreign = SpiffeId::new("other.local", "demo", "sleep").expect("valid");
        assert!(matches!(
            authz.check("cluster.local", "node-a", &foreign),
            Err(AuthzError::ForeignTrustDomain { .. })
        ));
    }

    #[test]
    fn cluster_file_changes_are_followed_and_bad_ones_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_cluster(dir.path());
        let index = ClusterFileIndex::load(&path, "cluster.local").expect("load");
        // node-a now runs another service account instead of sleep.
        let changed = CLUSTER.replace("serviceAccount: sleep", "serviceAccount: moved");
        std::fs::write(&path, &changed).expect("rewrite");
        let current = index.current();
        assert!(current.check("node-a", &id("sleep"), true).is_err());
        assert_eq!(current.check("node-a", &id("moved"), true), Ok(()));
        std::fs::write(&path, "nodes: [garbage").expect("break");
        assert_eq!(index.current().check("node-a", &id("moved"), true), Ok(()));
    }

    fn pod(ns: &str, name: &str, node: &str, sa: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.to_owned()),
                name: Some(name.to_owned()),
                uid: Some(format!("uid-{name}")),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.to_owned()),
                service_account_name: Some(sa.to_owned()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.to_owned()),
                ..PodStatus::default()
            }),
        }
    }

    fn apply_all(
        watch: &PodWatch,
        events: Vec<watcher::Event<Pod>>,
        pods: &mut HashMap<PodKey, PodFacts>,
    ) {
        let mut relist = None;
        for event in events {
            watch.apply(event, pods, &mut relist);
        }
        watch.publish("cluster.local", pods);
    }

    #[test]
    fn pod_index() {
        let watch = Arc::new(PodWatch::default());
        let authz = Authorizer::Kubernetes(Arc::clone(&watch));
        assert_eq!(
            authz.check("cluster.local", "node-a", &id("sleep")),
            Err(AuthzError::NotSynced)
        );
        assert!(authz.not_ready().is_some());
        let mut pods = HashMap::new();
        let mut deleting = pod("demo", "old", "node-a", "old", "Running");
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        apply_all(
            &watch,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(pod("demo", "sleep-1", "node-a", "sleep", "Running")),
                watcher::Event::InitApply(pod("demo", "httpbin-1", "node-b", "httpbin", "Pending")),
                watcher::Event::InitApply(pod("demo", "done", "node-a", "done", "Succeeded")),
                watcher::Event::InitApply(deleting),
                watcher::Event::InitDone,
            ],
            &mut pods,
        );
        assert!(authz.not_ready().is_none());
        assert_eq!(authz.check("cluster.local", "node-a", &id("sleep")), Ok(()));
        assert_eq!(
            authz.check("cluster.local", "node-b", &id("httpbin")),
            Ok(())
        );
        for (node, sa) in [
            ("node-a", "httpbin"),
            ("node-a", "done"),
            ("node-a", "old"),
            ("node-z", "sleep"),
        ] {
            assert!(
                matches!(
                    authz.check("cluster.local", node, &id(sa)),
                    Err(AuthzError::NotOnNode { .. })
                ),
                "{node} {sa}"
            );
        }
        assert_eq!(
            watch
                .node_of_pod("demo", "sleep-1", Some("uid-sleep-1"))
                .as_deref(),
            Some("node-a")
        );
        assert_eq!(
            watch.node_of_pod("demo", "sleep-1", Some("another-uid")),
            None
        );

        // The pod leaves: its identity is no longer granted on its node.
        apply_all(
            &watch,
            vec![watcher::Event::Delete(pod(
                "demo", "sleep-1", "node-a", "sleep", "Running",
            ))],
            &mut pods,
        );
        assert!(
            authz
                .check("cluster.local", "node-a", &id("sleep"))
                .is_err()
        );
        // It finishes: same.
        apply_all(
            &watch,
            vec![watcher::Event::Apply(pod(
                "demo",
                "httpbin-1",
                "node-b",
                "httpbin",
                "Failed",
            ))],
            &mut pods,
        );
        assert!(
            authz
                .check("cluster.local", "node-b", &id("httpbin"))
                .is_err()
        );
    }
}
