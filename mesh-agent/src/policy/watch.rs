//! Reloading policies when their files change, keeping the last good set when a change is bad.
//!
//! The path is polled (file sizes, times and inodes, and the directory listing) rather than
//! watched with inotify: polling works the same in containers, on bind mounts and network
//! filesystems, and through the symbolic-link swaps of Kubernetes ConfigMap volumes, where
//! inotify events are missed or never sent.

use crate::admin::{Metrics, ReloadResult};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::load::policy_files;
use super::{PolicyError, PolicySet};
use crate::fswatch::Fingerprint;

/// How often the policy path is checked for changes, unless told otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Loads the policies of a path, then reloads them whenever the path changes.
pub struct PolicyWatcher;

impl PolicyWatcher {
    /// Loads `path` (a file or a directory) now and returns the set, to be read with `borrow()`.
    /// A load error now is returned: there is no good set to fall back on. Then a task polls
    /// the path every `poll_interval` and reloads it on change: a good set is published and
    /// logged (`policy loaded`); a bad one is logged (`policy rejected; keeping the last good
    /// policy`) and the last good set stays, as it does while the path is missing. The task
    /// ends when `shutdown` is cancelled or every receiver is dropped.
    ///
    /// Must be called from within a Tokio runtime.
    pub fn spawn(
        path: impl Into<PathBuf>,
        root_namespace: impl Into<String>,
        poll_interval: Duration,
        shutdown: CancellationToken,
    ) -> Result<watch::Receiver<Arc<PolicySet>>, PolicyError> {
        Self::spawn_counted(path, root_namespace, poll_interval, None, shutdown)
    }

    /// [`Self::spawn`], counting each reload in `metrics` (`mesh_agent_policy_reloads_total`).
    pub fn spawn_counted(
        path: impl Into<PathBuf>,
        root_namespace: impl Into<String>,
        poll_interval: Duration,
        metrics: Option<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<watch::Receiver<Arc<PolicySet>>, PolicyError> {
        let (path, root_namespace) = (path.into(), root_namespace.into());
        let seen = fingerprint(&path);
        let set = PolicySet::load(&path, &root_namespace)?;
        if let Some(metrics) = &metrics {
            metrics.policy_reload(ReloadResult::Loaded);
        }
        log_loaded(&path, &set);
        let (sender, receiver) = watch::channel(Arc::new(set));
        let poller = Poller {
            path,
            root_namespace,
            poll_interval,
            seen,
            sender,
            metrics,
        };
        tokio::spawn(poller.run(shutdown));
        Ok(receiver)
    }
}

struct Poller {
    path: PathBuf,
    root_namespace: String,
    poll_interval: Duration,
    /// The state of the path when it was last read, good or bad: a bad change is reported once.
    seen: Fingerprint,
    sender: watch::Sender<Arc<PolicySet>>,
    metrics: Option<Metrics>,
}

impl Poller {
    fn count(&self, result: ReloadResult) {
        if let Some(metrics) = &self.metrics {
            metrics.policy_reload(result);
        }
    }

    async fn run(mut self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.poll_interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = self.sender.closed() => return,
                () = shutdown.cancelled() => return,
            }
            self.check().await;
        }
    }

    async fn check(&mut self) {
        let (path, root_namespace) = (self.path.clone(), self.root_namespace.clone());
        let seen = self.seen.clone();
        // Reading files blocks: keep it off the runtime's workers.
        let examined =
            tokio::task::spawn_blocking(move || examine(&path, &root_namespace, &seen)).await;
        let change = match examined {
            Ok(change) => change,
            Err(err) => {
                tracing::error!(
                    path = %self.path.display(),
                    error = %err,
                    "policy reload failed; keeping the last good policy"
                );
                return;
            }
        };
        match change {
            Change::None => {}
            Change::Disappeared => {
                self.seen = Fingerprint::Missing;
                tracing::error!(
                    path = %self.path.display(),
                    "policy path disappeared; keeping the last good policy"
                );
            }
            Change::Reloaded(fingerprint, Ok(set)) => {
                self.seen = fingerprint;
                self.count(ReloadResult::Loaded);
                log_loaded(&self.path, &set);
                self.sender.send_replace(Arc::new(set));
            }
            Change::Reloaded(fingerprint, Err(err)) => {
                self.seen = fingerprint;
                self.count(ReloadResult::Rejected);
                tracing::error!(
                    path = %self.path.display(),
                    error = %err,
                    "policy rejected; keeping the last good policy"
                );
            }
        }
    }
}

enum Change {
    None,
    Disappeared,
    Reloaded(Fingerprint, Result<PolicySet, PolicyError>),
}

/// Compares the path with what was last read, and reloads it if it changed. The fingerprint is
/// taken before reading, so a change made while reading is seen at the next poll.
fn examine(path: &Path, root_namespace: &str, seen: &Fingerprint) -> Change {
    let current = fingerprint(path);
    if &current == seen {
        return Change::None;
    }
    if current == Fingerprint::Missing {
        return Change::Disappeared;
    }
    Change::Reloaded(current, PolicySet::load(path, root_namespace))
}

fn log_loaded(path: &Path, set: &PolicySet) {
    tracing::info!(
        path = %path.display(),
        files = set.files().len(),
        peer_authentications = set.peer_authentication_count(),
        authorization_policies = set.authorization_policy_count(),
        "policy loaded"
    );
    for warning in set.warnings() {
        tracing::warn!(path = %path.display(), "{warning}");
    }
}

/// What a poll compares: each policy file's identity, size and times.
fn fingerprint(path: &Path) -> Fingerprint {
    Fingerprint::of(path, |path| {
        policy_files(path).map_err(|err| err.to_string())
    })
}
