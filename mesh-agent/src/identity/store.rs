//! The node's current workload certificates, and their issuance and renewal.
//!
//! Workloads ask for their identity's certificate with [`IdentityStore::want`]; a task issues
//! what is wanted and renews what is due, without blocking anyone, because the issuer may be a
//! CA across the network (`docs/identity.md`).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use futures::future::BoxFuture;
use rustls::sign::CertifiedKey;
use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::ca::{CertificateAuthority, WorkloadCert, format_time};
use super::spiffe::SpiffeId;
use crate::admin::{Metrics, RenewalResult};

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
/// Requests in flight to the issuer at once: a node starting with many identities does not
/// flood a remote CA.
const MAX_CONCURRENT_REQUESTS: usize = 16;

/// Something that issues workload certificates: the in-process [`CertificateAuthority`], the
/// CA service ([`super::RemoteCa`]), or a closure (tests inject failures this way).
pub trait CertificateIssuer: Send + Sync + 'static {
    fn issue<'a>(
        &'a self,
        id: &'a SpiffeId,
        lifetime: Duration,
    ) -> BoxFuture<'a, anyhow::Result<WorkloadCert>>;
}

impl CertificateIssuer for CertificateAuthority {
    fn issue<'a>(
        &'a self,
        id: &'a SpiffeId,
        lifetime: Duration,
    ) -> BoxFuture<'a, anyhow::Result<WorkloadCert>> {
        let result = CertificateAuthority::issue(self, id, lifetime).map_err(Into::into);
        Box::pin(std::future::ready(result))
    }
}

impl<F> CertificateIssuer for F
where
    F: Fn(&SpiffeId, Duration) -> anyhow::Result<WorkloadCert> + Send + Sync + 'static,
{
    fn issue<'a>(
        &'a self,
        id: &'a SpiffeId,
        lifetime: Duration,
    ) -> BoxFuture<'a, anyhow::Result<WorkloadCert>> {
        Box::pin(std::future::ready(self(id, lifetime)))
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
    /// Wakes the renewal task when identities are wanted, added or replaced.
    changed: Notify,
    /// Bumped whenever an identity gets a certificate (its first, or a renewed one).
    issued: watch::Sender<u64>,
    metrics: Option<Metrics>,
}

struct Entry {
    /// None until the first certificate arrives.
    current: Option<Arc<WorkloadCert>>,
    next_attempt: Instant,
    failures: u32,
    /// A request for it is with the issuer now.
    in_flight: bool,
    /// The last request's failure, until one succeeds (for readiness).
    last_error: Option<String>,
}

impl Entry {
    fn wanted() -> Self {
        Self {
            current: None,
            next_attempt: Instant::now(),
            failures: 0,
            in_flight: false,
            last_error: None,
        }
    }
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
        Self::build(issuer, lifetime, None)
    }

    /// As [`IdentityStore::new`], counting issuance results and exporting expiries in `metrics`.
    pub fn with_metrics(
        issuer: Arc<dyn CertificateIssuer>,
        lifetime: Duration,
        metrics: Metrics,
    ) -> Self {
        Self::build(issuer, lifetime, Some(metrics))
    }

    fn build(
        issuer: Arc<dyn CertificateIssuer>,
        lifetime: Duration,
        metrics: Option<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                issuer,
                lifetime,
                entries: Mutex::new(HashMap::new()),
                changed: Notify::new(),
                issued: watch::Sender::new(0),
                metrics,
            }),
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.inner.lifetime
    }

    /// The certificate of `id` if it has one; otherwise `id` is wanted from now on and the
    /// renewal task asks the issuer for it (see [`IdentityStore::issued`]).
    pub fn want(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let mut entries = self.entries();
        if let Some(entry) = entries.get(id) {
            return entry.current.clone();
        }
        entries.insert(id.clone(), Entry::wanted());
        drop(entries);
        self.inner.changed.notify_one();
        None
    }

    /// Changes whenever an identity gets a certificate: a workload waiting for its first one
    /// can be served.
    pub fn issued(&self) -> watch::Receiver<u64> {
        self.inner.issued.subscribe()
    }

    /// The identities whose last renewal failed, each on a line that says until when its
    /// current certificate carries on: what readiness shows while the CA is away.
    pub fn failing_renewals(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .entries()
            .iter()
            .filter_map(|(id, entry)| {
                let current = entry.current.as_ref()?;
                let error = entry.last_error.as_ref()?;
                Some(format!(
                    "{id}: renewal failing ({error}); serving with the current certificate, valid until {}",
                    format_time(current.not_after())
                ))
            })
            .collect();
        lines.sort();
        lines
    }

    /// Why `id` has no certificate yet, once a request for it has failed.
    pub fn last_error(&self, id: &SpiffeId) -> Option<String> {
        self.entries()
            .get(id)
            .and_then(|entry| entry.last_error.clone())
    }

    /// Issues a certificate for each identity that has none yet. Fails on the first identity
    /// the issuer refuses.
    pub async fn issue_all(&self, ids: impl IntoIterator<Item = SpiffeId>) -> anyhow::Result<()> {
        for id in ids {
            self.add(&id).await?;
        }
        Ok(())
    }

    /// The certificate of `id`, issued now if the store has none.
    pub async fn add(&self, id: &SpiffeId) -> anyhow::Result<Arc<WorkloadCert>> {
        if let Some(current) = self.current(id) {
            return Ok(current);
        }
        let cert = self
            .inner
            .issuer
            .issue(id, self.inner.lifetime)
            .await
            .with_context(|| format!("issuing a certificate for {id}"))?;
        log_issued(id, &cert);
        Ok(self.insert(id.clone(), cert))
    }

    /// Stores a certificate obtained elsewhere; it is renewed like an issued one.
    pub fn insert(&self, id: SpiffeId, cert: WorkloadCert) -> Arc<WorkloadCert> {
        let current = Arc::new(cert);
        self.record_expiry(&id, &current);
        let entry = Entry {
            next_attempt: renewal_time(&current, self.inner.lifetime),
            current: Some(Arc::clone(&current)),
            failures: 0,
            in_flight: false,
            last_error: None,
        };
        self.entries().insert(id, entry);
        self.inner.changed.notify_one();
        self.inner.issued.send_modify(|n| *n = n.wrapping_add(1));
        current
    }

    /// Forgets `id` (its workload left the node): its certificate is dropped. Returns whether
    /// it was there.
    pub fn remove(&self, id: &SpiffeId) -> bool {
        let removed = self.entries().remove(id).is_some();
        if removed && let Some(metrics) = &self.inner.metrics {
            metrics.certificate_dropped(&id.to_string());
        }
        removed
    }

    /// The identities wanted or held.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<_> = self.entries().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The current certificate of `id`.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.entries()
            .get(id)
            .and_then(|entry| entry.current.clone())
    }

    /// The current certificate of `id` in the form rustls presents.
    pub fn certified_key(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        self.entries()
            .get(id)
            .and_then(|entry| entry.current.as_ref().map(|cert| cert.certified_key()))
    }

    /// Issues wanted certificates and renews every certificate at about half its remaining
    /// validity until `shutdown`. A failed request keeps the current certificate and is retried
    /// after 1 s, doubling, at most a tenth of the lifetime or 60 s.
    pub fn spawn_renewal(self, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move { self.run_renewal(shutdown).await })
    }

    async fn run_renewal(self, shutdown: CancellationToken) {
        let mut requests = JoinSet::new();
        loop {
            let next = self.start_due(&mut requests);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
                () = self.inner.changed.notified() => {}
                Some(done) = requests.join_next() => match done {
                    Ok((id, result)) => self.complete(&id, result),
                    Err(err) => error!(error = %err, "a certificate request task failed"),
                },
            }
        }
    }

    /// Starts requests for what is due now (as many as allowed in flight); returns when to
    /// look again.
    fn start_due(
        &self,
        requests: &mut JoinSet<(SpiffeId, anyhow::Result<WorkloadCert>)>,
    ) -> Instant {
        let now = Instant::now();
        let mut entries = self.entries();
        for (id, entry) in entries.iter_mut() {
            if requests.len() >= MAX_CONCURRENT_REQUESTS {
                break;
            }
            if entry.in_flight || entry.next_attempt > now {
                continue;
            }
            entry.in_flight = true;
            let (issuer, id, lifetime) =
                (self.inner.issuer.clone(), id.clone(), self.inner.lifetime);
            requests.spawn(async move {
                let result = issuer.issue(&id, lifetime).await;
                (id, result)
            });
        }
        if requests.len() >= MAX_CONCURRENT_REQUESTS {
            // Saturated: the next completion wakes the task, not the clock.
            return now + IDLE_WAKE_UP;
        }
        entries
            .values()
            .filter(|entry| !entry.in_flight)
            .map(|entry| entry.next_attempt)
            .min()
            .unwrap_or_else(|| now + IDLE_WAKE_UP)
    }

    /// Installs a new certificate, or notes the failure and when to retry.
    fn complete(&self, id: &SpiffeId, result: anyhow::Result<WorkloadCert>) {
        let mut entries = self.entries();
        let Some(entry) = entries.get_mut(id) else {
            return; // removed meanwhile: its certificate is not wanted any more
        };
        entry.in_flight = false;
        match result {
            Ok(cert) => {
                log_issued(id, &cert);
                let cert = Arc::new(cert);
                entry.next_attempt = renewal_time(&cert, self.inner.lifetime);
                entry.current = Some(Arc::clone(&cert));
                entry.failures = 0;
                entry.last_error = None;
                drop(entries);
                self.record_expiry(id, &cert);
                self.count(RenewalResult::Success);
                self.inner.issued.send_modify(|n| *n = n.wrapping_add(1));
            }
            Err(err) => {
                entry.failures = entry.failures.saturating_add(1);
                let delay = retry_delay(entry.failures, self.inner.lifetime);
                entry.next_attempt = Instant::now() + delay;
                log_request_failed(id, entry.current.as_deref(), &err, delay);
                entry.last_error = Some(format!("{err:#}"));
                drop(entries);
                self.count(RenewalResult::Failure);
            }
        }
    }

    fn record_expiry(&self, id: &SpiffeId, cert: &WorkloadCert) {
        if let Some(metrics) = &self.inner.metrics {
            metrics.certificate_expiry(&id.to_string(), cert.not_after());
        }
    }

    fn count(&self, result: RenewalResult) {
        if let Some(metrics) = &self.inner.metrics {
            metrics.certificate_renewal(result);
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

/// Half-way through what is left of the certificate's validity, less a random part of up to a
/// twentieth of the lifetime, so that a node's certificates (and the nodes of a mesh started
/// together) do not all come back to the CA at the same moment.
fn renewal_time(cert: &WorkloadCert, lifetime: Duration) -> Instant {
    let remaining = cert
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let jitter = (lifetime / 20).mul_f64(rand::random::<f64>());
    Instant::now() + (remaining / 2).saturating_sub(jitter)
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

fn log_request_failed(
    id: &SpiffeId,
    current: Option<&WorkloadCert>,
    err: &anyhow::Error,
    retry_in: Duration,
) {
    let error = format!("{err:#}");
    match current {
        None => warn!(
            identity = %id,
            error,
            retry_in = ?retry_in,
            "certificate request failed; the workload is not served until one is issued"
        ),
        Some(current) if current.not_after() <= SystemTime::now() => error!(
            identity = %id,
            not_after = %format_time(current.not_after()),
            error,
            retry_in = ?retry_in,
            "certificate renewal failed and the current certificate has expired"
        ),
        Some(current) => warn!(
            identity = %id,
            not_after = %format_time(current.not_after()),
            error,
            retry_in = ?retry_in,
            "certificate renewal failed"
        ),
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
