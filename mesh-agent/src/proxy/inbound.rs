//! Inbound HBONE: the agent terminates mutual TLS on each local workload's IP, port 15008,
//! inside the workload's namespace, and delivers each CONNECT stream to the workload as plain
//! TCP.
//!
//! The caller's identity is the SPIFFE ID of its verified client certificate, and nothing else.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::{body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use super::{hbone::HBONE_PORT, relay::relay};
use crate::{
    identity::{self, SpiffeId},
    netns::NetNs,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer that does not finish its handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Every TLS connection opens with a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// One local workload, as its HBONE listeners serve it.
pub struct Inbound {
    listeners: Vec<TcpListener>,
    target: Arc<Target>,
}

struct Target {
    name: String,
    ips: Vec<IpAddr>,
    netns: NetNs,
    tls: TlsAcceptor,
}

/// Why an inbound connection or stream was turned away; each has its own log line.
#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("not a TLS client (plaintext on the mTLS port?)")]
    NotTls,
    #[error("closed before the TLS handshake")]
    ClosedEarly,
    #[error("TLS handshake timed out after {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("client did not negotiate HTTP/2 (ALPN h2)")]
    NotHttp2,
    #[error("{0}")]
    NoPeerIdentity(String),
    #[error("method {0} is not CONNECT")]
    NotConnect(Method),
    #[error("authority {0:?} is not an ip:port")]
    BadAuthority(String),
    #[error("authority {0} is not a workload this listener serves")]
    NotServedHere(SocketAddr),
}

impl Rejection {
    /// Stable names for logs and metrics.
    fn kind(&self) -> &'static str {
        match self {
            Rejection::NotTls => "not_tls",
            Rejection::ClosedEarly => "connection_closed",
            Rejection::HandshakeTimeout => "handshake_timeout",
            Rejection::Handshake(err) => identity::rejection_kind(err),
            Rejection::NotHttp2 => "not_http2",
            Rejection::NoPeerIdentity(_) => "no_client_certificate",
            Rejection::NotConnect(_) => "not_connect",
            Rejection::BadAuthority(_) => "bad_authority",
            Rejection::NotServedHere(_) => "authority_not_served",
        }
    }
}

impl Inbound {
    /// Binds port 15008 on every IP of the workload, inside its namespace.
    pub fn listen(
        name: String,
        ips: Vec<IpAddr>,
        netns: NetNs,
        tls: Arc<rustls::ServerConfig>,
    ) -> anyhow::Result<Self> {
        let mut listeners = Vec::with_capacity(ips.len());
        for ip in &ips {
            let addr = SocketAddr::new(*ip, HBONE_PORT);
            let listener = netns
                .bind(addr)
                .with_context(|| format!("binding {addr} in {}", netns.path().display()))?;
            listeners.push(TcpListener::from_std(listener)?);
        }
        Ok(Self {
            listeners,
            target: Arc::new(Target {
                name,
                ips,
                netns,
                tls: TlsAcceptor::from(tls),
            }),
        })
    }

    pub fn serve(self, shutdown: &CancellationToken, tracker: &TaskTracker) {
        for listener in self.listeners {
            let target = self.target.clone();
            let (shutdown, connections) = (shutdown.clone(), tracker.clone());
            tracker.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        accepted = listener.accept() => accepted,
                    };
                    match accepted {
                        Ok((tcp, peer)) => {
                            connections.spawn(serve_connection(tcp, peer, target.clone()));
                        }
                        Err(err) => {
                            warn!(workload = %target.name, error = %err, "inbound accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
    }
}

async fn serve_connection(tcp: TcpStream, peer_addr: SocketAddr, target: Arc<Target>) {
    let peer = match accept_mtls(tcp, &target).await {
        Ok(accepted) => accepted,
        Err(rejection) => {
            warn!(
                workload = %target.name,
                peer_addr = %peer_addr,
                rejection = rejection.kind(),
                reason = %rejection,
                "inbound connection rejected"
            );
            return;
        }
    };
    let (tls, identity) = peer;
    info!(workload = %target.name, peer_addr = %peer_addr, peer_identity = %identity, "inbound mTLS connection accepted");
    let service = {
        let (target, identity) = (target.clone(), identity.clone());
        service_fn(move |request| handle_request(request, identity.clone(), target.clone()))
    };
    if let Err(err) = http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        warn!(workload = %target.name, peer_identity = %identity, reason = %err, "inbound HTTP/2 connection failed");
    }
}

async fn accept_mtls(
    tcp: TcpStream,
    target: &Target,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, SpiffeId), Rejection> {
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        expect_tls(&tcp).await?;
        target.tls.accept(tcp).await.map_err(Rejection::Handshake)
    };
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| Rejection::HandshakeTimeout)??;
    let session = tls.get_ref().1;
    if session.alpn_protocol() != Some(identity::ALPN_H2) {
        return Err(Rejection::NotHttp2);
    }
    let identity = identity::peer_identity(session)
        .map_err(|err| Rejection::NoPeerIdentity(err.to_string()))?;
    Ok((tls, identity))
}

/// Tells a plaintext client from a broken TLS one, for a clearer log line.
async fn expect_tls(tcp: &TcpStream) -> Result<(), Rejection> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) | Err(_) => Err(Rejection::ClosedEarly),
        Ok(_) if first[0] != TLS_HANDSHAKE_RECORD => Err(Rejection::NotTls),
        Ok(_) => Ok(()),
    }
}

async fn handle_request(
    request: Request<Incoming>,
    peer: SpiffeId,
    target: Arc<Target>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let dst = match authorized_destination(&request, &target) {
        Ok(dst) => dst,
        Err(rejection) => {
            warn!(
                workload = %target.name,
                peer_identity = %peer,
                rejection = rejection.kind(),
                reason = %rejection,
                "inbound stream rejected"
            );
            return Ok(status(StatusCode::BAD_REQUEST));
        }
    };
    let upstream = match connect_to_workload(&target.netns, dst).await {
        Ok(upstream) => upstream,
        Err(err) => {
            warn!(workload = %target.name, peer_identity = %peer, dst = %dst, error = %err, "inbound delivery failed");
            return Ok(status(StatusCode::SERVICE_UNAVAILABLE));
        }
    };
    tokio::spawn(deliver(request, upstream, peer, dst, target));
    Ok(status(StatusCode::OK))
}

fn authorized_destination(
    request: &Request<Incoming>,
    target: &Target,
) -> Result<SocketAddr, Rejection> {
    if request.method() != Method::CONNECT {
        return Err(Rejection::NotConnect(request.method().clone()));
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .unwrap_or_default();
    let dst: SocketAddr = authority
        .parse()
        .map_err(|_| Rejection::BadAuthority(authority.to_owned()))?;
    let served = target
        .ips
        .iter()
        .any(|ip| ip.to_canonical() == dst.ip().to_canonical());
    if !served {
        return Err(Rejection::NotServedHere(dst));
    }
    Ok(dst)
}

async fn connect_to_workload(netns: &NetNs, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = netns.tcp_socket_for(&dst)?;
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = upstream.set_nodelay(true);
    Ok(upstream)
}

/// Waits for the stream to become a tunnel, then relays it to the workload.
async fn deliver(
    request: Request<Incoming>,
    mut upstream: TcpStream,
    peer: SpiffeId,
    dst: SocketAddr,
    target: Arc<Target>,
) {
    let started = Instant::now();
    let tunnel = match hyper::upgrade::on(request).await {
        Ok(upgraded) => TokioIo::new(upgraded),
        Err(err) => {
            warn!(workload = %target.name, peer_identity = %peer, dst = %dst, error = %err, "inbound stream upgrade failed");
            return;
        }
    };
    let (transferred, result) = relay(tunnel, &mut upstream).await;
    let duration_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(()) => info!(
            workload = %target.name,
            peer_identity = %peer,
            dst = %dst,
            bytes_sent = transferred.sent,
            bytes_received = transferred.received,
            duration_ms,
            "inbound connection closed"
        ),
        Err(err) => {
            warn!(
                workload = %target.name,
                peer_identity = %peer,
                dst = %dst,
                bytes_sent = transferred.sent,
                bytes_received = transferred.received,
                duration_ms,
                error = %err,
                "inbound connection closed"
            );
            let _ = upstream.set_zero_linger();
        }
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}
