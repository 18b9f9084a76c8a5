//! Same node: a connection between two workloads of this node is handed by the outbound side
//! straight to the destination's inbound side, without a tunnel and without TLS (its bytes never
//! leave the node). The caller's identity is a kernel fact: the listener that captured the
//! connection lives in the source workload's namespace and nowhere else. The destination's mTLS
//! mode and authorization policy apply as to a connection through HBONE, so STRICT admits it
//! (it is mesh traffic, proven by the kernel) and a policy change revokes it.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;

use super::{Admission, Caller, Target, Via, admit, deliver, wait_for_first_bytes};
use crate::{
    admin::ResponseFlags,
    identity::SpiffeId,
    proxy::{record::ByteMeter, relay::tcp_halves},
};

/// The node's served workloads by IP: published when a workload's inbound side starts serving,
/// withdrawn when it stops. Read without a lock on every same-node connection.
#[derive(Clone, Default)]
pub struct LocalTargets(Arc<ArcSwap<HashMap<IpAddr, Arc<Target>>>>);

/// Why a same-node connection was not delivered, or how its delivery ended.
#[derive(Debug, thiserror::Error)]
pub enum SameNodeError {
    #[error("denied by {by}")]
    Denied { by: String },
    #[error("the workload did not accept the connection")]
    Unreachable,
    #[error("the connection failed or was revoked")]
    Ended { flags: ResponseFlags },
}

impl SameNodeError {
    pub fn response_flags(&self) -> ResponseFlags {
        match self {
            SameNodeError::Denied { .. } => ResponseFlags::Denied,
            SameNodeError::Unreachable => ResponseFlags::UpstreamConnectFailure,
            SameNodeError::Ended { flags } => *flags,
        }
    }
}

/// The inbound side of one served workload, for a same-node connection to it.
pub struct LocalTarget(Arc<Target>);

impl LocalTargets {
    /// The served workload that owns `ip`, if any.
    pub fn get(&self, ip: IpAddr) -> Option<LocalTarget> {
        self.0
            .load()
            .get(&ip.to_canonical())
            .map(|t| LocalTarget(t.clone()))
    }

    pub(super) fn publish(&self, target: &Arc<Target>) {
        self.0.rcu(|current| {
            let mut next = HashMap::clone(current);
            for ip in &target.info.workload.ips {
                next.insert(ip.to_canonical(), target.clone());
            }
            next
        });
    }

    /// Withdraws `target`'s entries, not those of a workload that took its IPs since.
    pub(super) fn withdraw(&self, target: &Arc<Target>) {
        self.0.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.retain(|_, t| !Arc::ptr_eq(t, target));
            next
        });
    }
}

impl LocalTarget {
    /// The destination workload's identity, as this agent serves it.
    pub fn identity(&self) -> &SpiffeId {
        &self.0.info.identity
    }

    /// Authorizes a connection from the local workload with `identity` (at `src`) to `dst`
    /// and relays it to the workload until either side is done or a policy change revokes it,
    /// counting its bytes in `meter`, which the source side's record shares.
    pub async fn deliver(
        &self,
        conn: &mut TcpStream,
        identity: SpiffeId,
        src: SocketAddr,
        dst: SocketAddr,
        meter: Arc<ByteMeter>,
    ) -> Result<(), SameNodeError> {
        let target = &self.0;
        let caller = Caller {
            identity: Some(identity),
            addr: src,
            via: Via::SameNode,
        };
        let record = target.record(&caller, dst, meter);
        let (upstream, record) = match admit(target, &caller, dst, record).await {
            Admission::Connected(upstream, record) => (upstream, record),
            Admission::Denied { by } => {
                // The source side resets the connection, as this side would a refused HBONE
                // caller's: the client sees a reset, as across nodes.
                wait_for_first_bytes(conn).await;
                return Err(SameNodeError::Denied { by });
            }
            // A same-node caller is limited on its outbound side, not here.
            Admission::Unreachable | Admission::OverLimit => {
                return Err(SameNodeError::Unreachable);
            }
        };
        match deliver(tcp_halves(conn), upstream, &caller, dst, target, record).await {
            None => Ok(()),
            Some(flags) => Err(SameNodeError::Ended { flags }),
        }
    }
}
