//! Outbound: connections captured from a workload, accepted on the agent's listener inside that
//! workload's network namespace, and forwarded to their original destination: through an HBONE
//! tunnel when the destination is a mesh workload or a Service (one of its endpoints), as plain
//! TCP otherwise.
//!
//! Which workload made a call is a kernel fact: the listener that accepted it lives in that
//! workload's namespace and nowhere else. The source IP is never consulted.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use mesh_ebpf_common::OUTBOUND_PORT;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::{
    Lifetime,
    hbone::{HBONE_PORT, HboneClient, HboneError, HboneStream},
    inbound::{LocalTarget, LocalTargets, SameNodeError},
    limits::{Limit, Limits},
    record::{ConnectionRecord, Connections, Direction, End, Ending, Facts, Security},
    relay::{relay, tcp_halves},
    tunnel::Refused,
};
use crate::{
    admin::ResponseFlags,
    ebpf::OrigDstTable,
    identity,
    netns::{self, NetNs},
    state::{Destination, ServiceInfo, StateStore, WorkloadInfo},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One workload's outbound side: its listeners and what handling a connection needs.
pub struct Outbound {
    listeners: Vec<TcpListener>,
    source: Arc<Source>,
}

/// The captured workload, as every connection from it needs to know it.
struct Source {
    info: Arc<WorkloadInfo>,
    netns: NetNs,
    netns_cookie: u64,
    orig_dst: OrigDstTable,
    mesh: Arc<Mesh>,
    lifetime: Lifetime,
    /// Its concurrent connections (fair sharing).
    connections: Arc<Limit>,
    /// The HBONE handshakes its connections may wait on at once.
    handshakes: Semaphore,
}

/// What the outbound side needs to know of the mesh to choose a route.
pub struct Mesh {
    pub state: StateStore,
    pub hbone: Arc<HboneClient>,
    /// Where every connection is recorded (metrics, access log, admin listing).
    pub connections: Connections,
    /// The node's served workloads, for same-node connections.
    pub local: LocalTargets,
    pub limits: Limits,
}

/// A workload a connection may go to through its agent, and the address it is asked for.
struct Endpoint {
    workload: Arc<WorkloadInfo>,
    /// The HBONE `:authority`: the endpoint's IP and the (target) port.
    authority: SocketAddr,
    /// The Service it was chosen from, and its index there.
    of_service: Option<(Arc<ServiceInfo>, usize)>,
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
    #[error("service {service} has no ready endpoint for port {port}")]
    NoEndpoint { service: String, port: u16 },
    #[error("the workload was removed or restarted")]
    WorkloadGone,
    #[error("same node: {0}")]
    SameNode(#[from] SameNodeError),
}

impl Outbound {
    /// Opens the outbound listeners (IPv4 and IPv6 loopback, port 15001) inside the workload's
    /// network namespace.
    pub fn listen(
        info: Arc<WorkloadInfo>,
        netns: NetNs,
        orig_dst: OrigDstTable,
        mesh: Arc<Mesh>,
        lifetime: Lifetime,
    ) -> anyhow::Result<Self> {
        let addrs = [
            SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT)),
        ];
        let mut listeners = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let listener = netns
                .bind(addr)
                .with_context(|| format!("binding {addr} in {}", netns.path().display()))?;
            listeners.push(listener);
        }
        let netns_cookie =
            netns::netns_cookie(&listeners[0]).context("reading the workload's netns cookie")?;
        let connections = Limit::new(mesh.limits.connections_per_workload);
        let handshakes = Semaphore::new(mesh.limits.handshakes_per_workload);
        Ok(Self {
            listeners,
            source: Arc::new(Source {
                info,
                netns,
                netns_cookie,
                orig_dst,
                mesh,
                lifetime,
                connections,
                handshakes,
            }),
        })
    }

    /// Accepts connections until the workload's listeners stop, handling each on its own task
    /// in `tracker`.
    pub fn serve(self, tracker: &TaskTracker) {
        for listener in self.listeners {
            let source = self.source.clone();
            let handle_from = move |conn, peer| handle(conn, peer, source.clone());
            super::accept_loop(
                listener,
                self.source.info.uid.clone(),
                &self.source.lifetime.stop,
                tracker,
                handle_from,
            );
        }
    }
}

async fn handle(mut conn: TcpStream, peer: SocketAddr, source: Arc<Source>) {
    let dst = source.orig_dst.take(source.netns_cookie, peer);
    let facts = source.facts(dst, peer.port());
    let mut record = ConnectionRecord::new(&source.mesh.connections, facts);
    let Some(dst) = dst else {
        record.close(OutboundError::NoOriginalDestination.ending());
        reset(conn);
        return;
    };
    let Some(permit) = source.connections.try_acquire() else {
        let limit = source.connections.max();
        record.close(Ending::over_limit(format_args!(
            "{limit} concurrent connections from this workload"
        )));
        reset(conn);
        return;
    };
    record.hold(permit);
    let _ = conn.set_nodelay(true);
    let state = source.mesh.state.load();
    let forwarded = async {
        match state.destination(dst) {
            Destination::Workload(workload) => {
                record.facts_mut().dst.workload = Some(workload.clone());
                let endpoint = Endpoint {
                    workload: workload.clone(),
                    authority: dst,
                    of_service: None,
                };
                forward_hbone(&mut conn, vec![endpoint], &source, &mut record).await
            }
            Destination::Service {
                service,
                target_port,
            } => {
                record.facts_mut().service = Some(service.hostname.clone());
                match target_port.map(|port| endpoints_of(service, dst, port)) {
                    Some(endpoints) if !endpoints.is_empty() => {
                        forward_hbone(&mut conn, endpoints, &source, &mut record).await
                    }
                    // Only endpoints outside the mesh: to the virtual IP from the workload's
                    // namespace, where the node's Service routing (kube-proxy) picks one.
                    Some(_) if service.outside_endpoints => {
                        forward_direct(&mut conn, dst, &source, &mut record).await
                    }
                    _ => Err(OutboundError::NoEndpoint {
                        service: service.uid.clone(),
                        port: dst.port(),
                    }),
                }
            }
            Destination::Outside => forward_direct(&mut conn, dst, &source, &mut record).await,
        }
    };
    let result = tokio::select! {
        result = forwarded => result,
        () = source.lifetime.abort.cancelled() => Err(OutboundError::WorkloadGone),
    };
    match result {
        Ok(()) => record.close(Ending::completed()),
        Err(err) => {
            record.close(err.ending());
            reset(conn);
        }
    }
}

/// The Service's endpoints for a connection to `dst`, in the order to try them.
fn endpoints_of(service: &Arc<ServiceInfo>, dst: SocketAddr, target_port: u16) -> Vec<Endpoint> {
    service
        .endpoints_in_turn()
        .into_iter()
        .map(|(k, workload)| {
            let ip = workload
                .workload
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == dst.is_ipv4())
                .unwrap_or(&workload.workload.ips[0]);
            Endpoint {
                workload: workload.clone(),
                authority: SocketAddr::new(*ip, target_port),
                of_service: Some((service.clone(), k)),
            }
        })
        .collect()
}

/// Connects to the original destination from inside the workload's namespace (so the far end
/// sees the workload's own address) and relays.
async fn forward_direct(
    conn: &mut TcpStream,
    dst: SocketAddr,
    source: &Source,
    record: &mut ConnectionRecord,
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
    record.open();
    relay(tcp_halves(conn), tcp_halves(&mut upstream), record.meter())
        .await
        .map_err(OutboundError::Relay)
}

/// Through the agent of the first endpoint that answers, within the connect timeout: a
/// Service's endpoint whose node cannot be reached is skipped.
async fn forward_hbone(
    conn: &mut TcpStream,
    endpoints: Vec<Endpoint>,
    source: &Source,
    record: &mut ConnectionRecord,
) -> Result<(), OutboundError> {
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut last_error = None;
    let mut opened = None;
    let count = endpoints.len();
    for (tried, endpoint) in endpoints.into_iter().enumerate() {
        if let Some(local) = source.same_node_target(&endpoint) {
            return forward_same_node(conn, endpoint, local, source, record).await;
        }
        let via = SocketAddr::new(endpoint.authority.ip(), HBONE_PORT);
        let open = source.mesh.hbone.open(
            (&source.info.uid, &source.info.identity),
            (&source.netns, &source.handshakes),
            via,
            &endpoint.workload.identity,
            endpoint.authority,
        );
        match tokio::time::timeout_at(deadline, open).await {
            Ok(Ok(stream)) => {
                opened = Some((endpoint, stream));
                break;
            }
            Ok(Err(err)) => {
                if tried + 1 < count {
                    warn!(src_workload = %source.info.uid, endpoint = %endpoint.authority, error = %err, "endpoint unreachable; trying the next");
                }
                if let Some((service, k)) = &endpoint.of_service {
                    service.eject(*k);
                }
                last_error = Some(err);
            }
            Err(_) => {
                last_error = Some(HboneError::ConnectTimeout { dst: via });
                break;
            }
        }
    }
    let Some((endpoint, stream)) = opened else {
        return Err(last_error.map(OutboundError::Hbone).unwrap_or(
            OutboundError::ConnectTimeout {
                dst: record
                    .facts()
                    .dst
                    .addr
                    .unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))),
            },
        ));
    };
    let HboneStream {
        reader,
        writer,
        peer,
    } = stream;
    let authority = endpoint.authority;
    let facts = record.facts_mut();
    facts.security = Security::MutualTls;
    facts.dst.identity = Some(peer);
    facts.dst.workload = Some(endpoint.workload);
    facts.endpoint = Some(authority);
    record.open();
    let relayed = relay(tcp_halves(conn), (reader, writer), record.meter()).await;
    relayed.map_err(|err| match Refused::status_of(&err) {
        Some(status) => OutboundError::Hbone(HboneError::Refused {
            dst: SocketAddr::new(authority.ip(), HBONE_PORT),
            authority,
            status,
        }),
        None => OutboundError::Relay(err),
    })
}

impl Source {
    /// What is known of a connection to `dst` from the source port `port`, before routing.
    fn facts(&self, dst: Option<SocketAddr>, port: u16) -> Facts {
        let state = self.mesh.state.load();
        // The workload as it is now: its labels (`source_app`) may have changed.
        let workload = state
            .workload_by_uid(&self.info.uid)
            .cloned()
            .unwrap_or_else(|| self.info.clone());
        let src = End {
            workload: Some(workload),
            identity: Some(self.info.identity.clone()),
            ..End::at(self.address_towards(dst, port))
        };
        let dst = dst.map(End::at).unwrap_or_default();
        Facts::new(Direction::Outbound, src, dst)
    }

    /// The destination's inbound side, when the endpoint is a workload this agent serves and
    /// the settings let the connection skip HBONE.
    fn same_node_target(&self, endpoint: &Endpoint) -> Option<LocalTarget> {
        let target = self.mesh.local.get(endpoint.authority.ip())?;
        let state = self.mesh.state.load();
        state
            .cluster
            .same_node
            .short_circuits_to(&endpoint.workload.workload)
            .then_some(target)
    }

    /// The source's own address for a connection to `dst`: the capturing listener sees the
    /// client on loopback, but policy (`ipBlocks`) and logs need the workload's IP.
    fn address_towards(&self, dst: Option<SocketAddr>, port: u16) -> SocketAddr {
        let ips = &self.info.workload.ips;
        let ip = ips
            .iter()
            .find(|ip| dst.is_none_or(|dst| ip.is_ipv4() == dst.is_ipv4()))
            .unwrap_or(&ips[0]);
        SocketAddr::new(*ip, port)
    }
}

/// To a workload of this node, through its inbound side in this process: no tunnel, no TLS.
/// Both sides' records count the bytes of the one relay.
async fn forward_same_node(
    conn: &mut TcpStream,
    endpoint: Endpoint,
    local: LocalTarget,
    source: &Source,
    record: &mut ConnectionRecord,
) -> Result<(), OutboundError> {
    let dst = endpoint.authority;
    let facts = record.facts_mut();
    facts.security = Security::SameNode;
    facts.dst.identity = Some(local.identity().clone());
    facts.dst.workload = Some(endpoint.workload);
    facts.endpoint = Some(dst);
    let src = record
        .facts()
        .src
        .addr
        .unwrap_or_else(|| source.address_towards(Some(dst), 0));
    record.open();
    let identity = source.info.identity.clone();
    local
        .deliver(conn, identity, src, dst, record.meter().clone())
        .await
        .map_err(OutboundError::from)
}

impl OutboundError {
    /// How the connection ended, for its record.
    fn ending(&self) -> Ending {
        let flags = match self {
            OutboundError::Relay(_) => ResponseFlags::UpstreamTermination,
            OutboundError::NoEndpoint { .. } => ResponseFlags::NoHealthyUpstream,
            OutboundError::WorkloadGone => ResponseFlags::DownstreamTermination,
            OutboundError::SameNode(err) => err.response_flags(),
            OutboundError::Hbone(HboneError::Refused { status, .. })
                if *status == http::StatusCode::FORBIDDEN =>
            {
                ResponseFlags::Denied
            }
            _ => ResponseFlags::UpstreamConnectFailure,
        };
        Ending {
            rejection: self.rejection(),
            ..Ending::failed(flags, self)
        }
    }

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

/// A failed connection ends with a reset, as it would have without the mesh, never with a
/// clean close the client could mistake for a complete response.
fn reset(conn: TcpStream) {
    let _ = conn.set_zero_linger();
    drop(conn);
}
