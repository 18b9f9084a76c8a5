//! Workload identity and mutual TLS between node agents (see `docs/identity.md`).
//!
//! - [`SpiffeId`]: the identity `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`;
//! - [`CertificateAuthority`]: a generated root, or a user-supplied root or intermediate and its
//!   key, that signs short-lived [`WorkloadCert`]s; [`TrustBundle`]: the roots peers must chain to;
//! - [`RemoteCa`]: the CA service (ours or istiod) as the issuer: keys made on the node, CSRs;
//! - [`IdentityStore`]: the node's current certificates, issued as workloads need them and
//!   renewed at about half their lifetime;
//! - [`server_config`] / [`client_config`]: rustls configurations for HBONE (TLS 1.3, ALPN `h2`)
//!   that check the peer's SPIFFE ID, and [`peer_identity`] to read it after the handshake.

mod bundle;
mod ca;
mod remote;
mod spiffe;
mod store;
mod tls;

#[cfg(test)]
mod tests;

pub use bundle::{BUNDLE_POLL_INTERVAL, SharedBundle};
pub use ca::{
    CA_CERT_FILE, CA_KEY_FILE, CLOCK_SKEW_ALLOWANCE, CaError, CertSummary, CertificateAuthority,
    CsrError, IssuedCert, ROOT_COMMON_NAME, ROOT_VALIDITY, TrustBundle, WorkloadCert, WorkloadCsr,
};
pub use remote::RemoteCa;
pub use spiffe::{NameProblem, SpiffeId, SpiffeIdError, validate_trust_domain};
pub use store::{
    CertificateIssuer, DEFAULT_CERT_LIFETIME, INITIAL_RETRY_DELAY, IdentityStore, MAX_RETRY_DELAY,
};
pub use tls::{
    ALPN_H2, TlsConfigError, VerifyError, client_config, peer_identity, rejection_kind,
    server_config, spiffe_id_of_certificate,
};
