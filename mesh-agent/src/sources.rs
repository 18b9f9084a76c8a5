//! Where the live view of the mesh comes from. Every source builds whole [`State`]s and
//! publishes them to the one [`StateStore`]; today the cluster file, watched for edits.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::{
    fswatch::Fingerprint,
    state::{State, StateStore},
    workload::Cluster,
};

/// How often the cluster file is checked for changes.
pub const CLUSTER_FILE_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The cluster file: read at start, then re-read whenever it changes. A bad edit is refused
/// whole (with file:line) and the last good state stays.
pub struct ClusterFileSource {
    path: PathBuf,
    node: String,
    seen: Fingerprint,
    store: StateStore,
}

impl ClusterFileSource {
    /// Reads the file now: without a good first state there is nothing to serve.
    pub fn load(path: &Path, node: &str) -> anyhow::Result<State> {
        let cluster = Cluster::load(path)?;
        State::build(cluster, node).map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))
    }

    /// Polls the file every `interval` until `shutdown`, publishing each good edit to `store`.
    pub fn spawn(
        path: &Path,
        node: &str,
        store: StateStore,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let source = Self {
            seen: fingerprint(path),
            path: path.to_owned(),
            node: node.to_owned(),
            store,
        };
        tokio::spawn(source.run(interval, shutdown));
    }

    async fn run(mut self, interval: Duration, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let (path, node, seen) = (self.path.clone(), self.node.clone(), self.seen.clone());
            // Reading files blocks: keep it off the runtime's workers.
            let examined = tokio::task::spawn_blocking(move || examine(&path, &node, &seen)).await;
            match examined {
                Ok(Some((fingerprint, loaded))) => {
                    self.seen = fingerprint;
                    self.apply(loaded);
                }
                Ok(None) => {}
                Err(err) => tracing::error!(error = %err, "reading the cluster file failed"),
            }
        }
    }

    fn apply(&self, loaded: anyhow::Result<State>) {
        let path = self.path.display();
        match loaded {
            Ok(state) => {
                if needs_restart(&self.store.load().cluster, &state.cluster) {
                    tracing::warn!(
                        path = %path,
                        "the identity, trust domain, policy path and hbone settings of the cluster file take effect at the next start"
                    );
                }
                tracing::info!(
                    path = %path,
                    workloads = state.local_workloads().len(),
                    services = state.services().len(),
                    "cluster file loaded"
                );
                self.store.publish(state);
            }
            Err(err) => tracing::error!(
                path = %path,
                error = format!("{err:#}"),
                "cluster file rejected; keeping the last good state"
            ),
        }
    }
}

/// The new fingerprint and what reading the file gave, if it changed since `seen`.
fn examine(
    path: &Path,
    node: &str,
    seen: &Fingerprint,
) -> Option<(Fingerprint, anyhow::Result<State>)> {
    let current = fingerprint(path);
    if &current == seen {
        return None;
    }
    let loaded = ClusterFileSource::load(path, node);
    Some((current, loaded))
}

/// Whether settings the agent reads only at start differ.
fn needs_restart(before: &Cluster, after: &Cluster) -> bool {
    before.identity != after.identity
        || before.policy.path != after.policy.path
        || before.trust_domain != after.trust_domain
        || before.hbone != after.hbone
        || before.limits != after.limits
}

fn fingerprint(path: &Path) -> Fingerprint {
    Fingerprint::of(path, |path| Ok(vec![path.to_owned()]))
}
