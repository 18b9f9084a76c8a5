//! The admin HTTP server: config dump, metrics and readiness, each on its own address.

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may take to finish once shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Where the three endpoints listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// `/` and `/config_dump`; loopback only by default, as it may reveal the agent's state.
    pub admin: SocketAddr,
    /// `/metrics` (also `/stats/prometheus`, the path Istio's scrape configs use).
    pub metrics: SocketAddr,
    /// `/healthz/ready`.
    pub readiness: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            admin: (Ipv4Addr::LOCALHOST, 15000).into(),
            metrics: (Ipv4Addr::UNSPECIFIED, 15020).into(),
            readiness: (Ipv4Addr::UNSPECIFIED, 15021).into(),
        }
    }
}

/// Produces the JSON served on `/config_dump` (and `/connections`).
pub type ConfigDumpFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the server reports on. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Metrics,
    /// Why `/healthz/ready` answers 503; empty means ready (200).
    not_ready: Arc<Mutex<Vec<String>>>,
    /// What `/healthz/ready` says besides, ready or not (a CA away, say).
    notes: Arc<Mutex<Vec<String>>>,
    pub config_dump: ConfigDumpFn,
    /// More JSON documents on the admin port, by path (`/connections`, `/plaintext_clients`).
    json: Arc<Vec<(&'static str, ConfigDumpFn)>>,
}

impl AdminState {
    /// A state that is not ready yet.
    pub fn new(
        metrics: Metrics,
        config_dump: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> Self {
        Self {
            metrics,
            not_ready: Arc::new(Mutex::new(vec!["starting".to_owned()])),
            notes: Arc::new(Mutex::new(Vec::new())),
            config_dump: Arc::new(config_dump),
            json: Arc::new(Vec::new()),
        }
    }

    /// Serves `document()` as JSON on `path` of the admin port.
    pub fn with_json(
        mut self,
        path: &'static str,
        document: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> Self {
        Arc::make_mut(&mut self.json).push((path, Arc::new(document)));
        self
    }

    fn json_document(&self, path: &str) -> Option<&ConfigDumpFn> {
        self.json.iter().find(|(p, _)| *p == path).map(|(_, f)| f)
    }

    pub fn set_ready(&self, ready: bool) {
        let reasons = if ready {
            Vec::new()
        } else {
            vec!["not ready".to_owned()]
        };
        self.set_not_ready(reasons);
    }

    /// Not ready for these reasons (one line each, shown by `/healthz/ready`); none: ready.
    pub fn set_not_ready(&self, reasons: Vec<String>) {
        *self.not_ready.lock().unwrap_or_else(|p| p.into_inner()) = reasons;
    }

    /// Lines `/healthz/ready` shows whether ready or not: things the agent copes with for now.
    pub fn set_notes(&self, notes: Vec<String>) {
        *self.notes.lock().unwrap_or_else(|p| p.into_inner()) = notes;
    }

    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready_reasons().is_empty()
    }

    pub fn not_ready_reasons(&self) -> Vec<String> {
        self.not_ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl fmt::Debug for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminState")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

/// One of the three listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Endpoint::Admin => "admin",
            Endpoint::Metrics => "metrics",
            Endpoint::Readiness => "readiness",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {addr} ({endpoint} endpoint)")]
    Bind {
        endpoint: Endpoint,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The addresses actually bound (differs from [`AdminConfig`] for port 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundAddrs {
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

/// The bound listeners, not serving yet: bind first to learn the ports, then [`Self::run`].
#[derive(Debug)]
pub struct AdminServer {
    admin: TcpListener,
    metrics: TcpListener,
    readiness: TcpListener,
    addrs: BoundAddrs,
}

impl AdminServer {
    pub async fn bind(config: &AdminConfig) -> Result<Self, AdminError> {
        /// With `SO_REUSEPORT`: during an upgrade the new agent serves beside the old one.
        async fn listen(endpoint: Endpoint, addr: SocketAddr) -> Result<TcpListener, AdminError> {
            let bind = || -> io::Result<TcpListener> {
                let socket = match addr {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.set_reuseaddr(true)?;
                socket.set_reuseport(true)?;
                socket.bind(addr)?;
                socket.listen(1024)
            };
            bind().map_err(|source| AdminError::Bind {
                endpoint,
                addr,
                source,
            })
        }
        fn local(
            endpoint: Endpoint,
            addr: SocketAddr,
            l: &TcpListener,
        ) -> Result<SocketAddr, AdminError> {
            l.local_addr().map_err(|source| AdminError::Bind {
                endpoint,
                addr,
                source,
            })
        }
        let admin = listen(Endpoint::Admin, config.admin).await?;
        let metrics = listen(Endpoint::Metrics, config.metrics).await?;
        let readiness = listen(Endpoint::Readiness, config.readiness).await?;
        let addrs = BoundAddrs {
            admin: local(Endpoint::Admin, config.admin, &admin)?,
            metrics: local(Endpoint::Metrics, config.metrics, &metrics)?,
            readiness: local(Endpoint::Readiness, config.readiness, &readiness)?,
        };
        Ok(Self {
            admin,
            metrics,
            readiness,
            addrs,
        })
    }

    pub fn local_addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// Serves until `shutdown` is cancelled, then lets open requests finish (a few seconds at
    /// most). Errors on single connections are logged, never fatal. Dropping the future stops
    /// the server too.
    pub async fn run(self, state: AdminState, shutdown: CancellationToken) -> anyhow::Result<()> {
        let shutdown = shutdown.child_token();
        let _stop_on_drop = shutdown.clone().drop_guard();
        let router = Arc::new(Router {
            state,
            addrs: self.addrs,
        });
        let tracker = TaskTracker::new();
        for (endpoint, listener) in [
            (Endpoint::Admin, self.admin),
            (Endpoint::Metrics, self.metrics),
            (Endpoint::Readiness, self.readiness),
        ] {
            tracing::info!(%endpoint, addr = %router.addr(endpoint), "admin server listening");
            tracker.spawn(accept_loop(
                endpoint,
                listener,
                router.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        shutdown.cancelled().await;
        tracker.close();
        tracker.wait().await;
        Ok(())
    }
}

/// Binds the three addresses of `config` and serves until `shutdown` is cancelled.
pub async fn serve(
    config: AdminConfig,
    state: AdminState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    AdminServer::bind(&config).await?.run(state, shutdown).await
}

async fn accept_loop(
    endpoint: Endpoint,
    listener: TcpListener,
    router: Arc<Router>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                tracker.spawn(serve_connection(
                    endpoint,
                    stream,
                    router.clone(),
                    shutdown.clone(),
                ));
            }
            Err(error) => {
                // Typically out of file descriptors: back off rather than spin.
                tracing::warn!(%endpoint, %error, "admin server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(
    endpoint: Endpoint,
    stream: TcpStream,
    router: Arc<Router>,
    shutdown: CancellationToken,
) {
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let response = router.route(endpoint, &request);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_GRACE, connection).await {
                Ok(result) => result,
                Err(_elapsed) => Ok(()),
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%endpoint, %error, "admin server: connection ended with an error");
    }
}

struct Router {
    state: AdminState,
    addrs: BoundAddrs,
}

impl Router {
    fn addr(&self, endpoint: Endpoint) -> SocketAddr {
        match endpoint {
            Endpoint::Admin => self.addrs.admin,
            Endpoint::Metrics => self.addrs.metrics,
            Endpoint::Readiness => self.addrs.readiness,
        }
    }

    fn route<B>(&self, endpoint: Endpoint, request: &Request<B>) -> Response<Full<Bytes>> {
        let (method, path) = (request.method(), request.uri().path());
        let known = matches!(
            (endpoint, path),
            (Endpoint::Admin, "/" | "/config_dump" | "/logging")
                | (Endpoint::Metrics, "/metrics" | "/stats/prometheus")
                | (Endpoint::Readiness, "/healthz/ready")
        ) || (endpoint == Endpoint::Admin && self.state.json_document(path).is_some());
        if !known {
            return text(StatusCode::NOT_FOUND, "not found\n");
        }
        if (endpoint, path) == (Endpoint::Admin, "/logging") {
            return logging(method, request.uri().query());
        }
        if method != Method::GET && method != Method::HEAD {
            return method_not_allowed("GET, HEAD");
        }
        match (endpoint, path) {
            (Endpoint::Admin, "/config_dump") => self.config_dump(),
            (Endpoint::Admin, "/") => text(StatusCode::OK, self.index()),
            (Endpoint::Admin, other) => match self.state.json_document(other) {
                Some(document) => json_response(&document(), other),
                None => text(StatusCode::NOT_FOUND, "not found\n"),
            },
            (Endpoint::Metrics, _) if wants_openmetrics(request) => with_type(
                StatusCode::OK,
                OPENMETRICS_CONTENT_TYPE,
                self.state.metrics.encode(),
            ),
            (Endpoint::Metrics, _) => with_type(
                StatusCode::OK,
                PROMETHEUS_CONTENT_TYPE,
                self.state.metrics.encode_prometheus(),
            ),
            (Endpoint::Readiness, _) => self.readiness(),
        }
    }

    fn readiness(&self) -> Response<Full<Bytes>> {
        let reasons = self.state.not_ready_reasons();
        let (status, mut body) = if reasons.is_empty() {
            (StatusCode::OK, String::from("ready\n"))
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, String::from("not ready\n"))
        };
        for line in reasons.into_iter().chain(self.state.notes()) {
            body.push_str(&line);
            body.push('\n');
        }
        text(status, body)
    }

    fn config_dump(&self) -> Response<Full<Bytes>> {
        let dump = catch_unwind(AssertUnwindSafe(|| (self.state.config_dump)()));
        let json = dump
            .map_err(|_panic| "the config dump callback panicked".to_string())
            .map(|mut value| {
                if let Some(object) = value.as_object_mut() {
                    let reasons = self.state.not_ready_reasons();
                    object.insert(
                        "readiness".to_owned(),
                        serde_json::json!({"ready": reasons.is_empty(), "notReady": reasons}),
                    );
                }
                value
            })
            .and_then(|value| serde_json::to_string_pretty(&value).map_err(|e| e.to_string()));
        match json {
            Ok(mut json) => {
                json.push('\n');
                with_type(StatusCode::OK, "application/json", json)
            }
            Err(error) => {
                tracing::error!(%error, "admin server: /config_dump failed");
                text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"))
            }
        }
    }

    fn index(&self) -> String {
        let a = self.addrs;
        format!(
            "mesh-agent admin endpoints:\n\
             \x20 http://{}/              this list\n\
             \x20 http://{}/config_dump   workloads, certificates and policies (JSON)\n\
             \x20 http://{}/connections   open connections (JSON)\n\
             \x20 http://{}/plaintext_clients  who reached which workload in plaintext (JSON)\n\
             \x20 http://{}/logging       the log filter; POST ?level=debug changes it\n\
             \x20 http://{}/metrics       Prometheus / OpenMetrics metrics\n\
             \x20 http://{}/healthz/ready readiness (200 ready, 503 not ready)\n",
            a.admin, a.admin, a.admin, a.admin, a.admin, a.metrics, a.readiness
        )
    }
}

/// Whether the scraper accepts OpenMetrics (Prometheus asks for it first); the Prometheus text
/// format otherwise. Quality values are not weighed: listing OpenMetrics at all is enough.
fn wants_openmetrics<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("application/openmetrics-text"))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    with_type(status, "text/plain; charset=utf-8", body)
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    response
}

fn json_response(value: &serde_json::Value, what: &str) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(mut json) => {
            json.push('\n');
            with_type(StatusCode::OK, "application/json", json)
        }
        Err(error) => {
            tracing::error!(%error, "admin server: {what} failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"))
        }
    }
}

/// `GET /logging`: the filter in force. `POST /logging?level=SPEC`: replaces it (`RUST_LOG`
/// syntax, e.g. `debug` or `info,mesh_agent::proxy=debug`), as Envoy's and ztunnel's do.
fn logging(method: &Method, query: Option<&str>) -> Response<Full<Bytes>> {
    let current = || crate::logging::current_filter().unwrap_or_else(|| "unknown".to_owned());
    match *method {
        Method::GET | Method::HEAD => text(StatusCode::OK, format!("{}\n", current())),
        Method::POST | Method::PUT => {
            let level = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    (key == "level").then(|| percent_decode(value))
                });
            let Some(level) = level else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "say which filter: POST /logging?level=debug\n",
                );
            };
            match crate::logging::set_filter(&level) {
                Ok(()) => text(StatusCode::OK, format!("{}\n", current())),
                Err(err @ crate::logging::FilterError::Invalid { .. }) => {
                    text(StatusCode::BAD_REQUEST, format!("{err}\n"))
                }
                Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
            }
        }
        _ => method_not_allowed("GET, HEAD, POST, PUT"),
    }
}

/// `%2C` as `,` and so on: filters have commas, `=` and `:`.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{ConnectionLabels, Reporter};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Response {
        status: u16,
        head: String,
        body: String,
    }

    /// Sends raw bytes, reads until the server closes, and splits the HTTP response.
    /// With `half_close`, shuts the write side after sending, as a client that is done talking.
    async fn exchange(addr: SocketAddr, request: &[u8], half_close: bool) -> io::Result<Response> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        if half_close {
            stream.shutdown().await?;
        }
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response"))??;
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok(Response {
            status,
            head: head.to_string(),
            body: body.to_string(),
        })
    }

    async fn get(addr: SocketAddr, path: &str) -> Response {
        get_with(addr, path, "").await
    }

    /// GET with extra header lines (each ending in `\r\n`).
    async fn get_with(addr: SocketAddr, path: &str, headers: &str) -> Response {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: test\r\n{headers}Connection: close\r\n\r\n");
        exchange(addr, request.as_bytes(), false)
            .await
            .expect("request failed")
    }

    fn loopback_config() -> AdminConfig {
        let any: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
        AdminConfig {
            admin: any,
            metrics: any,
            readiness: any,
        }
    }

    /// Starts a server on ephemeral ports; the caller cancels the token and awaits the handle.
    async fn start(
        state: AdminState,
    ) -> (
        BoundAddrs,
        CancellationToken,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let server = AdminServer::bind(&loopback_config()).await.expect("bind");
        let addrs = server.local_addrs();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server.run(state, shutdown.clone()));
        (addrs, shutdown, handle)
    }

    async fn stop(
        shutdown: CancellationToken,
        handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("server did not stop")
            .expect("server task panicked")
            .expect("server failed");
    }

    /// Runs `promtool check metrics` on `text` if promtool is installed.
    fn promtool_check(text: &str) {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                eprintln!("note: promtool not found, skipping `promtool check metrics`");
                return;
            }
            Err(error) => panic!("cannot run promtool: {error}"),
        };
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write to promtool");
        let output = child.wait_with_output().expect("promtool");
        assert!(
            output.status.success(),
            "promtool check metrics failed:\n{}{}\non:\n{text}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }

    #[tokio::test]
    async fn serves_metrics_readiness_and_config_dump() {
        let metrics = Metrics::new();
        let labels = ConnectionLabels {
            source_workload: "sleep".into(),
            ..ConnectionLabels::new(Reporter::Source)
        };
        metrics.connection_opened(&labels);
        metrics.connection_closed(&labels, 3, 4);
        let odd = ConnectionLabels {
            destination_service: "we\"ird\\name\nhere".into(),
            ..ConnectionLabels::new(Reporter::Destination)
        };
        metrics.connection_opened(&odd);
        metrics.set_workloads(2);
        metrics.inbound_rejected("not_tls");
        metrics.certificate_renewal(crate::admin::RenewalResult::Success);
        let state = AdminState::new(
            metrics,
            || serde_json::json!({"workloads": [{"name": "sleep", "namespace": "foo"}]}),
        );
        let (addrs, shutdown, handle) = start(state.clone()).await;

        // Without an Accept header (promtool's format): the Prometheus text format.
        let response = get(addrs.metrics, "/metrics").await;
        assert_eq!(response.status, 200, "{}", response.head);
        let head = response.head.to_ascii_lowercase();
        assert!(
            head.contains(&format!("content-type: {PROMETHEUS_CONTENT_TYPE}")),
            "{head}"
        );
        for name in [
            "\nistio_tcp_connections_opened_total{",
            "\nistio_tcp_connections_closed_total{",
            "\nistio_tcp_sent_bytes_total{",
            "\nistio_tcp_received_bytes_total{",
        ] {
            assert!(response.body.contains(name), "{}", response.body);
        }
        promtool_check(&response.body);

        // What Prometheus asks for.
        let accept = "Accept: application/openmetrics-text;version=1.0.0;q=0.5,\
                      text/plain;version=0.0.4;q=0.4,*/*;q=0.1\r\n";
        let response = get_with(addrs.metrics, "/metrics", accept).await;
        assert_eq!(response.status, 200, "{}", response.head);
        let head = response.head.to_ascii_lowercase();
        assert!(
            head.contains(&format!("content-type: {OPENMETRICS_CONTENT_TYPE}")),
            "{head}"
        );
        assert!(response.body.ends_with("# EOF\n"), "{}", response.body);
        assert!(
            response
                .body
                .contains("\nistio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"sleep\","),
            "{}",
            response.body
        );
        assert_eq!(get(addrs.metrics, "/stats/prometheus").await.status, 200);

        let response = get(addrs.readiness, "/healthz/ready").await;
        assert_eq!(response.status, 503);
        let why = "foo/sleep: network namespace /run/netns/sleep does not exist";
        state.set_not_ready(vec![why.to_owned()]);
        let response = get(addrs.readiness, "/healthz/ready").await;
        assert_eq!(
            (response.status, response.body.as_str()),
            (503, format!("not ready\n{why}\n").as_str())
        );
        let response = get(addrs.admin, "/config_dump").await;
        let json: serde_json::Value = serde_json::from_str(&response.body).expect("JSON");
        assert_eq!(json["readiness"]["ready"], false);
        assert_eq!(json["readiness"]["notReady"][0], why);
        state.set_ready(true);
        let response = get(addrs.readiness, "/healthz/ready").await;
        assert_eq!((response.status, response.body.as_str()), (200, "ready\n"));

        let response = get(addrs.admin, "/config_dump").await;
        assert_eq!(response.status, 200);
        let json: serde_json::Value = serde_json::from_str(&response.body).expect("JSON");
        assert_eq!(json["workloads"][0]["name"], "sleep");
        assert_eq!(json["readiness"]["ready"], true);

        let response = get(addrs.admin, "/").await;
        assert_eq!(response.status, 200);
        assert!(response.body.contains("/config_dump"), "{}", response.body);
        assert!(
            response.body.contains(&addrs.metrics.to_string()),
            "{}",
            response.body
        );

        stop(shutdown, handle).await;
    }

    #[tokio::test]
    async fn unknown_paths_methods_and_ports() {
        let state = AdminState::new(Metrics::new(), || serde_json::Value::Null);
        let (addrs, shutdown, handle) = start(state).await;
        assert_eq!(get(addrs.metrics, "/nope").await.status, 404);
        // Each path lives on its own port only.
        assert_eq!(get(addrs.admin, "/metrics").await.status, 404);
        assert_eq!(get(addrs.metrics, "/config_dump").await.status, 404);
        assert_eq!(get(addrs.readiness, "/").await.status, 404);
        let post = b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi";
        let response = exchange(addrs.metrics, post, false).await.expect("POST");
        assert_eq!(response.status, 405);
        assert!(
            response
                .head
                .to_ascii_lowercase()
                .contains("allow: get, head")
        );
        stop(shutdown, handle).await;
    }

    #[tokio::test]
    async fn garbage_does_not_kill_the_server() {
        let state = AdminState::new(Metrics::new(), || serde_json::json!({}));
        let (addrs, shutdown, handle) = start(state).await;
        for garbage in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage\r\n\r\n"[..],
            b"\r\n\r\n\r\n",
            b"GET /metrics HTTP/9.9 nonsense\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n",
            b"",
        ] {
            for addr in [addrs.admin, addrs.metrics, addrs.readiness] {
                let response = exchange(addr, garbage, true).await.expect("exchange");
                assert_ne!(response.status, 200, "{garbage:?}: {}", response.head);
            }
        }
        // A client that connects and vanishes mid-request.
        let mut stream = TcpStream::connect(addrs.metrics).await.expect("connect");
        stream.write_all(b"GET /met").await.expect("write");
        drop(stream);
        assert_eq!(get(addrs.metrics, "/metrics").await.status, 200);
        assert_eq!(get(addrs.admin, "/config_dump").await.status, 200);
        stop(shutdown, handle).await;
    }

    #[tokio::test]
    async fn config_dump_panic_is_a_500() {
        let state = AdminState::new(Metrics::new(), || panic!("boom"));
        let (addrs, shutdown, handle) = start(state).await;
        assert_eq!(get(addrs.admin, "/config_dump").await.status, 500);
        assert_eq!(get(addrs.admin, "/").await.status, 200);
        stop(shutdown, handle).await;
    }

    #[tokio::test]
    async fn bind_failure_names_the_address() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let taken_addr = taken.local_addr().expect("addr");
        let config = AdminConfig {
            metrics: taken_addr,
            ..loopback_config()
        };
        let state = AdminState::new(Metrics::new(), || serde_json::Value::Null);
        let error = serve(config, state, CancellationToken::new())
            .await
            .expect_err("bind must fail");
        let message = format!("{error:#}");
        assert!(message.contains(&taken_addr.to_string()), "{message}");
        assert!(message.contains("metrics"), "{message}");
    }
}
