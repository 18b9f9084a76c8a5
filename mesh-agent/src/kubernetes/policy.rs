//! Istio's `security.istio.io` PeerAuthentication and AuthorizationPolicy objects from the API,
//! checked one by one as the file source checks documents: a valid object joins the set, an
//! invalid one is logged and reported as a Kubernetes Event on it, and its last valid version
//! (if any) stays in force.

use crate::admin::{Metrics, ReloadResult};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use futures::StreamExt as _;
use kube::{
    Api, Client, Resource as _,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt as _,
        events::{Event as K8sEvent, EventType, Recorder, Reporter},
        watcher,
    },
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::policy::PolicySet;

pub const GROUP: &str = "security.istio.io";
pub const VERSION: &str = "v1";
const KINDS: [&str; 2] = ["PeerAuthentication", "AuthorizationPolicy"];

/// One policy object, as the set is built from it.
#[derive(Clone)]
struct Document {
    /// `Kind/namespace/name`: how errors and the config dump name it.
    label: PathBuf,
    /// Istio's tie-break is the oldest policy; then by name.
    order: (String, PathBuf),
    text: String,
}

enum Change {
    Apply(&'static str, DynamicObject),
    Delete(&'static str, DynamicObject),
    Init(&'static str),
    InitDone(&'static str),
}

/// Follows both kinds and publishes each new good set; returns once both have been listed.
pub async fn start(
    client: Client,
    root_namespace: String,
    recorder: Recorder,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<watch::Receiver<Arc<PolicySet>>> {
    let (changes_tx, mut changes) = mpsc::channel(256);
    for kind in KINDS {
        tokio::spawn(follow(
            client.clone(),
            kind,
            changes_tx.clone(),
            shutdown.clone(),
        ));
    }
    drop(changes_tx);
    let mut source = PolicySource {
        root_namespace,
        recorder,
        metrics,
        documents: BTreeMap::new(),
        listing: BTreeMap::new(),
        listed: BTreeMap::new(),
    };
    while source.listed.len() < KINDS.len() {
        let Some(change) = changes.recv().await else {
            anyhow::bail!("stopped before the policies were listed");
        };
        source.handle(change).await;
    }
    let (sender, receiver) = watch::channel(Arc::new(source.build()));
    tokio::spawn(async move {
        while let Some(change) = changes.recv().await {
            if source.handle(change).await {
                sender.send_replace(Arc::new(source.build()));
            }
        }
    });
    Ok(receiver)
}

fn api_resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(GROUP, VERSION, kind))
}

/// Watches one kind (list, then watch; relists after a reconnect) and forwards its changes.
async fn follow(
    client: Client,
    kind: &'static str,
    changes: mpsc::Sender<Change>,
    shutdown: CancellationToken,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &api_resource(kind));
    let mut events = watcher(api, watcher::Config::default())
        .backoff(super::WatchBackoff::default())
        .boxed();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.next() => event,
        };
        let change = match event {
            None => return,
            Some(Err(err)) => {
                warn!(kind, error = %err, "watching policies failed; retrying");
                continue;
            }
            Some(Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj))) => {
                Change::Apply(kind, obj)
            }
            Some(Ok(watcher::Event::Delete(obj))) => Change::Delete(kind, obj),
            Some(Ok(watcher::Event::Init)) => Change::Init(kind),
            Some(Ok(watcher::Event::InitDone)) => Change::InitDone(kind),
        };
        if changes.send(change).await.is_err() {
            return;
        }
    }
}

struct PolicySource {
    root_namespace: String,
    recorder: Recorder,
    metrics: Metrics,
    /// The valid policies in force, by label.
    documents: BTreeMap<PathBuf, Document>,
    /// Labels seen since a kind's (re)list began: what the list does not name was deleted
    /// while the watch was away.
    listing: BTreeMap<&'static str, Vec<PathBuf>>,
    listed: BTreeMap<&'static str, ()>,
}

impl PolicySource {
    /// Returns whether the set changed.
    async fn handle(&mut self, change: Change) -> bool {
        match change {
            Change::Init(kind) => {
                self.listing.insert(kind, Vec::new());
                false
            }
            Change::InitDone(kind) => {
                self.listed.insert(kind, ());
                let seen = self.listing.remove(kind).unwrap_or_default();
                let before = self.documents.len();
                let prefix = format!("{kind}/");
                self.documents.retain(|label, _| {
                    !label.to_string_lossy().starts_with(&prefix) || seen.contains(label)
                });
                before != self.documents.len() || !seen.is_empty()
            }
            Change::Delete(kind, obj) => {
                let label = label_of(kind, &obj);
                info!(policy = %label.display(), "policy deleted");
                self.documents.remove(&label).is_some()
            }
            Change::Apply(kind, obj) => {
                let label = label_of(kind, &obj);
                if let Some(seen) = self.listing.get_mut(kind) {
                    seen.push(label.clone());
                }
                self.apply(kind, label, &obj).await
            }
        }
    }

    async fn apply(&mut self, kind: &'static str, label: PathBuf, obj: &DynamicObject) -> bool {
        let document = match document_of(kind, &label, obj) {
            Ok(document) => document,
            Err(err) => {
                self.reject(kind, &label, obj, &err).await;
                return false;
            }
        };
        let checked = PolicySet::from_documents(
            [(document.label.as_path(), document.text.as_str())],
            &self.root_namespace,
        );
        match checked {
            Ok(_) => {
                let changed = self
                    .documents
                    .get(&label)
                    .is_none_or(|old| old.text != document.text);
                self.documents.insert(label, document);
                changed
            }
            Err(err) => {
                self.reject(kind, &label, obj, &err.to_string()).await;
                false
            }
        }
    }

    async fn reject(&self, kind: &str, label: &Path, obj: &DynamicObject, why: &str) {
        self.metrics.policy_reload(ReloadResult::Rejected);
        let kept = self.documents.contains_key(label);
        error!(
            policy = %label.display(),
            error = why,
            kept_previous = kept,
            "policy rejected; keeping the last good policy"
        );
        let note = if kept {
            format!("{why} (its last valid version stays in force)")
        } else {
            format!("{why} (not enforced)")
        };
        let event = K8sEvent {
            type_: EventType::Warning,
            reason: "InvalidPolicy".to_owned(),
            note: Some(truncate(note, 1000)),
            action: "Validate".to_owned(),
            secondary: None,
        };
        let reference = obj.object_ref(&api_resource(kind));
        if let Err(err) = self.recorder.publish(&event, &reference).await {
            warn!(policy = %label.display(), error = %err, "cannot report the rejected policy as an Event");
        }
    }

    /// The set of every valid policy, the oldest first.
    fn build(&self) -> PolicySet {
        let mut documents: Vec<&Document> = self.documents.values().collect();
        documents.sort_by(|a, b| a.order.cmp(&b.order));
        let set = PolicySet::from_documents(
            documents
                .iter()
                .map(|d| (d.label.as_path(), d.text.as_str())),
            &self.root_namespace,
        );
        match set {
            Ok(set) => {
                self.metrics.policy_reload(ReloadResult::Loaded);
                info!(
                    source = "kubernetes",
                    peer_authentications = set.peer_authentication_count(),
                    authorization_policies = set.authorization_policy_count(),
                    "policy loaded"
                );
                for warning in set.warnings() {
                    warn!(source = "kubernetes", "{warning}");
                }
                set
            }
            // Each document was valid alone; together they can only clash on names, which the
            // API keeps unique. Still, never serve a half set.
            Err(err) => {
                error!(error = %err, "policy set rejected; serving no policy changes");
                PolicySet::empty(&self.root_namespace)
            }
        }
    }
}

fn label_of(kind: &str, obj: &DynamicObject) -> PathBuf {
    let namespace = obj.metadata.namespace.as_deref().unwrap_or("");
    let name = obj.metadata.name.as_deref().unwrap_or("");
    PathBuf::from(format!("{kind}/{namespace}/{name}"))
}

/// The object as the YAML document a user would have written: apiVersion, kind, name,
/// namespace and spec (status and server-side fields are not policy).
fn document_of(kind: &str, label: &Path, obj: &DynamicObject) -> Result<Document, String> {
    let mut document = serde_json::json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": kind,
        "metadata": {
            "name": obj.metadata.name,
            "namespace": obj.metadata.namespace,
        },
    });
    if let Some(spec) = obj.data.get("spec") {
        document["spec"] = spec.clone();
    }
    let text = serde_yaml_ng::to_string(&document).map_err(|err| err.to_string())?;
    let created = obj
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    Ok(Document {
        label: label.to_owned(),
        order: (created, label.to_owned()),
        text,
    })
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The reporter of the agent's Events: `mesh-agent` on this node.
pub fn recorder(client: Client, node: &str) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: "mesh-agent".to_owned(),
            instance: Some(node.to_owned()),
        },
    )
}
