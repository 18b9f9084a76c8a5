//! The node's current workload certificates, and their renewal.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::ca::{CertificateAuthority, WorkloadCert, format_time};
use super::spiffe::SpiffeId;

/// Default lifetime of a workload certificate.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// First retry delay after a failed renewal; it doubles on each further failure.
pub const INITIAL_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Retry delays never exceed this, nor a tenth of the certificate lifetime.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// Retry delays never go below this, however short the lifetime.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(100);
/// How long the renewal task sleeps when it has nothing to renew (it wakes on changes anyway).
const IDLE_WAKE_UP: Duration = Duration::from_secs(3600);

/// Something that issues workload certificates: the in-process [`CertificateAuthority`], a
/// closure (tests inject failures this way), or one day a remote CA.
pub trait CertificateIssuer: Send + Sync + 'static {
    fn issue(&self, id: &SpiffeId, lifetime: Duration) -> anyhow::Result<WorkloadCert>;
}

impl CertificateIssuer for CertificateAuthority {
    fn issue(&self, id: &SpiffeId, lifetime: Duration) -> anyhow::Result<WorkloadCert> {
        Ok(CertificateAuthority::issue(self, id, lifetime)?)
    }
}

impl<F> CertificateIssuer for F
where
    F: Fn(&SpiffeId, Duration) -> anyhow::Result<WorkloadCert> + Send + Sync + 'static,
{
    fn issue(&self, id: &SpiffeId, lifetime: Duration) -> anyhow::Result<WorkloadCert> {
        self(id, lifetime)
    }
}

/// The current certificate of each identity this node serves. Cheap to clone (shared state);
/// TLS configurations read it on every handshake, so a renewal applies to the next connection
/// while established ones carry on.
#[derive(Clone)]
pub struct IdentityStore {
    inner: Arc<Inner>,
}

struct Inner {
    issuer: Arc<dyn CertificateIssuer>,
    lifetime: Duration,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    /// Wakes the renewal task when identities are added or replaced.
    changed: Notify,
}

struct Entry {
    current: Arc<WorkloadCert>,
    next_attempt: Instant,
    failures: u32,
}

impl fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityStore")
            .field("lifetime", &self.inner.lifetime)
            .field("identities", &self.identities())
            .finish()
    }
}

impl IdentityStore {
    /// An empty store whose certificates `issuer` signs, each valid for `lifetime`.
    pub fn new(issuer: Arc<dyn CertificateIssuer>, lifetime: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                issuer,
                lifetime,
                entries: Mutex::new(HashMap::new()),
                changed: Notify::new(),
            }),
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.inner.lifetime
    }

    /// Issues a certificate for each identity that has none yet (at start, or when workloads
    /// arrive). Fails on the first identity the issuer refuses.
    pub fn issue_all(&self, ids: impl IntoIterator<Item = SpiffeId>) -> anyhow::Result<()> {
        for id in ids {
            self.add(&id)?;
        }
        Ok(())
    }

    /// The certificate of `id`, issued now if the store has none.
    pub fn add(&self, id: &SpiffeId) -> anyhow::Result<Arc<WorkloadCert>> {
        if let Some(current) = self.current(id) {
            return Ok(current);
        }
        let cert = self
            .inner
            .issuer
            .issue(id, self.inner.lifetime)
            .with_context(|| format!("issuing a certificate for {id}"))?;
        log_issued(id, &cert);
        Ok(self.insert(id.clone(), cert))
    }

    /// Stores a certificate obtained elsewhere; it is renewed like an issued one.
    pub fn insert(&self, id: SpiffeId, cert: WorkloadCert) -> Arc<WorkloadCert> {
        let current = Arc::new(cert);
        let entry = Entry {
            next_attempt: renewal_time(&current),
            current: Arc::clone(&current),
            failures: 0,
        };
        self.entries().insert(id, entry);
        self.inner.changed.notify_one();
        current
    }

    /// Forgets `id` (its workload left the node). Returns whether it was there.
    pub fn remove(&self, id: &SpiffeId) -> bool {
        self.entries().remove(id).is_some()
    }

    pub fn identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<_> = self.entries().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The current certificate of `id`.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.entries()
            .get(id)
            .map(|entry| Arc::clone(&entry.current))
    }

    /// The current certificate of `id` in the form rustls presents.
    pub fn certified_key(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        self.entries()
            .get(id)
            .map(|entry| entry.current.certified_key())
    }

    /// Renews every certificate at half its remaining validity until `shutdown`. A failed renewal
    /// keeps the current certificate and is retried after 1 s, doubling, at most a tenth of the
    /// lifetime or 60 s.
    pub fn spawn_renewal(self, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move { self.run_renewal(shutdown).await })
    }

    async fn run_renewal(self, shutdown: CancellationToken) {
        loop {
            let next = self
                .renew_due()
                .unwrap_or_else(|| Instant::now() + IDLE_WAKE_UP);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
                () = self.inner.changed.notified() => {}
            }
        }
    }

    /// Renews what is due now; returns when the next attempt is due.
    fn renew_due(&self) -> Option<Instant> {
        for id in self.due_identities(Instant::now()) {
            self.renew(&id);
        }
        self.entries()
            .values()
            .map(|entry| entry.next_attempt)
            .min()
    }

    fn due_identities(&self, now: Instant) -> Vec<SpiffeId> {
        self.entries()
            .iter()
            .filter(|(_, entry)| entry.next_attempt <= now)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// One renewal attempt. The issuer runs without the lock held.
    fn renew(&self, id: &SpiffeId) {
        let result = self.inner.issuer.issue(id, self.inner.lifetime);
        let mut entries = self.entries();
        let Some(entry) = entries.get_mut(id) else {
            return; // removed meanwhile
        };
        match result {
            Ok(cert) => {
                log_issued(id, &cert);
                entry.current = Arc::new(cert);
                entry.next_attempt = renewal_time(&entry.current);
                entry.failures = 0;
            }
            Err(err) => {
                entry.failures = entry.failures.saturating_add(1);
                let delay = retry_delay(entry.failures, self.inner.lifetime);
                entry.next_attempt = Instant::now() + delay;
                log_renewal_failed(id, &entry.current, &err, delay);
            }
        }
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<SpiffeId, Entry>> {
        // A panic while holding the lock leaves the map consistent (every update is one
        // assignment), so a poisoned lock is still usable.
        self.inner
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Half-way through what is left of the certificate's validity.
fn renewal_time(cert: &WorkloadCert) -> Instant {
    let remaining = cert
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now() + remaining / 2
}

/// 1 s, 2 s, 4 s, ... capped at a tenth of the lifetime or 60 s, whichever is smaller.
fn retry_delay(failures: u32, lifetime: Duration) -> Duration {
    let cap = (lifetime / 10).min(MAX_RETRY_DELAY).max(MIN_RETRY_DELAY);
    let doublings = failures.saturating_sub(1).min(16);
    INITIAL_RETRY_DELAY.saturating_mul(1 << doublings).min(cap)
}

fn log_issued(id: &SpiffeId, cert: &WorkloadCert) {
    info!(
        identity = %id,
        serial = cert.serial(),
        not_after = %format_time(cert.not_after()),
        "certificate issued"
    );
}

fn log_renewal_failed(
    id: &SpiffeId,
    current: &WorkloadCert,
    err: &anyhow::Error,
    retry_in: Duration,
) {
    if current.not_after() <= SystemTime::now() {
        error!(
            identity = %id,
            not_after = %format_time(current.not_after()),
            error = format!("{err:#}"),
            retry_in = ?retry_in,
            "certificate renewal failed and the current certificate has expired"
        );
    } else {
        warn!(
            identity = %id,
            not_after = %format_time(current.not_after()),
            error = format!("{err:#}"),
            retry_in = ?retry_in,
            "certificate renewal failed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_up_to_its_cap() {
        let day = DEFAULT_CERT_LIFETIME;
        let delays: Vec<_> = (1..=8).map(|n| retry_delay(n, day).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(retry_delay(1_000, day), MAX_RETRY_DELAY);
        assert_eq!(
            retry_delay(1, Duration::from_secs(2)),
            Duration::from_millis(200)
        );
        assert_eq!(retry_delay(3, Duration::ZERO), MIN_RETRY_DELAY);
    }
}
