//! The data path: where connections are accepted, and where they are forwarded.
//!
//! - [`outbound`]: connections captured from a local workload;
//! - [`hbone`]: the mutual-TLS tunnel to the agent of a workload on another node;
//! - [`inbound`]: that tunnel's far end, delivering to the local workload.

pub mod hbone;
pub mod inbound;
pub mod outbound;
mod relay;
pub mod telemetry;

pub use relay::Transferred;
