//! The certificate authority that signs workload certificates, the trust bundle that verifies
//! them, and the issued certificates themselves.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::spiffe::SpiffeId;

/// File names that [`CertificateAuthority::init`] writes.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Subject common name of a generated root.
pub const ROOT_COMMON_NAME: &str = "mesh root CA";
/// Validity of a generated root: ten years.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// How far back a certificate's `not_before` is set, so a peer whose clock is a little behind
/// accepts it.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

const ORGANIZATION: &str = "mesh";

/// What went wrong creating, loading or using a CA, or reading a trust bundle.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{}: already exists; refusing to overwrite an existing CA", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: cannot write: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{}: no PEM certificate found", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: certificate #{index} is invalid: {reason}", path.display())]
    BadCertificate {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{}: invalid private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("{}: the private key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: the first certificate is not a CA (basicConstraints CA:TRUE is missing)", path.display())]
    NotCa { path: PathBuf },
    #[error("{}: the first certificate may not sign certificates (keyUsage lacks keyCertSign)", path.display())]
    CannotSignCertificates { path: PathBuf },
    #[error("{}: certificate #{index} is not valid before {not_before}", path.display())]
    NotYetValid {
        path: PathBuf,
        index: usize,
        not_before: String,
    },
    #[error("{}: certificate #{index} expired at {not_after}", path.display())]
    Expired {
        path: PathBuf,
        index: usize,
        not_after: String,
    },
    #[error(
        "{}: certificate #{index} was not issued by certificate #{next}: the file must hold the signing certificate first, then its issuers in order",
        path.display(), next = index + 1
    )]
    BrokenChain { path: PathBuf, index: usize },
    #[error("the signing certificate expired at {not_after}; no certificate can be issued")]
    SignerExpired { not_after: String },
    #[error("this CA was loaded without its root; load the trust bundle from a file instead")]
    RootUnknown,
    #[error("the trust bundle holds no certificate")]
    EmptyBundle,
    #[error("trust bundle certificate #{index} is not a usable trust anchor: {reason}")]
    BadTrustAnchor { index: usize, reason: String },
    #[error("the workload certificate is invalid: {0}")]
    BadLeaf(String),
    #[error("cannot create a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the issued certificate and key are unusable by rustls: {0}")]
    Unusable(#[from] rustls::Error),
}

/// Signs workload certificates with a CA key held in this process.
///
/// The signing certificate is either a self-signed root or an intermediate; in the latter case
/// the intermediate and its issuers (below the root) are sent along with every leaf.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate.
    signer: CertificateDer<'static>,
    /// What a peer needs between a leaf and a root: the signer and its issuers, roots left out.
    chain: Vec<CertificateDer<'static>>,
    /// The self-signed root, when it is the signer or was in the loaded file.
    root: Option<CertificateDer<'static>>,
    /// The earliest expiry in the signing chain: no leaf can be valid after it.
    not_after: SystemTime,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("chain_len", &self.chain.len())
            .field("has_root", &self.root.is_some())
            .field("not_after", &format_time(self.not_after))
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Writes a new self-signed root, `ca-cert.pem` and `ca-key.pem` (mode 0600), into `dir`
    /// (created if missing). Refuses to overwrite either file.
    pub fn init(dir: &Path) -> Result<(), CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        refuse_existing(&cert_path)?;
        refuse_existing(&key_path)?;
        fs::create_dir_all(dir).map_err(|source| CaError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let ca = Self::generate_root(ROOT_COMMON_NAME)?;
        write_new_file(&key_path, ca.key_pem().as_bytes(), 0o600)?;
        write_new_file(&cert_path, ca.chain_pem().as_bytes(), 0o644)?;
        Ok(())
    }

    /// A new self-signed root (ECDSA P-256, ten years), in memory.
    pub fn generate_root(common_name: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let params = ca_params(
            common_name,
            &key,
            IsCa::Ca(BasicConstraints::Unconstrained),
            now,
            now + ROOT_VALIDITY,
        );
        let cert = params.self_signed(&key)?.der().clone();
        Ok(Self {
            issuer: Issuer::new(params, key),
            signer: cert.clone(),
            chain: Vec::new(),
            root: Some(cert),
            not_after: now + ROOT_VALIDITY,
        })
    }

    /// Loads a signing certificate (a root, or an intermediate followed by its issuers) and its
    /// PKCS #8 private key, checking that they match, that the certificate is a CA, and that the
    /// whole chain in the file is valid now.
    pub fn load(cert_chain_pem: &Path, key_pem: &Path) -> Result<Self, CaError> {
        let certs = read_certificates(cert_chain_pem)?;
        let facts = parse_all(&certs, cert_chain_pem)?;
        let key = read_private_key(key_pem)?;
        let signer = &facts[0];
        if signer.public_key != key.public_key_raw() {
            return Err(CaError::KeyMismatch {
                cert: cert_chain_pem.to_owned(),
                key: key_pem.to_owned(),
            });
        }
        check_can_sign(signer, cert_chain_pem)?;
        check_currently_valid(&facts, cert_chain_pem)?;
        check_chain_links(&facts, cert_chain_pem)?;
        let issuer =
            Issuer::from_ca_cert_der(&certs[0], key).map_err(|err| CaError::BadCertificate {
                path: cert_chain_pem.to_owned(),
                index: 0,
                reason: err.to_string(),
            })?;
        Ok(Self::from_parts(issuer, certs, &facts))
    }

    fn from_parts(
        issuer: Issuer<'static, KeyPair>,
        certs: Vec<CertificateDer<'static>>,
        facts: &[CertFacts],
    ) -> Self {
        let root = certs
            .iter()
            .zip(facts)
            .find(|(_, facts)| facts.is_self_signed())
            .map(|(cert, _)| cert.clone());
        let chain = certs
            .iter()
            .zip(facts)
            .filter(|(_, facts)| !facts.is_self_signed())
            .map(|(cert, _)| cert.clone())
            .collect();
        let not_after = facts
            .iter()
            .map(|f| f.not_after)
            .min()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Self {
            issuer,
            signer: certs[0].clone(),
            chain,
            root,
            not_after,
        }
    }

    /// A workload certificate for `id`, valid from one minute ago (clock skew) for `lifetime`,
    /// but never beyond the signing chain's own expiry.
    pub fn issue(&self, id: &SpiffeId, lifetime: Duration) -> Result<WorkloadCert, CaError> {
        self.sign_leaf(&self.current_svid_params(id, lifetime)?)
    }

    /// A workload certificate for `id` carrying the public key of `csr` (whose key stays with
    /// the requester), shaped exactly as [`Self::issue`] shapes it. Only the CSR's key is used:
    /// its subject and any other extension it asks for are ignored, so a requester cannot widen
    /// what the certificate may do.
    pub fn sign_csr(
        &self,
        csr: &WorkloadCsr,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<IssuedCert, CsrError> {
        let wanted = id.to_string();
        if csr.uri != wanted {
            return Err(CsrError::IdentityMismatch {
                csr: csr.uri.clone(),
                identity: wanted,
            });
        }
        let params = self.current_svid_params(id, lifetime)?;
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(CaError::from)?
            .der()
            .clone();
        let facts = CertFacts::parse(&leaf).map_err(CaError::BadLeaf)?;
        let chain = std::iter::once(leaf)
            .chain(self.chain.iter().cloned())
            .collect();
        Ok(IssuedCert {
            chain,
            serial: facts.serial,
            not_after: facts.not_after,
        })
    }

    /// The one definition of a workload certificate's parameters, shared by [`Self::issue`] and
    /// [`Self::sign_csr`]: valid from one minute ago (clock skew) for `lifetime`, never beyond
    /// the signing chain's own expiry.
    fn current_svid_params(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<CertificateParams, CaError> {
        let now = SystemTime::now();
        if self.not_after <= now {
            return Err(CaError::SignerExpired {
                not_after: format_time(self.not_after),
            });
        }
        let not_after = (now + lifetime).min(self.not_after);
        svid_params(id, now - CLOCK_SKEW_ALLOWANCE, not_after)
    }

    /// A workload certificate for `id` with exactly the given validity, even one in the past or
    /// the future (for tests of expiry handling).
    pub fn issue_with_validity(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, CaError> {
        self.sign_leaf(&svid_params(id, not_before, not_after)?)
    }

    /// Signs a leaf with a fresh P-256 key for any parameters (tests use it for malformed
    /// certificates).
    pub(crate) fn sign_leaf(&self, params: &CertificateParams) -> Result<WorkloadCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = params.signed_by(&key, &self.issuer)?.der().clone();
        let chain = std::iter::once(leaf)
            .chain(self.chain.iter().cloned())
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCert::new(chain, key)
    }

    /// A new intermediate CA signed by this one, valid for `lifetime` (capped by this CA's
    /// expiry), allowed to sign leaves only (path length 0).
    pub fn issue_intermediate(
        &self,
        common_name: &str,
        lifetime: Duration,
    ) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let not_after = (now + lifetime).min(self.not_after);
        let mut params = ca_params(
            common_name,
            &key,
            IsCa::Ca(BasicConstraints::Constrained(0)),
            now,
            not_after,
        );
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?.der().clone();
        let chain = std::iter::once(cert.clone())
            .chain(self.chain.iter().cloned())
            .collect();
        Ok(Self {
            issuer: Issuer::new(params, key),
            signer: cert,
            chain,
            root: self.root.clone(),
            not_after,
        })
    }

    /// The certificate whose key signs the leaves.
    pub fn signing_certificate(&self) -> &CertificateDer<'static> {
        &self.signer
    }

    /// The self-signed root, when this CA knows it.
    pub fn root_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.root.as_ref()
    }

    /// The earliest expiry in the signing chain.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The signing certificate and its issuers below the root, as PEM (what [`Self::load`]
    /// reads); for a self-signed root, the root itself.
    pub fn chain_pem(&self) -> String {
        let certs = if self.chain.is_empty() {
            std::slice::from_ref(&self.signer)
        } else {
            &self.chain[..]
        };
        certs
            .iter()
            .map(|cert| pem_encode("CERTIFICATE", cert))
            .collect()
    }

    /// The signing key as PKCS #8 PEM. This is the secret that lets its holder mint any identity.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
}

/// A certificate signed for a requester that holds the key: the chain (leaf first, then the
/// signing certificate and its issuers below the root), the leaf's serial and expiry.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub chain: Vec<CertificateDer<'static>>,
    /// Colon-separated hex, as [`WorkloadCert::serial`].
    pub serial: String,
    pub not_after: SystemTime,
}

/// Why a certificate signing request cannot be signed. Everything but [`CsrError::Ca`] is the
/// requester's fault.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not a PEM PKCS #10 request with a valid signature: {0}")]
    Unparsable(String),
    #[error("the CSR's key is {0}; only ECDSA P-256 keys are signed")]
    UnsupportedKey(String),
    #[error("the CSR must carry exactly one subjectAltName, a URI; it has {count}: {sans}")]
    Sans { count: usize, sans: String },
    #[error("the CSR's URI subjectAltName {csr:?} is not the identity asked for, {identity:?}")]
    IdentityMismatch { csr: String, identity: String },
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// A parsed certificate signing request whose signature has been checked, reduced to what a
/// certificate is made from: its public key and its one URI SAN.
#[derive(Debug, Clone)]
pub struct WorkloadCsr {
    public_key: rcgen::PublicKey,
    uri: String,
}

impl WorkloadCsr {
    /// Parses a PEM PKCS #10 request, verifies its self-signature and requires exactly one SAN, a
    /// URI, and an ECDSA P-256 key.
    pub fn parse(pem: &str) -> Result<Self, CsrError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(pem)
            .map_err(|err| CsrError::Unparsable(err.to_string()))?;
        check_csr_key(&csr.public_key)?;
        let uri = match &csr.params.subject_alt_names[..] {
            [SanType::URI(uri)] => uri,
            sans => {
                return Err(CsrError::Sans {
                    count: sans.len(),
                    sans: format!("{sans:?}"),
                });
            }
        };
        Ok(Self {
            uri: uri.as_str().to_owned(),
            public_key: csr.public_key,
        })
    }

    /// The identity the requester asks for in its CSR.
    pub fn uri_san(&self) -> &str {
        &self.uri
    }
}

/// Only P-256 keys (what agents generate) are signed. rcgen infers the key's algorithm from the
/// CSR's *signature* algorithm, so the raw key's length is checked as well: a P-384 key signed
/// with SHA-256 would otherwise be put into a certificate labelled P-256.
fn check_csr_key(key: &rcgen::PublicKey) -> Result<(), CsrError> {
    const P256_UNCOMPRESSED_LEN: usize = 65;
    let alg = key.algorithm();
    if alg != &PKCS_ECDSA_P256_SHA256 {
        return Err(CsrError::UnsupportedKey(format!("{alg:?}")));
    }
    let raw = rcgen::PublicKeyData::der_bytes(key);
    if raw.len() != P256_UNCOMPRESSED_LEN || raw[0] != 0x04 {
        return Err(CsrError::UnsupportedKey(format!(
            "an EC key of {} bytes, not an uncompressed P-256 point",
            raw.len()
        )));
    }
    Ok(())
}

/// An X.509-SVID's parameters for `id` with the given validity.
fn svid_params(
    id: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let uri = rcgen::string::Ia5String::try_from(id.to_string())?;
    let mut params = leaf_params(vec![SanType::URI(uri)], not_before, not_after);
    // rcgen would derive the serial from the public key; a requester that keeps its key across
    // renewals would then get the same serial twice, which RFC 5280 forbids.
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// A positive 16-byte random serial (the top bit cleared so DER needs no sign byte).
fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    rcgen::SerialNumber::from_slice(&bytes)
}

/// The roots that peers' chains must lead to. Several roots let the mesh rotate its root: trust
/// old and new, move signers to the new one, then drop the old.
#[derive(Clone)]
pub struct TrustBundle {
    certs: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.certs.len())
            .finish()
    }
}

impl TrustBundle {
    /// Reads one or more root certificates from a PEM file.
    pub fn load(path: &Path) -> Result<Self, CaError> {
        let certs = read_certificates(path)?;
        Self::from_certs(certs).map_err(|err| match err {
            CaError::BadTrustAnchor { index, reason } => CaError::BadCertificate {
                path: path.to_owned(),
                index,
                reason,
            },
            other => other,
        })
    }

    pub fn from_certs(
        certs: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<Self, CaError> {
        let certs: Vec<_> = certs.into_iter().collect();
        if certs.is_empty() {
            return Err(CaError::EmptyBundle);
        }
        let mut roots = RootCertStore::empty();
        for (index, cert) in certs.iter().enumerate() {
            roots
                .add(cert.clone())
                .map_err(|err| CaError::BadTrustAnchor {
                    index,
                    reason: err.to_string(),
                })?;
        }
        Ok(Self {
            certs,
            roots: Arc::new(roots),
        })
    }

    /// A bundle holding the root of `ca` alone.
    pub fn from_ca(ca: &CertificateAuthority) -> Result<Self, CaError> {
        let root = ca.root_certificate().ok_or(CaError::RootUnknown)?;
        Self::from_certs([root.clone()])
    }

    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    pub fn root_store(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.roots)
    }
}

/// A workload's certificate chain (leaf first) and private key, ready for rustls.
pub struct WorkloadCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
    certified_key: Arc<CertifiedKey>,
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("serial", &self.serial)
            .field("chain_len", &self.chain.len())
            .field("not_before", &format_time(self.not_before))
            .field("not_after", &format_time(self.not_after))
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    /// Wraps a chain (leaf first) and its key; the leaf's validity is read from it, and the key
    /// must match the leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, CaError> {
        let leaf = chain
            .first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        let facts = CertFacts::parse(leaf).map_err(CaError::BadLeaf)?;
        let provider = rustls::crypto::ring::default_provider();
        let certified_key = CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)?;
        Ok(Self {
            chain,
            key,
            not_before: facts.not_before,
            not_after: facts.not_after,
            serial: facts.serial,
            certified_key: Arc::new(certified_key),
        })
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial number, as colon-separated hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The chain and key in the form rustls presents.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified_key)
    }

    /// Each certificate of the chain, leaf first, as the admin API shows it.
    pub fn chain_summary(&self) -> Vec<CertSummary> {
        self.chain.iter().map(|der| CertSummary::of(der)).collect()
    }
}

/// One certificate of a chain, as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    /// Colon-separated hex.
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    pub not_after: String,
    /// The URI SANs (a workload certificate's SPIFFE ID).
    pub uris: Vec<String>,
}

impl CertSummary {
    fn of(der: &[u8]) -> Self {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return Self {
                subject: "(unparsable certificate)".to_owned(),
                issuer: String::new(),
                serial: String::new(),
                not_before: String::new(),
                not_after: String::new(),
                uris: Vec::new(),
            };
        };
        let time = |t: x509_parser::time::ASN1Time| format_time(t.to_datetime().into());
        let uris = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            not_before: time(cert.validity().not_before),
            not_after: time(cert.validity().not_after),
            uris,
        }
    }
}

/// What this module needs to know about a certificate.
struct CertFacts {
    subject: Vec<u8>,
    issuer: Vec<u8>,
    is_ca: bool,
    may_sign_certificates: bool,
    not_before: SystemTime,
    not_after: SystemTime,
    public_key: Vec<u8>,
    serial: String,
}

impl CertFacts {
    fn parse(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|err| err.to_string())?;
        let is_ca = cert
            .basic_constraints()
            .map_err(|err| err.to_string())?
            .is_some_and(|ext| ext.value.ca);
        let may_sign_certificates = cert
            .key_usage()
            .map_err(|err| err.to_string())?
            .is_none_or(|ext| ext.value.key_cert_sign());
        Ok(Self {
            subject: cert.subject().as_raw().to_vec(),
            issuer: cert.issuer().as_raw().to_vec(),
            is_ca,
            may_sign_certificates,
            not_before: cert.validity().not_before.to_datetime().into(),
            not_after: cert.validity().not_after.to_datetime().into(),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            serial: cert.raw_serial_as_string(),
        })
    }

    fn is_self_signed(&self) -> bool {
        self.subject == self.issuer
    }
}

/// A CA's parameters. Its common name ends with a short fingerprint of its key, so that two
/// independently generated CAs never share a subject: webpki finds issuers by name, and a
/// certificate from a same-named foreign CA would be refused as `BadSignature` instead of the
/// clearer `UnknownIssuer`.
fn ca_params(
    common_name: &str,
    key: &KeyPair,
    is_ca: IsCa,
    not_before: SystemTime,
    not_after: SystemTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let fingerprint: String = params
        .key_identifier(key)
        .iter()
        .take(4)
        .map(|byte| format!("{byte:02x}"))
        .collect();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, ORGANIZATION);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{common_name} {fingerprint}"));
    params.is_ca = is_ca;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params
}

/// A leaf in the X.509-SVID shape: empty subject (so the SAN extension is critical), CA:false,
/// digitalSignature, serverAuth + clientAuth.
pub(crate) fn leaf_params(
    sans: Vec<SanType>,
    not_before: SystemTime,
    not_after: SystemTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params
}

fn refuse_existing(path: &Path) -> Result<(), CaError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Err(CaError::AlreadyExists {
            path: path.to_owned(),
        }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CaError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Creates `path` (never replacing an existing file) with `mode`, and writes `contents`.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        file.write_all(contents)?;
        file.sync_all()
    };
    write().map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => CaError::AlreadyExists {
            path: path.to_owned(),
        },
        _ => CaError::Write {
            path: path.to_owned(),
            source,
        },
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| CaError::BadCertificate {
            path: path.to_owned(),
            index: 0,
            reason: format!("bad PEM: {err}"),
        })?;
    if certs.is_empty() {
        return Err(CaError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_private_key(path: &Path) -> Result<KeyPair, CaError> {
    let pem = read_file(path)?;
    let bad_key = |reason: String| CaError::BadKey {
        path: path.to_owned(),
        reason,
    };
    match PrivateKeyDer::from_pem_slice(&pem).map_err(|err| bad_key(format!("no PEM private key ({err})")))? {
        PrivateKeyDer::Pkcs8(pkcs8) => KeyPair::try_from(&pkcs8).map_err(|err| bad_key(err.to_string())),
        _ => Err(bad_key(
            "the key is not PKCS #8 (\"BEGIN PRIVATE KEY\"); convert it with `openssl pkcs8 -topk8 -nocrypt`".into(),
        )),
    }
}

fn parse_all(certs: &[CertificateDer<'_>], path: &Path) -> Result<Vec<CertFacts>, CaError> {
    certs
        .iter()
        .enumerate()
        .map(|(index, cert)| {
            CertFacts::parse(cert).map_err(|reason| CaError::BadCertificate {
                path: path.to_owned(),
                index,
                reason,
            })
        })
        .collect()
}

fn check_can_sign(signer: &CertFacts, path: &Path) -> Result<(), CaError> {
    if !signer.is_ca {
        return Err(CaError::NotCa {
            path: path.to_owned(),
        });
    }
    if !signer.may_sign_certificates {
        return Err(CaError::CannotSignCertificates {
            path: path.to_owned(),
        });
    }
    Ok(())
}

fn check_currently_valid(facts: &[CertFacts], path: &Path) -> Result<(), CaError> {
    let now = SystemTime::now();
    for (index, cert) in facts.iter().enumerate() {
        if now < cert.not_before {
            return Err(CaError::NotYetValid {
                path: path.to_owned(),
                index,
                not_before: format_time(cert.not_before),
            });
        }
        if now > cert.not_after {
            return Err(CaError::Expired {
                path: path.to_owned(),
                index,
                not_after: format_time(cert.not_after),
            });
        }
    }
    Ok(())
}

/// Each certificate must be issued by the next one in the file.
fn check_chain_links(facts: &[CertFacts], path: &Path) -> Result<(), CaError> {
    match facts
        .windows(2)
        .position(|pair| pair[0].issuer != pair[1].subject)
    {
        Some(index) => Err(CaError::BrokenChain {
            path: path.to_owned(),
            index,
        }),
        None => Ok(()),
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der.to_vec()), config)
}

/// RFC 3339, for messages and logs.
pub(crate) fn format_time(time: SystemTime) -> String {
    let time = time::OffsetDateTime::from(time);
    time.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{time}"))
}
