//! HBONE client: HTTP/2 `CONNECT` streams over pooled mutual-TLS connections to the agent that
//! serves the destination workload (its IP, port 15008).
//!
//! The TLS connections of one (source workload, its identity, destination, expected identity)
//! carry its streams: they are opened from the source workload's own namespace, so the far agent
//! sees that workload's IP, and a destination IP now owned by another identity gets connections
//! of its own. Concurrent streams are spread over up to one connection per worker thread (a new
//! one is opened only when every existing one is busy); sequential ones reuse the first. A
//! connection with no stream for `idle_timeout` is closed and its entry removed.
//!
//! A stream is usable as soon as `CONNECT` is sent: the caller's first bytes travel with it
//! instead of a round trip later, and the far agent delivers them only once it has accepted
//! the stream (see [`super::tunnel`]).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use super::tunnel::{self, TunnelReader, TunnelWriter};
use crate::{
    identity::{self, IdentityStore, SharedBundle, SpiffeId},
    netns::NetNs,
};

/// Port of the HBONE listener on every workload IP (shared with the kernel side, which leaves it
/// alone).
pub use mesh_ebpf_common::HBONE_PORT;
/// Between agents of one cluster a TCP handshake takes milliseconds: a node that does not answer
/// within this is treated as gone, so a Service's next endpoint still has time.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct HboneClient {
    pool: Mutex<HashMap<PoolKey, Slot>>,
    identities: IdentityStore,
    bundle: SharedBundle,
    idle_timeout: Duration,
    /// Connections per key that concurrent streams are spread over: one per worker thread,
    /// since one connection's TLS runs on one thread at a time.
    spread: usize,
}

/// The connections of one key. The lock serializes choosing and establishing, so that a burst
/// of streams to a new destination opens one TLS connection, not one each, and a stream is
/// counted on its connection before the next caller chooses (the peer's stream limit holds).
type Slot = Arc<tokio::sync::Mutex<Vec<PooledConnection>>>;

/// How often an idle pooled connection PINGs its peer; a peer that does not answer within
/// [`TCP_USER_TIMEOUT`] gets no new streams.
const PING_INTERVAL: Duration = Duration::from_millis(500);
/// Unacknowledged data (a PING, a stream's first bytes) for this long kills the connection: a
/// peer that vanished without a reset is noticed within 2 s, not TCP's minutes.
const TCP_USER_TIMEOUT: Duration = Duration::from_millis(1500);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    source_workload: String,
    /// The source's network namespace (inode): a pod re-created under its name has a new one,
    /// and the connections opened from the old one died with it.
    source_netns: u64,
    source: SpiffeId,
    dst: SocketAddr,
    expected: SpiffeId,
}

struct PooledConnection {
    sender: SendRequest<Bytes>,
    peer: SpiffeId,
    usage: Arc<Usage>,
}

struct Usage {
    open_streams: AtomicUsize,
    last_used: Mutex<Instant>,
    /// The connection has ended: the next stream needs a new one.
    closed: AtomicBool,
}

impl Usage {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            open_streams: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            closed: AtomicBool::new(false),
        })
    }
}

/// A tunnel to the destination through the far agent.
pub struct HboneStream {
    pub reader: TunnelReader<StreamUsage>,
    pub writer: TunnelWriter,
    /// The far agent's identity, as verified by the secure naming check.
    pub peer: SpiffeId,
}

/// Counts a stream as open on its pooled connection until dropped.
pub struct StreamUsage(Arc<Usage>);

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {dst}: {source}")]
    Connect {
        dst: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {dst}: timed out")]
    ConnectTimeout { dst: SocketAddr },
    #[error("TLS handshake with {dst}: {source}")]
    Tls {
        dst: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP/2 with {dst}: {source}")]
    Http2 { dst: SocketAddr, source: h2::Error },
    #[error("{dst} refused CONNECT {authority}: {status}")]
    Refused {
        dst: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
    #[error("{0}")]
    Identity(String),
}

impl HboneClient {
    pub fn new(
        identities: IdentityStore,
        bundle: SharedBundle,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        let client = Arc::new(Self {
            pool: Mutex::new(HashMap::new()),
            identities,
            bundle,
            idle_timeout,
            spread: tokio::runtime::Handle::current()
                .metrics()
                .num_workers()
                .max(1),
        });
        tokio::spawn(close_idle_connections(Arc::downgrade(&client)));
        client
    }

    /// Opens a stream to `authority` (the destination) through the agent listening on `dst`
    /// (the destination workload's IP, port 15008), which must prove `expected`, for the
    /// workload named `source_workload` with identity `source` (from its namespace `netns`; a
    /// TLS handshake it needs waits for one of its `handshakes`).
    pub async fn open(
        &self,
        (source_workload, source): (&str, &SpiffeId),
        (netns, handshakes): (&NetNs, &Semaphore),
        dst: SocketAddr,
        expected: &SpiffeId,
        authority: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        let key = PoolKey {
            source_workload: source_workload.to_owned(),
            source_netns: netns.inode(),
            source: source.clone(),
            dst,
            expected: expected.clone(),
        };
        // A pooled connection the far agent is closing (GOAWAY: it is stopping) refuses new
        // streams before its task ends: mark it closed and try once more on a fresh one.
        let mut retried = false;
        loop {
            let (sender, peer, stream_usage) = self.pooled_sender(&key, netns, handshakes).await?;
            let usage = stream_usage.0.clone();
            let request = connect_request(authority)?;
            match open_stream(sender, request, stream_usage).await {
                Ok((reader, writer)) => {
                    return Ok(HboneStream {
                        reader,
                        writer,
                        peer,
                    });
                }
                Err(source) if !retried => {
                    debug!(dst = %dst, error = %source, "pooled hbone connection refused a stream; reconnecting");
                    usage.closed.store(true, Ordering::Release);
                    retried = true;
                }
                Err(source) => return Err(HboneError::Http2 { dst, source }),
            }
        }
    }

    async fn pooled_sender(
        &self,
        key: &PoolKey,
        netns: &NetNs,
        handshakes: &Semaphore,
    ) -> Result<(SendRequest<Bytes>, SpiffeId, StreamUsage), HboneError> {
        let slot = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.entry(key.clone()).or_default().clone()
        };
        let mut connections = slot.lock().await;
        connections.retain(|c| !c.usage.closed.load(Ordering::Acquire));
        let least_busy = connections
            .iter()
            .filter(|c| c.has_room())
            .min_by_key(|c| c.open_streams());
        match least_busy {
            Some(conn) if conn.open_streams() == 0 || connections.len() >= self.spread => {
                let usage = StreamUsage::open(conn.usage.clone());
                return Ok((conn.sender.clone(), conn.peer.clone(), usage));
            }
            // Every connection is busy (or at the peer's SETTINGS_MAX_CONCURRENT_STREAMS), and
            // there are fewer than worker threads: another connection lets the streams'
            // encryption run on another thread.
            _ => {}
        }
        // The semaphore is never closed: an error cannot happen, and would mean no wait.
        let _turn = handshakes.acquire().await.ok();
        let conn = self.establish(key, netns).await?;
        let found = (
            conn.sender.clone(),
            conn.peer.clone(),
            StreamUsage::open(conn.usage.clone()),
        );
        connections.push(conn);
        Ok(found)
    }

    /// TCP from inside the source workload's namespace, then mutual TLS, then HTTP/2.
    async fn establish(
        &self,
        key: &PoolKey,
        netns: &NetNs,
    ) -> Result<PooledConnection, HboneError> {
        let dst = key.dst;
        let socket = netns
            .tcp_socket_for(&dst)
            .map_err(|source| HboneError::Connect { dst, source })?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
            .await
            .map_err(|_| HboneError::ConnectTimeout { dst })?
            .map_err(|source| HboneError::Connect { dst, source })?;
        let _ = tcp.set_nodelay(true);
        if let Err(err) = set_user_timeout(&tcp, TCP_USER_TIMEOUT) {
            debug!(dst = %dst, error = %err, "cannot set TCP_USER_TIMEOUT");
        }

        let config = identity::client_config(
            self.identities.clone(),
            key.source.clone(),
            self.bundle.clone(),
            vec![key.expected.clone()],
        )
        .map_err(|err| HboneError::Identity(format!("{err:#}")))?;
        let tls = TlsConnector::from(config)
            .connect(ServerName::IpAddress(dst.ip().into()), tcp)
            .await
            .map_err(|source| HboneError::Tls { dst, source })?;
        let peer = identity::peer_identity(tls.get_ref().1)
            .map_err(|err| HboneError::Identity(err.to_string()))?;

        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(tunnel::STREAM_WINDOW)
            .initial_connection_window_size(tunnel::CONNECTION_WINDOW)
            .max_frame_size(tunnel::MAX_FRAME_SIZE)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::Http2 { dst, source })?;
        let usage = Usage::new();
        let mut ping_pong = connection.ping_pong();
        let (source, closed_peer, closed) = (key.source.clone(), peer.clone(), usage.clone());
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(error = %err, "hbone connection ended with an error");
            }
            closed.closed.store(true, Ordering::Release);
            info!(src_identity = %source, dst = %dst, peer_identity = %closed_peer, "hbone connection closed");
        });
        // Until the peer's SETTINGS arrive, h2 knows no stream limit: a burst would put every
        // stream on this connection and the peer would refuse those beyond its limit. The peer
        // sends its SETTINGS before it answers a PING, so one round trip settles it.
        if let Some(ping_pong) = ping_pong.as_mut() {
            let pong = tokio::time::timeout(CONNECT_TIMEOUT, ping_pong.ping(h2::Ping::opaque()));
            match pong.await {
                Ok(Ok(_)) => {}
                Ok(Err(source)) => return Err(HboneError::Http2 { dst, source }),
                Err(_) => return Err(HboneError::ConnectTimeout { dst }),
            }
        }
        info!(
            src_identity = %key.source,
            dst = %dst,
            peer_identity = %peer,
            max_streams = sender.current_max_send_streams(),
            "hbone connection established"
        );
        if let Some(ping_pong) = ping_pong {
            tokio::spawn(keep_alive(ping_pong, usage.clone(), dst));
        }
        Ok(PooledConnection {
            sender,
            peer,
            usage,
        })
    }

    /// Drops pooled connections without streams for `idle_timeout`, and entries without a
    /// connection, so the pool stays bounded under churn; HTTP/2 closes a connection once its
    /// last sender and stream are gone.
    fn drop_idle(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.retain(|_, slot| {
            // Busy: someone is connecting or picking a connection right now.
            let Ok(mut connections) = slot.try_lock() else {
                return true;
            };
            connections.retain(|c| {
                !c.usage.closed.load(Ordering::Acquire) && !c.is_idle_for(self.idle_timeout)
            });
            !connections.is_empty()
        });
    }

    /// How many connections the pool holds (the admin API reports it).
    pub fn pooled_connections(&self) -> usize {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn connect_request(authority: SocketAddr) -> Result<Request<()>, HboneError> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .body(())
        .map_err(|err| HboneError::Identity(format!("building CONNECT request: {err}")))
}

/// Sends `request` on a pooled connection; the stream is usable at once.
async fn open_stream(
    sender: SendRequest<Bytes>,
    request: Request<()>,
    stream_usage: StreamUsage,
) -> Result<(TunnelReader<StreamUsage>, TunnelWriter), h2::Error> {
    // Waits while the connection is at its limit of concurrent streams.
    let mut sender = sender.ready().await?;
    let (response, send) = sender.send_request(request, false)?;
    Ok((
        TunnelReader::awaiting(response, stream_usage),
        TunnelWriter::new(send),
    ))
}

async fn close_idle_connections(client: std::sync::Weak<HboneClient>) {
    let period = match client.upgrade() {
        Some(client) => (client.idle_timeout / 2).max(Duration::from_millis(100)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        match client.upgrade() {
            Some(client) => client.drop_idle(),
            None => return,
        }
    }
}

/// PINGs the peer every [`PING_INTERVAL`]; a peer that does not answer within the TCP user
/// timeout gets no new streams.
async fn keep_alive(mut ping_pong: h2::PingPong, usage: Arc<Usage>, dst: SocketAddr) {
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        if usage.closed.load(Ordering::Acquire) {
            return;
        }
        let pong = tokio::time::timeout(TCP_USER_TIMEOUT, ping_pong.ping(h2::Ping::opaque()));
        match pong.await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                info!(dst = %dst, "hbone peer does not answer PINGs; no new streams on this connection");
                usage.closed.store(true, Ordering::Release);
                return;
            }
        }
    }
}

fn set_user_timeout(tcp: &tokio::net::TcpStream, timeout: Duration) -> std::io::Result<()> {
    let millis = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: the option value is a c_uint that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(tcp),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&raw const millis).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl PooledConnection {
    /// Whether the peer allows another concurrent stream on it.
    fn has_room(&self) -> bool {
        self.open_streams() < self.sender.current_max_send_streams()
    }

    fn open_streams(&self) -> usize {
        self.usage.open_streams.load(Ordering::Acquire)
    }

    fn is_idle_for(&self, timeout: Duration) -> bool {
        if self.usage.open_streams.load(Ordering::Acquire) > 0 {
            return false;
        }
        let last_used = *self
            .usage
            .last_used
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        last_used.elapsed() >= timeout
    }
}

impl StreamUsage {
    fn open(usage: Arc<Usage>) -> Self {
        usage.open_streams.fetch_add(1, Ordering::AcqRel);
        Self(usage)
    }
}

impl Drop for StreamUsage {
    fn drop(&mut self) {
        *self.0.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.open_streams.fetch_sub(1, Ordering::AcqRel);
    }
}
