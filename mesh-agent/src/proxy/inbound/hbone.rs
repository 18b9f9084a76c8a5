//! Inbound HBONE: mutual TLS on each of the workload's IPs, port 15008, then HTTP/2 `CONNECT`
//! streams, each delivered to the workload once authorized.
//!
//! The caller's identity is the SPIFFE ID of its verified client certificate, and nothing else.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

use super::{Admission, Caller, Target, Via, admit, deliver};
use crate::{
    admin::ResponseFlags,
    identity::{self, SpiffeId},
    proxy::{
        record::{Ending, canonical},
        tunnel::{self, TunnelReader, TunnelWriter},
    },
};

/// A peer that does not finish its handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Every TLS connection opens with a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Why an inbound HBONE connection or stream was turned away; each has its own log line.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
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
    #[error("the peer has {0} TLS handshakes in progress already")]
    TooManyHandshakes(usize),
}

impl Rejection {
    /// Stable names for logs and metrics.
    pub fn kind(&self) -> &'static str {
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
            Rejection::TooManyHandshakes(_) => "over_limit",
        }
    }
}

pub(super) async fn serve_connection(tcp: TcpStream, peer_addr: SocketAddr, target: Arc<Target>) {
    let peer_addr = canonical(peer_addr);
    let handshakes = &target.context.limits.inbound_handshakes;
    let turn = handshakes.try_acquire(peer_addr.ip());
    let accepted = match turn {
        Some(_) => accept_mtls(tcp, &target).await,
        None => Err(Rejection::TooManyHandshakes(handshakes.max())),
    };
    drop(turn);
    let (tls, identity) = match accepted {
        Ok(accepted) => accepted,
        Err(rejection) => {
            target
                .context
                .connections
                .metrics()
                .inbound_rejected(rejection.kind());
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
        via: Via::Hbone,
    };
    if let Err(err) = serve_streams(tls, caller, &target).await {
        warn!(workload = %target.name, peer_identity = %identity, reason = %err, "inbound HTTP/2 connection failed");
    }
}

/// Accepts the connection's `CONNECT` streams, each handled on a task of its own, until the
/// peer closes; when the agent stops, says GOAWAY and lets open streams finish.
async fn serve_streams(
    tls: TlsStream<TcpStream>,
    caller: Caller,
    target: &Arc<Target>,
) -> Result<(), h2::Error> {
    let mut connection = h2::server::Builder::new()
        .initial_window_size(tunnel::STREAM_WINDOW)
        .initial_connection_window_size(tunnel::CONNECTION_WINDOW)
        .max_frame_size(tunnel::MAX_FRAME_SIZE)
        .max_concurrent_streams(target.context.max_concurrent_streams)
        .handshake::<_, Bytes>(tls)
        .await?;
    let (stop, abort) = (target.lifetime.stop.clone(), target.lifetime.abort.clone());
    let mut draining = false;
    loop {
        let accepted = tokio::select! {
            accepted = connection.accept() => accepted,
            _ = abort.cancelled() => {
                connection.abrupt_shutdown(h2::Reason::CANCEL);
                return Ok(());
            }
            _ = stop.cancelled(), if !draining => {
                connection.graceful_shutdown();
                draining = true;
                continue;
            }
        };
        match accepted {
            None => return Ok(()),
            Some(Err(err)) => return Err(err),
            Some(Ok((request, respond))) => {
                tokio::spawn(handle_stream(
                    request,
                    respond,
                    caller.clone(),
                    target.clone(),
                ));
            }
        }
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

/// Checks, authorizes and connects one stream; data the caller sent with its `CONNECT` waits in
/// the stream's window until then, and is dropped with the stream if it is refused.
async fn handle_stream(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    caller: Caller,
    target: Arc<Target>,
) {
    let dst = match requested_destination(&request, &target) {
        Ok(dst) => dst,
        Err(rejection) => {
            target
                .context
                .connections
                .metrics()
                .inbound_rejected(rejection.kind());
            warn!(
                workload = %target.name,
                peer_identity = %caller.identity_text(),
                rejection = rejection.kind(),
                reason = %rejection,
                "inbound stream rejected"
            );
            return refuse(&mut respond, StatusCode::BAD_REQUEST);
        }
    };
    let record = target.record(&caller, dst, Arc::default());
    let (upstream, record) = match admit(&target, &caller, dst, record).await {
        Admission::Connected(upstream, record) => (upstream, record),
        Admission::Denied { .. } => return refuse(&mut respond, StatusCode::FORBIDDEN),
        Admission::Unreachable | Admission::OverLimit => {
            return refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let send = match respond.send_response(status(StatusCode::OK), false) {
        Ok(send) => send,
        Err(err) => {
            record.close(Ending::failed(
                ResponseFlags::DownstreamTermination,
                format!("the stream ended before it was accepted: {err}"),
            ));
            return;
        }
    };
    let tunnel = (
        TunnelReader::open(request.into_body()),
        TunnelWriter::new(send),
    );
    deliver(tunnel, upstream, &caller, dst, &target, record).await;
}

/// Answers with `code` and ends the stream; what the caller sent with its `CONNECT` is dropped.
fn refuse(respond: &mut SendResponse<Bytes>, code: StatusCode) {
    let _ = respond.send_response(status(code), true);
}

/// The destination a stream asks for, if the listener serves it.
fn requested_destination(
    request: &Request<RecvStream>,
    target: &Target,
) -> Result<SocketAddr, Rejection> {
    let dst = connect_destination(request)?;
    if !target.owns(dst.ip()) {
        return Err(Rejection::NotServedHere(dst));
    }
    Ok(dst)
}

/// The destination of a `CONNECT` request: its authority, which must be an `ip:port` (HBONE
/// names no hosts, and nothing is resolved). Any other method is refused.
pub fn connect_destination<B>(request: &Request<B>) -> Result<SocketAddr, Rejection> {
    if request.method() != Method::CONNECT {
        return Err(Rejection::NotConnect(request.method().clone()));
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .unwrap_or_default();
    let bad = || Rejection::BadAuthority(authority.to_owned());
    // An IPv6 zone (`[fe80::1%2]:80`) would let the peer choose the interface the workload is
    // reached through. An HTTP authority has none, but the std parser takes one (and reads RFC
    // 6874's `%25` as zone 25), so any `%` is refused before it.
    if authority.contains('%') {
        return Err(bad());
    }
    authority.parse().map_err(|_| bad())
}

fn status(code: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = code;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destination(method: Method, authority: &str) -> Result<SocketAddr, Rejection> {
        let request = Request::builder()
            .method(method)
            .uri(
                http::Uri::builder()
                    .authority(authority)
                    .build()
                    .expect("a URI"),
            )
            .body(())
            .expect("a request");
        connect_destination(&request)
    }

    #[test]
    fn a_connect_to_an_ip_and_port_is_its_destination() {
        for (authority, dst) in [
            ("10.1.0.2:8080", "10.1.0.2:8080"),
            ("[fd00:1::2]:15008", "[fd00:1::2]:15008"),
            ("[::ffff:10.1.0.2]:80", "[::ffff:10.1.0.2]:80"),
            ("10.1.0.2:0080", "10.1.0.2:80"),
        ] {
            assert_eq!(
                destination(Method::CONNECT, authority).expect(authority),
                dst.parse::<SocketAddr>().expect("an address"),
            );
        }
    }

    #[test]
    fn other_methods_and_authorities_are_refused() {
        let kind = |method, authority| destination(method, authority).map_err(|r| r.kind());
        assert_eq!(kind(Method::GET, "10.1.0.2:80"), Err("not_connect"));
        for authority in [
            "httpbin.demo:80",
            "user@10.1.0.2:80",
            "10.1.0.2",
            "10.1.0.2:",
            "10.1.0.2:65536",
            "010.1.0.2:80",
        ] {
            assert_eq!(
                kind(Method::CONNECT, authority),
                Err("bad_authority"),
                "{authority}"
            );
        }
    }

    /// Found by fuzzing (fuzz/fuzz_targets/connect_authority.rs): the zone was taken, and the
    /// connection to the workload would have gone out of the interface the peer named.
    #[test]
    fn an_ipv6_zone_is_refused() {
        for authority in ["[fe80::1%2]:80", "[fe80::1%25]:80", "[fd00:1::2%0]:8080"] {
            let refused = destination(Method::CONNECT, authority).map_err(|r| r.kind());
            assert_eq!(refused, Err("bad_authority"), "{authority}");
        }
    }
}
