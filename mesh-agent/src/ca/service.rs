//! The gRPC service (`istio.v1.auth.IstioCertificateService/CreateCertificate`) and its TLS
//! listener.
//!
//! A request is answered in this order, and the first failure refuses it:
//! authenticate the node (node credential, else bearer token) → parse and check the CSR →
//! name the identity (`ImpersonatedIdentity`, else the CSR's URI SAN) → authorize it for the
//! node → sign.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use mesh_ca_api::{
    IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateResponse,
    IstioCertificateService, IstioCertificateServiceServer,
};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};
use tracing::{debug, info, warn};

use super::authn::{
    AuthnError, AuthnFailure, Caller, TokenAuthenticator, bearer_token, node_of_certificate,
};
use super::authz::{Authorizer, AuthzError};
use super::metrics::CaMetrics;
use super::nodes::{RegistryView, pem_encode};
use crate::identity::{
    CLOCK_SKEW_ALLOWANCE, CertificateAuthority, CsrError, SpiffeId, WorkloadCert, WorkloadCsr,
};

/// The serving certificate's lifetime; it is re-made at half of it.
const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// A failed re-make of the serving certificate is retried after this.
const SERVING_CERT_RETRY: Duration = Duration::from_secs(60);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the gRPC server.
const ACCEPT_QUEUE: usize = 128;

/// The signing material: the CA, and the root its chains end with.
pub struct Signing {
    pub ca: CertificateAuthority,
    /// Appended to every returned chain (Istio's order: leaf, intermediates, root).
    pub root: CertificateDer<'static>,
}

/// Everything a request is decided with.
pub struct Authority {
    pub trust_domain: String,
    pub signing: Signing,
    pub max_lifetime: Duration,
    /// `None`: node credentials are not accepted.
    pub registry: Option<RegistryView>,
    /// `None`: bearer tokens are not accepted.
    pub tokens: Option<TokenAuthenticator>,
    pub authz: Authorizer,
    pub metrics: CaMetrics,
}

/// A refused request: who asked for what, why, and the gRPC status it gets.
#[derive(Debug)]
pub struct Refusal {
    pub node: Option<String>,
    pub caller: String,
    pub identity: String,
    pub code: Code,
    pub reason: String,
}

impl Refusal {
    fn status(&self) -> Status {
        Status::new(self.code, self.reason.clone())
    }
}

/// A granted request.
#[derive(Debug)]
pub struct Grant {
    pub node: String,
    pub identity: SpiffeId,
    pub serial: String,
    pub not_after: SystemTime,
    pub response: IstioCertificateResponse,
}

/// The tonic service. Cheap to clone.
#[derive(Clone)]
pub struct CaService(Arc<Authority>);

impl CaService {
    pub fn new(authority: Arc<Authority>) -> Self {
        Self(authority)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        match self.0.answer(request).await {
            Ok(grant) => {
                self.0.metrics.issued(started.elapsed());
                info!(
                    node = grant.node,
                    identity = %grant.identity,
                    serial = grant.serial,
                    not_after = %humantime::format_rfc3339_seconds(grant.not_after),
                    "certificate issued"
                );
                Ok(Response::new(grant.response))
            }
            Err(refusal) => {
                self.0.metrics.refused();
                warn!(
                    node = refusal.node.as_deref().unwrap_or("unknown"),
                    caller = refusal.caller,
                    identity = refusal.identity,
                    reason = refusal.reason,
                    code = ?refusal.code,
                    "certificate request refused"
                );
                Err(refusal.status())
            }
        }
    }
}

impl Authority {
    async fn answer(&self, request: Request<IstioCertificateRequest>) -> Result<Grant, Refusal> {
        let asked = impersonated_identity(request.get_ref(), request.metadata());
        let caller = self
            .authenticate(&request)
            .await
            .map_err(|failure| Refusal {
                code: authn_code(&failure.error),
                reason: failure.error.to_string(),
                node: failure.node,
                caller: failure.caller,
                identity: shown_identity(&asked),
            })?;
        self.grant(&caller, asked, request.into_inner())
    }

    /// Decides an authenticated request: `asked` is its [`impersonated_identity`], `body` the
    /// request itself. Checks the CSR, names the identity, authorizes it for the caller's node
    /// and signs. Needs no network: everything here is decided from the request and the
    /// authority's own state.
    pub fn grant(
        &self,
        caller: &Caller,
        asked: Result<Option<String>, String>,
        body: IstioCertificateRequest,
    ) -> Result<Grant, Refusal> {
        let shown = shown_identity(&asked);
        let refuse = |code: Code, identity: &str, reason: String| Refusal {
            node: Some(caller.node.clone()),
            caller: caller.caller.clone(),
            identity: identity.to_owned(),
            code,
            reason,
        };
        let asked = asked.map_err(|reason| refuse(Code::InvalidArgument, &shown, reason))?;
        let csr = WorkloadCsr::parse(&body.csr)
            .map_err(|err| refuse(Code::InvalidArgument, &shown, err.to_string()))?;
        let named = asked.unwrap_or_else(|| csr.uri_san().to_owned());
        let identity = SpiffeId::from_str(&named)
            .map_err(|err| refuse(Code::InvalidArgument, &named, err.to_string()))?;
        self.authz
            .check(&self.trust_domain, &caller.node, &identity)
            .map_err(|err| refuse(authz_code(&err), &named, err.to_string()))?;
        let lifetime = granted_lifetime(body.validity_duration, self.max_lifetime);
        let issued = self
            .signing
            .ca
            .sign_csr(&csr, &identity, lifetime)
            .map_err(|err| refuse(csr_code(&err), &named, err.to_string()))?;
        let cert_chain = issued
            .chain
            .iter()
            .chain(std::iter::once(&self.signing.root))
            .map(|cert| pem_encode("CERTIFICATE", cert))
            .collect();
        Ok(Grant {
            node: caller.node.clone(),
            identity,
            serial: issued.serial,
            not_after: issued.not_after,
            response: IstioCertificateResponse { cert_chain },
        })
    }

    /// A client certificate (a node credential: TLS has checked it chains to the
    /// node-credential CA) takes precedence; otherwise a bearer token.
    async fn authenticate(
        &self,
        request: &Request<IstioCertificateRequest>,
    ) -> Result<Caller, AuthnFailure> {
        let failure = |error| AuthnFailure {
            caller: "unknown".to_owned(),
            node: None,
            error,
        };
        if let Some(certs) = request.peer_certs()
            && let Some(leaf) = certs.first()
        {
            let registry = self
                .registry
                .as_ref()
                .ok_or_else(|| failure(AuthnError::CredentialsNotAccepted))?;
            return node_of_certificate(leaf, &self.trust_domain, &registry.current());
        }
        let Some(value) = request.metadata().get("authorization") else {
            return Err(failure(AuthnError::Missing));
        };
        let value = value
            .to_str()
            .map_err(|_| failure(AuthnError::MalformedAuthorization))?;
        let token = bearer_token(value).map_err(failure)?;
        let tokens = self
            .tokens
            .as_ref()
            .ok_or_else(|| failure(AuthnError::TokensNotAccepted))?;
        tokens.authenticate(token).await
    }
}

/// The identity named by the request's `ImpersonatedIdentity`: in its `metadata` struct (as
/// ztunnel sends it) or, failing that, in the gRPC metadata. Both present and different is an
/// error rather than a guess.
pub fn impersonated_identity(
    body: &IstioCertificateRequest,
    grpc: &MetadataMap,
) -> Result<Option<String>, String> {
    use prost_types::value::Kind;
    let in_body = match body
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
        .and_then(|value| value.kind.as_ref())
    {
        None => None,
        Some(Kind::StringValue(id)) => Some(id.clone()),
        Some(_) => return Err(format!("metadata {IMPERSONATED_IDENTITY} is not a string")),
    };
    let in_header = match grpc.get(IMPERSONATED_IDENTITY.to_ascii_lowercase().as_str()) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| format!("gRPC metadata {IMPERSONATED_IDENTITY} is not text"))?
                .to_owned(),
        ),
    };
    match (in_body, in_header) {
        (Some(body), Some(header)) if body != header => Err(format!(
            "{IMPERSONATED_IDENTITY} differs between the request's metadata ({body:?}) and the gRPC metadata ({header:?})"
        )),
        (Some(id), _) | (None, Some(id)) => Ok(Some(id)),
        (None, None) => Ok(None),
    }
}

/// The identity a refusal names before the CSR is read.
fn shown_identity(asked: &Result<Option<String>, String>) -> String {
    match asked {
        Ok(Some(id)) => id.clone(),
        _ => "unknown".to_owned(),
    }
}

/// What the requester asked for (seconds), capped; zero or less asks for the maximum.
fn granted_lifetime(asked_secs: i64, max: Duration) -> Duration {
    match u64::try_from(asked_secs) {
        Ok(secs) if secs > 0 => Duration::from_secs(secs).min(max),
        _ => max,
    }
}

fn authn_code(error: &AuthnError) -> Code {
    match error {
        AuthnError::ReviewUnavailable(_) => Code::Unavailable,
        _ => Code::Unauthenticated,
    }
}

fn authz_code(error: &AuthzError) -> Code {
    match error {
        AuthzError::NotSynced => Code::Unavailable,
        _ => Code::PermissionDenied,
    }
}

fn csr_code(error: &CsrError) -> Code {
    match error {
        CsrError::Ca(_) => Code::Internal,
        _ => Code::InvalidArgument,
    }
}

/// The CA's own serving certificate, re-made before it expires; every handshake takes the
/// current one.
pub struct ServingCert {
    current: ArcSwap<CertifiedKey>,
    sans: Vec<SanType>,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("sans", &self.sans)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ServingCert {
    pub fn new(
        ca: &CertificateAuthority,
        sans: Vec<SanType>,
    ) -> anyhow::Result<(Self, SystemTime)> {
        let cert = make_serving_cert(ca, &sans)?;
        let serving = Self {
            current: ArcSwap::new(cert.certified_key()),
            sans,
        };
        Ok((serving, cert.not_after()))
    }

    /// Re-makes the certificate at half its remaining life, until `shutdown`.
    async fn renew(
        self: Arc<Self>,
        authority: Arc<Authority>,
        mut not_after: SystemTime,
        shutdown: CancellationToken,
    ) {
        loop {
            let remaining = not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            let wait = (remaining / 2).max(Duration::from_secs(1));
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            match make_serving_cert(&authority.signing.ca, &self.sans) {
                Ok(cert) => {
                    not_after = cert.not_after();
                    self.current.store(cert.certified_key());
                    info!(serial = cert.serial(), "serving certificate renewed");
                }
                Err(err) => {
                    warn!(
                        error = format!("{err:#}"),
                        "cannot renew the serving certificate; retrying"
                    );
                    not_after = SystemTime::now() + 2 * SERVING_CERT_RETRY;
                }
            }
        }
    }
}

/// A server certificate for the CA's names, signed by the mesh's signing key.
fn make_serving_cert(ca: &CertificateAuthority, sans: &[SanType]) -> anyhow::Result<WorkloadCert> {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans.to_vec();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
    params.not_after = (now + SERVING_CERT_LIFETIME).min(ca.not_after()).into();
    ca.sign_leaf(&params)
        .context("cannot make the CA's serving certificate")
}

/// TLS 1.3 only, ALPN h2, client certificates optional but, when sent, verified against the
/// node-credential CA (a workload certificate never gets through).
pub fn server_config(
    serving: Arc<ServingCert>,
    node_ca: Option<CertificateDer<'static>>,
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ClientCertVerifier> = match node_ca {
        Some(node_ca) => {
            let mut roots = RootCertStore::empty();
            roots
                .add(node_ca)
                .context("the node-credential CA certificate is not a usable trust anchor")?;
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .allow_unauthenticated()
                .build()
                .context("cannot build the client certificate verifier")?
        }
        None => WebPkiClientVerifier::no_client_auth(),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is unavailable")?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The gRPC listener, bound, with what it serves.
pub struct GrpcServer {
    pub listener: TcpListener,
    pub tls: Arc<rustls::ServerConfig>,
    pub serving: Arc<ServingCert>,
    pub serving_not_after: SystemTime,
    pub authority: Arc<Authority>,
}

impl GrpcServer {
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listener
            .local_addr()
            .context("the gRPC listener has no address")
    }

    /// Serves until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tokio::spawn(Arc::clone(&self.serving).renew(
            Arc::clone(&self.authority),
            self.serving_not_after,
            shutdown.clone(),
        ));
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        tokio::spawn(accept_loop(
            self.listener,
            TlsAcceptor::from(self.tls),
            tx,
            shutdown.clone(),
        ));
        let incoming = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|stream| (Ok::<_, std::io::Error>(stream), rx))
        });
        tonic::transport::Server::builder()
            .add_service(IstioCertificateServiceServer::new(CaService::new(
                self.authority,
            )))
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
            .context("the gRPC server failed")
    }
}

/// Accepts TCP connections and performs each TLS handshake in its own task, so a slow or
/// failing client never holds up the others or ends the listener.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshaken: mpsc::Sender<TlsStream<TcpStream>>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically out of file descriptors: back off rather than spin.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Small request/response exchanges: without it, Nagle's algorithm and the client's
        // delayed ACK add 40 ms to each answer.
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        let (acceptor, handshaken) = (acceptor.clone(), handshaken.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    if handshaken.send(tls).await.is_err() {
                        debug!(%peer, "the gRPC server stopped; connection dropped");
                    }
                }
                // A client certificate the node-credential CA did not sign ends here.
                Ok(Err(error)) => warn!(%peer, %error, "TLS handshake failed"),
                Err(_) => warn!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost_types::{Struct, Value, value::Kind};

    use super::*;

    fn request(metadata: Option<&str>) -> IstioCertificateRequest {
        IstioCertificateRequest {
            csr: String::new(),
            validity_duration: 0,
            metadata: metadata.map(|id| Struct {
                fields: BTreeMap::from([(
                    IMPERSONATED_IDENTITY.to_owned(),
                    Value {
                        kind: Some(Kind::StringValue(id.to_owned())),
                    },
                )]),
            }),
        }
    }

    #[test]
    fn impersonated_identity_from_body_or_header() {
        let mut headers = MetadataMap::new();
        assert_eq!(impersonated_identity(&request(None), &headers), Ok(None));
        assert_eq!(
            impersonated_identity(&request(Some("a")), &headers),
            Ok(Some("a".to_owned()))
        );
        headers.insert("impersonatedidentity", "b".parse().expect("ascii"));
        assert_eq!(
            impersonated_identity(&request(None), &headers),
            Ok(Some("b".to_owned()))
        );
        assert!(impersonated_identity(&request(Some("a")), &headers).is_err());
    }

    #[test]
    fn lifetimes_are_capped() {
        let max = Duration::from_secs(3600);
        assert_eq!(granted_lifetime(0, max), max);
        assert_eq!(granted_lifetime(-5, max), max);
        assert_eq!(granted_lifetime(60, max), Duration::from_secs(60));
        assert_eq!(granted_lifetime(i64::MAX, max), max);
    }
}
