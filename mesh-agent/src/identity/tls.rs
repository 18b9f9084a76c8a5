//! rustls configurations for HBONE mutual TLS between node agents, and the SPIFFE checks on
//! peer certificates.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::extensions::GeneralName;

use arc_swap::ArcSwap;

use super::bundle::SharedBundle;
use super::spiffe::{SpiffeId, SpiffeIdError, validate_trust_domain};
use super::store::IdentityStore;

/// HBONE is HTTP/2 `CONNECT`.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a peer certificate that chains to the trust bundle is still refused, or why its identity
/// cannot be read. Carried in handshake errors as
/// `rustls::Error::InvalidCertificate(CertificateError::Other(..))`; see [`VerifyError::of`].
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("peer certificate has no SPIFFE ID (no URI SAN)")]
    MissingSpiffeId,
    #[error("peer certificate has {count} URI SANs; a SPIFFE certificate has exactly one")]
    SeveralUriSans { count: usize },
    #[error("peer certificate URI SAN {uri:?} is not a valid SPIFFE ID: {reason}")]
    MalformedSpiffeId { uri: String, reason: SpiffeIdError },
    #[error("peer identity {got} is not in trust domain {expected:?}")]
    WrongTrustDomain { expected: String, got: SpiffeId },
    #[error(
        "secure naming check failed: expected {}, got {got}",
        list_ids(expected)
    )]
    SecureNamingMismatch {
        expected: Vec<SpiffeId>,
        got: SpiffeId,
    },
    #[error("peer certificate cannot be parsed: {0}")]
    UnparsableCertificate(String),
    #[error("no verified peer certificate (handshake not complete?)")]
    NoPeerCertificate,
}

/// Debug prints the message: rustls shows `CertificateError::Other` with `{:?}`, and this is what
/// makes a handshake error's text say why the peer was refused.
impl fmt::Debug for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl VerifyError {
    /// The SPIFFE rejection inside a handshake error, if that is why it failed. Accepts the
    /// `io::Error` that tokio-rustls returns as well as a bare `rustls::Error`.
    pub fn of<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a VerifyError> {
        if let Some(found) = err.downcast_ref::<VerifyError>() {
            return Some(found);
        }
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))) =
            err.downcast_ref::<rustls::Error>()
        {
            return inner.downcast_ref::<VerifyError>();
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.get_ref().and_then(|inner| VerifyError::of(inner));
        }
        err.source().and_then(VerifyError::of)
    }

    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

fn list_ids(ids: &[SpiffeId]) -> String {
    match ids {
        [] => "no identity".to_owned(),
        [one] => one.to_string(),
        many => {
            let names: Vec<_> = many.iter().map(ToString::to_string).collect();
            format!("one of [{}]", names.join(", "))
        }
    }
}

/// The SPIFFE ID of a certificate: its one URI SAN, parsed.
pub fn spiffe_id_of_certificate(cert: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|err| VerifyError::UnparsableCertificate(err.to_string()))?;
    let sans = parsed
        .subject_alternative_name()
        .map_err(|err| VerifyError::UnparsableCertificate(err.to_string()))?;
    let uris: Vec<&str> = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris[..] {
        [] => Err(VerifyError::MissingSpiffeId),
        [uri] => uri
            .parse()
            .map_err(|reason| VerifyError::MalformedSpiffeId {
                uri: uri.to_owned(),
                reason,
            }),
        _ => Err(VerifyError::SeveralUriSans { count: uris.len() }),
    }
}

/// The verified SPIFFE ID of the peer of a finished handshake.
pub fn peer_identity(conn: &CommonState) -> Result<SpiffeId, VerifyError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(VerifyError::NoPeerCertificate)?;
    spiffe_id_of_certificate(leaf)
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error(transparent)]
    TrustDomain(#[from] SpiffeIdError),
    #[error("cannot build the peer verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server side of HBONE for `identity`: TLS 1.3, ALPN `h2`, presents the store's current
/// certificate of `identity`, and requires a client certificate that chains to `bundle` and
/// carries one SPIFFE ID in `trust_domain`.
pub fn server_config(
    store: IdentityStore,
    identity: SpiffeId,
    bundle: impl Into<SharedBundle>,
    trust_domain: impl Into<String>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let trust_domain = trust_domain.into();
    validate_trust_domain(&trust_domain)?;
    let provider = provider();
    let bundle = bundle.into();
    let roots = bundle.current().root_store();
    let webpki = client_chain_verifier(&roots, &provider)?;
    let verifier = SpiffeClientVerifier {
        bundle,
        provider: Arc::clone(&provider),
        webpki: ArcSwap::from_pointee((roots, webpki)),
        trust_domain,
    };
    let resolver = StoreCertResolver { store, identity };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection proves its certificate afresh, so renewals, expiry and
    // bundle changes apply to each new connection.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The client side of HBONE for `identity`: TLS 1.3, ALPN `h2`, presents the store's current
/// certificate of `identity`, and accepts a server whose chain leads to `bundle` and whose SPIFFE
/// ID is one of `expected_server` (the secure naming check). The server name given to the
/// connection is not checked: the SPIFFE ID is the server's identity.
pub fn client_config(
    store: IdentityStore,
    identity: SpiffeId,
    bundle: impl Into<SharedBundle>,
    expected_server: Vec<SpiffeId>,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        bundle: bundle.into(),
        algorithms: provider.signature_verification_algorithms,
        expected: expected_server,
    };
    let resolver = StoreCertResolver { store, identity };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The standard client-certificate checks against `roots`.
fn client_chain_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, rustls::server::VerifierBuilderError> {
    WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(provider)).build()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Presents the store's current certificate of one identity, read at each handshake.
#[derive(Debug)]
struct StoreCertResolver {
    store: IdentityStore,
    identity: SpiffeId,
}

impl StoreCertResolver {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let found = self.store.certified_key(&self.identity);
        if found.is_none() {
            tracing::warn!(identity = %self.identity, "no certificate for this identity; handshake will fail");
        }
        found
    }
}

impl ResolvesServerCert for StoreCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for StoreCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Server side: the standard chain checks (rustls/webpki), then the client's SPIFFE ID must be
/// well-formed and in the trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    bundle: SharedBundle,
    provider: Arc<CryptoProvider>,
    /// The webpki verifier of the bundle's roots, made again when the bundle changes.
    webpki: ArcSwap<(Arc<RootCertStore>, Arc<dyn ClientCertVerifier>)>,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    /// The chain verifier for the bundle as it is now.
    fn webpki(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let roots = self.bundle.current().root_store();
        let cached = self.webpki.load();
        if Arc::ptr_eq(&cached.0, &roots) {
            return Ok(Arc::clone(&cached.1));
        }
        let verifier = client_chain_verifier(&roots, &self.provider)
            .map_err(|err| rustls::Error::General(format!("trust bundle: {err}")))?;
        self.webpki.store(Arc::new((roots, Arc::clone(&verifier))));
        Ok(verifier)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    /// No hints: they would borrow from a bundle that may be replaced meanwhile, and clients
    /// present their identity's one certificate whatever the hints.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.webpki()?
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id_of_certificate(end_entity).map_err(VerifyError::into_rustls)?;
        if id.trust_domain() != self.trust_domain {
            return Err(VerifyError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                got: id,
            }
            .into_rustls());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.load().1.supported_verify_schemes()
    }
}

/// Client side: the standard chain checks (rustls/webpki) without the DNS/IP name check, then
/// the secure naming check on the server's SPIFFE ID.
#[derive(Debug)]
struct SpiffeServerVerifier {
    bundle: SharedBundle,
    algorithms: WebPkiSupportedAlgorithms,
    expected: Vec<SpiffeId>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.bundle.current().root_store(),
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = spiffe_id_of_certificate(end_entity).map_err(VerifyError::into_rustls)?;
        if !self.expected.contains(&id) {
            return Err(VerifyError::SecureNamingMismatch {
                expected: self.expected.clone(),
                got: id,
            }
            .into_rustls());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A short, stable name for why a TLS handshake failed, for log lines and metrics labels:
/// `unknown_ca`, `expired`, `not_yet_valid`, `wrong_trust_domain`, `missing_spiffe_id`,
/// `malformed_spiffe_id`, `secure_naming_mismatch`, `no_client_certificate`, `not_http2`,
/// `not_tls`, `peer_alert`, `connection_closed`, or `tls_error`.
pub fn rejection_kind(err: &(dyn std::error::Error + 'static)) -> &'static str {
    if let Some(verify) = VerifyError::of(err) {
        return match verify {
            VerifyError::MissingSpiffeId => "missing_spiffe_id",
            VerifyError::SeveralUriSans { .. }
            | VerifyError::MalformedSpiffeId { .. }
            | VerifyError::UnparsableCertificate(_) => "malformed_spiffe_id",
            VerifyError::WrongTrustDomain { .. } => "wrong_trust_domain",
            VerifyError::SecureNamingMismatch { .. } => "secure_naming_mismatch",
            VerifyError::NoPeerCertificate => "no_client_certificate",
        };
    }
    match find_rustls_error(err) {
        Some(rustls::Error::InvalidCertificate(cert)) => match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            _ => "invalid_certificate",
        },
        Some(rustls::Error::NoCertificatesPresented) => "no_client_certificate",
        Some(rustls::Error::NoApplicationProtocol) => "not_http2",
        Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => {
            "not_tls"
        }
        Some(rustls::Error::AlertReceived(_)) => "peer_alert",
        Some(_) => "tls_error",
        None => match err
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
        {
            Some(std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => {
                "connection_closed"
            }
            _ => "tls_error",
        },
    }
}

fn find_rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(found) = err.downcast_ref::<rustls::Error>() {
        return Some(found);
    }
    if let Some(inner) = err
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        return find_rustls_error(inner);
    }
    err.source().and_then(find_rustls_error)
}
