//! The data path: where connections are accepted, and where they are forwarded.
//!
//! - [`outbound`]: connections captured from a local workload;
//! - [`hbone`]: the mutual-TLS tunnel to the agent of a workload on another node;
//! - [`inbound`]: that tunnel's far end, delivering to the local workload;
//! - [`tunnel`]: one HBONE stream, as the relay reads and writes it;
//! - [`limits`]: what one workload may hold at once (fair sharing);
//! - `relay`: moving the bytes between the two legs of a connection;
//! - [`record`]: one connection's metrics, access-log line and admin listing, from open to
//!   close.

pub mod hbone;
pub mod inbound;
pub mod limits;
pub mod outbound;
pub mod record;
mod relay;
pub mod telemetry;
pub mod tunnel;

pub use relay::Transferred;

use std::{net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// One workload's serving, as its listeners and connections follow it.
#[derive(Clone, Default)]
pub struct Lifetime {
    /// Listeners stop accepting (the agent stops, or the workload goes); HBONE connections say
    /// GOAWAY and open connections may finish.
    pub stop: CancellationToken,
    /// Open connections are reset: the workload is gone, or its namespace was recreated.
    pub abort: CancellationToken,
}

impl Lifetime {
    /// A lifetime that also stops when `agent` does.
    pub fn within(agent: &CancellationToken) -> Self {
        Self {
            stop: agent.child_token(),
            abort: CancellationToken::new(),
        }
    }

    /// Stops accepting and resets what is open.
    pub fn end(&self) {
        self.stop.cancel();
        self.abort.cancel();
    }
}

/// Accepts on `listener` until `shutdown`, handling each connection on its own task in
/// `tracker`; `name` identifies the listener's workload in logs.
pub(crate) fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: String,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (shutdown, connections) = (shutdown.clone(), tracker.clone());
    tracker.spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((conn, peer)) => {
                    connections.spawn(handle(conn, peer));
                }
                Err(err) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(workload = %name, error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
}
