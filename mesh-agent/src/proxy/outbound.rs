//! Outbound: connections captured from a workload, accepted on the agent's listener inside that
//! workload's network namespace, and forwarded to their original destination: through an HBONE
//! tunnel when the destination is a mesh workload, as plain TCP otherwise.
//!
//! Which workload made a call is a kernel fact: the listener that accepted it lives in that
//! workload's namespace and nowhere else. The source IP is never consulted.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_ebpf_common::OUTBOUND_PORT;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use super::{
    hbone::{HBONE_PORT, HboneClient, HboneError},
    relay::{Transferred, relay, tcp_halves},
    telemetry::{self, Party},
    tunnel::Refused,
};
use crate::{
    admin::{Metrics, Reporter, ResponseFlags},
    ebpf::OrigDstTable,
    identity::{self, SpiffeId, SpiffeIdError},
    netns::{self, NetNs},
    workload::{Cluster, Workload},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One workload's outbound side: its listeners and what handling a connection needs.
pub struct Outbound {
    listeners: Vec<TcpListener>,
    source: Arc<Source>,
}

/// The captured workload, as every connection from it needs to know it.
struct Source {
    workload: Workload,
    name: String,
    identity: SpiffeId,
    netns: NetNs,
    netns_cookie: u64,
    orig_dst: OrigDstTable,
    mesh: Arc<Mesh>,
}

/// What the outbound side needs to know of the mesh to choose a route.
pub struct Mesh {
    pub cluster: Arc<Cluster>,
    pub hbone: Arc<HboneClient>,
    pub metrics: Metrics,
}

/// How a captured connection reaches its destination.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// Through the agent that serves the destination workload, which must prove `expected`.
    Hbone { via: SocketAddr, expected: SpiffeId },
    /// Straight to the destination: outside the mesh, or on this node (bytes that never leave
    /// the node need no encryption).
    Direct,
}

/// How a relayed connection was secured, for logs (Istio's `connection_security_policy`).
#[derive(Clone, Copy)]
enum Security {
    MutualTls,
    None,
}

impl Security {
    fn as_str(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::None => "none",
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum OutboundError {
    #[error("no original destination recorded for this connection (not captured by the mesh?)")]
    NoOriginalDestination,
    #[error("connecting to {dst}: {source}")]
    Connect { dst: SocketAddr, source: io::Error },
    #[error("connecting to {dst}: timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout { dst: SocketAddr },
    #[error("relaying: {0}")]
    Relay(io::Error),
    #[error("hbone: {0}")]
    Hbone(#[from] HboneError),
    #[error("destination identity: {0}")]
    Identity(#[from] SpiffeIdError),
}

impl Outbound {
    /// Opens the outbound listeners (IPv4 and IPv6 loopback, port 15001) inside the workload's
    /// network namespace.
    pub fn listen(
        workload: &Workload,
        identity: SpiffeId,
        orig_dst: OrigDstTable,
        mesh: Arc<Mesh>,
    ) -> anyhow::Result<Self> {
        let netns = NetNs::open(&workload.netns)?;
        let addrs = [
            SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT)),
        ];
        let mut listeners = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let listener = netns
                .bind(addr)
                .with_context(|| format!("binding {addr} in {}", netns.path().display()))?;
            listeners.push(TcpListener::from_std(listener)?);
        }
        let netns_cookie =
            netns::netns_cookie(&listeners[0]).context("reading the workload's netns cookie")?;
        Ok(Self {
            listeners,
            source: Arc::new(Source {
                workload: workload.clone(),
                name: workload.qualified_name(),
                identity,
                netns,
                netns_cookie,
                orig_dst,
                mesh,
            }),
        })
    }

    /// Accepts connections until `shutdown`, handling each on its own task in `tracker`.
    pub fn serve(self, shutdown: &CancellationToken, tracker: &TaskTracker) {
        for listener in self.listeners {
            let source = self.source.clone();
            let handle_from = move |conn, peer| handle(conn, peer, source.clone());
            super::accept_loop(
                listener,
                self.source.name.clone(),
                shutdown,
                tracker,
                handle_from,
            );
        }
    }
}

async fn handle(mut conn: TcpStream, peer: SocketAddr, source: Arc<Source>) {
    let started = Instant::now();
    let mut log = ConnectionLog::new(&source.name, started);
    let Some(dst) = source.orig_dst.take(source.netns_cookie, peer) else {
        log.closed(Err(&OutboundError::NoOriginalDestination));
        reset(conn);
        return;
    };
    log.dst = Some(dst);
    let _ = conn.set_nodelay(true);
    let result = match source.mesh.route(dst) {
        Ok(Route::Hbone { via, expected }) => {
            forward_hbone(&mut conn, dst, via, expected, &source, &mut log).await
        }
        Ok(Route::Direct) => forward_direct(&mut conn, dst, &source, &mut log).await,
        Err(err) => Err(err.into()),
    };
    log.closed(result.as_ref().map(|_| ()));
    record_metrics(&source, dst, &log, &result);
    if result.is_err() {
        reset(conn);
    }
}

/// Connects to the original destination from inside the workload's namespace (so the far end
/// sees the workload's own address) and relays.
async fn forward_direct(
    conn: &mut TcpStream,
    dst: SocketAddr,
    source: &Source,
    log: &mut ConnectionLog<'_>,
) -> Result<(), OutboundError> {
    let socket = source
        .netns
        .tcp_socket_for(&dst)
        .map_err(|source| OutboundError::Connect { dst, source })?;
    let mut upstream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| OutboundError::ConnectTimeout { dst })?
        .map_err(|source| OutboundError::Connect { dst, source })?;
    let _ = upstream.set_nodelay(true);
    let (transferred, result) = relay(tcp_halves(conn), tcp_halves(&mut upstream)).await;
    log.transferred = transferred;
    result.map_err(OutboundError::Relay)
}

async fn forward_hbone(
    conn: &mut TcpStream,
    dst: SocketAddr,
    via: SocketAddr,
    expected: SpiffeId,
    source: &Source,
    log: &mut ConnectionLog<'_>,
) -> Result<(), OutboundError> {
    let stream = source
        .mesh
        .hbone
        .open(
            &source.identity,
            &source.netns,
            via,
            std::slice::from_ref(&expected),
            dst,
        )
        .await?;
    log.security = Security::MutualTls;
    log.peer_identity = Some(stream.peer.clone());
    let (transferred, result) = relay(tcp_halves(conn), (stream.reader, stream.writer)).await;
    log.transferred = transferred;
    result.map_err(|err| match Refused::status_of(&err) {
        Some(status) => OutboundError::Hbone(HboneError::Refused {
            dst: via,
            authority: dst,
            status,
        }),
        None => OutboundError::Relay(err),
    })
}

/// Istio's TCP metrics for the connection, reported by the source side.
fn record_metrics(
    source: &Source,
    dst: SocketAddr,
    log: &ConnectionLog<'_>,
    result: &Result<(), OutboundError>,
) {
    let destination = source.mesh.cluster.workload_by_ip(dst.ip());
    let mut labels = telemetry::connection_labels(
        Reporter::Source,
        Party {
            workload: Some(&source.workload),
            principal: Some(&source.identity),
        },
        Party {
            workload: destination.map(|(_, workload)| workload),
            principal: log.peer_identity.as_ref(),
        },
        matches!(log.security, Security::MutualTls),
    );
    let flags = match result {
        Ok(()) => ResponseFlags::None,
        Err(OutboundError::Relay(_)) => ResponseFlags::UpstreamTermination,
        Err(_) => ResponseFlags::UpstreamConnectFailure,
    };
    source.mesh.metrics.connection_opened(&labels);
    telemetry::record_closed(&source.mesh.metrics, &mut labels, log.transferred, flags);
}

impl OutboundError {
    /// Why the far agent's TLS handshake was refused, when that is what failed.
    fn rejection(&self) -> Option<&'static str> {
        match self {
            OutboundError::Hbone(HboneError::Tls { source, .. }) => {
                Some(identity::rejection_kind(source))
            }
            _ => None,
        }
    }
}

impl Mesh {
    fn route(&self, dst: SocketAddr) -> Result<Route, SpiffeIdError> {
        Ok(match self.cluster.workload_by_ip(dst.ip()) {
            Some((_, workload)) => Route::Hbone {
                via: SocketAddr::new(dst.ip(), HBONE_PORT),
                expected: workload.spiffe_id(&self.cluster.trust_domain)?,
            },
            None => Route::Direct,
        })
    }
}

/// A failed connection ends with a reset, as it would have without the mesh, never with a
/// clean close the client could mistake for a complete response.
fn reset(conn: TcpStream) {
    let _ = conn.set_zero_linger();
    drop(conn);
}

/// What the per-connection log line says, filled in as the connection progresses.
struct ConnectionLog<'a> {
    src_workload: &'a str,
    dst: Option<SocketAddr>,
    security: Security,
    peer_identity: Option<SpiffeId>,
    transferred: Transferred,
    started: Instant,
}

impl<'a> ConnectionLog<'a> {
    fn new(src_workload: &'a str, started: Instant) -> Self {
        Self {
            src_workload,
            dst: None,
            security: Security::None,
            peer_identity: None,
            transferred: Transferred::default(),
            started,
        }
    }

    fn closed(&self, result: Result<(), &OutboundError>) {
        let dst = self
            .dst
            .map_or_else(|| "unknown".to_owned(), |d| d.to_string());
        let peer_identity = self
            .peer_identity
            .as_ref()
            .map_or_else(|| "unknown".to_owned(), ToString::to_string);
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let (src_workload, security) = (self.src_workload, self.security.as_str());
        let (bytes_sent, bytes_received) = (self.transferred.sent, self.transferred.received);
        match result {
            Ok(()) => info!(
                src_workload,
                dst,
                security,
                peer_identity,
                bytes_sent,
                bytes_received,
                duration_ms,
                "connection closed"
            ),
            Err(error) => warn!(
                src_workload, dst, security, peer_identity, bytes_sent, bytes_received, duration_ms,
                rejection = error.rejection(),
                error = %error,
                "connection closed"
            ),
        }
    }
}
