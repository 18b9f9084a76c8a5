//! Outbound: connections captured from a workload, accepted on the agent's listener inside that
//! workload's network namespace, and forwarded to their original destination.
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

use super::relay::{Transferred, relay};
use crate::{
    ebpf::OrigDstTable,
    netns::{self, NetNs},
    workload::Workload,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One workload's outbound side: its listeners and what handling a connection needs.
pub struct Outbound {
    listeners: Vec<TcpListener>,
    source: Arc<Source>,
}

/// The captured workload, as every connection from it needs to know it.
struct Source {
    name: String,
    netns: NetNs,
    netns_cookie: u64,
    orig_dst: OrigDstTable,
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
}

impl Outbound {
    /// Opens the outbound listeners (IPv4 and IPv6 loopback, port 15001) inside the workload's
    /// network namespace.
    pub fn listen(workload: &Workload, orig_dst: OrigDstTable) -> anyhow::Result<Self> {
        let netns = NetNs::open(&workload.netns)?;
        let addrs = [
            SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT)),
        ];
        let mut listeners = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let listener = netns.bind(addr).with_context(|| {
                format!("binding {addr} in {}", netns.path().display())
            })?;
            listeners.push(TcpListener::from_std(listener)?);
        }
        let netns_cookie = netns::netns_cookie(&listeners[0])
            .context("reading the workload's netns cookie")?;
        Ok(Self {
            listeners,
            source: Arc::new(Source {
                name: workload.qualified_name(),
                netns,
                netns_cookie,
                orig_dst,
            }),
        })
    }

    /// Accepts connections until `shutdown`, handling each on its own task in `tracker`.
    pub fn serve(self, shutdown: &CancellationToken, tracker: &TaskTracker) {
        for listener in self.listeners {
            let source = self.source.clone();
            let (shutdown, connections) = (shutdown.clone(), tracker.clone());
            tracker.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        accepted = listener.accept() => accepted,
                    };
                    match accepted {
                        Ok((conn, peer)) => {
                            connections.spawn(handle(conn, peer, source.clone()));
                        }
                        Err(err) => {
                            // Out of file descriptors and the like: back off rather than spin.
                            warn!(src_workload = %source.name, error = %err, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
    }
}

async fn handle(mut conn: TcpStream, peer: SocketAddr, source: Arc<Source>) {
    let started = Instant::now();
    let Some(dst) = source.orig_dst.take(source.netns_cookie, peer) else {
        log_closed(&source.name, None, Transferred::default(), started, Some(&OutboundError::NoOriginalDestination));
        reset(conn);
        return;
    };
    match forward(&mut conn, dst, &source).await {
        Ok(transferred) => log_closed(&source.name, Some(dst), transferred, started, None),
        Err((transferred, err)) => {
            log_closed(&source.name, Some(dst), transferred, started, Some(&err));
            reset(conn);
        }
    }
}

/// Connects to the original destination from inside the workload's namespace (so the far end
/// sees the workload's own address) and relays.
async fn forward(
    conn: &mut TcpStream,
    dst: SocketAddr,
    source: &Source,
) -> Result<Transferred, (Transferred, OutboundError)> {
    let fail = |err| (Transferred::default(), err);
    let socket = source
        .netns
        .tcp_socket_for(&dst)
        .map_err(|source| fail(OutboundError::Connect { dst, source }))?;
    let mut upstream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| fail(OutboundError::ConnectTimeout { dst }))?
        .map_err(|source| fail(OutboundError::Connect { dst, source }))?;
    let _ = upstream.set_nodelay(true);
    let _ = conn.set_nodelay(true);
    match relay(conn, &mut upstream).await {
        (transferred, Ok(())) => Ok(transferred),
        (transferred, Err(err)) => Err((transferred, OutboundError::Relay(err))),
    }
}

/// A failed connection ends with a reset, as it would have without the mesh, never with a
/// clean close the client could mistake for a complete response.
fn reset(conn: TcpStream) {
    let _ = conn.set_zero_linger();
    drop(conn);
}

fn log_closed(
    src_workload: &str,
    dst: Option<SocketAddr>,
    transferred: Transferred,
    started: Instant,
    error: Option<&OutboundError>,
) {
    let dst = dst.map_or_else(|| "unknown".to_owned(), |d| d.to_string());
    let duration_ms = started.elapsed().as_millis() as u64;
    match error {
        None => info!(
            src_workload,
            dst,
            bytes_sent = transferred.sent,
            bytes_received = transferred.received,
            duration_ms,
            "connection closed"
        ),
        Some(error) => warn!(
            src_workload,
            dst,
            bytes_sent = transferred.sent,
            bytes_received = transferred.received,
            duration_ms,
            error = %error,
            "connection closed"
        ),
    }
}
