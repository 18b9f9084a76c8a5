//! The CA service's `CreateCertificate`: the request's protobuf decoded as tonic decodes it
//! (prost, `IstioCertificateRequest` of Istio's ca.proto), then `Authority::grant`, what the
//! service runs once the caller is authenticated: the `ImpersonatedIdentity`, the CSR's PEM,
//! signature and key, its SAN, the identity's authorization for the caller's node, signing.
//!
//! Input: one byte choosing the caller's node (bits 0-1) and whether a gRPC metadata
//! `ImpersonatedIdentity` is sent (bit 2: then one length byte and that many bytes of its
//! value), then the request's protobuf bytes.
//!
//! Invariants: nothing panics; a requester never causes an `Internal` error; a certificate is
//! granted only to the caller's node and only for an identity of a workload on that node (per
//! the cluster file, and per the table below, written independently of it), and it certifies
//! exactly that identity.
#![no_main]

use std::path::PathBuf;
use std::str::FromStr as _;
use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::{Corpus, fuzz_target};
use mesh_agent::ca::authn::Caller;
use mesh_agent::ca::authz::{Authorizer, ClusterFileIndex};
use mesh_agent::ca::metrics::CaMetrics;
use mesh_agent::ca::service::{Authority, Signing, impersonated_identity};
use mesh_agent::identity::{CertificateAuthority, SpiffeId, spiffe_id_of_certificate};
use mesh_ca_api::{IMPERSONATED_IDENTITY, IstioCertificateRequest};
use prost::Message as _;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tonic::Code;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

const TRUST_DOMAIN: &str = "cluster.local";

/// `demo/sleep` on node-a, `demo/httpbin` and `demo/other` (service account `httpbin` too) on
/// node-b; node-c has no workload.
const CLUSTER: &str = "
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
      - name: other
        namespace: demo
        serviceAccount: httpbin
        ips: [10.0.0.3]
        netns: /run/netns/other
        cgroup: /sys/fs/cgroup/mesh/node-b/other
  - name: node-c
    workloadCgroup: /sys/fs/cgroup/mesh/node-c
    workloads: []
";

/// What each node may obtain, written out rather than read from the cluster file.
const MAY_OBTAIN: &[(&str, &str)] = &[
    ("node-a", "spiffe://cluster.local/ns/demo/sa/sleep"),
    ("node-b", "spiffe://cluster.local/ns/demo/sa/httpbin"),
];

/// Callers' nodes: in the cluster file with workloads, without, and not in it.
const NODES: [&str; 4] = ["node-a", "node-b", "node-c", "node-z"];

struct Fixture {
    authority: Authority,
    root: CertificateDer<'static>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    // One file for every run: written only when it differs, so that parallel runs (`-fork`)
    // never see it change under them.
    let dir: PathBuf = std::env::temp_dir().join("mesh-fuzz-ca");
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let cluster_file = dir.join("cluster.yaml");
    if std::fs::read_to_string(&cluster_file).ok().as_deref() != Some(CLUSTER) {
        std::fs::write(&cluster_file, CLUSTER).expect("writing the cluster file");
    }
    let index = ClusterFileIndex::load(&cluster_file, TRUST_DOMAIN).expect("the cluster file");
    let ca = CertificateAuthority::generate_root("fuzz root").expect("a CA");
    let root = ca.root_certificate().expect("a root").clone();
    let authority = Authority {
        trust_domain: TRUST_DOMAIN.to_owned(),
        signing: Signing {
            ca,
            root: root.clone(),
        },
        max_lifetime: Duration::from_secs(3600),
        registry: None,
        tokens: None,
        authz: Authorizer::ClusterFile(index),
        metrics: CaMetrics::new(),
    };
    Fixture { authority, root }
});

fuzz_target!(|data: &[u8]| -> Corpus {
    let fixture = &*FIXTURE;
    let Some((&selector, mut rest)) = data.split_first() else {
        return Corpus::Reject;
    };
    let node = NODES[usize::from(selector & 3)];
    let mut grpc = MetadataMap::new();
    if selector & 4 != 0 {
        let Some((&len, after)) = rest.split_first() else {
            return Corpus::Reject;
        };
        let len = usize::from(len).min(after.len());
        let (value, after) = after.split_at(len);
        rest = after;
        // Header values that are not valid never reach the service (h2 refuses them).
        let Ok(value) = MetadataValue::try_from(value) else {
            return Corpus::Reject;
        };
        let key = MetadataKey::from_bytes(IMPERSONATED_IDENTITY.to_ascii_lowercase().as_bytes())
            .expect("a valid metadata key");
        grpc.insert(key, value);
    }
    // tonic answers a body that does not decode with an error of its own.
    let Ok(body) = IstioCertificateRequest::decode(rest) else {
        return Corpus::Reject;
    };
    let caller = Caller {
        node: node.to_owned(),
        caller: format!("CN={node}"),
    };
    let asked = impersonated_identity(&body, &grpc);
    let named = asked.clone().ok().flatten();
    match fixture.authority.grant(&caller, asked, body) {
        Err(refusal) => {
            assert_ne!(
                refusal.code,
                Code::Internal,
                "a requester caused an internal error: {}",
                refusal.reason
            );
            assert!(!refusal.reason.is_empty());
            assert_eq!(refusal.node.as_deref(), Some(node));
        }
        Ok(grant) => {
            assert_eq!(grant.node, node);
            let identity = grant.identity.to_string();
            assert!(
                MAY_OBTAIN.contains(&(node, identity.as_str())),
                "{node} was granted {identity}"
            );
            if let Some(named) = named {
                assert_eq!(
                    SpiffeId::from_str(&named).ok().as_ref(),
                    Some(&grant.identity)
                );
            }
            let chain = &grant.response.cert_chain;
            assert!(chain.len() >= 2, "leaf and root");
            let leaf = CertificateDer::from_pem_slice(chain[0].as_bytes()).expect("a PEM leaf");
            assert_eq!(
                spiffe_id_of_certificate(&leaf).expect("the leaf's SPIFFE ID"),
                grant.identity
            );
            let root = CertificateDer::from_pem_slice(chain[chain.len() - 1].as_bytes())
                .expect("a PEM root");
            assert_eq!(root, fixture.root);
        }
    }
    Corpus::Keep
});
