//! The Kubernetes source: the mesh's view from the API server, followed with watches (no
//! polling): Pods, Namespaces, Services and EndpointSlices feed the [`State`]; Istio's
//! PeerAuthentication and AuthorizationPolicy feed the policy ([`policy`]). New pods of this
//! node also arrive from the CNI plugin ([`crate::cni`]) before the API knows their addresses.
//!
//! - [`config`]: the mesh settings (`mesh.yaml`);
//! - [`facts`]: what is kept of each object;
//! - [`node`]: where a pod of this node is in the kernel (cgroup, network namespace);
//! - [`view`]: the facts, and the [`crate::workload::Cluster`] built from them.
//!
//! While the API server is away the last state stays served; the watches reconnect with
//! backoff and relist, and the view is rebuilt from what the relist says.

pub mod config;
pub mod facts;
pub mod node;
pub mod policy;
mod view;

use std::{collections::HashSet, net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    admin::Metrics,
    policy::PolicySet,
    state::{State, StateStore},
};
pub use config::MeshConfig;
use facts::{NamespaceFacts, PodFacts, ServiceFacts, SliceFacts};
use view::{Keyed, View};

/// How long changes are gathered before the state is rebuilt: one rebuild for a burst (a
/// Deployment scaled up, a relist) instead of one per object.
const REBUILD_DELAY: Duration = Duration::from_millis(20);
/// How often this node's pods without a CNI-given namespace are looked up again in /proc
/// (their first process may have ended).
const NETNS_REFRESH: Duration = Duration::from_secs(1);
/// How long a sandbox waits for its pod to appear in the watch (the API knows a pod before
/// the kubelet starts it, so this covers only the watch's lag).
pub const SANDBOX_POD_WAIT: Duration = Duration::from_secs(20);

/// What the agent runs on in Kubernetes mode.
pub struct Started {
    pub store: StateStore,
    pub policy: watch::Receiver<Arc<PolicySet>>,
    pub sandboxes: Sandboxes,
}

/// Connects to the API server (in-cluster, else KUBECONFIG), lists everything the view needs,
/// and keeps following it. Returns once the first complete state is built.
pub async fn start(
    config: &MeshConfig,
    node: &str,
    metrics: &Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<Started> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config, else KUBECONFIG)")?;
    let cgroups = node::PodCgroups::new(&node::cgroup2_mount()?, &config.kubelet);
    info!(
        node,
        pods_cgroup = %cgroups.pods_root().display(),
        "following the Kubernetes API"
    );
    let recorder = policy::recorder(client.clone(), node);
    let policy = policy::start(
        client.clone(),
        config.policy.root_namespace.clone(),
        recorder,
        metrics.clone(),
        shutdown.clone(),
    );
    let (changes_tx, changes) = mpsc::channel(1024);
    spawn_watches(&client, &changes_tx, metrics, &shutdown);
    let (sandbox_tx, sandbox_rx) = mpsc::channel(64);
    let mut view = View::new(config, node, cgroups);
    let mut source = Source {
        changes,
        sandbox_requests: sandbox_rx,
        shutdown: shutdown.clone(),
    };
    let (first, policy) = tokio::try_join!(source.until_listed(&mut view), policy)?;
    let store = StateStore::new(first);
    tokio::spawn(source.run(view, store.clone(), metrics.clone()));
    Ok(Started {
        store,
        policy,
        sandboxes: Sandboxes {
            requests: sandbox_tx,
        },
    })
}

/// One watch's news, tagged by kind, with the facts already taken from the objects.
pub(crate) enum Change {
    Pod(Keyed<PodFacts>),
    Namespace(Keyed<NamespaceFacts>),
    Service(Keyed<ServiceFacts>),
    Slice(Keyed<SliceFacts>),
}

fn spawn_watches(
    client: &Client,
    changes: &mpsc::Sender<Change>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    let watch = Watch {
        client,
        changes,
        metrics,
        shutdown,
    };
    watch.spawn::<Pod, _>(Change::Pod, view::pod_key, |p| PodFacts::of(p).map(Some));
    watch.spawn::<Namespace, _>(Change::Namespace, view::object_key, |n| {
        NamespaceFacts::of(n).map(Some)
    });
    watch.spawn::<Service, _>(Change::Service, view::object_key, ServiceFacts::of);
    watch.spawn::<EndpointSlice, _>(Change::Slice, view::object_key, SliceFacts::of);
}

/// What every watch shares.
struct Watch<'a> {
    client: &'a Client,
    changes: &'a mpsc::Sender<Change>,
    metrics: &'a Metrics,
    shutdown: &'a CancellationToken,
}

impl Watch<'_> {
    /// Lists and watches every object of kind `K`, forwarding each event with the facts of its
    /// objects (tagged by `tag`) until shutdown; errors are logged and the watch resumes with
    /// backoff (and relists when it has been away too long).
    fn spawn<K, T>(
        &self,
        tag: fn(Keyed<T>) -> Change,
        key: fn(&K) -> String,
        facts: fn(&K) -> Result<Option<T>, facts::FactsError>,
    ) where
        K: kube::Resource<DynamicType = ()>
            + k8s_openapi::Resource
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + 'static,
        T: Send + 'static,
    {
        let api: Api<K> = Api::all(self.client.clone());
        let kind: &'static str = <K as k8s_openapi::Resource>::KIND;
        let mut events: BoxStream<'static, Result<watcher::Event<K>, watcher::Error>> =
            watcher(api, watcher::Config::default().any_semantic())
                .backoff(WatchBackoff::default())
                .boxed();
        let (shutdown, changes, metrics) = (
            self.shutdown.clone(),
            self.changes.clone(),
            self.metrics.clone(),
        );
        tokio::spawn(async move {
            let mut reported = HashSet::new();
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    event = events.next() => event,
                };
                match event {
                    None => return,
                    Some(Err(err)) => {
                        warn!(kind, error = %err, "watching the API failed; retrying")
                    }
                    Some(Ok(event)) => {
                        metrics.watch_event(kind);
                        let keyed = view::keyed(&mut reported, event, key, facts);
                        if changes.send(tag(keyed)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// How long a watch waits before it tries again after an error: from 0.5 s, doubling, at
/// most 5 s, with ±25% jitter so the agents of many nodes do not return in step. Shorter than
/// kube-rs's default (30 s at most): the agent must see the changes made while the API server
/// was away soon after it is back, and a node's watches are few.
pub(crate) struct WatchBackoff {
    next: Duration,
}

const WATCH_BACKOFF_FIRST: Duration = Duration::from_millis(500);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Default for WatchBackoff {
    fn default() -> Self {
        Self {
            next: WATCH_BACKOFF_FIRST,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (base * 2).min(WATCH_BACKOFF_MAX);
        // Jitter from the clock's low bits: no need for a random number generator here.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let factor = 0.75 + f64::from(nanos % 1000) / 2000.0;
        Some(base.mul_f64(factor))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_BACKOFF_FIRST;
    }
}

/// A sandbox the CNI plugin reports: the pod's network namespace and addresses as the
/// runtime made them, before the API has them.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
}

/// What the view decided for a sandbox.
#[derive(Debug)]
pub enum SandboxVerdict {
    /// In the mesh: the state now serves it as this workload (`namespace/name`).
    InMesh {
        workload: String,
    },
    NotInMesh {
        reason: String,
    },
    /// The pod did not appear in the API in time.
    UnknownPod,
}

pub(crate) enum SandboxRequest {
    Add(Sandbox, oneshot::Sender<SandboxVerdict>),
    /// The sandbox is gone (CNI DEL).
    Remove {
        uid: Option<String>,
        namespace: String,
        name: String,
    },
    /// Whether the pod should be in the mesh (CNI CHECK).
    Check(Sandbox, oneshot::Sender<SandboxVerdict>),
}

/// The CNI server's handle on the view.
#[derive(Clone)]
pub struct Sandboxes {
    requests: mpsc::Sender<SandboxRequest>,
}

impl Sandboxes {
    /// Hands a new sandbox to the view; answers once its pod is known.
    pub async fn add(&self, sandbox: Sandbox) -> anyhow::Result<SandboxVerdict> {
        self.ask(|reply| SandboxRequest::Add(sandbox, reply)).await
    }

    pub async fn check(&self, sandbox: Sandbox) -> anyhow::Result<SandboxVerdict> {
        self.ask(|reply| SandboxRequest::Check(sandbox, reply))
            .await
    }

    pub async fn remove(&self, uid: Option<String>, namespace: String, name: String) {
        let _ = self
            .requests
            .send(SandboxRequest::Remove {
                uid,
                namespace,
                name,
            })
            .await;
    }

    async fn ask(
        &self,
        request: impl FnOnce(oneshot::Sender<SandboxVerdict>) -> SandboxRequest,
    ) -> anyhow::Result<SandboxVerdict> {
        let (reply, verdict) = oneshot::channel();
        self.requests
            .send(request(reply))
            .await
            .map_err(|_| anyhow::anyhow!("the Kubernetes source has stopped"))?;
        verdict
            .await
            .map_err(|_| anyhow::anyhow!("the Kubernetes source has stopped"))
    }
}

/// The task that owns the [`View`]: applies changes and sandbox requests, and publishes a new
/// state after each burst.
struct Source {
    changes: mpsc::Receiver<Change>,
    sandbox_requests: mpsc::Receiver<SandboxRequest>,
    shutdown: CancellationToken,
}

impl Source {
    /// Applies changes until every kind has been listed once; the first state.
    async fn until_listed(&mut self, view: &mut View) -> anyhow::Result<State> {
        let mut waiting = tokio::time::interval(Duration::from_secs(10));
        waiting.tick().await;
        while !view.listed() {
            tokio::select! {
                () = self.shutdown.cancelled() => anyhow::bail!("stopped before the API was listed"),
                change = self.changes.recv() => match change {
                    Some(change) => { view.apply(change); }
                    None => anyhow::bail!("the API watches stopped"),
                },
                _ = waiting.tick() => warn!(missing = ?view.unlisted(), "still waiting for the API server to list"),
            }
        }
        view.build()
            .context("building the first state from the API")
    }

    async fn run(mut self, mut view: View, store: StateStore, metrics: Metrics) {
        let mut refresh = tokio::time::interval(NETNS_REFRESH);
        let mut rebuild_at: Option<tokio::time::Instant> = None;
        loop {
            let rebuild = async {
                match rebuild_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let dirty = tokio::select! {
                () = self.shutdown.cancelled() => return,
                change = self.changes.recv() => match change {
                    Some(change) => view.apply(change),
                    None => return,
                },
                request = self.sandbox_requests.recv() => match request {
                    Some(request) => view.sandbox(request),
                    None => false,
                },
                _ = refresh.tick() => view.refresh_netns(),
                () = rebuild => {
                    rebuild_at = None;
                    self.publish(&mut view, &store, &metrics);
                    false
                }
            };
            if dirty && rebuild_at.is_none() {
                rebuild_at = Some(tokio::time::Instant::now() + REBUILD_DELAY);
            }
            view.expire_waiting_sandboxes();
        }
    }

    fn publish(&self, view: &mut View, store: &StateStore, metrics: &Metrics) {
        match view.build() {
            Ok(state) => {
                info!(
                    workloads = state.local_workloads().len(),
                    services = state.services().len(),
                    "kubernetes state updated"
                );
                store.publish(state);
                metrics.state_built();
                view.answer_sandboxes();
            }
            Err(err) => warn!(
                error = format!("{err:#}"),
                "cannot build the state; keeping the last good one"
            ),
        }
    }
}
