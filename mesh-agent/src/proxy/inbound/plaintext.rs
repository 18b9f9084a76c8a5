//! Inbound plaintext: connections `sk_lookup` steered to port 15006. The socket keeps the
//! original destination as its local address and the caller's address as its peer: there is no
//! identity, so STRICT refuses them with a reset, as Istio does.

use std::{net::SocketAddr, sync::Arc};

use mesh_ebpf_common::INBOUND_PLAINTEXT_PORT;
use tokio::net::TcpStream;
use tracing::warn;

use super::{Admission, Caller, Target, Via, admit, deliver, wait_for_first_bytes};
use crate::policy::MtlsMode;
use crate::proxy::{
    record::{Ending, canonical},
    relay::tcp_halves,
};

pub(super) async fn serve_connection(
    mut tcp: TcpStream,
    peer_addr: SocketAddr,
    target: Arc<Target>,
) {
    let _ = tcp.set_nodelay(true);
    let caller = Caller {
        identity: None,
        addr: canonical(peer_addr),
        via: Via::Plaintext,
    };
    let dst = match tcp.local_addr() {
        Ok(dst) if dst.port() != INBOUND_PLAINTEXT_PORT => canonical(dst),
        _ => {
            // Not a captured connection: nothing a workload was asked for.
            const REJECTION: &str = "direct_to_capture_port";
            target
                .context
                .connections
                .metrics()
                .inbound_rejected(REJECTION);
            warn!(workload = %target.name, src_addr = %caller.addr, rejection = REJECTION, "inbound connection rejected");
            reset(tcp);
            return;
        }
    };
    let record = target.record(&caller, dst, Arc::default());
    if target.mtls_mode(dst.port()) == MtlsMode::Strict {
        record.close(Ending::refused(
            "plaintext_strict",
            "STRICT mTLS: plaintext is not accepted",
        ));
        refuse(tcp).await;
        return;
    }
    let (upstream, record) = match admit(&target, &caller, dst, record).await {
        Admission::Connected(upstream, record) => (upstream, record),
        Admission::Denied { .. } => return refuse(tcp).await,
        Admission::Unreachable | Admission::OverLimit => return reset(tcp),
    };
    let failure = deliver(
        tcp_halves(&mut tcp),
        upstream,
        &caller,
        dst,
        &target,
        record,
    )
    .await;
    if failure.is_some() {
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
