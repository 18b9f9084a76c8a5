//! The trust bundle as the agent's TLS configurations see it: shared, and replaced when its
//! file changes, so that a root rotation reaches every new handshake without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ca::TrustBundle;
use crate::fswatch::Fingerprint;

/// How often the bundle's file is looked at.
pub const BUNDLE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The current trust bundle. Cheap to clone; clones share it.
#[derive(Clone, Debug)]
pub struct SharedBundle {
    current: Arc<ArcSwap<TrustBundle>>,
}

impl From<TrustBundle> for SharedBundle {
    fn from(bundle: TrustBundle) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(bundle)),
        }
    }
}

impl SharedBundle {
    pub fn current(&self) -> Arc<TrustBundle> {
        self.current.load_full()
    }

    /// From the next handshake on, peers must chain to `bundle`.
    pub fn replace(&self, bundle: TrustBundle) {
        self.current.store(Arc::new(bundle));
    }

    /// Reloads the bundle from `path` whenever the file changes, until `shutdown`. A file that
    /// does not parse (half written, say) is logged and the current bundle kept.
    pub fn follow_file(&self, path: &Path, shutdown: CancellationToken) {
        let (shared, path) = (self.clone(), path.to_owned());
        tokio::spawn(async move { shared.poll_file(path, shutdown).await });
    }

    async fn poll_file(self, path: PathBuf, shutdown: CancellationToken) {
        let mut seen = fingerprint(&path);
        let mut reported: Option<String> = None;
        let mut ticks = tokio::time::interval(BUNDLE_POLL_INTERVAL);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let now = fingerprint(&path);
            if now == seen {
                continue;
            }
            match TrustBundle::load(&path) {
                Ok(bundle) => {
                    info!(path = %path.display(), roots = bundle.certificates().len(), "trust bundle reloaded");
                    self.replace(bundle);
                    seen = now;
                    reported = None;
                }
                // Not remembered as seen: the next poll tries again, once the writer is done.
                Err(err) => {
                    let error = err.to_string();
                    if reported.as_ref() != Some(&error) {
                        warn!(path = %path.display(), error, "trust bundle not reloaded; keeping the current one");
                        reported = Some(error);
                    }
                }
            }
        }
    }
}

fn fingerprint(path: &Path) -> Fingerprint {
    Fingerprint::of(path, |path| Ok(vec![path.to_owned()]))
}
