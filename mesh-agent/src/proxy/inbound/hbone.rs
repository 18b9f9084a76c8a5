//! Inbound HBONE: mutual TLS on each of the workload's IPs, port 15008, then HTTP/2 `CONNECT`
//! streams, each delivered to the workload once authorized.
//!
//! The caller's identity is the SPIFFE ID of its verified client certificate, and nothing else.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::{body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{Caller, Target, connect_to_workload, deliver, log_denied};
use crate::{
    identity::{self, SpiffeId},
    policy::Decision,
};

/// A peer that does not finish its handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Every TLS connection opens with a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Why an inbound HBONE connection or stream was turned away; each has its own log line.
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

pub(super) async fn serve_connection(tcp: TcpStream, peer_addr: SocketAddr, target: Arc<Target>) {
    let (tls, identity) = match accept_mtls(tcp, &target).await {
        Ok(accepted) => accepted,
        Err(rejection) => {
            target.context.metrics.inbound_rejected(rejection.kind());
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
    info!(workload = %target.name, peer_addr = %peer_addr, peer_identity = %identity, "inbound mTLS connection accepted");
    let caller = Caller {
        identity: Some(identity.clone()),
        addr: peer_addr,
    };
    let service = {
        let target = target.clone();
        service_fn(move |request| handle_request(request, caller.clone(), target.clone()))
    };
    let connection =
        http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        _ = target.context.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = served {
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
    caller: Caller,
    target: Arc<Target>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let dst = match requested_destination(&request, &target) {
        Ok(dst) => dst,
        Err(rejection) => {
            target.record_refused(&caller, rejection.kind());
            warn!(
                workload = %target.name,
                peer_identity = %caller.identity_text(),
                rejection = rejection.kind(),
                reason = %rejection,
                "inbound stream rejected"
            );
            return Ok(status(StatusCode::BAD_REQUEST));
        }
    };
    if let Decision::Deny { by } = target.authorize(&caller, dst) {
        log_denied(&target, &caller, dst, &by.to_string());
        return Ok(status(StatusCode::FORBIDDEN));
    }
    let upstream = match connect_to_workload(&target.netns, dst).await {
        Ok(upstream) => upstream,
        Err(err) => {
            warn!(workload = %target.name, peer_identity = %caller.identity_text(), dst = %dst, error = %err, "inbound delivery failed");
            return Ok(status(StatusCode::SERVICE_UNAVAILABLE));
        }
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(request).await {
            Ok(upgraded) => {
                let mut tunnel = TokioIo::new(upgraded);
                deliver(&mut tunnel, upstream, caller, dst, &target).await;
            }
            Err(err) => {
                warn!(workload = %target.name, peer_identity = %caller.identity_text(), dst = %dst, error = %err, "inbound stream upgrade failed");
            }
        }
    });
    Ok(status(StatusCode::OK))
}

fn requested_destination(
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
    if !target.owns(dst.ip()) {
        return Err(Rejection::NotServedHere(dst));
    }
    Ok(dst)
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}
