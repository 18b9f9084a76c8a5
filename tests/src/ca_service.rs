//! The central CA of a test cluster ([`crate::ClusterBuilder::with_ca_service`]):
//! `mesh-agent ca serve` on a host of its own, as the CA Deployment or VM of a real mesh.
//!
//! - host: netns `{id}-ca` on the fabric with 10.255.0.253/24 and fd00:ff::fd/64 (attached
//!   as the control plane's is), cgroup `ca` in the cluster's cgroup directory;
//! - files: `{scratch}/{id}-ca/`, outside the cluster's workdir (which holds what the nodes
//!   read: the cluster file, their credentials): `ca-cert.pem` and `ca-key.pem` from
//!   `mesh-agent ca init`, `CA.yaml`, `nodes/` (the node registry and the node-credential CA),
//!   `serve.log` (JSON lines);
//! - every node is enrolled with `ca add-node` into [`Cluster::node_credential_dir`].
//!
//! Everything goes with the cluster (also on panic): the process is killed, the netns and
//! the directory removed; a crashed test process's leftovers are swept by their names.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::cluster::{agent_bin, read_log, scratch_root, terminate, wait_for_line};
use crate::pod::{RunOutput, run_with_timeout, tail_of};
use crate::{Cluster, sys};

/// The CA host's name: its netns is `{id}-ca`, its cgroup `ca` (so no node may be called so).
pub const CA_SERVICE_NAME: &str = "ca";
/// The CA service's address on the fabric (the control plane is .254, nodes .1, .2, ...).
pub const CA_IPV4: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 253);
pub const CA_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, 0xfd);
/// Istio's CA API port (gRPC over TLS), as istiod's.
pub const CA_PORT: u16 = 15012;
/// Metrics (`/metrics`) and readiness (`/healthz/ready`).
pub const CA_METRICS_PORT: u16 = 15014;
/// The CA's log message for every certificate it signs.
pub const CA_ISSUED: &str = "certificate issued";
/// The CA's log message for every request it refuses.
pub const CA_REFUSED: &str = "certificate request refused";
/// What `ca add-node --out DIR` writes.
pub const NODE_CERT_FILE: &str = "node-cert.pem";
pub const NODE_KEY_FILE: &str = "node-key.pem";
pub const NODE_ROOTS_FILE: &str = "ca-roots.pem";

const CA_READY_TIMEOUT: Duration = Duration::from_secs(30);
const CLI_TIMEOUT: Duration = Duration::from_secs(20);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The answer of the CA service to one `CreateCertificate`.
#[derive(Debug, Clone)]
pub enum CaAnswer {
    /// Signed: the chain (PEM each, leaf first, root last) and the key the CSR was made with
    /// (PKCS#8 PEM).
    Issued { chain: Vec<String>, key_pem: String },
    /// A gRPC error status.
    Refused { code: tonic::Code, message: String },
}

impl CaAnswer {
    /// The status code of a refusal (`None` when issued).
    pub fn refusal(&self) -> Option<tonic::Code> {
        match self {
            CaAnswer::Issued { .. } => None,
            CaAnswer::Refused { code, .. } => Some(*code),
        }
    }

    /// The subject alternative names of the issued leaf as `openssl x509` prints them
    /// (`URI:spiffe://...`); an error for a refusal.
    pub fn leaf_sans(&self) -> Result<Vec<String>> {
        use std::io::Write as _;
        let CaAnswer::Issued { chain, .. } = self else {
            bail!("nothing was issued: {self:?}");
        };
        let leaf = chain.first().context("an empty chain")?;
        let mut child = Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run openssl x509")?;
        child
            .stdin
            .take()
            .context("openssl's stdin")?
            .write_all(leaf.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "openssl x509 failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

/// A central CA service; see the module documentation.
pub struct CaService {
    netns: String,
    cgroup: PathBuf,
    dir: PathBuf,
    cluster_file: PathBuf,
    trust_domain: String,
    process: Mutex<Option<Child>>,
}

impl CaService {
    /// Names everything (nothing is made yet): the cluster holds it from the start, so its
    /// teardown removes whatever [`CaService::set_up`] made, even half-way.
    pub(crate) fn new(cluster: &Cluster) -> CaService {
        CaService {
            netns: format!("{}-{CA_SERVICE_NAME}", cluster.id()),
            cgroup: cluster.cgroup_dir().join(CA_SERVICE_NAME),
            dir: scratch_root().join(format!("{}-{CA_SERVICE_NAME}", cluster.id())),
            cluster_file: cluster.cluster_file().to_owned(),
            trust_domain: cluster.trust_domain().to_owned(),
            process: Mutex::new(None),
        }
    }

    /// The host on the fabric, the CA (`ca init`), `CA.yaml`, a credential for every node and
    /// the trust bundle the cluster file names ([`Cluster::ca_roots_path`]).
    pub(crate) fn set_up(&self, cluster: &Cluster) -> Result<()> {
        sys::mkdir_all(&self.cgroup)?;
        cluster
            .add_fabric_host(&self.netns, "ca0", CA_IPV4, CA_IPV6)
            .context("attach the CA's netns to the fabric")?;
        self.cli([OsStr::new("init"), self.dir.as_os_str()])?;
        let config = serde_json::json!({
            "trustDomain": self.trust_domain,
            "listen": format!("0.0.0.0:{CA_PORT}"),
            "signingCert": "ca-cert.pem",
            "signingKey": "ca-key.pem",
            "serverNames": ["mesh-ca", CA_IPV4.to_string(), CA_IPV6.to_string()],
            "maxCertificateLifetime": "24h",
            "nodes": "nodes/",
            "authorization": { "clusterFile": self.cluster_file.display().to_string() },
        });
        let text = serde_yaml_ng::to_string(&config).context("serialize CA.yaml")?;
        sys::write_atomic(&self.config_path(), text.as_bytes())?;
        for node in cluster.nodes() {
            self.add_node(node.name(), &cluster.node_credential_dir(node.name()))?;
        }
        let first = cluster.nodes().first().context("no nodes")?.name();
        let roots = cluster.node_credential_dir(first).join(NODE_ROOTS_FILE);
        fs::copy(&roots, cluster.ca_roots_path())
            .with_context(|| format!("copy {}", roots.display()))?;
        Ok(())
    }

    // ------------------------------------------------------------ accessors

    /// The CA's directory, on its host only: signing key, `CA.yaml`, `nodes/`, log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("CA.yaml")
    }
    /// The mesh's signing key (PKCS#8 PEM).
    pub fn signing_key_path(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    pub fn signing_cert_path(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }
    /// The key of the CA that signs node credentials (made by the first `add-node`).
    pub fn node_ca_key_path(&self) -> PathBuf {
        self.dir.join("nodes").join("node-ca-key.pem")
    }
    /// Where `ca serve` logs (JSON lines; every run appends).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("serve.log")
    }
    /// `https://10.255.0.253:15012`, as the cluster file names it.
    pub fn address(&self) -> String {
        format!("https://{CA_IPV4}:{CA_PORT}")
    }
    pub fn netns_name(&self) -> &str {
        &self.netns
    }
    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.netns)
    }

    // ------------------------------------------------------------ process

    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.process.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `mesh-agent ca serve` in the CA's netns and cgroup and waits until it answers
    /// `/healthz/ready` with 200.
    pub fn start(&self) -> Result<()> {
        if self.running() {
            bail!("the CA service is running already");
        }
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let bin = agent_bin();
        let mut cmd = Command::new(&bin);
        cmd.args(["--log-format", "json", "ca", "serve", "--config"])
            .arg(self.config_path())
            .arg("--metrics-addr")
            .arg(format!("0.0.0.0:{CA_METRICS_PORT}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        sys::place(&mut cmd, &self.cgroup, &self.netns_path())?;
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {} ca serve", bin.display()))?;
        wait_until_ready(&mut child, &log_path, || {
            Ok(self.http_get("/healthz/ready")?.map(|(status, _)| status))
        })?;
        *self.lock() = Some(child);
        Ok(())
    }

    /// Stops the CA service: SIGTERM, then waits (up to 10 s, then SIGKILL and an error).
    pub fn stop(&self) -> Result<ExitStatus> {
        stop_process(self.lock().take(), &self.log_path())
    }

    /// Whether `ca serve` is running.
    pub fn running(&self) -> bool {
        match self.lock().as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id of `ca serve` while the harness runs it.
    pub fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Child::id)
    }

    /// Kills the process at once (teardown).
    pub(crate) fn kill(&self) {
        if let Some(mut child) = self.lock().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    // ------------------------------------------------------------ CLI

    /// `mesh-agent ca ARGS`, on the CA's host (its files only; no network), checked.
    fn cli<I, S>(&self, args: I) -> Result<RunOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("ca").args(args).stdin(Stdio::null());
        let shown = format!("{cmd:?}");
        run_with_timeout(&mut cmd, CLI_TIMEOUT)
            .and_then(RunOutput::check)
            .with_context(|| format!("run {shown}"))
    }

    /// `mesh-agent ca add-node --config CA.yaml NAME --out DIR`: a new credential for the node
    /// (`node-cert.pem`, `node-key.pem`, `ca-roots.pem` in `out`), which replaces, hence
    /// revokes, any earlier one.
    pub fn add_node(&self, name: &str, out: &Path) -> Result<()> {
        sys::mkdir_all(out)?;
        let config = self.config_path();
        self.cli([
            OsStr::new("add-node"),
            OsStr::new("--config"),
            config.as_os_str(),
            OsStr::new(name),
            OsStr::new("--out"),
            out.as_os_str(),
        ])
        .map(drop)
    }

    /// `mesh-agent ca revoke-node --config CA.yaml NAME`.
    pub fn revoke_node(&self, name: &str) -> Result<()> {
        let config = self.config_path();
        self.cli([
            OsStr::new("revoke-node"),
            OsStr::new("--config"),
            config.as_os_str(),
            OsStr::new(name),
        ])
        .map(drop)
    }

    // ------------------------------------------------------------ observing

    /// Every JSON line `ca serve` has logged (all runs), fields flattened.
    pub fn logs(&self) -> Result<Vec<Value>> {
        read_log(&self.log_path(), 0)
    }

    /// The lines whose `message` is `message`.
    pub fn logs_with(&self, message: &str) -> Result<Vec<Value>> {
        Ok(self
            .logs()?
            .into_iter()
            .filter(|l| l["message"] == message)
            .collect())
    }

    /// The last lines of the log, for messages.
    pub fn log_tail(&self) -> String {
        tail_of(&self.log_path())
    }

    /// Polls the log until a line satisfies `pred`.
    pub fn wait_for_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        wait_for_line(&self.log_path(), pred, timeout).context("the CA service")
    }

    /// `GET /metrics` (Prometheus text).
    pub fn metrics(&self) -> Result<String> {
        match self.http_get("/metrics")? {
            Some((200, body)) => Ok(body),
            other => bail!("GET /metrics of the CA service: {other:?}"),
        }
    }

    /// `GET http://127.0.0.1:15014PATH` from the CA's host: (status, body), `None` while
    /// nothing answers.
    fn http_get(&self, path: &str) -> Result<Option<(u16, String)>> {
        let url = format!("http://127.0.0.1:{CA_METRICS_PORT}{path}");
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "3", "-w", "\n%{http_code}", &url])
            .stdin(Stdio::null());
        sys::place(&mut cmd, &self.cgroup, &self.netns_path())?;
        let out = run_with_timeout(&mut cmd, Duration::from_secs(8))
            .with_context(|| format!("curl {url}"))?;
        match out.code() {
            Some(0) => {
                let text = out.stdout_str();
                let (body, code) = text
                    .rsplit_once('\n')
                    .ok_or_else(|| anyhow!("curl {url}: no status in {text:?}"))?;
                let code = code
                    .parse()
                    .with_context(|| format!("curl {url}: status {code:?}"))?;
                Ok(Some((code, body.to_owned())))
            }
            // Couldn't connect, timed out, empty reply, connection reset.
            Some(7 | 28 | 52 | 56) => Ok(None),
            _ => bail!(
                "curl {url} exited {}: {}",
                out.status,
                out.stderr_str().trim()
            ),
        }
    }

    // ------------------------------------------------------------ requests

    /// One `CreateCertificate` as an agent makes it, from inside the network namespace at
    /// `netns` (a node's), with the node credential in `credential` (`node-cert.pem`,
    /// `node-key.pem`) as client certificate, or none; see [`request_certificate_at`].
    pub fn request_certificate(
        &self,
        netns: &Path,
        roots: &Path,
        credential: Option<&Path>,
        identity: &str,
    ) -> Result<CaAnswer> {
        let caller = credential.map_or(CaCaller::Anonymous, CaCaller::NodeCredential);
        request_certificate_at(netns, &self.address(), roots, None, caller, identity)
    }
}

/// How a request to a CA service proves who asks.
#[derive(Debug, Clone, Copy)]
pub enum CaCaller<'a> {
    /// No credential at all.
    Anonymous,
    /// A node credential made by `ca add-node` (a directory with `node-cert.pem` and
    /// `node-key.pem`), presented as TLS client certificate.
    NodeCredential(&'a Path),
    /// A Kubernetes service account token (JWT), sent as `authorization: Bearer`.
    Token(&'a str),
}

/// One `CreateCertificate` to the CA service at `address` (`https://ip:port`) as an agent
/// makes it, from inside the network namespace at `netns`: a fresh P-256 key, a CSR whose
/// only SAN is `identity`, metadata `ImpersonatedIdentity: identity` and `clusterid:
/// Kubernetes`, over TLS verified against `roots` (for `server_name`, if not the address),
/// authenticated as `caller` says. Fails only when no answer came (no connection, a
/// TLS failure, a timeout).
pub fn request_certificate_at(
    netns: &Path,
    address: &str,
    roots: &Path,
    server_name: Option<&str>,
    caller: CaCaller<'_>,
    identity: &str,
) -> Result<CaAnswer> {
    let roots = fs::read(roots).with_context(|| format!("read {}", roots.display()))?;
    let client_identity = match caller {
        CaCaller::NodeCredential(dir) => {
            let read = |name: &str| {
                let path = dir.join(name);
                fs::read(&path).with_context(|| format!("read {}", path.display()))
            };
            Some((read(NODE_CERT_FILE)?, read(NODE_KEY_FILE)?))
        }
        CaCaller::Anonymous | CaCaller::Token(_) => None,
    };
    let token = match caller {
        CaCaller::Token(token) => Some(token.to_owned()),
        CaCaller::Anonymous | CaCaller::NodeCredential(_) => None,
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = workload_csr(identity, &key)?;
    let url = address.to_owned();
    let server_name = server_name.map(str::to_owned);
    let identity = identity.to_owned();
    let answer = sys::in_netns(netns, move || -> Result<_> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("build a tokio runtime")?;
        runtime.block_on(create_certificate(
            url,
            roots,
            server_name,
            client_identity,
            token,
            csr,
            identity,
        ))
    })??;
    Ok(match answer {
        Ok(chain) => CaAnswer::Issued {
            chain,
            key_pem: key.serialize_pem(),
        },
        Err(status) => CaAnswer::Refused {
            code: status.code(),
            message: status.message().to_owned(),
        },
    })
}

/// A PKCS#10 request (PEM) with `identity` as its only SAN (a URI) and an empty subject.
fn workload_csr(identity: &str, key: &rcgen::KeyPair) -> Result<String> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
        identity,
    )?)];
    Ok(params.serialize_request(key)?.pem()?)
}

/// The gRPC call; `Err` of the outer result when no answer came.
async fn create_certificate(
    url: String,
    roots: Vec<u8>,
    server_name: Option<String>,
    client_identity: Option<(Vec<u8>, Vec<u8>)>,
    token: Option<String>,
    csr: String,
    identity: String,
) -> Result<Result<Vec<String>, tonic::Status>> {
    use mesh_ca_api::{
        IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateServiceClient,
    };
    use tonic::metadata::MetadataValue;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(roots));
    if let Some(name) = server_name {
        tls = tls.domain_name(name);
    }
    if let Some((cert, key)) = client_identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(url.clone())?
        .connect_timeout(REQUEST_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .tls_config(tls)?
        .connect()
        .await
        .with_context(|| format!("connect to {url}"))?;
    let mut client = IstioCertificateServiceClient::new(channel);
    // As ztunnel and the agent name it: in the request's metadata struct (istiod reads
    // nothing else, and without it signs the caller's own identity).
    let impersonating = prost_types::Struct {
        fields: [(
            IMPERSONATED_IDENTITY.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(identity)),
            },
        )]
        .into(),
    };
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata: Some(impersonating),
    });
    // istiod lets a node agent impersonate only when it names its cluster.
    request
        .metadata_mut()
        .insert("clusterid", MetadataValue::from_static("Kubernetes"));
    if let Some(token) = token {
        let bearer: MetadataValue<_> = format!("Bearer {token}").parse()?;
        request.metadata_mut().insert("authorization", bearer);
    }
    Ok(client
        .create_certificate(request)
        .await
        .map(|response| response.into_inner().cert_chain))
}

/// Waits until a just started `ca serve` answers its readiness probe with 200 (`probe` gives
/// the status, if any): an error with its log's tail if it exits first or is not ready within
/// [`CA_READY_TIMEOUT`] (then it is killed). The file-mode and Kubernetes CA hosts share it.
pub(crate) fn wait_until_ready(
    child: &mut Child,
    log_path: &Path,
    mut probe: impl FnMut() -> Result<Option<u16>>,
) -> Result<()> {
    let deadline = Instant::now() + CA_READY_TIMEOUT;
    loop {
        // Not ready yet, or an error: either way keep polling until the deadline.
        let ready = probe();
        if matches!(ready, Ok(Some(200))) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the CA service exited ({status}) before it was ready; {}",
                tail_of(log_path)
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the CA service was not ready after {CA_READY_TIMEOUT:?} (last: {ready:?}); {}",
                tail_of(log_path)
            );
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Stops `ca serve`: SIGTERM, then waits (up to 10 s, then SIGKILL and an error).
pub(crate) fn stop_process(child: Option<Child>, log_path: &Path) -> Result<ExitStatus> {
    let mut child = child.ok_or_else(|| anyhow!("the CA service is not running"))?;
    match terminate(&mut child, Duration::from_secs(10))? {
        (status, false) => Ok(status),
        (status, true) => bail!(
            "the CA service ignored SIGTERM for 10 s; killed ({status}); {}",
            tail_of(log_path)
        ),
    }
}
