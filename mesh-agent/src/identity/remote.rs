//! The CA service as the issuer of this node's workload certificates: for each identity a
//! fresh key made here (it never leaves the node), a CSR, and Istio's
//! `IstioCertificateService/CreateCertificate` call, naming the identity the node asks for as
//! ztunnel does (`ImpersonatedIdentity`). The same client works with `mesh-agent ca serve` and
//! with istiod.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use mesh_ca_api::{IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateServiceClient};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::info;

use super::ca::WorkloadCert;
use super::spiffe::SpiffeId;
use super::store::CertificateIssuer;
use super::tls::spiffe_id_of_certificate;
use crate::ca::nodes::{NODE_CERT_FILE, NODE_KEY_FILE};
use crate::fswatch::Fingerprint;
use crate::workload::RemoteCaConfig;

/// Connecting to the CA gives up after this; the store retries with backoff.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A request not answered in this long fails (and is retried).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How the agent proves to the CA which node it is.
#[derive(Debug, Clone)]
enum Credential {
    /// A service account token file, sent as `authorization: Bearer`.
    Token(PathBuf),
    /// The node's client certificate, presented in the TLS handshake.
    NodeCertificate,
}

/// A client of the CA service. Its roots file is looked at before each request: when a root
/// rotation adds the new root there, the next request trusts it (the CA's serving certificate
/// may move to the new root before the agent restarts).
pub struct RemoteCa {
    config: RemoteCaConfig,
    credential_dir: Option<PathBuf>,
    credential: Credential,
    client: ArcSwap<Connection>,
}

/// A channel made from the files as they were when it was made.
struct Connection {
    roots: Fingerprint,
    client: IstioCertificateServiceClient<Channel>,
}

impl std::fmt::Debug for RemoteCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCa")
            .field("address", &self.config.address)
            .field("credential", &self.credential)
            .finish()
    }
}

impl RemoteCa {
    /// A client for the CA that `config` names, authenticating with its token file or, without
    /// one, with the node credential in `credential_dir`. It connects lazily: an agent starts
    /// while the CA is away, and its requests fail (and are retried) until the CA answers.
    pub fn new(config: &RemoteCaConfig, credential_dir: Option<&Path>) -> anyhow::Result<Self> {
        let credential = match (&config.token, credential_dir) {
            (Some(token), _) => Credential::Token(token.clone()),
            (None, Some(_)) => Credential::NodeCertificate,
            (None, None) => bail!(
                "identity.ca has no token and the agent has no node credential: give \
                 --ca-credential DIR (made by `mesh-agent ca add-node`) or identity.ca.token"
            ),
        };
        let credential_dir = credential_dir.map(Path::to_owned);
        let connection = connect(config, credential_dir.as_deref(), &credential)?;
        Ok(Self {
            config: config.clone(),
            credential_dir,
            credential,
            client: ArcSwap::from_pointee(connection),
        })
    }

    /// The client for the roots file as it is now.
    fn client(&self) -> anyhow::Result<IstioCertificateServiceClient<Channel>> {
        let current = self.client.load();
        if roots_fingerprint(&self.config.roots) == current.roots {
            return Ok(current.client.clone());
        }
        let connection = connect(
            &self.config,
            self.credential_dir.as_deref(),
            &self.credential,
        )?;
        info!(roots = %self.config.roots.display(), "the CA's roots changed; reconnecting with them");
        let client = connection.client.clone();
        self.client.store(Arc::new(connection));
        Ok(client)
    }

    async fn request(&self, id: &SpiffeId, lifetime: Duration) -> anyhow::Result<WorkloadCert> {
        let (key, csr) = key_and_csr(id)?;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(impersonating(id)),
        });
        let cluster = self
            .config
            .cluster_id
            .parse()
            .context("identity.ca.clusterId is not a valid header value")?;
        request.metadata_mut().insert("clusterid", cluster);
        if let Credential::Token(path) = &self.credential {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading the CA token {}", path.display()))?;
            let value = format!("Bearer {}", token.trim())
                .parse()
                .context("the CA token is not a valid header value")?;
            request.metadata_mut().insert("authorization", value);
        }
        let response = self
            .client()?
            .create_certificate(request)
            .await
            .map_err(|status| {
                anyhow!(
                    "the CA at {} answered {:?}: {}",
                    self.config.address,
                    status.code(),
                    status.message()
                )
            })?
            .into_inner();
        workload_cert(id, &response.cert_chain, key)
            .with_context(|| format!("the certificate the CA at {} returned", self.config.address))
    }
}

impl CertificateIssuer for RemoteCa {
    fn issue<'a>(
        &'a self,
        id: &'a SpiffeId,
        lifetime: Duration,
    ) -> BoxFuture<'a, anyhow::Result<WorkloadCert>> {
        Box::pin(self.request(id, lifetime))
    }
}

/// A lazily connecting channel to the CA, trusting its roots file as it is now and presenting
/// the node credential if that is how the agent authenticates.
fn connect(
    config: &RemoteCaConfig,
    credential_dir: Option<&Path>,
    credential: &Credential,
) -> anyhow::Result<Connection> {
    let roots = roots_fingerprint(&config.roots);
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&config.roots)?));
    if let Some(name) = &config.server_name {
        tls = tls.domain_name(name.clone());
    }
    if let (Credential::NodeCertificate, Some(dir)) = (credential, credential_dir) {
        let cert = read(&dir.join(NODE_CERT_FILE))?;
        let key = read(&dir.join(NODE_KEY_FILE))?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from_shared(config.address.clone())
        .with_context(|| format!("identity.ca.address {:?}", config.address))?;
    if endpoint.uri().scheme_str() != Some("https") {
        bail!(
            "identity.ca.address {:?}: the CA is reached over TLS only (https://host:port)",
            config.address
        );
    }
    let channel = endpoint
        .tls_config(tls)
        .with_context(|| format!("TLS settings for the CA at {}", config.address))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .connect_lazy();
    Ok(Connection {
        roots,
        client: IstioCertificateServiceClient::new(channel),
    })
}

fn roots_fingerprint(path: &Path) -> Fingerprint {
    Fingerprint::of(path, |path| Ok(vec![path.to_owned()]))
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// A fresh ECDSA P-256 key and a PEM CSR for `id` (its only subjectAltName).
fn key_and_csr(id: &SpiffeId) -> anyhow::Result<(KeyPair, String)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        id.to_string()
            .try_into()
            .context("the SPIFFE ID as a URI SAN")?,
    )];
    let csr = params
        .serialize_request(&key)
        .context("signing the CSR")?
        .pem()
        .context("encoding the CSR")?;
    Ok((key, csr))
}

/// `metadata` naming the identity asked for, as ztunnel sends it.
fn impersonating(id: &SpiffeId) -> prost_types::Struct {
    let value = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
    };
    prost_types::Struct {
        fields: BTreeMap::from([(IMPERSONATED_IDENTITY.to_owned(), value)]),
    }
}

/// The CA's answer (PEM certificates, leaf first, root last) with our key, once the leaf is
/// for exactly `id`. The self-signed root is not sent to peers (they hold it).
fn workload_cert(id: &SpiffeId, pems: &[String], key: KeyPair) -> anyhow::Result<WorkloadCert> {
    let mut chain = Vec::new();
    for (index, text) in pems.iter().enumerate() {
        let block = pem::parse(text).with_context(|| format!("certificate #{index} is not PEM"))?;
        chain.push(CertificateDer::from(block.into_contents()));
    }
    let leaf = chain.first().context("the CA returned no certificate")?;
    let got = spiffe_id_of_certificate(leaf).context("the leaf's identity")?;
    if &got != id {
        bail!("asked for {id}, the CA issued {got}");
    }
    if chain.len() > 1 && chain.last().is_some_and(is_self_signed) {
        chain.pop();
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok(WorkloadCert::new(chain, key)?)
}

fn is_self_signed(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert)
        .is_ok_and(|(_, parsed)| parsed.subject().as_raw() == parsed.issuer().as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CertificateAuthority;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).expect("id")
    }

    #[test]
    fn the_csr_names_the_identity_alone() {
        let (_, csr) = key_and_csr(&id("web")).expect("csr");
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).expect("parses");
        let sans = &parsed.params.subject_alt_names;
        assert_eq!(sans.len(), 1, "{sans:?}");
        assert!(
            matches!(&sans[0], SanType::URI(uri) if uri.as_str() == "spiffe://cluster.local/ns/default/sa/web")
        );
    }

    #[test]
    fn a_certificate_for_another_identity_is_refused() {
        let ca = CertificateAuthority::generate_root("test root").expect("root");
        let other = ca
            .issue(&id("other"), Duration::from_secs(60))
            .expect("issue");
        let pems: Vec<String> = other
            .chain()
            .iter()
            .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
            .collect();
        let (key, _) = key_and_csr(&id("web")).expect("csr");
        let err = workload_cert(&id("web"), &pems, key).expect_err("refused");
        assert!(
            format!("{err:#}").contains("the CA issued spiffe://cluster.local/ns/default/sa/other"),
            "{err:#}"
        );
    }

    #[test]
    fn an_empty_or_garbage_answer_is_an_error() {
        let (key, _) = key_and_csr(&id("web")).expect("csr");
        assert!(workload_cert(&id("web"), &[], key).is_err());
        let (key, _) = key_and_csr(&id("web")).expect("csr");
        assert!(workload_cert(&id("web"), &["garbage".to_owned()], key).is_err());
    }
}
