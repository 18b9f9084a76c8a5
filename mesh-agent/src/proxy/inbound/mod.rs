//! Inbound: every connection to a local workload reaches the agent first, is checked against the
//! workload's mTLS mode and authorization policy, and is then delivered to the workload as plain
//! TCP from inside its namespace.
//!
//! - [`hbone`]: mutual TLS on the workload's IPs, port 15008 (the caller's identity comes from its
//!   certificate);
//! - [`plaintext`]: everything else, steered by `sk_lookup` to port 15006 (no identity; refused
//!   under STRICT);
//! - [`same_node`]: connections from another workload of this node, handed over by the outbound
//!   side without a tunnel (the caller's identity is a kernel fact).
//!
//! Connections stay registered while they last: when the policy changes, those it no longer
//! allows are reset, the others continue.

mod hbone;
mod plaintext;
mod same_node;

/// For the fuzz targets (`fuzz/`): the parsing of a `CONNECT` request's destination.
#[doc(hidden)]
pub use hbone::{Rejection as HboneRejection, connect_destination};
pub use same_node::{LocalTarget, LocalTargets, SameNodeError};

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use mesh_ebpf_common::INBOUND_PLAINTEXT_PORT;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::warn;

use super::{
    Lifetime,
    hbone::HBONE_PORT,
    limits::Limits,
    record::{ByteMeter, ConnectionRecord, Connections, Direction, End, Ending, Facts, Security},
    relay::{ChunkRead, ChunkWrite, relay, tcp_halves},
};
use crate::{
    admin::ResponseFlags,
    identity::SpiffeId,
    netns::NetNs,
    policy::{ConnectionAttrs, Decision, MtlsMode, PolicySet, WorkloadRef},
    state::{StateStore, WorkloadInfo},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CLIENT_FIRST_BYTES_WAIT: Duration = Duration::from_millis(500);

/// One local workload, as its inbound listeners serve it.
pub struct Inbound {
    hbone_listeners: Vec<TcpListener>,
    /// Dual-stack: `sk_lookup` may hand it IPv4 connections too.
    plaintext_listener: TcpListener,
    target: Arc<Target>,
}

/// What the inbound side of every local workload shares.
#[derive(Clone)]
pub struct InboundContext {
    pub state: StateStore,
    pub policy: watch::Receiver<Arc<PolicySet>>,
    /// Where every connection is recorded (metrics, access log, admin listing).
    pub connections: Connections,
    /// Streams allowed on one inbound HBONE connection.
    pub max_concurrent_streams: u32,
    /// Where each served workload is published for same-node connections.
    pub local: LocalTargets,
    /// What one calling workload may hold (fair sharing).
    pub limits: Limits,
}

/// What every inbound connection to the workload needs.
struct Target {
    name: String,
    info: Arc<WorkloadInfo>,
    netns: NetNs,
    tls: TlsAcceptor,
    active: ActiveConnections,
    context: InboundContext,
    lifetime: Lifetime,
}

/// How a connection reached the agent, and so what policy may know of its source.
#[derive(Clone, Debug)]
struct Caller {
    identity: Option<SpiffeId>,
    addr: SocketAddr,
    via: Via,
}

/// The path a connection came by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// An HBONE tunnel: the identity is the peer certificate's.
    Hbone,
    /// Captured plaintext: no identity.
    Plaintext,
    /// From a workload of this node: the identity is the capturing listener's workload's.
    SameNode,
}

#[derive(Default)]
struct ActiveConnections {
    next_id: AtomicU64,
    by_id: Mutex<HashMap<u64, ActiveConnection>>,
}

struct ActiveConnection {
    caller: Caller,
    dst: SocketAddr,
    revoked: CancellationToken,
}

impl Inbound {
    /// Binds port 15008 on every IP of the workload and the plaintext capture port on the
    /// dual-stack wildcard address, inside its namespace.
    pub fn listen(
        info: Arc<WorkloadInfo>,
        netns: NetNs,
        tls: Arc<rustls::ServerConfig>,
        context: InboundContext,
        lifetime: Lifetime,
    ) -> anyhow::Result<Self> {
        let bind = |addr: SocketAddr| -> anyhow::Result<TcpListener> {
            netns
                .bind(addr)
                .with_context(|| format!("binding {addr} in {}", netns.path().display()))
        };
        let hbone_listeners = info
            .workload
            .ips
            .iter()
            .map(|ip| bind(SocketAddr::new(*ip, HBONE_PORT)))
            .collect::<anyhow::Result<_>>()?;
        let plaintext_listener = bind(SocketAddr::from((
            Ipv6Addr::UNSPECIFIED,
            INBOUND_PLAINTEXT_PORT,
        )))?;
        Ok(Self {
            hbone_listeners,
            plaintext_listener,
            target: Arc::new(Target {
                name: info.uid.clone(),
                info,
                netns,
                tls: TlsAcceptor::from(tls),
                active: ActiveConnections::default(),
                context,
                lifetime,
            }),
        })
    }

    /// The listener `sk_lookup` must hand captured plaintext connections to.
    pub fn plaintext_listener(&self) -> &TcpListener {
        &self.plaintext_listener
    }

    pub fn netns(&self) -> &NetNs {
        &self.target.netns
    }

    pub fn serve(self, tracker: &TaskTracker) {
        let shutdown = &self.target.lifetime.stop.clone();
        self.target.context.local.publish(&self.target);
        let target = self.target.clone();
        tracker.spawn(async move {
            target.lifetime.stop.cancelled().await;
            target.context.local.withdraw(&target);
        });
        for listener in self.hbone_listeners {
            accept_loop(
                listener,
                self.target.clone(),
                shutdown,
                tracker,
                hbone::serve_connection,
            );
        }
        accept_loop(
            self.plaintext_listener,
            self.target.clone(),
            shutdown,
            tracker,
            plaintext::serve_connection,
        );
        tracker.spawn(revoke_on_policy_change(self.target, shutdown.clone()));
    }
}

/// Accepts on `listener` for `target`, handling each connection with `serve_connection`.
fn accept_loop<F, Fut>(
    listener: TcpListener,
    target: Arc<Target>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    serve_connection: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<Target>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let name = target.name.clone();
    let handle = move |tcp, peer| serve_connection(tcp, peer, target.clone());
    super::accept_loop(listener, name, shutdown, tracker, handle);
}

impl Target {
    /// The workload as the state knows it now: its labels (what policies select it by) may have
    /// changed since its listeners opened.
    fn current(&self) -> Arc<WorkloadInfo> {
        let state = self.context.state.load();
        state
            .workload_by_uid(&self.name)
            .cloned()
            .unwrap_or_else(|| self.info.clone())
    }

    fn mtls_mode(&self, port: u16) -> MtlsMode {
        let policy = self.context.policy.borrow().clone();
        policy.mtls_mode(&WorkloadRef::from(&self.current().workload), port)
    }

    fn authorize(&self, caller: &Caller, dst: SocketAddr) -> Decision {
        let policy = self.context.policy.borrow().clone();
        policy.authorize(
            &WorkloadRef::from(&self.current().workload),
            &caller.attrs(dst),
        )
    }

    /// The record of a connection from `caller` to `dst`, reported by this (the destination)
    /// side, counting its bytes in `meter`.
    fn record(&self, caller: &Caller, dst: SocketAddr, meter: Arc<ByteMeter>) -> ConnectionRecord {
        let state = self.context.state.load();
        let src = End {
            workload: state.workload_by_ip(caller.addr.ip()).cloned(),
            identity: caller.identity.clone(),
            ..End::at(caller.addr)
        };
        let dst = End {
            workload: Some(self.current()),
            identity: Some(self.info.identity.clone()),
            ..End::at(dst)
        };
        let mut facts = Facts::new(Direction::Inbound, src, dst);
        facts.security = caller.security();
        ConnectionRecord::sharing(&self.context.connections, facts, meter)
    }

    /// Whether the current policy still admits a connection: its mode (plaintext under STRICT
    /// is not) and its authorization.
    fn still_admits(&self, caller: &Caller, dst: SocketAddr) -> Result<(), String> {
        if caller.identity.is_none() && self.mtls_mode(dst.port()) == MtlsMode::Strict {
            return Err("plaintext is no longer allowed (STRICT)".to_owned());
        }
        match self.authorize(caller, dst) {
            Decision::Allow { .. } => Ok(()),
            Decision::Deny { by } => Err(by.to_string()),
        }
    }

    fn owns(&self, ip: IpAddr) -> bool {
        self.info.owns(ip)
    }
}

impl Caller {
    fn attrs(&self, dst: SocketAddr) -> ConnectionAttrs<'_> {
        ConnectionAttrs {
            source: self.identity.as_ref(),
            source_ip: self.addr.ip().to_canonical(),
            destination_port: dst.port(),
        }
    }

    fn security(&self) -> Security {
        match self.via {
            Via::Hbone => Security::MutualTls,
            Via::Plaintext => Security::None,
            Via::SameNode => Security::SameNode,
        }
    }

    fn identity_text(&self) -> String {
        self.identity
            .as_ref()
            .map_or_else(|| "unknown".to_owned(), ToString::to_string)
    }
}

/// Re-checks the workload's open connections whenever the policy or the state (the workload's
/// labels) changes; resets those no longer admitted.
async fn revoke_on_policy_change(target: Arc<Target>, shutdown: CancellationToken) {
    let mut policy = target.context.policy.clone();
    let mut state = target.context.state.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = policy.changed() => if changed.is_err() { return },
            changed = state.changed() => if changed.is_err() { return },
        }
        let active = target
            .active
            .by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for connection in active.values() {
            if let Err(reason) = target.still_admits(&connection.caller, connection.dst) {
                warn!(
                    workload = %target.name,
                    peer_identity = %connection.caller.identity_text(),
                    src_addr = %connection.caller.addr,
                    dst = %connection.dst,
                    reason = %reason,
                    "policy changed: closing a connection it no longer allows"
                );
                connection.revoked.cancel();
            }
        }
    }
}

/// Connects to the workload from inside its namespace. The workload's own IP is local there, so
/// the connection arrives on loopback, which the inbound capture leaves alone.
async fn connect_to_workload(netns: &NetNs, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = netns.tcp_socket_for(&dst)?;
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = upstream.set_nodelay(true);
    Ok(upstream)
}

/// Whether a connection may reach the workload, and if so its connection to it.
enum Admission {
    Connected(TcpStream, ConnectionRecord),
    /// Refused by authorization policy (the record says by which).
    Denied {
        by: String,
    },
    /// The workload did not accept the connection.
    Unreachable,
    /// The calling workload is at its limit of concurrent connections.
    OverLimit,
}

/// Authorizes a connection and connects to the workload; a refused or failed one is recorded
/// as such here.
async fn admit(
    target: &Target,
    caller: &Caller,
    dst: SocketAddr,
    mut record: ConnectionRecord,
) -> Admission {
    if let Decision::Deny { by } = target.authorize(caller, dst) {
        let by = by.to_string();
        record.close(Ending::denied(&by));
        return Admission::Denied { by };
    }
    // A same-node caller holds its place under its own outbound limit already.
    if caller.via != Via::SameNode {
        let limits = &target.context.limits.inbound_connections;
        let Some(permit) = limits.try_acquire(caller.addr.ip()) else {
            let limit = limits.max();
            record.close(Ending::over_limit(format_args!(
                "{limit} concurrent connections from one workload"
            )));
            return Admission::OverLimit;
        };
        record.hold(permit);
    }
    match connect_to_workload(&target.netns, dst).await {
        Ok(upstream) => Admission::Connected(upstream, record),
        Err(err) => {
            record.close(Ending::failed(
                ResponseFlags::UpstreamConnectFailure,
                format!("connecting to the workload: {err}"),
            ));
            Admission::Unreachable
        }
    }
}

/// Relays an admitted connection to the workload until either side is done or the policy
/// revokes it, then records how it ended. Returns its `response_flags` if it failed (the
/// caller then resets its side).
async fn deliver<R: ChunkRead, W: ChunkWrite>(
    caller_side: (R, W),
    mut upstream: TcpStream,
    caller: &Caller,
    dst: SocketAddr,
    target: &Target,
    mut record: ConnectionRecord,
) -> Option<ResponseFlags> {
    record.open();
    let id = target.active.next_id.fetch_add(1, Ordering::Relaxed);
    let revoked = CancellationToken::new();
    target
        .active
        .by_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            id,
            ActiveConnection {
                caller: caller.clone(),
                dst,
                revoked: revoked.clone(),
            },
        );
    let meter = record.meter().clone();
    let ending = tokio::select! {
        result = relay(caller_side, tcp_halves(&mut upstream), &meter) => match result {
            Ok(()) => Ending::completed(),
            Err(err) => Ending::failed(ResponseFlags::UpstreamTermination, err),
        },
        _ = revoked.cancelled() => Ending::failed(ResponseFlags::Denied, "revoked by a policy change"),
        _ = target.lifetime.abort.cancelled() => Ending::failed(ResponseFlags::UpstreamTermination, "the workload was removed or restarted"),
    };
    target
        .active
        .by_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    let failure = ending.error.is_some().then_some(ending.flags);
    if failure.is_some() {
        let _ = upstream.set_zero_linger();
    }
    record.close(ending);
    failure
}

/// Waits, briefly, for a refused client's first bytes, so that the reset that follows meets a
/// client waiting for its answer (`curl: (56) Recv failure`), not one still connecting (which
/// would report that it could not connect).
async fn wait_for_first_bytes(tcp: &TcpStream) {
    // `readable()` may wake before data is there; `peek` waits for a byte.
    let mut first = [0u8; 1];
    let _ = tokio::time::timeout(CLIENT_FIRST_BYTES_WAIT, tcp.peek(&mut first)).await;
}
