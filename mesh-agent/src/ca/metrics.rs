//! The CA's metrics (`/metrics`) and readiness (`/healthz/ready`), on one HTTP/1 port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Counters and the signing histogram. Cheap to clone; clones share them.
#[derive(Clone)]
pub struct CaMetrics {
    registry: Arc<Registry>,
    requests: Family<ResultLabel, Counter>,
    sign_seconds: Histogram,
}

impl Default for CaMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CaMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<ResultLabel, Counter>::default();
        // prometheus-client appends `_total`: `mesh_ca_requests_total`.
        registry.register(
            "mesh_ca_requests",
            "Certificate requests answered, by result (issued or refused)",
            requests.clone(),
        );
        // 50 µs .. ~1.6 s: a signature takes well under a millisecond, a TokenReview more.
        let sign_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "mesh_ca_sign_seconds",
            "Time to answer a granted certificate request (authentication, authorization, signing)",
            sign_seconds.clone(),
        );
        Self {
            registry: Arc::new(registry),
            requests,
            sign_seconds,
        }
    }

    pub fn issued(&self, elapsed: Duration) {
        self.requests
            .get_or_create(&ResultLabel { result: "issued" })
            .inc();
        self.sign_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn refused(&self) {
        self.requests
            .get_or_create(&ResultLabel { result: "refused" })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            warn!(%error, "encoding metrics failed");
        }
        text
    }
}

/// Says why the CA cannot answer yet; `None`: ready.
pub type NotReadyFn = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Serves `/metrics` and `/healthz/ready` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: CaMetrics,
    not_ready: NotReadyFn,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let (metrics, not_ready) = (metrics.clone(), Arc::clone(&not_ready));
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let response = route(&request, &metrics, &not_ready);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        debug!(%error, "metrics connection ended with an error");
                    }
                });
            }
            Err(error) => {
                // Typically out of file descriptors: back off rather than spin.
                warn!(%error, "metrics server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn route<B>(
    request: &Request<B>,
    metrics: &CaMetrics,
    not_ready: &NotReadyFn,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".to_owned());
    }
    match request.uri().path() {
        "/metrics" | "/stats/prometheus" => {
            let mut response = text(StatusCode::OK, metrics.encode());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
            );
            response
        }
        "/healthz/ready" => match not_ready() {
            None => text(StatusCode::OK, "ready\n".to_owned()),
            Some(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics or /healthz/ready\n".to_owned(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let metrics = CaMetrics::new();
        metrics.issued(Duration::from_millis(1));
        metrics.refused();
        let text = metrics.encode();
        assert!(
            text.contains("mesh_ca_requests_total{result=\"issued\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mesh_ca_requests_total{result=\"refused\"} 1"),
            "{text}"
        );
        assert!(text.contains("mesh_ca_sign_seconds_count 1"), "{text}");
    }
}
