//! Real TLS handshakes between the configurations this module builds, over an in-memory pipe.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use rcgen::SanType;
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use super::ca::leaf_params;
use super::*;

const TD: &str = "cluster.local";
const HOUR: Duration = Duration::from_secs(3600);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn id(namespace: &str, service_account: &str) -> SpiffeId {
    SpiffeId::new(TD, namespace, service_account).expect("valid test identity")
}

fn client_id() -> SpiffeId {
    id("default", "client")
}

fn server_id() -> SpiffeId {
    id("default", "server")
}

fn new_ca() -> Arc<CertificateAuthority> {
    Arc::new(CertificateAuthority::generate_root("test root CA").expect("root"))
}

fn bundle_of(ca: &CertificateAuthority) -> TrustBundle {
    TrustBundle::from_ca(ca).expect("bundle")
}

/// A store issuing from `ca` that already holds `ids`.
fn store_from(ca: &Arc<CertificateAuthority>, ids: &[SpiffeId]) -> IdentityStore {
    let ca = Arc::clone(ca);
    let store = IdentityStore::new(
        Arc::new(move |id: &SpiffeId, lifetime| Ok(ca.issue(id, lifetime)?)),
        HOUR,
    );
    // The in-process CA answers at once: its future is ready when first polled.
    futures::executor::block_on(store.issue_all(ids.iter().cloned())).expect("initial issuance");
    store
}

/// A store holding exactly `cert` for `id`.
fn store_holding(
    ca: &Arc<CertificateAuthority>,
    id: SpiffeId,
    cert: WorkloadCert,
) -> IdentityStore {
    let store = store_from(ca, &[]);
    store.insert(id, cert);
    store
}

fn server_cfg(store: &IdentityStore, bundle: &TrustBundle) -> Arc<ServerConfig> {
    server_config(store.clone(), server_id(), bundle.clone(), TD).expect("server config")
}

fn client_cfg(
    store: &IdentityStore,
    bundle: &TrustBundle,
    expected: Vec<SpiffeId>,
) -> Arc<ClientConfig> {
    client_config(store.clone(), client_id(), bundle.clone(), expected).expect("client config")
}

/// What each side saw: the peer's identity on success.
struct Outcome {
    server: io::Result<SpiffeId>,
    client: io::Result<SpiffeId>,
}

/// Runs a handshake and one round trip ("ping"/"pong") so that a rejection on either side shows.
async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server_side = async move {
        let mut tls = TlsAcceptor::from(server).accept(server_io).await?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(super::ALPN_H2));
        let peer = peer_identity(tls.get_ref().1).map_err(io::Error::other)?;
        let mut ping = [0u8; 4];
        tls.read_exact(&mut ping).await?;
        tls.write_all(b"pong").await?;
        tls.flush().await?;
        Ok(peer)
    };
    let client_side = async move {
        // An IP server name, as HBONE uses: it must not matter for verification.
        let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2)).into());
        let mut tls = TlsConnector::from(client).connect(name, client_io).await?;
        let peer = peer_identity(tls.get_ref().1).map_err(io::Error::other)?;
        tls.write_all(b"ping").await?;
        tls.flush().await?;
        let mut pong = [0u8; 4];
        tls.read_exact(&mut pong).await?;
        Ok(peer)
    };
    let (server, client) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        tokio::join!(server_side, client_side)
    })
    .await
    .expect("handshake timed out");
    Outcome { server, client }
}

fn certificate_error(err: &io::Error) -> &CertificateError {
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(cert_err)) => cert_err,
        _ => panic!("expected an invalid-certificate error, got {err}"),
    }
}

fn verify_error(err: &io::Error) -> &VerifyError {
    VerifyError::of(err).unwrap_or_else(|| panic!("expected a SPIFFE rejection, got {err}"))
}

fn assert_rejected_by_server(outcome: &Outcome) -> &io::Error {
    let err = outcome
        .server
        .as_ref()
        .expect_err("server should refuse the client");
    assert!(outcome.client.is_err(), "client should see the refusal");
    err
}

fn assert_rejected_by_client(outcome: &Outcome) -> &io::Error {
    let err = outcome
        .client
        .as_ref()
        .expect_err("client should refuse the server");
    assert!(outcome.server.is_err(), "server should see the refusal");
    err
}

/// A leaf signed by `ca` with arbitrary SANs.
fn leaf_with_sans(ca: &CertificateAuthority, sans: Vec<SanType>) -> WorkloadCert {
    let now = SystemTime::now();
    ca.sign_leaf(&leaf_params(
        sans,
        now - Duration::from_secs(60),
        now + HOUR,
    ))
    .expect("leaf")
}

fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.try_into().expect("IA5 string"))
}

#[tokio::test]
async fn mutual_tls_succeeds_and_both_sides_see_the_peer_identity() {
    let ca = new_ca();
    let bundle = bundle_of(&ca);
    let store = store_from(&ca, &[client_id(), server_id()]);
    let outcome = handshake(
        server_cfg(&store, &bundle),
        client_cfg(&store, &bundle, vec![server_id()]),
    )
    .await;
    assert_eq!(outcome.server.expect("server side"), client_id());
    assert_eq!(outcome.client.expect("client side"), server_id());
}

#[tokio::test]
async fn server_refuses_client_certificate_from_another_ca() {
    let (ca, other) = (new_ca(), new_ca());
    let bundle = bundle_of(&ca);
    let server_store = store_from(&ca, &[server_id()]);
    let client_store = store_from(&other, &[client_id()]);
    let outcome = handshake(
        server_cfg(&server_store, &bundle),
        client_cfg(&client_store, &bundle, vec![server_id()]),
    )
    .await;
    let err = assert_rejected_by_server(&outcome);
    assert_eq!(
        *certificate_error(err),
        CertificateError::UnknownIssuer,
        "{err}"
    );
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn client_refuses_server_certificate_from_another_ca() {
    let (ca, other) = (new_ca(), new_ca());
    let bundle = bundle_of(&ca);
    let server_store = store_from(&other, &[server_id()]);
    let client_store = store_from(&ca, &[client_id()]);
    let outcome = handshake(
        server_cfg(&server_store, &bundle),
        client_cfg(&client_store, &bundle, vec![server_id()]),
    )
    .await;
    let err = assert_rejected_by_client(&outcome);
    assert_eq!(
        *certificate_error(err),
        CertificateError::UnknownIssuer,
        "{err}"
    );
}

#[tokio::test]
async fn server_refuses_expired_client_certificate() {
    let ca = new_ca();
    let bundle = bundle_of(&ca);
    let now = SystemTime::now();
    let expired = ca
        .issue_with_validity(&client_id(), now - 2 * HOUR, now - HOUR)
        .expect("cert");
    let client_store = store_holding(&ca, client_id(), expired);
    let server_store = store_from(&ca, &[server_id()]);
    let outcome = handshake(
        server_cfg(&server_store, &bundle),
        client_cfg(&client_store, &bundle, vec![server_id()]),
    )
    .await;
    let err = assert_rejected_by_server(&outcome);
    assert!(
        matches!(
            certificate_error(err),
            CertificateError::Expired | CertificateError::ExpiredContext { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("certificate expired"), "{err}");
}

#[tokio::test]
async fn client_refuses_not_yet_valid_server_certificate() {
    let ca = new_ca();
    let bundle = bundle_of(&ca);
    let now = SystemTime::now();
    let future = ca
        .issue_with_validity(&server_id(), now + HOUR, now + 2 * HOUR)
        .expect("cert");
    let server_store = store_holding(&ca, server_id(), future);
    let client_store = store_from(&ca, &[client_id()]);
    let outcome = handshake(
        server_cfg(&server_store, &bundle),
        client_cfg(&client_store, &bundle, vec![server_id()]),
    )
    .await;
    let err = assert_rejected_by_client(&outcome);
    assert!(
        matches!(
            certificate_error(err),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("not valid yet"), "{err}");
}

#[tokio::test]
async fn server_refuses_client_from_another_trust_domain() {
    let ca = new_ca();
    let bundle = bundle_of(&ca);
    let foreign = SpiffeId::new("other.example", "default", "client").expect("id");
    let client_store = store_holding(&ca, client_id(), ca.issue(&foreign, HOUR).expect("cert"));
    let server_store = store_from(&ca, &[server_id()]);
    let outcome = handshake(
        server_cfg(&server_store, &bundle),
        client_cfg(&client_store, &bundle, vec![server_id()]),
    )
    .await;
    let err = assert_rejected_by_server(&outcome);
    assert_eq!(
        *verify_error(err),
        VerifyError::WrongTrustDomain {
            expected: TD.into(),
            got: foreign
        }
    );
    assert!(
        err.to_string()
            .contains("is not in trust domain \"cluster.local\""),
        "{err}"
    );
}

/// The server's refusal of a client whose certificate (signed by the trusted CA) has `sans`.
async fn server_refusal_for_client_sans(sans: Vec<SanType>) -> (VerifyError, String) {
    let ca = new_ca();
    let bundle = bundle_of(&ca);
    let client_store = store_holding(&ca, client_id(), leaf_with_sans(&ca, sans));
    let server_store = store_from(&ca, &[server_id()]);
    let outcome = handshake(
        server_cfg(&server_store, &bundle),
        client_cfg(&client_store, &bundle, vec![server_id()]),
    )
    .await;
    let err = assert_rejected_by_server(&outcome);
    (verify_error(err).clone(), err.to_string())
}

#[tokio::test]
async fn server_refuses_client_without_spiffe_san() {
    let dns = SanType::DnsName("client.default.svc".try_into().expect("IA5"));
    let (reason, text) = server_refusal_for_client_sans(vec![dns]).await;
    assert_eq!(reason, VerifyError::MissingSpiffeId);
    assert!(text.contains("no SPIFFE ID"), "{text}");
}

#[tokio::test]
async fn server_refuses_client_with_malformed_spiffe_san() {
    let (reason, text) =
        server_refusal_for_client_sans(vec![uri_san("spiffe://cluster.local/ns/default")]).await;
    assert!(
        matches!(reason, VerifyError::MalformedSpiffeId { .. }),
        "{reason}"
    );
    assert!(text.contains("is not a valid SPIFFE ID"), "{text}");
}

#[tokio::test]
async fn server_refuses_client_with_several_uri_sans() {
    let sans = vec![
        uri_san("spiffe://cluster.local/ns/default/sa/client"),
        uri_san("spiffe://cluster.local/ns/kube-system/sa/admin"),
    ];
    let (reason, text) = server_refusal_for_client_sans(sans).await;
    assert_eq!(reason, VerifyError::SeveralUriSans { count: 2 });
    assert!(text.contains("2 URI SANs"), "{text}");
}

#[tokio::test]
async fn client_refuses_server_failing_the_secure_naming_check() {
    let ca = new_ca();
    let bundle = bundle_of(&ca);
    let store = store_from(&ca, &[client_id(), server_id()]);
    let expected = vec![id("default", "reviews"), id("default", "ratings")];
    let outcome = handshake(
        server_cfg(&store, &bundle),
        client_cfg(&store, &bundle, expected.clone()),
    )
    .await;
    let err = assert_rejected_by_client(&outcome);
    assert_eq!(
        *verify_error(err),
        VerifyError::SecureNamingMismatch {
            expected,
            got: server_id()
        }
    );
    let text = err.to_string();
    assert!(
        text.contains(
            "secure naming check failed: expected one of [spiffe://cluster.local/ns/default/sa/reviews, \
             spiffe://cluster.local/ns/default/sa/ratings], got spiffe://cluster.local/ns/default/sa/server"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn intermediate_signer_chains_to_a_bundle_holding_only_the_root() {
    let root = new_ca();
    let intermediate = root
        .issue_intermediate("node-a intermediate", HOUR)
        .expect("intermediate");
    let dir = tempfile::tempdir().expect("tempdir");
    let (chain_path, key_path) = (dir.path().join("chain.pem"), dir.path().join("key.pem"));
    std::fs::write(&chain_path, intermediate.chain_pem()).expect("write chain");
    std::fs::write(&key_path, intermediate.key_pem()).expect("write key");
    let loaded =
        Arc::new(CertificateAuthority::load(&chain_path, &key_path).expect("load intermediate"));
    assert!(loaded.root_certificate().is_none());

    let leaf = loaded.issue(&server_id(), HOUR).expect("leaf");
    assert_eq!(leaf.chain().len(), 2, "leaf + intermediate, no root");
    assert_eq!(leaf.chain()[1], *intermediate.signing_certificate());

    let bundle = bundle_of(&root);
    let server_store = store_from(&loaded, &[server_id()]);
    let client_store = store_from(&root, &[client_id()]);
    let outcome = handshake(
        server_cfg(&server_store, &bundle),
        client_cfg(&client_store, &bundle, vec![server_id()]),
    )
    .await;
    assert_eq!(
        outcome
            .client
            .expect("client accepts the intermediate-signed server"),
        server_id()
    );
    assert_eq!(
        outcome
            .server
            .expect("server accepts the root-signed client"),
        client_id()
    );
}

#[tokio::test]
async fn bundle_with_two_roots_accepts_both() {
    let (old_root, new_root) = (new_ca(), new_ca());
    let roots = [&old_root, &new_root].map(|ca| ca.root_certificate().expect("root").clone());
    let bundle = TrustBundle::from_certs(roots).expect("bundle");
    let server_store = store_from(&old_root, &[server_id()]);
    let client_store = store_from(&new_root, &[client_id()]);
    let outcome = handshake(
        server_cfg(&server_store, &bundle),
        client_cfg(&client_store, &bundle, vec![server_id()]),
    )
    .await;
    assert_eq!(outcome.server.expect("server side"), client_id());
    assert_eq!(outcome.client.expect("client side"), server_id());
}

#[test]
fn init_then_load_round_trips_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    CertificateAuthority::init(&ca_dir).expect("init");
    let (cert_path, key_path) = (ca_dir.join(CA_CERT_FILE), ca_dir.join(CA_KEY_FILE));
    let key_mode = std::fs::metadata(&key_path)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);

    let ca = CertificateAuthority::load(&cert_path, &key_path).expect("load");
    assert!(ca.root_certificate().is_some());
    let leaf = ca.issue(&client_id(), HOUR).expect("issue");
    assert_eq!(leaf.chain().len(), 1, "a root signer is not sent");
    assert_eq!(spiffe_id_of_certificate(&leaf.chain()[0]), Ok(client_id()));
    let bundle = TrustBundle::load(&cert_path).expect("bundle from the root file");
    assert_eq!(bundle.certificates().len(), 1);

    let err = CertificateAuthority::init(&ca_dir).expect_err("second init");
    assert!(matches!(err, CaError::AlreadyExists { .. }), "{err}");
    assert!(
        err.to_string().contains("ca-cert.pem: already exists"),
        "{err}"
    );
}

#[test]
fn issued_leaf_has_the_svid_shape() {
    let ca = new_ca();
    let before = SystemTime::now();
    let cert = ca.issue(&client_id(), HOUR).expect("issue");
    let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain()[0]).expect("parse");
    assert!(!leaf.is_ca());
    let key_usage = leaf.key_usage().expect("ext").expect("key usage").value;
    assert!(key_usage.digital_signature() && !key_usage.key_cert_sign());
    let eku = leaf.extended_key_usage().expect("ext").expect("eku").value;
    assert!(eku.server_auth && eku.client_auth);
    let skew = before
        .duration_since(cert.not_before())
        .expect("not_before in the past");
    assert!(
        skew >= Duration::from_secs(59) && skew <= Duration::from_secs(61),
        "{skew:?}"
    );
    let lifetime = cert
        .not_after()
        .duration_since(before)
        .expect("not_after in the future");
    assert!(
        lifetime.abs_diff(HOUR) <= Duration::from_secs(2),
        "{lifetime:?}"
    );
}

mod load_errors {
    use super::*;

    fn write(dir: &std::path::Path, name: &str, contents: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write");
        path
    }

    #[test]
    fn key_of_another_ca() {
        let (ca, other) = (new_ca(), new_ca());
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = write(dir.path(), "cert.pem", &ca.chain_pem());
        let key = write(dir.path(), "key.pem", &other.key_pem());
        let err = CertificateAuthority::load(&cert, &key).expect_err("mismatch");
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("key.pem: the private key does not match"),
            "{err}"
        );
    }

    #[test]
    fn leaf_is_not_a_ca() {
        let ca = new_ca();
        let leaf = ca.issue(&client_id(), HOUR).expect("leaf");
        let dir = tempfile::tempdir().expect("tempdir");
        let leaf_pem = pem::encode(&pem::Pem::new("CERTIFICATE", leaf.chain()[0].to_vec()));
        let key_pem = pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            leaf.key().secret_der().to_vec(),
        ));
        let cert = write(dir.path(), "leaf.pem", &leaf_pem);
        let key = write(dir.path(), "leaf-key.pem", &key_pem);
        let err = CertificateAuthority::load(&cert, &key).expect_err("not a CA");
        assert!(matches!(err, CaError::NotCa { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("leaf.pem: the first certificate is not a CA"),
            "{err}"
        );
    }

    #[test]
    fn expired_intermediate() {
        let root = new_ca();
        let intermediate = root
            .issue_intermediate("short", Duration::from_secs(1))
            .expect("intermediate");
        std::thread::sleep(Duration::from_millis(2100));
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = write(dir.path(), "int.pem", &intermediate.chain_pem());
        let key = write(dir.path(), "int-key.pem", &intermediate.key_pem());
        let err = CertificateAuthority::load(&cert, &key).expect_err("expired");
        assert!(matches!(err, CaError::Expired { index: 0, .. }), "{err}");
        assert!(
            err.to_string()
                .contains("int.pem: certificate #0 expired at"),
            "{err}"
        );
        let err = intermediate
            .issue(&client_id(), HOUR)
            .expect_err("signer expired");
        assert!(matches!(err, CaError::SignerExpired { .. }), "{err}");
    }

    #[test]
    fn missing_and_empty_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.pem");
        let err = CertificateAuthority::load(&missing, &missing).expect_err("missing");
        assert!(err.to_string().contains("nope.pem: cannot read"), "{err}");
        let empty = write(dir.path(), "empty.pem", "");
        let err = TrustBundle::load(&empty).expect_err("empty");
        assert!(
            err.to_string()
                .contains("empty.pem: no PEM certificate found"),
            "{err}"
        );
    }

    #[test]
    fn sec1_key_is_explained() {
        let ca = new_ca();
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = write(dir.path(), "cert.pem", &ca.chain_pem());
        let key = write(
            dir.path(),
            "ec-key.pem",
            "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAoAoGCCqGSM49\nAwEHoUQDQgAE\n-----END EC PRIVATE KEY-----\n",
        );
        let err = CertificateAuthority::load(&cert, &key).expect_err("sec1");
        assert!(matches!(err, CaError::BadKey { .. }), "{err}");
        assert!(err.to_string().contains("not PKCS #8"), "{err}");
    }
}

mod renewal {
    use super::*;

    const SHORT: Duration = Duration::from_secs(2);

    /// Issues from `ca`, failing while `failing` is set; counts calls.
    struct FlakyIssuer {
        ca: Arc<CertificateAuthority>,
        failing: AtomicBool,
        calls: AtomicUsize,
    }

    impl CertificateIssuer for FlakyIssuer {
        fn issue<'a>(
            &'a self,
            id: &'a SpiffeId,
            lifetime: Duration,
        ) -> futures::future::BoxFuture<'a, anyhow::Result<WorkloadCert>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let result = if self.failing.load(Ordering::SeqCst) {
                Err(anyhow::anyhow!("CA unreachable (injected)"))
            } else {
                self.ca.issue(id, lifetime).map_err(Into::into)
            };
            Box::pin(std::future::ready(result))
        }
    }

    #[tokio::test]
    async fn certificate_is_renewed_at_half_life_and_handshakes_use_the_new_one() {
        let ca = new_ca();
        let bundle = bundle_of(&ca);
        let issuer_ca = Arc::clone(&ca);
        let store = IdentityStore::new(
            Arc::new(move |id: &SpiffeId, lifetime| Ok(issuer_ca.issue(id, lifetime)?)),
            SHORT,
        );
        store
            .issue_all([client_id(), server_id()])
            .await
            .expect("issue");
        let first = store.current(&server_id()).expect("server cert");
        let shutdown = CancellationToken::new();
        let task = store.clone().spawn_renewal(shutdown.clone());

        tokio::time::sleep(Duration::from_millis(1500)).await;
        let renewed = store.current(&server_id()).expect("server cert");
        assert_ne!(
            renewed.serial(),
            first.serial(),
            "a new key, so a new serial"
        );
        assert!(renewed.not_after() > first.not_after());

        // After the first certificate has expired, a handshake still succeeds on the renewed one.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(first.not_after() < SystemTime::now());
        let outcome = handshake(
            server_cfg(&store, &bundle),
            client_cfg(&store, &bundle, vec![server_id()]),
        )
        .await;
        assert_eq!(outcome.client.expect("client side"), server_id());
        assert_eq!(outcome.server.expect("server side"), client_id());

        shutdown.cancel();
        task.await.expect("renewal task ends");
    }

    #[tokio::test]
    async fn failed_renewal_keeps_the_current_certificate_and_retries() {
        // Longer than SHORT: X.509 times are whole seconds, so a certificate's real validity
        // can be up to a second shorter than asked, and this test checks it is still valid
        // after several failed retries.
        let lifetime = Duration::from_secs(6);
        let issuer = Arc::new(FlakyIssuer {
            ca: new_ca(),
            failing: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        });
        let store = IdentityStore::new(issuer.clone(), lifetime);
        let first = store.add(&client_id()).await.expect("first issuance");
        issuer.failing.store(true, Ordering::SeqCst);
        let shutdown = CancellationToken::new();
        let task = store.clone().spawn_renewal(shutdown.clone());

        // Renewal is due after ~2.5-3 s; retries follow every 600 ms (a tenth of the lifetime).
        let retried = || issuer.calls.load(Ordering::SeqCst) >= 3;
        wait_until(retried, Duration::from_secs(5)).await;
        let kept = store.current(&client_id()).expect("cert");
        assert_eq!(
            kept.serial(),
            first.serial(),
            "the still-valid certificate is kept"
        );
        assert!(kept.not_after() > SystemTime::now());

        issuer.failing.store(false, Ordering::SeqCst);
        let renewed = || {
            store
                .current(&client_id())
                .is_some_and(|c| c.serial() != first.serial())
        };
        wait_until(renewed, Duration::from_secs(2)).await;

        shutdown.cancel();
        task.await.expect("renewal task ends");
    }

    async fn wait_until(condition: impl Fn() -> bool, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !condition() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not met within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn identity_added_while_running_is_renewed_too() {
        let ca = new_ca();
        let issuer_ca = Arc::clone(&ca);
        let store = IdentityStore::new(
            Arc::new(move |id: &SpiffeId, lifetime| Ok(issuer_ca.issue(id, lifetime)?)),
            SHORT,
        );
        let shutdown = CancellationToken::new();
        let task = store.clone().spawn_renewal(shutdown.clone());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let first = store.add(&client_id()).await.expect("issue");
        tokio::time::sleep(Duration::from_millis(1400)).await;
        let renewed = store.current(&client_id()).expect("cert");
        assert_ne!(renewed.serial(), first.serial());
        assert!(store.remove(&client_id()));
        assert!(store.identities().is_empty());
        shutdown.cancel();
        task.await.expect("renewal task ends");
    }
}

mod rotation {
    use super::*;

    /// A trust bundle replaced in place (what follows its file) applies to the next handshake
    /// of configurations made before, on both sides.
    #[tokio::test]
    async fn a_replaced_bundle_applies_to_the_next_handshake() {
        let (old, new) = (new_ca(), new_ca());
        let server_store = store_from(&old, &[server_id()]);
        let client_store = store_from(&new, &[client_id()]);
        let server_bundle = SharedBundle::from(bundle_of(&old));
        let client_bundle = SharedBundle::from(bundle_of(&old));
        let server = server_config(server_store, server_id(), server_bundle.clone(), TD)
            .expect("server config");
        let client = client_config(
            client_store,
            client_id(),
            client_bundle.clone(),
            vec![server_id()],
        )
        .expect("client config");

        let refused = handshake(Arc::clone(&server), Arc::clone(&client)).await;
        assert!(
            refused.server.is_err(),
            "the server trusts only the old root yet"
        );

        let both = TrustBundle::from_certs(
            [&old, &new].map(|ca| ca.root_certificate().expect("root").clone()),
        )
        .expect("bundle");
        server_bundle.replace(both.clone());
        client_bundle.replace(both);
        let outcome = handshake(server, client).await;
        assert_eq!(outcome.server.expect("server side"), client_id());
        assert_eq!(outcome.client.expect("client side"), server_id());
    }
}

mod issuance {
    use super::*;

    /// Answers after a while, like a CA across the network; counts requests in flight.
    struct SlowIssuer {
        ca: Arc<CertificateAuthority>,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
    }

    impl CertificateIssuer for SlowIssuer {
        fn issue<'a>(
            &'a self,
            id: &'a SpiffeId,
            lifetime: Duration,
        ) -> futures::future::BoxFuture<'a, anyhow::Result<WorkloadCert>> {
            Box::pin(async move {
                let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.most_in_flight.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok(self.ca.issue(id, lifetime)?)
            })
        }
    }

    /// Wanted identities are issued in the background, a bounded number at a time, and each
    /// issuance is announced.
    #[tokio::test]
    async fn wanted_identities_are_issued_a_few_at_a_time() {
        let issuer = Arc::new(SlowIssuer {
            ca: new_ca(),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
        });
        let store = IdentityStore::new(issuer.clone(), HOUR);
        let mut issued = store.issued();
        let shutdown = CancellationToken::new();
        let task = store.clone().spawn_renewal(shutdown.clone());
        let ids: Vec<SpiffeId> = (0..40).map(|i| id("default", &format!("sa-{i}"))).collect();
        for id in &ids {
            assert!(store.want(id).is_none(), "nothing issued synchronously");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while ids.iter().any(|id| store.current(id).is_none()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not all issued in time"
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), issued.changed()).await;
        }
        let most = issuer.most_in_flight.load(Ordering::SeqCst);
        assert!(
            (2..=16).contains(&most),
            "{most} requests in flight at most"
        );
        for id in &ids {
            assert!(store.want(id).is_some());
        }
        shutdown.cancel();
        task.await.expect("renewal task ends");
    }
}
