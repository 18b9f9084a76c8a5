//! The CA service on Kubernetes (deploy/ca/), against a real kube-apiserver: it signs only for
//! the agents' own service account, only with tokens the API server says are valid now, and
//! only identities of pods on the asking agent's node; every refusal is logged with who asked
//! for what.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use mesh_tests::kube::{CA_AUDIENCE, KubeMesh, two_nodes};
use mesh_tests::{CA_ISSUED, CA_REFUSED, CaAnswer};
use serde_json::Value;

const NS: &str = "shop";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// Namespace `shop` in the mesh: pod `client` (ServiceAccount client) on node-a, pod `web`
/// (ServiceAccount web) on node-b.
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
  - {name: web, image: curlimages/curl, command: [sleep, "3650d"]}
"#;

fn start() -> Result<KubeMesh> {
    let mesh = KubeMesh::start(&two_nodes())?;
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
