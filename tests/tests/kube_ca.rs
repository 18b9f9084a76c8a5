//! The CA service on Kubernetes (deploy/ca/), against a real kube-apiserver: it signs only for
//! the agents' own service account, only with tokens the API server says are valid now, and
//! only identities of pods on the asking agent's node; every refusal is logged with who asked
//! for what. With deploy/istiod/ the agents take their certificates from a real istiod
//! instead (`pilot-discovery`, built from istio.io/istio), and its node authorizer decides.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use mesh_tests::kube::{CA_AUDIENCE, CaKind, KubeMesh, MESH_NAMESPACE, two_nodes};
use mesh_tests::{CA_ISSUED, CA_REFUSED, CaAnswer};
use serde_json::Value;

const NS: &str = "shop";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// Namespace `shop` in the mesh: pod `client` (ServiceAccount client) on node-a, pod `web`
/// (ServiceAccount web, HTTP on 8080) on node-b.
const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  serviceAccountName: client
  nodeSelector: {kubernetes.io/hostname: node-a}
  containers:
  - {name: client, image: curlimages/curl, command: [sleep, "3650d"]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  serviceAccountName: web
  nodeSelector: {kubernetes.io/hostname: node-b}
  containers:
  - name: web
    image: python:3
    command: [python3, -m, http.server, "8080", --directory, /usr/share/doc/curl]
    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
"#;

fn start() -> Result<KubeMesh> {
    start_with(CaKind::Mesh)
}

fn start_with(ca: CaKind) -> Result<KubeMesh> {
    let mesh = KubeMesh::start_with(&two_nodes(), ca)?;
    mesh.apply(SHOP)?;
    mesh.wait_ready(NS, "app in (client, web)")?;
    Ok(mesh)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

/// Waits for the CA's refusal of `identity` and returns the line.
fn refusal(mesh: &KubeMesh, identity: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    mesh.ca().wait_for_log(
        |l| l["message"] == CA_REFUSED && l["identity"] == identity && pred(l),
        LOG_TIMEOUT,
    )
}

fn issued(answer: &CaAnswer) -> bool {
    matches!(answer, CaAnswer::Issued { .. })
}

#[test]
fn the_ca_signs_for_the_agents_of_the_pods_nodes_only() -> Result<()> {
    let mesh = start()?;
    let cp = mesh.kube().control_plane();

    // The agents took their workloads' certificates from the CA, each for its own node.
    for (node, identity) in [("node-a", CLIENT), ("node-b", WEB)] {
        mesh.ca()
            .wait_for_log(
                |l| l["message"] == CA_ISSUED && l["node"] == node && l["identity"] == identity,
                Duration::from_secs(30),
            )
            .with_context(|| format!("{node}'s agent gets {identity} from the CA"))?;
    }

    // What the CA relies on: the API server says which node a token of an agent's pod
    // belongs to.
    let token_a = mesh.agent_ca_token("node-a")?;
    let review = cp.token_review(&token_a, CA_AUDIENCE)?;
    eprintln!("TokenReview of node-a's agent token: {review}");
    assert_eq!(review["authenticated"], true, "{review}");
    assert_eq!(
        review["user"]["username"], "system:serviceaccount:mesh-system:mesh-agent",
        "{review}"
    );
    assert_eq!(
        review["user"]["extra"]["authentication.kubernetes.io/node-name"][0], "node-a",
        "{review}"
    );

    // An agent asks for the identity of a pod of its own node: issued.
    let answer = mesh.request_certificate("node-a", Some(&token_a), CLIENT)?;
    assert!(issued(&answer), "node-a asking for {CLIENT}: {answer:?}");

    // (c) node-a's agent asks for the identity of a pod on node-b: refused, logged, nothing
    // issued.
    let answer = mesh.request_certificate("node-a", Some(&token_a), WEB)?;
    assert_eq!(
        answer.refusal(),
        Some(tonic::Code::PermissionDenied),
        "node-a asking for {WEB}: {answer:?}"
    );
    let line = refusal(&mesh, WEB, |l| l["node"] == "node-a")?;
    assert!(
        line["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{line}"
    );
    let web_for_a = mesh
        .ca()
        .logs()?
        .into_iter()
        .filter(|l| l["message"] == CA_ISSUED && l["identity"] == WEB && l["node"] == "node-a")
        .count();
    assert_eq!(web_for_a, 0, "a certificate for {WEB} went to node-a");
    // node-b's own agent gets it.
    let token_b = mesh.agent_ca_token("node-b")?;
    let answer = mesh.request_certificate("node-b", Some(&token_b), WEB)?;
    assert!(issued(&answer), "node-b asking for {WEB}: {answer:?}");

    // (a) A token of another service account (a workload's, audience istio-ca, bound to its
    // pod on node-a) asking for that very pod's identity: refused and logged.
    let client_token = cp.bound_service_account_token(
        NS,
        "client",
        CA_AUDIENCE,
        Some(("Pod", "client")),
        Duration::from_secs(600),
    )?;
    let answer = mesh.request_certificate("node-a", Some(&client_token), CLIENT)?;
    let code = answer.refusal();
    assert!(
        matches!(
            code,
            Some(tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
        ),
        "shop/client's token: {answer:?}"
    );
    refusal(&mesh, CLIENT, |l| {
        l["caller"].as_str().is_some_and(|c| c.contains("client"))
    })?;

    // No token at all: refused.
    let answer = mesh.request_certificate("node-a", None, CLIENT)?;
    assert_eq!(
        answer.refusal(),
        Some(tonic::Code::Unauthenticated),
        "{answer:?}"
    );

    // (b) An expired token. TokenRequest will not make one (10 minutes at least), so node-a's
    // real token is signed again with the cluster's ServiceAccount key, its times moved. The
    // same token with its times in the future is accepted, so only the expiry differs.
    let resign = |exp: i64| {
        cp.resign_service_account_token(&token_a, |claims| {
            claims["iat"] = (exp - 3600).into();
            claims["nbf"] = (exp - 3600).into();
            claims["exp"] = exp.into();
        })
    };
    let fresh = resign(now() + 600)?;
    let answer = mesh.request_certificate("node-a", Some(&fresh), CLIENT)?;
    assert!(issued(&answer), "re-signed token, not expired: {answer:?}");
    let expired = resign(now() - 600)?;
    let review = cp.token_review(&expired, CA_AUDIENCE)?;
    assert_ne!(review["authenticated"], true, "{review}");
    let before = mesh.ca().logs()?.len();
    let answer = mesh.request_certificate("node-a", Some(&expired), CLIENT)?;
    assert_eq!(
        answer.refusal(),
        Some(tonic::Code::Unauthenticated),
        "expired token: {answer:?}"
    );
    let logged = poll_logged(&mesh, before, CLIENT)?;
    for line in mesh
        .ca()
        .logs()?
        .iter()
        .filter(|l| l["message"] == CA_REFUSED)
    {
        eprintln!("CA refusal: {line}");
    }
    assert!(
        logged["reason"]
            .as_str()
            .is_some_and(|r| r.contains("expired")),
        "the API server's verdict is the reason: {logged}"
    );
    assert_ne!(
        logged["node"], "node-a",
        "an expired token names no node: {logged}"
    );
    Ok(())
}

/// The first refusal of `identity` the CA logged after its first `skip` lines.
fn poll_logged(mesh: &KubeMesh, skip: usize, identity: &str) -> Result<Value> {
    let deadline = std::time::Instant::now() + LOG_TIMEOUT;
    loop {
        if let Some(line) = mesh
            .ca()
            .logs()?
            .into_iter()
            .skip(skip)
            .find(|l| l["message"] == CA_REFUSED && l["identity"] == identity)
        {
            return Ok(line);
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "the CA logged no refusal of {identity}; {}",
                mesh.ca().log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// istiod's log says it signed a certificate for `identity` (its `serverca` scope).
fn istiod_signed(mesh: &KubeMesh, identity: &str) -> Result<bool> {
    let signed = format!("CSR successfully signed, sans [{identity}].");
    Ok(mesh
        .ca()
        .logs()?
        .iter()
        .any(|l| l["msg"] == signed.as_str()))
}

#[test]
fn agents_take_their_workload_certificates_from_istiod() -> Result<()> {
    let mesh = start_with(CaKind::Istiod)?;

    // No mesh CA, so no mesh signing key, anywhere on the cluster.
    for kind in ["secret", "deployment"] {
        let out = mesh.kube().control_plane().kubectl_output([
            "-n",
            MESH_NAMESPACE,
            "get",
            kind,
            "mesh-ca",
        ])?;
        assert!(
            !out.success(),
            "deploy/istiod installed {kind} mesh-ca: {}",
            out.stdout_str()
        );
    }
    // The agents trust istiod's root, as istiod published it, and nothing else.
    let istiod_root = std::fs::read_to_string(mesh.ca_roots_path())?;
    for node in ["node-a", "node-b"] {
        let path = mesh.agent_file(node, "/etc/mesh/ca-roots/roots.pem");
        let roots =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        assert_eq!(roots, istiod_root, "{node}'s agent's roots");
    }

    // Until node-a's agent has seen web's pod, it would pass the call through as plain TCP.
    let url = format!("http://{}:8080/", mesh.pod_ip(NS, "web")?);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let line = loop {
        let out = mesh.curl(NS, "client", &url, Duration::from_secs(5))?;
        let mtls = mesh.cluster().agent_logs("node-b")?.into_iter().find(|l| {
            l["message"] == "connection closed"
                && l["direction"] == "inbound"
                && l["security"] == "mutual_tls"
                && l["src_identity"] == CLIENT
        });
        match mtls {
            Some(line) if out.success() => break line,
            _ if std::time::Instant::now() > deadline => bail!(
                "no mTLS call client → web: curl {:?} {}; {}; {}",
                out.code(),
                out.stderr_str(),
                mesh.cluster().agent_log_tail("node-b"),
                mesh.ca().log_tail()
            ),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert!(line["bytes_sent"].as_u64() > Some(0), "{line}");
    for identity in [CLIENT, WEB] {
        assert!(
            istiod_signed(&mesh, identity)?,
            "istiod logged no signature for {identity}; {}",
            mesh.ca().log_tail()
        );
    }

    // istiod's node authorizer: node-a's agent gets its own pod's identity, signed by the
    // root the agents trust, and not the identity of a pod on node-b.
    let token = mesh.agent_ca_token("node-a")?;
    let own = mesh.request_certificate("node-a", Some(&token), CLIENT)?;
    let CaAnswer::Issued { chain, .. } = &own else {
        bail!("istiod refused node-a its own pod's identity: {own:?}");
    };
    assert_eq!(own.leaf_sans()?, [format!("URI:{CLIENT}")]);
    assert_eq!(
        chain.last().map(|c| c.trim()),
        Some(istiod_root.trim()),
        "the chain istiod returned does not end at the root it published"
    );
    let other = mesh.request_certificate("node-a", Some(&token), WEB)?;
    assert!(
        other.refusal().is_some(),
        "istiod gave node-a's agent the identity of web, which runs on node-b: {other:?}"
    );
    mesh.ca()
        .wait_for_log(
            |l| {
                l["msg"].as_str().is_some_and(|m| {
                    m.contains(&format!("impersonation failed for identity {WEB}"))
                        && m.contains("node-a")
                })
            },
            Duration::from_secs(5),
        )
        .context("istiod logs why it refused")?;
    Ok(())
}
