//! Inbound plaintext: connections `sk_lookup` steered to port 15006. The socket keeps the
//! original destination as its local address and the caller's address as its peer: there is no
//! identity, so STRICT refuses them with a reset, as Istio does.

use std::{net::SocketAddr, sync::Arc};

use mesh_ebpf_common::INBOUND_PLAINTEXT_PORT;
use tokio::net::TcpStream;
use tracing::warn;

use super::{Caller, Target, Via, connect_to_workload, deliver, log_denied, wait_for_first_bytes};
use crate::policy::{Decision, MtlsMode};
use crate::proxy::relay::tcp_halves;

pub(super) async fn serve_connection(
    mut tcp: TcpStream,
    peer_addr: SocketAddr,
    target: Arc<Target>,
) {
    let _ = tcp.set_nodelay(true);
    let caller = Caller {
        identity: None,
        addr: SocketAddr::new(peer_addr.ip().to_canonical(), peer_addr.port()),
        via: Via::Plaintext,
    };
    let dst = match tcp.local_addr() {
        Ok(dst) if dst.port() != INBOUND_PLAINTEXT_PORT => {
            SocketAddr::new(dst.ip().to_canonical(), dst.port())
        }
        _ => {
            warn!(workload = %target.name, src_addr = %peer_addr, rejection = "direct_to_capture_port", "inbound connection rejected");
            reset(tcp);
            return;
        }
    };
    if target.mtls_mode(dst.port()) == MtlsMode::Strict {
        target.record_refused(&caller, "plaintext_strict");
        warn!(
            workload = %target.name,
            src_addr = %peer_addr,
            dst = %dst,
            security = "none",
            rejection = "plaintext_strict",
            reason = "STRICT mTLS: plaintext is not accepted",
            "inbound connection rejected"
        );
        refuse(tcp).await;
        return;
    }
    if let Decision::Deny { by } = target.authorize(&caller, dst) {
        log_denied(&target, &caller, dst, &by.to_string());
        refuse(tcp).await;
        return;
    }
    let upstream = match connect_to_workload(&target.netns, dst).await {
        Ok(upstream) => upstream,
        Err(err) => {
            warn!(workload = %target.name, src_addr = %peer_addr, dst = %dst, error = %err, "inbound delivery failed");
            reset(tcp);
            return;
        }
    };
    let delivered = deliver(tcp_halves(&mut tcp), upstream, caller, dst, &target).await;
    if delivered.failure.is_some() {
        reset(tcp);
    }
}

/// What a refused plaintext client sees, as in Istio: a reset
/// (`curl: (56) Recv failure: Connection reset by peer`), once it has sent its first bytes.
async fn refuse(tcp: TcpStream) {
    wait_for_first_bytes(&tcp).await;
    reset(tcp);
}

fn reset(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}
