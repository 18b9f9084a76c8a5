//! The CA service: `mesh-agent ca serve`, `ca add-node`, `ca revoke-node`.
//!
//! It speaks Istio's CA API (`IstioCertificateService/CreateCertificate`, gRPC over TLS 1.3)
//! and signs a workload certificate only for an agent whose node runs that workload now. The
//! signing key never leaves the CA's host (docs/identity.md). Its parts:
//!
//! - [`config`]: the file, `CA.yaml`;
//! - [`authn`]: who asks (node credential, or Kubernetes token via TokenReview);
//! - [`authz`]: what runs where (cluster file, or Kubernetes Pods);
//! - [`nodes`]: node credentials and their registry;
//! - [`service`]: the gRPC service and its TLS listener;
//! - [`metrics`]: `/metrics` and `/healthz/ready`.

pub mod authn;
pub mod authz;
pub mod config;
pub mod metrics;
pub mod nodes;
pub mod service;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::identity::{CertificateAuthority, TrustBundle};
use authn::{TokenAuthenticator, TokenPolicy};
use authz::{Authorizer, ClusterFileIndex, PodWatch};
pub use config::{CaConfig, DEFAULT_METRICS_ADDR};
use metrics::CaMetrics;
use nodes::{NodesDir, RegistryView};
use service::{Authority, GrpcServer, ServingCert, Signing};

/// `ca serve`: runs until SIGTERM or SIGINT.
pub async fn serve(config_path: &Path, metrics_addr: SocketAddr) -> anyhow::Result<()> {
    let config = CaConfig::load(config_path)?;
    let shutdown = CancellationToken::new();
    let server = CaServer::bind(&config, metrics_addr).await?;
    info!(
        listen = %server.grpc_addr()?,
        metrics = %server.metrics_addr()?,
        trust_domain = config.trust_domain,
        "CA serving"
    );
    tokio::spawn(stop_on_signal(shutdown.clone()));
    server.run(shutdown).await
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    info!("stopping the CA");
    shutdown.cancel();
}

/// `ca add-node`: prints where the credential went.
pub fn add_node(config_path: &Path, node: &str, out: &Path) -> anyhow::Result<()> {
    let config = CaConfig::load(config_path)?;
    let nodes_dir = nodes_dir(&config, config_path)?;
    let roots = roots_pem(&trust_bundle(&config)?);
    let credential = nodes::add_node(nodes_dir, &config.trust_domain, node, &roots, out)?;
    println!(
        "wrote {} (serial {}, valid until {}), {} and {} in {}; node {node}'s previous credential, if any, is revoked",
        nodes::NODE_CERT_FILE,
        credential.serial,
        humantime::format_rfc3339_seconds(credential.not_after),
        nodes::NODE_KEY_FILE,
        nodes::CA_ROOTS_FILE,
        out.display()
    );
    Ok(())
}

/// `ca revoke-node`.
pub fn revoke_node(config_path: &Path, node: &str) -> anyhow::Result<()> {
    let config = CaConfig::load(config_path)?;
    let nodes_dir = nodes_dir(&config, config_path)?;
    match nodes::revoke_node(nodes_dir, node)? {
        Some(serial) => println!("revoked node {node}'s credential (serial {serial})"),
        None => println!("node {node} had no valid credential"),
    }
    Ok(())
}

fn nodes_dir<'c>(config: &'c CaConfig, config_path: &Path) -> anyhow::Result<&'c Path> {
    match &config.nodes {
        Some(dir) => Ok(dir),
        None => bail!(
            "{}: no `nodes` directory configured, so this CA has no node credentials",
            config_path.display()
        ),
    }
}

/// The CA, bound to its addresses and ready to run.
pub struct CaServer {
    grpc: GrpcServer,
    metrics_listener: tokio::net::TcpListener,
    pod_watch: Option<(kube::Client, Arc<PodWatch>)>,
}

impl CaServer {
    /// Loads everything and binds both addresses; fails before serving anything if the
    /// configuration, the signing material or the authorization source is unusable.
    pub async fn bind(config: &CaConfig, metrics_addr: SocketAddr) -> anyhow::Result<Self> {
        let signing = load_signing(config)?;
        let (authz, tokens, pod_watch) = authorization(config).await?;
        let (registry, node_ca) = match &config.nodes {
            Some(dir) => (
                Some(RegistryView::new(dir)),
                Some(NodesDir::new(dir).ca_certificate()?),
            ),
            None => (None, None),
        };
        let (serving, serving_not_after) = ServingCert::new(&signing.ca, config.server_sans()?)?;
        let serving = Arc::new(serving);
        let tls = Arc::new(service::server_config(Arc::clone(&serving), node_ca)?);
        let authority = Arc::new(Authority {
            trust_domain: config.trust_domain.clone(),
            signing,
            max_lifetime: config.max_certificate_lifetime,
            registry,
            tokens,
            authz,
            metrics: CaMetrics::new(),
        });
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let metrics_listener = metrics::bind(metrics_addr).await?;
        Ok(Self {
            grpc: GrpcServer {
                listener,
                tls,
                serving,
                serving_not_after,
                authority,
            },
            metrics_listener,
            pod_watch,
        })
    }

    pub fn grpc_addr(&self) -> anyhow::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    pub fn metrics_addr(&self) -> anyhow::Result<SocketAddr> {
        self.metrics_listener
            .local_addr()
            .context("the metrics listener has no address")
    }

    /// Serves until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let authority = Arc::clone(&self.grpc.authority);
        if let Some((client, pods)) = self.pod_watch {
            tokio::spawn(pods.run(client, authority.trust_domain.clone(), shutdown.clone()));
        }
        let not_ready_of = Arc::clone(&authority);
        tokio::spawn(metrics::serve(
            self.metrics_listener,
            authority.metrics.clone(),
            Arc::new(move || not_ready_of.authz.not_ready()),
            shutdown.clone(),
        ));
        self.grpc.run(shutdown).await
    }
}

type AuthorizationParts = (
    Authorizer,
    Option<TokenAuthenticator>,
    Option<(kube::Client, Arc<PodWatch>)>,
);

async fn authorization(config: &CaConfig) -> anyhow::Result<AuthorizationParts> {
    match config.authorization()? {
        config::Authorization::ClusterFile(path) => Ok((
            Authorizer::ClusterFile(ClusterFileIndex::load(&path, &config.trust_domain)?),
            None,
            None,
        )),
        config::Authorization::Kubernetes(kubernetes) => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config, else KUBECONFIG)")?;
            let pods = Arc::new(PodWatch::default());
            let policy = TokenPolicy {
                audience: kubernetes.audience.clone(),
                agents: kubernetes.service_accounts()?.into_iter().collect(),
            };
            let tokens = TokenAuthenticator::new(client.clone(), policy, Arc::clone(&pods));
            Ok((
                Authorizer::Kubernetes(Arc::clone(&pods)),
                Some(tokens),
                Some((client, pods)),
            ))
        }
    }
}

/// The signing CA, and the root its chains end with (from the signing file, else the bundle).
fn load_signing(config: &CaConfig) -> anyhow::Result<Signing> {
    let ca = CertificateAuthority::load(&config.signing_cert, &config.signing_key)?;
    let root = match ca.root_certificate() {
        Some(root) => root.clone(),
        None => root_in_bundle(config)?,
    };
    Ok(Signing { ca, root })
}

/// The root of the bundle that issued the last certificate of `signingCert`.
fn root_in_bundle(config: &CaConfig) -> anyhow::Result<CertificateDer<'static>> {
    let certs = read_certificates(&config.signing_cert)?;
    let top = certs
        .last()
        .with_context(|| format!("{}: no certificate", config.signing_cert.display()))?;
    let issuer = subject_and_issuer(top)?.1;
    trust_bundle(config)?
        .certificates()
        .iter()
        .find(|root| subject_and_issuer(root).is_ok_and(|(subject, _)| subject == issuer))
        .cloned()
        .with_context(|| {
            format!(
                "{}: no root in the trust bundle issued {}",
                config.signing_cert.display(),
                config.signing_cert.display()
            )
        })
}

/// The roots handed to agents and nodes: `trustBundle`, else the root in `signingCert`.
pub fn trust_bundle(config: &CaConfig) -> anyhow::Result<TrustBundle> {
    if let Some(path) = &config.trust_bundle {
        return Ok(TrustBundle::load(path)?);
    }
    let roots: Vec<_> = read_certificates(&config.signing_cert)?
        .into_iter()
        .filter(|cert| subject_and_issuer(cert).is_ok_and(|(subject, issuer)| subject == issuer))
        .collect();
    if roots.is_empty() {
        bail!(
            "{}: holds no root certificate; set trustBundle to the root(s)",
            config.signing_cert.display()
        );
    }
    Ok(TrustBundle::from_certs(roots)?)
}

fn roots_pem(bundle: &TrustBundle) -> String {
    bundle
        .certificates()
        .iter()
        .map(|cert| nodes::pem_encode("CERTIFICATE", cert))
        .collect()
}

fn read_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read certificates from {}", path.display()))
}

fn subject_and_issuer(cert: &CertificateDer<'_>) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).context("unparsable certificate")?;
    Ok((
        parsed.subject().as_raw().to_vec(),
        parsed.issuer().as_raw().to_vec(),
    ))
}
