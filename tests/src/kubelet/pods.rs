//! The pods bound to this node: a watch with `spec.nodeName=<node>` (as kubelet's), one
//! [`Worker`] task per pod uid that owns everything of that pod, and the pods this kubelet (or
//! an earlier run of it) left on the node.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{Result, anyhow};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Ctx;
use super::sandbox;
use super::worker::Worker;

/// A pod's worker, and the channel that gives it the pod's latest version (None: gone).
struct Handle {
    pod: watch::Sender<Option<Arc<Pod>>>,
    task: JoinHandle<()>,
}

/// Runs the pods until `stop`, then leaves them running, or with `--cleanup-on-exit` stops
/// them and removes their sandboxes (their API objects stay).
pub(crate) async fn run(ctx: &Arc<Ctx>, mut stop: watch::Receiver<bool>) -> Result<()> {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.config.node));
    let mut events = watcher::watcher(pods, config).default_backoff().boxed();
    let mut dispatch = Dispatch {
        ctx: ctx.clone(),
        workers: HashMap::new(),
        listing: None,
        recorded: Some(sandbox::recorded_uids(&ctx.config)?),
    };
    loop {
        let event = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            event = events.next() => event.ok_or_else(|| anyhow!("the pod watch ended"))?,
        };
        match event {
            Ok(event) => dispatch.handle(event),
            Err(e) => tracing::warn!("watch pods of node {}: {e}", ctx.config.node),
        }
        dispatch.workers.retain(|_, w| !w.task.is_finished());
    }
    dispatch.shutdown(ctx.config.cleanup_on_exit).await;
    Ok(())
}

struct Dispatch {
    ctx: Arc<Ctx>,
    workers: HashMap<String, Handle>,
    /// The uids listed since the watch (re)started listing, until the list is complete.
    listing: Option<HashSet<String>>,
    /// Pods with a sandbox record at start, until the first complete list says which of them
    /// are still in the API (the others are torn down).
    recorded: Option<Vec<String>>,
}

impl Dispatch {
    fn handle(&mut self, event: Event<Pod>) {
        match event {
            Event::Init => self.listing = Some(HashSet::new()),
            Event::InitApply(pod) | Event::Apply(pod) => {
                if let Some(uid) = pod.metadata.uid.clone() {
                    if let Some(listing) = &mut self.listing {
                        listing.insert(uid.clone());
                    }
                    self.update(uid, Some(Arc::new(pod)));
                }
            }
            Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid {
                    self.update(uid, None);
                }
            }
            Event::InitDone => self.listed(),
        }
    }

    /// After a complete list: pods not in it are gone (deleted while the watch was down, or
    /// before this kubelet started).
    fn listed(&mut self) {
        let listed = self.listing.take().unwrap_or_default();
        let gone: Vec<String> = self
            .workers
            .keys()
            .chain(self.recorded.take().iter().flatten())
            .filter(|uid| !listed.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            self.update(uid, None);
        }
    }

    /// Hands the pod's latest version (or its end) to its worker, starting one if needed.
    fn update(&mut self, uid: String, pod: Option<Arc<Pod>>) {
        if let Some(worker) = self.workers.get(&uid) {
            worker.pod.send_replace(pod);
            return;
        }
        let (tx, rx) = watch::channel(pod);
        let worker = Worker::new(self.ctx.clone(), uid.clone(), rx);
        let task = tokio::spawn(worker.run());
        self.workers.insert(uid, Handle { pod: tx, task });
    }

    /// Ends the workers: with `cleanup` each tears its pod down first (as for a pod that is
    /// gone), else each just stops at its next wait (its sender dropped), leaving the pod
    /// running.
    async fn shutdown(self, cleanup: bool) {
        let mut kept = Vec::new();
        let mut tasks = Vec::new();
        for (uid, worker) in self.workers {
            if cleanup {
                worker.pod.send_replace(None);
                kept.push(worker.pod);
            }
            tasks.push((uid, worker.task));
        }
        for (uid, task) in tasks {
            if let Err(e) = task.await {
                tracing::warn!("worker of pod {uid} failed: {e}");
            }
        }
        drop(kept);
    }
}
