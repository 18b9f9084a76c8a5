//! One connection, recorded in one place from open to close.
//!
//! A [`ConnectionRecord`] counts the connection opened when it opens, its bytes as they flow
//! (the relay adds them to a [`ByteMeter`]; [`Connections::flush`] moves them into the metrics
//! every few seconds), closed exactly once, and writes its access-log line. Both directions and
//! every path (HBONE, plaintext, same node, direct) use it, so the metrics, the access log and
//! the admin API's list of open connections cannot disagree. See docs/observability.md.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Transferred, limits::Permit, telemetry};
use crate::{
    admin::{ConnectionLabels, Metrics, Reporter, ResponseFlags, SecurityPolicy},
    identity::SpiffeId,
    state::WorkloadInfo,
};

/// How often the bytes of open connections reach the metrics.
pub const FLUSH_PERIOD: Duration = Duration::from_secs(5);
/// Shards of the open-connection table: opening and closing lock one shard, never all.
const SHARDS: usize = 16;

/// One access-log line of a connection at `$level`: its facts' fields (the same in every line),
/// then the caller's fields and message.
macro_rules! connection_line {
    ($level:ident, $facts:expr, $($rest:tt)*) => {{
        let f: &Facts = $facts;
        $level!(
            direction = f.direction.as_str(),
            src_addr = f.src.addr.map(display),
            src_workload = f.src.workload_name(),
            src_identity = f.src.identity.as_ref().map(display),
            dst_addr = f.dst.addr.map(display),
            dst_workload = f.dst.workload_name(),
            dst_identity = f.dst.identity.as_ref().map(display),
            dst_service = f.service.as_deref(),
            endpoint = f.endpoint.map(display),
            security = f.security.as_str(),
            $($rest)*
        )
    }};
}

/// Which agent reports: the source's (outbound) or the destination's (inbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    fn reporter(self) -> Reporter {
        match self {
            Direction::Outbound => Reporter::Source,
            Direction::Inbound => Reporter::Destination,
        }
    }
}

/// How a connection was secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// Mutual TLS between two agents (HBONE).
    MutualTls,
    /// Both ends on this node, no TLS, the source proven by the kernel.
    SameNode,
    /// Plaintext: a caller outside the mesh, or a destination outside it.
    None,
}

impl Security {
    /// The access log's and the admin API's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::SameNode => "same_node",
            Security::None => "none",
        }
    }

    /// Istio's `connection_security_policy`: plaintext is `unknown` there.
    pub fn policy(self) -> SecurityPolicy {
        match self {
            Security::MutualTls => SecurityPolicy::MutualTls,
            Security::SameNode => SecurityPolicy::SameNode,
            Security::None => SecurityPolicy::Unknown,
        }
    }
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One end of a connection, as far as the agent can name it.
#[derive(Clone, Default)]
pub struct End {
    /// Canonical: an IPv4 address is never printed as `::ffff:a.b.c.d`.
    pub addr: Option<SocketAddr>,
    pub workload: Option<Arc<WorkloadInfo>>,
    pub identity: Option<SpiffeId>,
}

impl End {
    pub fn at(addr: SocketAddr) -> Self {
        Self {
            addr: Some(canonical(addr)),
            ..Self::default()
        }
    }

    fn workload_name(&self) -> Option<&str> {
        self.workload.as_ref().map(|w| w.uid.as_str())
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`: one address, one spelling, in every line.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// What is known of a connection: filled in as it is routed, fixed once it opens.
#[derive(Clone)]
pub struct Facts {
    pub direction: Direction,
    pub src: End,
    pub dst: End,
    /// The Service's host name, when the destination is a Service.
    pub service: Option<String>,
    /// Outbound: the workload address chosen (the HBONE authority).
    pub endpoint: Option<SocketAddr>,
    pub security: Security,
}

impl Facts {
    pub fn new(direction: Direction, src: End, dst: End) -> Self {
        Self {
            direction,
            src,
            dst,
            service: None,
            endpoint: None,
            security: Security::None,
        }
    }

    /// Istio's labels, from this reporter's point of view.
    fn labels(&self) -> ConnectionLabels {
        fn party(end: &End) -> telemetry::Party<'_> {
            telemetry::Party {
                workload: end.workload.as_ref().map(|w| &w.workload),
                principal: end.identity.as_ref(),
            }
        }
        let mut labels = telemetry::connection_labels(
            self.direction.reporter(),
            party(&self.src),
            party(&self.dst),
            self.security.policy(),
        );
        if let Some(service) = &self.service {
            labels.destination_service = service.clone();
        }
        labels
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Default)]
pub struct Ending {
    pub flags: ResponseFlags,
    /// What went wrong, for the log.
    pub error: Option<String>,
    /// The stable code of a refusal (`policy_denied`, `plaintext_strict`, ...: docs/agent.md).
    pub rejection: Option<&'static str>,
    /// The policy that denied it.
    pub denied_by: Option<String>,
}

impl Ending {
    /// Both sides finished normally.
    pub fn completed() -> Self {
        Self::default()
    }

    pub fn failed(flags: ResponseFlags, error: impl fmt::Display) -> Self {
        Self {
            flags,
            error: Some(error.to_string()),
            ..Self::default()
        }
    }

    /// Refused by authorization policy `by`.
    pub fn denied(by: impl fmt::Display) -> Self {
        Self {
            flags: ResponseFlags::Denied,
            rejection: Some("policy_denied"),
            denied_by: Some(by.to_string()),
            ..Self::default()
        }
    }

    /// Refused because a workload is at its limit (`what`, e.g. its concurrent connections).
    pub fn over_limit(what: impl fmt::Display) -> Self {
        Self {
            flags: ResponseFlags::Overflow,
            error: Some(format!("over the limit of {what}")),
            rejection: Some("over_limit"),
            denied_by: None,
        }
    }

    /// Refused before policy, for `reason` (e.g. plaintext under STRICT).
    pub fn refused(rejection: &'static str, reason: impl fmt::Display) -> Self {
        Self {
            flags: ResponseFlags::Denied,
            error: Some(reason.to_string()),
            rejection: Some(rejection),
            denied_by: None,
        }
    }

    fn is_failure(&self) -> bool {
        self.error.is_some() || self.rejection.is_some()
    }
}

/// Bytes a connection moved, counted by the relay as they go. Shared by the two records of a
/// same-node connection, which one relay serves.
#[derive(Debug, Default)]
pub struct ByteMeter {
    /// Source to destination.
    sent: AtomicU64,
    /// Destination to source.
    received: AtomicU64,
}

impl ByteMeter {
    pub fn add_sent(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_received(&self, bytes: u64) {
        self.received.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn transferred(&self) -> Transferred {
        Transferred {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
        }
    }
}

/// An open connection, as the table holds it.
struct Open {
    facts: Facts,
    /// As opened: `response_flags` is `-` until it closes.
    labels: ConnectionLabels,
    meter: Arc<ByteMeter>,
    /// What the metrics have of its bytes: (sent, received).
    flushed: (AtomicU64, AtomicU64),
    opened_at: SystemTime,
    started: Instant,
}

impl Open {
    /// Bytes not in the metrics yet, taken: concurrent callers never both take the same bytes
    /// (`fetch_max` leaves the larger total, and whoever raised it reports the difference).
    fn take_unflushed(&self) -> Transferred {
        let now = self.meter.transferred();
        let take = |flushed: &AtomicU64, total: u64| {
            total.saturating_sub(flushed.fetch_max(total, Ordering::Relaxed))
        };
        Transferred {
            sent: take(&self.flushed.0, now.sent),
            received: take(&self.flushed.1, now.received),
        }
    }

    /// Istio counts request bytes as received and response bytes as sent, whoever reports.
    fn flush(&self, metrics: &Metrics, labels: &ConnectionLabels) {
        let bytes = self.take_unflushed();
        metrics.add_bytes(labels, bytes.received, bytes.sent);
    }
}

/// The agent's open connections, and the metrics they are counted in. Cheap to clone.
#[derive(Clone)]
pub struct Connections {
    inner: Arc<Table>,
}

struct Table {
    metrics: Metrics,
    next_id: AtomicU64,
    shards: [Mutex<HashMap<u64, Arc<Open>>>; SHARDS],
    /// By destination workload: who reached it in plaintext ([`Connections::plaintext_clients`]).
    plaintext: [Mutex<HashMap<PlaintextKey, PlaintextClient>>; SHARDS],
    started: SystemTime,
}

/// A workload of this node, and an address that reached it in plaintext.
#[derive(Clone, PartialEq, Eq, Hash)]
struct PlaintextKey {
    workload: String,
    client: std::net::IpAddr,
}

/// Clients remembered per workload; beyond this the least recently seen is forgotten.
const PLAINTEXT_CLIENTS_PER_SHARD: usize = 4096;

/// A client that reached a workload of this node in plaintext, for the migration report.
#[derive(Debug, Clone, Serialize)]
pub struct PlaintextClient {
    /// `namespace/name` of the workload reached.
    pub workload: String,
    /// The client's IP.
    pub client: std::net::IpAddr,
    /// `namespace/name`, when the IP is a workload the agent knows (of the mesh or not).
    pub client_workload: Option<String>,
    /// Plaintext connections admitted from it.
    pub connections: u64,
    /// The last port it connected to.
    pub last_port: u16,
    /// Unix time, seconds.
    pub first_seen: u64,
    pub last_seen: u64,
}

/// One open connection, as the admin API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct OpenConnection {
    pub direction: Direction,
    pub src_addr: Option<SocketAddr>,
    pub src_workload: Option<String>,
    pub src_identity: Option<String>,
    pub dst_addr: Option<SocketAddr>,
    pub dst_workload: Option<String>,
    pub dst_identity: Option<String>,
    pub dst_service: Option<String>,
    pub security: Security,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Unix time, seconds.
    pub opened_at: u64,
    pub duration_ms: u64,
}

impl Connections {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Table {
                metrics,
                next_id: AtomicU64::new(0),
                shards: Default::default(),
                plaintext: Default::default(),
                started: SystemTime::now(),
            }),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Moves the bytes open connections moved since the last flush into the metrics.
    pub fn flush(&self) {
        for open in self.all() {
            open.flush(&self.inner.metrics, &open.labels);
        }
    }

    /// Flushes every [`FLUSH_PERIOD`] until `shutdown`.
    pub async fn flush_periodically(self, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(FLUSH_PERIOD);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => self.flush(),
            }
        }
    }

    /// The connections open now, oldest first.
    pub fn list(&self) -> Vec<OpenConnection> {
        let mut open: Vec<_> = self.all();
        open.sort_by_key(|o| o.started);
        open.iter()
            .map(|o| {
                let facts = &o.facts;
                let bytes = o.meter.transferred();
                let name = |end: &End| end.workload_name().map(str::to_owned);
                let id = |end: &End| end.identity.as_ref().map(ToString::to_string);
                OpenConnection {
                    direction: facts.direction,
                    src_addr: facts.src.addr,
                    src_workload: name(&facts.src),
                    src_identity: id(&facts.src),
                    dst_addr: facts.dst.addr,
                    dst_workload: name(&facts.dst),
                    dst_identity: id(&facts.dst),
                    dst_service: facts.service.clone(),
                    security: facts.security,
                    bytes_sent: bytes.sent,
                    bytes_received: bytes.received,
                    opened_at: unix_seconds(o.opened_at),
                    duration_ms: millis(o.started.elapsed()),
                }
            })
            .collect()
    }

    /// Who reached this node's workloads in plaintext since the agent started, most recent
    /// first: what an operator needs to know before turning STRICT on.
    pub fn plaintext_clients(&self) -> Vec<PlaintextClient> {
        let mut all: Vec<_> = self
            .inner
            .plaintext
            .iter()
            .flat_map(|shard| lock(shard).values().cloned().collect::<Vec<_>>())
            .collect();
        all.sort_by(|a, b| b.last_seen.cmp(&a.last_seen));
        all
    }

    /// Since when [`Self::plaintext_clients`] counts (Unix time, seconds).
    pub fn started_at(&self) -> u64 {
        unix_seconds(self.inner.started)
    }

    fn saw_plaintext(&self, facts: &Facts) {
        let (Some(dst), Some(src)) = (facts.dst.workload_name(), facts.src.addr) else {
            return;
        };
        let key = PlaintextKey {
            workload: dst.to_owned(),
            client: src.ip(),
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&key, &mut hasher);
        let shard = std::hash::Hasher::finish(&hasher) as usize % SHARDS;
        let now = unix_seconds(SystemTime::now());
        let mut clients = lock(&self.inner.plaintext[shard]);
        if !clients.contains_key(&key) && clients.len() >= PLAINTEXT_CLIENTS_PER_SHARD {
            let oldest = clients
                .iter()
                .min_by_key(|(_, c)| c.last_seen)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                clients.remove(&oldest);
            }
        }
        let client = clients
            .entry(key)
            .or_insert_with_key(|key| PlaintextClient {
                workload: key.workload.clone(),
                client: key.client,
                client_workload: facts.src.workload_name().map(str::to_owned),
                connections: 0,
                last_port: 0,
                first_seen: now,
                last_seen: now,
            });
        client.connections += 1;
        client.last_seen = now;
        client.last_port = facts.dst.addr.map_or(0, |a| a.port());
    }

    fn all(&self) -> Vec<Arc<Open>> {
        let mut all = Vec::new();
        for shard in &self.inner.shards {
            all.extend(lock(shard).values().cloned());
        }
        all
    }

    fn insert(&self, open: Arc<Open>) -> u64 {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        lock(self.shard(id)).insert(id, open);
        id
    }

    fn remove(&self, id: u64) {
        lock(self.shard(id)).remove(&id);
    }

    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Arc<Open>>> {
        &self.inner.shards[(id % SHARDS as u64) as usize]
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One connection's record. Nothing is counted until [`Self::open`] (or [`Self::close`] of a
/// connection refused before it opened); dropping an open record closes it as cut short.
pub struct ConnectionRecord {
    connections: Connections,
    facts: Facts,
    meter: Arc<ByteMeter>,
    opened: Option<(u64, Arc<Open>)>,
    started: Instant,
    closed: bool,
    /// The connection's place under its workload's limit, given back with the record.
    permit: Option<Permit>,
}

impl ConnectionRecord {
    pub fn new(connections: &Connections, facts: Facts) -> Self {
        Self::sharing(connections, facts, Arc::default())
    }

    /// A record counting the bytes of `meter`, which another record's relay fills: the two
    /// ends of a same-node connection.
    pub fn sharing(connections: &Connections, facts: Facts, meter: Arc<ByteMeter>) -> Self {
        Self {
            connections: connections.clone(),
            facts,
            meter,
            opened: None,
            started: Instant::now(),
            closed: false,
            permit: None,
        }
    }

    /// Keeps `permit` for as long as the connection lasts.
    pub fn hold(&mut self, permit: Permit) {
        self.permit = Some(permit);
    }

    /// What is known so far; changes after [`Self::open`] reach the access log only.
    pub fn facts_mut(&mut self) -> &mut Facts {
        &mut self.facts
    }

    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    /// Where the relay counts the bytes.
    pub fn meter(&self) -> &Arc<ByteMeter> {
        &self.meter
    }

    /// The connection is established: counted opened, listed, its bytes flushed as they flow.
    /// An inbound plaintext one is remembered for the migration report.
    pub fn open(&mut self) {
        if self.opened.is_some() {
            return;
        }
        if self.facts.direction == Direction::Inbound && self.facts.security == Security::None {
            self.connections.saw_plaintext(&self.facts);
        }
        self.register();
    }

    /// Counts it opened and lists it.
    fn register(&mut self) {
        if self.opened.is_some() {
            return;
        }
        let labels = self.facts.labels();
        self.connections.metrics().connection_opened(&labels);
        let open = Arc::new(Open {
            facts: self.facts.clone(),
            labels,
            meter: self.meter.clone(),
            flushed: Default::default(),
            opened_at: SystemTime::now(),
            started: self.started,
        });
        let id = self.connections.insert(open.clone());
        self.opened = Some((id, open));
        connection_line!(debug, &self.facts, "connection opened");
    }

    /// Counts it closed (opened first, if it was refused before it opened), adds the bytes not
    /// flushed yet, and writes the access-log line.
    pub fn close(mut self, ending: Ending) {
        self.finish(ending);
    }

    fn finish(&mut self, ending: Ending) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.register();
        let Some((id, open)) = self.opened.take() else {
            return;
        };
        self.connections.remove(id);
        let metrics = self.connections.metrics();
        let mut labels = open.labels.clone();
        labels.response_flags = ending.flags;
        let rest = open.take_unflushed();
        metrics.connection_closed(&labels, rest.received, rest.sent);
        if let (Direction::Inbound, Some(rejection)) = (self.facts.direction, ending.rejection) {
            metrics.inbound_rejected(rejection);
        }
        self.log_closed(&ending);
    }

    fn log_closed(&self, ending: &Ending) {
        let f = &self.facts;
        let bytes = self.meter.transferred();
        let duration_ms = millis(self.started.elapsed());
        macro_rules! closed {
            ($level:ident) => {
                connection_line!(
                    $level,
                    f,
                    response_flags = ending.flags.as_str(),
                    bytes_sent = bytes.sent,
                    bytes_received = bytes.received,
                    duration_ms,
                    error = ending.error.as_deref(),
                    rejection = ending.rejection,
                    denied_by = ending.denied_by.as_deref(),
                    "connection closed"
                )
            };
        }
        if ending.is_failure() {
            closed!(warn);
        } else {
            closed!(info);
        }
    }
}

impl Drop for ConnectionRecord {
    /// A task ended without saying how (the agent stopping): the connection was cut short.
    fn drop(&mut self) {
        if !self.closed && self.opened.is_some() {
            self.finish(Ending::failed(
                ResponseFlags::DownstreamTermination,
                "the agent stopped handling the connection",
            ));
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str, needle: &str) -> u64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn record(connections: &Connections) -> ConnectionRecord {
        let facts = Facts::new(
            Direction::Inbound,
            End::at("[::ffff:10.0.0.1]:4000".parse().unwrap()),
            End::at("10.0.0.2:80".parse().unwrap()),
        );
        ConnectionRecord::new(connections, facts)
    }

    #[test]
    fn counts_opened_at_open_bytes_on_flush_and_closed_once() {
        let connections = Connections::new(Metrics::new());
        let mut record = record(&connections);
        let text = connections.metrics().encode();
        assert_eq!(sample(&text, "istio_tcp_connections_opened_total", ""), 0);
        record.open();
        record.meter().add_sent(100);
        record.meter().add_received(7);
        let text = connections.metrics().encode();
        assert_eq!(sample(&text, "istio_tcp_connections_opened_total", ""), 1);
        assert_eq!(sample(&text, "istio_tcp_received_bytes_total", ""), 0);
        assert_eq!(connections.list().len(), 1);
        assert_eq!(
            connections.list()[0].src_addr,
            Some("10.0.0.1:4000".parse().unwrap())
        );

        connections.flush();
        connections.flush();
        let text = connections.metrics().encode();
        assert_eq!(sample(&text, "istio_tcp_received_bytes_total", ""), 100);
        assert_eq!(sample(&text, "istio_tcp_sent_bytes_total", ""), 7);
        assert_eq!(sample(&text, "istio_tcp_connections_closed_total", ""), 0);

        record.meter().add_sent(5);
        record.close(Ending::failed(ResponseFlags::UpstreamTermination, "reset"));
        let text = connections.metrics().encode();
        assert_eq!(sample(&text, "istio_tcp_received_bytes_total", ""), 105);
        assert_eq!(
            sample(
                &text,
                "istio_tcp_received_bytes_total",
                r#"response_flags="UC""#
            ),
            5
        );
        assert_eq!(sample(&text, "istio_tcp_connections_closed_total", ""), 1);
        assert_eq!(sample(&text, "istio_tcp_connections_opened_total", ""), 1);
        assert!(connections.list().is_empty());
    }

    #[test]
    fn a_refusal_is_opened_and_closed_with_its_reason() {
        let connections = Connections::new(Metrics::new());
        record(&connections).close(Ending::denied("ns/deny-all"));
        let text = connections.metrics().encode();
        assert_eq!(sample(&text, "istio_tcp_connections_opened_total", ""), 1);
        assert_eq!(
            sample(
                &text,
                "istio_tcp_connections_closed_total",
                r#"response_flags="DENY""#
            ),
            1
        );
        assert!(text.contains("mesh_agent_inbound_rejections_total{reason=\"policy_denied\"} 1"));
    }

    #[test]
    fn a_dropped_open_record_closes_once_and_an_unopened_one_counts_nothing() {
        let connections = Connections::new(Metrics::new());
        drop(record(&connections));
        let mut open = record(&connections);
        open.open();
        drop(open);
        let text = connections.metrics().encode();
        assert_eq!(sample(&text, "istio_tcp_connections_opened_total", ""), 1);
        assert_eq!(
            sample(
                &text,
                "istio_tcp_connections_closed_total",
                r#"response_flags="DC""#
            ),
            1
        );
    }

    #[test]
    fn admitted_plaintext_is_remembered_per_workload_and_client_refused_is_not() {
        let connections = Connections::new(Metrics::new());
        let plaintext = |port: u16| {
            let mut facts = Facts::new(
                Direction::Inbound,
                End::at("10.0.0.9:5000".parse().unwrap()),
                End::at(SocketAddr::from(([10, 0, 0, 2], port))),
            );
            facts.dst.workload = Some(Arc::new(crate::state::WorkloadInfo::for_tests(
                "default/web",
            )));
            ConnectionRecord::new(&connections, facts)
        };
        for port in [80, 8080] {
            let mut record = plaintext(port);
            record.open();
            record.close(Ending::completed());
        }
        plaintext(80).close(Ending::refused("plaintext_strict", "STRICT"));
        let seen = connections.plaintext_clients();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].workload, "default/web");
        assert_eq!(seen[0].client.to_string(), "10.0.0.9");
        assert_eq!(seen[0].connections, 2);
        assert_eq!(seen[0].last_port, 8080);
        assert!(seen[0].client_workload.is_none());
    }

    /// What a subscriber of `format` writes while `f` runs.
    fn logged(json: bool, f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(data);
                Ok(data.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG);
        if json {
            tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), f);
        } else {
            tracing::subscriber::with_default(builder.finish(), f);
        }
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    fn denied_record(connections: &Connections) {
        let mut facts = Facts::new(
            Direction::Inbound,
            End {
                identity: Some("spiffe://cluster.local/ns/team/sa/other".parse().unwrap()),
                ..End::at("[::ffff:10.0.0.1]:4000".parse().unwrap())
            },
            End::at("10.0.0.2:80".parse().unwrap()),
        );
        let web = Arc::new(crate::state::WorkloadInfo::for_tests("default/web"));
        facts.dst.identity = Some(web.identity.clone());
        facts.dst.workload = Some(web);
        facts.security = Security::MutualTls;
        ConnectionRecord::new(connections, facts)
            .close(Ending::denied("denied by AuthorizationPolicy default/deny"));
    }

    #[test]
    fn the_access_log_line_has_one_schema_in_text_and_json() {
        let connections = Connections::new(Metrics::new());
        let text = logged(false, || denied_record(&connections));
        let line = text
            .lines()
            .find(|l| l.contains("connection closed"))
            .unwrap_or_else(|| panic!("{text}"));
        for field in [
            "WARN",
            "direction=\"inbound\"",
            "src_addr=10.0.0.1:4000",
            "src_identity=spiffe://cluster.local/ns/team/sa/other",
            "dst_addr=10.0.0.2:80",
            "dst_workload=\"default/web\"",
            "dst_identity=spiffe://cluster.local/ns/default/sa/default",
            "security=\"mutual_tls\"",
            "response_flags=\"DENY\"",
            "bytes_sent=0",
            "bytes_received=0",
            "duration_ms=",
            "rejection=\"policy_denied\"",
            "denied_by=\"denied by AuthorizationPolicy default/deny\"",
        ] {
            assert!(line.contains(field), "no {field} in {line}");
        }
        assert!(!line.contains('\u{1b}'), "colours in {line:?}");
        let json = logged(true, || denied_record(&connections));
        let line: serde_json::Value = json
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .find(|l: &serde_json::Value| l["message"] == "connection closed")
            .unwrap_or_else(|| panic!("{json}"));
        assert_eq!(line["direction"], "inbound");
        assert_eq!(line["src_addr"], "10.0.0.1:4000");
        assert_eq!(line["dst_workload"], "default/web");
        assert_eq!(line["response_flags"], "DENY");
        assert_eq!(line["rejection"], "policy_denied");
        assert_eq!(line["bytes_sent"], 0);
        assert!(line.get("error").is_none(), "{line}");
        // At debug, the refusal opened first: one `connection opened` line.
        assert_eq!(json.matches("connection opened").count(), 1, "{json}");
    }

    #[test]
    fn two_records_share_one_meter() {
        let connections = Connections::new(Metrics::new());
        let mut inbound = record(&connections);
        let mut outbound = ConnectionRecord::sharing(
            &connections,
            Facts::new(Direction::Outbound, End::default(), End::default()),
            inbound.meter().clone(),
        );
        inbound.open();
        outbound.open();
        inbound.meter().add_sent(10);
        inbound.close(Ending::completed());
        outbound.close(Ending::completed());
        let text = connections.metrics().encode();
        assert_eq!(
            sample(
                &text,
                "istio_tcp_received_bytes_total",
                r#"reporter="source""#
            ),
            10
        );
        assert_eq!(
            sample(
                &text,
                "istio_tcp_received_bytes_total",
                r#"reporter="destination""#
            ),
            10
        );
    }
}
