//! The CA service's tests: CSR signing, and whole requests over real TLS on 127.0.0.1 with a
//! real tonic client.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use mesh_ca_api::{IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateServiceClient};
use prost_types::{Struct, Value, value::Kind};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use x509_parser::extensions::GeneralName;

use super::{CaConfig, CaServer, nodes};
use crate::identity::{CertificateAuthority, CsrError, SpiffeId, TrustBundle, WorkloadCsr};

/// A cluster file with `demo/sleep` on node-a and `demo/httpbin` on node-b.
pub(crate) const CLUSTER: &str = "
trustDomain: cluster.local
identity:
  caCert: ca-cert.pem
  caKey: ca-key.pem
nodes:
  - name: node-a
    workloadCgroup: /sys/fs/cgroup/mesh/node-a
    workloads:
      - name: sleep
        namespace: demo
        serviceAccount: sleep
        ips: [10.0.0.1]
        netns: /run/netns/sleep
        cgroup: /sys/fs/cgroup/mesh/node-a/sleep
  - name: node-b
    workloadCgroup: /sys/fs/cgroup/mesh/node-b
    workloads:
      - name: httpbin
        namespace: demo
        serviceAccount: httpbin
        ips: [10.0.0.2]
        netns: /run/netns/httpbin
        cgroup: /sys/fs/cgroup/mesh/node-b/httpbin
";

const SLEEP: &str = "spiffe://cluster.local/ns/demo/sa/sleep";
const HTTPBIN: &str = "spiffe://cluster.local/ns/demo/sa/httpbin";
const HOUR: Duration = Duration::from_secs(3600);

fn csr_with_sans(key: &KeyPair, sans: &[&str]) -> String {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans
        .iter()
        .map(|san| SanType::URI(rcgen::string::Ia5String::try_from(*san).expect("ascii")))
        .collect();
    params
        .serialize_request(key)
        .expect("CSR")
        .pem()
        .expect("PEM")
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key")
}

fn id(text: &str) -> SpiffeId {
    text.parse().expect("SPIFFE ID")
}

fn leaf_uris(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("leaf parses");
    cert.subject_alternative_name()
        .expect("SAN ok")
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|name| match name {
                    GeneralName::URI(uri) => (*uri).to_owned(),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Verifies a leaf as a TLS peer would: chained to `roots`, clientAuth allowed.
fn verify_client_leaf(chain: &[CertificateDer<'static>], roots: &TrustBundle) {
    let verifier = WebPkiClientVerifier::builder_with_provider(
        roots.root_store(),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier");
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .expect("the issued leaf verifies against the root");
}

#[test]
fn signs_a_good_csr_with_its_key_and_nothing_else() {
    let ca = CertificateAuthority::generate_root("test root").expect("CA");
    let key = p256();
    let csr = WorkloadCsr::parse(&csr_with_sans(&key, &[SLEEP])).expect("valid CSR");
    assert_eq!(csr.uri_san(), SLEEP);
    let issued = ca.sign_csr(&csr, &id(SLEEP), HOUR).expect("signed");
    let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).expect("leaf");
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the leaf carries the CSR's key"
    );
    assert_eq!(leaf_uris(&issued.chain[0]), vec![SLEEP.to_owned()]);
    assert!(!leaf.is_ca());
    let eku = leaf
        .extended_key_usage()
        .expect("ok")
        .expect("present")
        .value;
    assert!(eku.server_auth && eku.client_auth);
    let lifetime = issued
        .not_after
        .duration_since(SystemTime::now())
        .expect("future");
    assert!(lifetime <= HOUR && lifetime > HOUR - Duration::from_secs(60));
    assert_eq!(issued.serial, leaf.raw_serial_as_string());
    let roots = TrustBundle::from_ca(&ca).expect("bundle");
    let mut chain = issued.chain.clone();
    chain.extend(ca.root_certificate().cloned());
    verify_client_leaf(&chain, &roots);

    // The same key asking again gets another serial.
    let again = ca.sign_csr(&csr, &id(SLEEP), HOUR).expect("signed");
    assert_ne!(again.serial, issued.serial);
}

#[test]
fn refuses_bad_csrs() {
    let ca = CertificateAuthority::generate_root("test root").expect("CA");
    let key = p256();

    let two = csr_with_sans(&key, &[SLEEP, HTTPBIN]);
    assert!(matches!(
        WorkloadCsr::parse(&two),
        Err(CsrError::Sans { count: 2, .. })
    ));
    assert!(matches!(
        WorkloadCsr::parse(&csr_with_sans(&key, &[])),
        Err(CsrError::Sans { count: 0, .. })
    ));

    let other = WorkloadCsr::parse(&csr_with_sans(&key, &[HTTPBIN])).expect("valid CSR");
    assert!(matches!(
        ca.sign_csr(&other, &id(SLEEP), HOUR),
        Err(CsrError::IdentityMismatch { .. })
    ));

    for garbage in [
        "",
        "not a CSR",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        assert!(
            matches!(WorkloadCsr::parse(garbage), Err(CsrError::Unparsable(_))),
            "{garbage:?}"
        );
    }

    // A CSR whose signature does not match its key.
    let good = csr_with_sans(&key, &[SLEEP]);
    let der = pem::parse(&good).expect("PEM");
    let mut bytes = der.contents().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let tampered = nodes::pem_encode("CERTIFICATE REQUEST", &bytes);
    assert!(matches!(
        WorkloadCsr::parse(&tampered),
        Err(CsrError::Unparsable(_))
    ));

    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
    assert!(matches!(
        WorkloadCsr::parse(&csr_with_sans(&p384, &[SLEEP])),
        Err(CsrError::UnsupportedKey(_))
    ));
}

/// A CA directory: mesh root, cluster file, CA.yaml, and node-a's credential in `node-a/`.
struct Fixture {
    _dir: tempfile::TempDir,
    config_path: PathBuf,
    config: CaConfig,
    node_a: PathBuf,
    roots_pem: String,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    CertificateAuthority::init(base).expect("ca init");
    std::fs::write(base.join("cluster.yaml"), CLUSTER).expect("cluster file");
    let config_path = base.join("CA.yaml");
    std::fs::write(
        &config_path,
        "listen: 127.0.0.1:0
signingCert: ca-cert.pem
signingKey: ca-key.pem
serverNames: [mesh-ca, 127.0.0.1]
maxCertificateLifetime: 2h
nodes: nodes
authorization:
  clusterFile: cluster.yaml
",
    )
    .expect("CA.yaml");
    let config = CaConfig::load(&config_path).expect("config");
    let node_a = base.join("node-a");
    super::add_node(&config_path, "node-a", &node_a).expect("add-node");
    let roots_pem = std::fs::read_to_string(node_a.join(nodes::CA_ROOTS_FILE)).expect("roots");
    Fixture {
        _dir: dir,
        config_path,
        config,
        node_a,
        roots_pem,
    }
}

async fn start(
    config: &CaConfig,
) -> (
    std::net::SocketAddr,
    std::net::SocketAddr,
    CancellationToken,
) {
    let server = CaServer::bind(config, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let (grpc, metrics) = (
        server.grpc_addr().expect("addr"),
        server.metrics_addr().expect("addr"),
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(shutdown.clone()));
    (grpc, metrics, shutdown)
}

async fn client(
    addr: std::net::SocketAddr,
    roots_pem: &str,
    credential: Option<&Path>,
) -> Result<IstioCertificateServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(roots_pem))
        .domain_name("mesh-ca");
    if let Some(dir) = credential {
        let cert = std::fs::read(dir.join(nodes::NODE_CERT_FILE)).expect("node cert");
        let key = std::fs::read(dir.join(nodes::NODE_KEY_FILE)).expect("node key");
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(IstioCertificateServiceClient::new(channel))
}

fn request(csr: String, impersonated: Option<&str>) -> IstioCertificateRequest {
    IstioCertificateRequest {
        csr,
        validity_duration: 24 * 3600,
        metadata: impersonated.map(|id| Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_owned(),
                Value {
                    kind: Some(Kind::StringValue(id.to_owned())),
                },
            )]
            .into(),
        }),
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

#[tokio::test]
async fn end_to_end_over_tls() {
    // Shows the grant and refusal logs with `--nocapture`.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let fixture = fixture();
    let (addr, metrics_addr, shutdown) = start(&fixture.config).await;
    let roots = TrustBundle::from_certs(
        CertificateDer::pem_slice_iter(fixture.roots_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("roots PEM"),
    )
    .expect("roots");
    let key = p256();

    // node-a, for its own workload: granted; the chain ends with the root and verifies.
    let mut node_a = client(addr, &fixture.roots_pem, Some(&fixture.node_a))
        .await
        .expect("connect with the node credential");
    let response = node_a
        .create_certificate(request(csr_with_sans(&key, &[SLEEP]), Some(SLEEP)))
        .await
        .expect("granted")
        .into_inner();
    assert_eq!(response.cert_chain.len(), 2, "leaf and root");
    let chain: Vec<CertificateDer<'static>> = response
        .cert_chain
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM cert"))
        .collect();
    assert_eq!(leaf_uris(&chain[0]), vec![SLEEP.to_owned()]);
    assert_eq!(&chain[1], &roots.certificates()[0]);
    verify_client_leaf(&chain, &roots);
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("leaf");
    let lifetime = SystemTime::from(leaf.validity().not_after.to_datetime())
        .duration_since(SystemTime::now())
        .expect("future");
    assert!(lifetime <= 2 * HOUR, "capped by maxCertificateLifetime");

    // Without ImpersonatedIdentity, the CSR's SAN names the identity.
    node_a
        .create_certificate(request(csr_with_sans(&key, &[SLEEP]), None))
        .await
        .expect("granted from the CSR's SAN");

    // node-a, for node-b's workload: refused.
    let refused = node_a
        .create_certificate(request(csr_with_sans(&key, &[HTTPBIN]), Some(HTTPBIN)))
        .await
        .expect_err("another node's workload");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // A CSR that does not match the identity asked for, and garbage: invalid.
    let mismatch = node_a
        .create_certificate(request(csr_with_sans(&key, &[HTTPBIN]), Some(SLEEP)))
        .await
        .expect_err("mismatch");
    assert_eq!(mismatch.code(), Code::InvalidArgument, "{mismatch:?}");
    let garbage = node_a
        .create_certificate(request("garbage".to_owned(), Some(SLEEP)))
        .await
        .expect_err("garbage");
    assert_eq!(garbage.code(), Code::InvalidArgument, "{garbage:?}");

    // No credential at all: unauthenticated.
    let mut anonymous = client(addr, &fixture.roots_pem, None)
        .await
        .expect("TLS without client certificate");
    let status = anonymous
        .create_certificate(request(csr_with_sans(&key, &[SLEEP]), Some(SLEEP)))
        .await
        .expect_err("no credential");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A bearer token, on a CA without Kubernetes: unauthenticated.
    let mut with_token = tonic::Request::new(request(csr_with_sans(&key, &[SLEEP]), Some(SLEEP)));
    with_token
        .metadata_mut()
        .insert("authorization", "Bearer abc".parse().expect("ascii"));
    let status = anonymous
        .create_certificate(with_token)
        .await
        .expect_err("tokens not accepted");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A workload certificate is no node credential: the handshake fails, the server lives on.
    let workload_dir = fixture.config_path.with_file_name("workload");
    std::fs::create_dir_all(&workload_dir).expect("dir");
    let mesh_ca =
        CertificateAuthority::load(&fixture.config.signing_cert, &fixture.config.signing_key)
            .expect("mesh CA");
    let workload = mesh_ca.issue(&id(SLEEP), HOUR).expect("workload cert");
    std::fs::write(
        workload_dir.join(nodes::NODE_CERT_FILE),
        nodes::pem_encode("CERTIFICATE", &workload.chain()[0]),
    )
    .expect("write");
    std::fs::write(
        workload_dir.join(nodes::NODE_KEY_FILE),
        nodes::pem_encode("PRIVATE KEY", workload.key().secret_der()),
    )
    .expect("write");
    let impostor = match client(addr, &fixture.roots_pem, Some(&workload_dir)).await {
        Err(_) => None,
        Ok(mut impostor) => Some(
            impostor
                .create_certificate(request(csr_with_sans(&key, &[SLEEP]), Some(SLEEP)))
                .await,
        ),
    };
    assert!(
        !matches!(impostor, Some(Ok(_))),
        "a workload certificate authenticated a node"
    );

    // Revoked: the same connection's next request is refused.
    super::revoke_node(&fixture.config_path, "node-a").expect("revoke");
    let status = node_a
        .create_certificate(request(csr_with_sans(&key, &[SLEEP]), Some(SLEEP)))
        .await
        .expect_err("revoked");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // Re-added into another directory: the old credential stays refused, the new one works.
    let replaced = fixture.config_path.with_file_name("node-a-2");
    super::add_node(&fixture.config_path, "node-a", &replaced).expect("re-add");
    let mut renewed = client(addr, &fixture.roots_pem, Some(&replaced))
        .await
        .expect("connect");
    renewed
        .create_certificate(request(csr_with_sans(&key, &[SLEEP]), Some(SLEEP)))
        .await
        .expect("the new credential works");

    let metrics = http_get(metrics_addr, "/metrics").await;
    assert!(
        metrics.contains("mesh_ca_requests_total{result=\"issued\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mesh_ca_requests_total{result=\"refused\"}"),
        "{metrics}"
    );
    let ready = http_get(metrics_addr, "/healthz/ready").await;
    assert!(
        ready.starts_with("HTTP/1.0 200") || ready.starts_with("HTTP/1.1 200"),
        "{ready}"
    );
    shutdown.cancel();
}
