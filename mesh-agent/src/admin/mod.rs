//! Observability: Istio-named metrics, and the admin HTTP server that exposes them with the
//! readiness probe and the config dump.
//!
//! - [`Metrics`]: `istio_tcp_*` connection metrics (labels in [`ConnectionLabels`]) and the
//!   agent's own `mesh_agent_*` metrics, encoded as OpenMetrics text;
//! - [`serve`] (or [`AdminServer::bind`] then [`AdminServer::run`], to learn the bound ports):
//!   `/config_dump` on 127.0.0.1:15000, `/metrics` on :15020, `/healthz/ready` on :15021.
//!
//! - [`status`]: `mesh-agent status`, a client of the admin API;
//! - [`graph`]: `mesh-agent graph`, the service graph from Prometheus.
//!
//! docs/observability.md is the user-facing description of both.

mod client;
pub mod graph;
mod metrics;
mod server;
pub mod status;

pub use metrics::{
    ConnectionLabels, Metrics, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE, ReloadResult,
    RenewalResult, Reporter, ResponseFlags, SecurityPolicy, UNKNOWN,
};
pub use server::{
    AdminConfig, AdminError, AdminServer, AdminState, BoundAddrs, ConfigDumpFn, Endpoint, serve,
};
