//! The agents with istiod as their CA (deploy/istiod/): a real `pilot-discovery`, built from
//! istio.io/istio, against the test API server. The agents ask it for their workloads'
//! certificates over Istio's CA API, as ztunnel does, and istiod's node authorizer decides.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_tests::CaAnswer;
use mesh_tests::kube::{CaKind, KubeMesh, MESH_NAMESPACE, two_nodes};
use serde_json::Value;

const NS: &str = "shop";

/// Namespace `shop` in the mesh: `web` (a Deployment on node-b, Service `web` port 80 →
/// 8080) and a `client` pod on node-a, each with its own ServiceAccount.
const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: web
      nodeSelector: {kubernetes.io/hostname: node-b}
      containers:
      - name: web
        image: python:3
        command: [python3, -m, http.server, "8080", --directory, /usr/share/doc/curl]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  serviceAccountName: client
  nodeSelector: {kubernetes.io/hostname: node-a}
  containers:
  - {name: client, image: curlimages/curl, command: [sleep, "3650d"]}
"#;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
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
    let mesh = KubeMesh::start_with(&two_nodes(), CaKind::Istiod)?;

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

    mesh.apply(SHOP)?;
    mesh.wait_ready(NS, "app in (web, client)")?;
    // Until the agents see web's EndpointSlice, the Service has no endpoint for them.
    let mut last = String::new();
    poll("client → web succeeds", Duration::from_secs(20), || {
        let out = mesh.curl(
            NS,
            "client",
            "http://web.shop.svc.cluster.local/",
            Duration::from_secs(5),
        )?;
        last = out.stderr_str();
        Ok(out.success().then_some(()))
    })
    .with_context(|| {
        format!(
            "{last}; {}; {}",
            mesh.cluster().agent_log_tail("node-a"),
            mesh.ca().log_tail()
        )
    })?;
    let line = poll(
        "node-b's agent logs the mTLS connection from client",
        Duration::from_secs(10),
        || {
            Ok(mesh
                .cluster()
                .agent_logs("node-b")?
                .into_iter()
                .find(|l: &Value| {
                    l["message"] == "inbound connection closed"
                        && l["security"] == "mutual_tls"
                        && l["peer_identity"] == CLIENT_ID
                }))
        },
    )
    .with_context(|| mesh.cluster().agent_log_tail("node-b"))?;
    assert!(line["bytes_sent"].as_u64() > Some(0), "{line}");
    for identity in [CLIENT_ID, WEB_ID] {
        assert!(
            istiod_signed(&mesh, identity)?,
            "istiod logged no signature for {identity}; {}",
            mesh.ca().log_tail()
        );
    }

    // istiod's node authorizer: node-a's agent gets its own pod's identity, signed by the
    // root the agents trust, and not the identity of a pod on node-b.
    let token = mesh.agent_ca_token("node-a")?;
    let own = mesh.request_certificate("node-a", Some(&token), CLIENT_ID)?;
    let CaAnswer::Issued { chain, .. } = &own else {
        bail!("istiod refused node-a its own pod's identity: {own:?}");
    };
    assert_eq!(own.leaf_sans()?, [format!("URI:{CLIENT_ID}")]);
    assert_eq!(
        chain.last().map(|c| c.trim()),
        Some(istiod_root.trim()),
        "the chain istiod returned does not end at the root it published"
    );
    let other = mesh.request_certificate("node-a", Some(&token), WEB_ID)?;
    assert!(
        other.refusal().is_some(),
        "istiod gave node-a's agent the identity of web, which runs on node-b: {other:?}"
    );
    mesh.ca()
        .wait_for_log(
            |l| {
                l["msg"].as_str().is_some_and(|m| {
                    m.contains(&format!("impersonation failed for identity {WEB_ID}"))
                        && m.contains("node-a")
                })
            },
            Duration::from_secs(5),
        )
        .context("istiod logs why it refused")?;
    Ok(())
}
