//! The mesh on Kubernetes, against a real kube-apiserver, etcd, controller-manager and
//! scheduler: installed from deploy/ as an operator does, pods made by Deployments and run by
//! the harness kubelets, the CNI chain calling mesh-cni, and the agents run as the DaemonSet
//! runs them, with exactly the shipped RBAC.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_tests::kube::{KubeMesh, two_nodes};
use serde_json::Value;

const NS: &str = "shop";
const CURL_TIME: Duration = Duration::from_secs(5);

/// Namespace `shop` in the mesh; `web` (a Deployment on node-b behind Service `web`, port 80 →
/// 8080) and a `client` pod on node-a; `outside` (a namespace not in the mesh) with a curl pod
/// on node-a.
fn shop(namespace_label: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
  labels: {{istio.io/dataplane-mode: {namespace_label}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: web, namespace: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: {NS}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {NS}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      serviceAccountName: web
      nodeSelector: {{kubernetes.io/hostname: node-b}}
      containers:
      - name: web
        image: python:3
        command: [python3, -m, http.server, "8080", --directory, /usr/share/doc/curl]
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{tcpSocket: {{port: http}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {NS}}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}, labels: {{app: client}}}}
spec:
  serviceAccountName: client
  nodeSelector: {{kubernetes.io/hostname: node-a}}
  containers:
  - {{name: client, image: curlimages/curl, command: [sleep, "3650d"]}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: outside}}
---
apiVersion: v1
kind: Pod
metadata: {{name: curl, namespace: outside}}
spec:
  nodeSelector: {{kubernetes.io/hostname: node-a}}
  containers:
  - {{name: curl, image: curlimages/curl, command: [sleep, "3650d"]}}
"#
    )
}

const WEB_URL: &str = "http://web.shop.svc.cluster.local/";

fn start_shop(label: &str) -> Result<KubeMesh> {
    let mesh = KubeMesh::start(&two_nodes())?;
    mesh.apply(&shop(label))?;
    mesh.wait_ready(NS, "app in (web, client)")?;
    mesh.kube().control_plane().wait_for(
        "condition=Ready",
        ["pod/curl", "-n", "outside"],
        Duration::from_secs(60),
    )?;
    Ok(mesh)
}

/// The inbound `connection closed` lines of node-b's agent for the web pod.
fn inbound_to_web(mesh: &KubeMesh) -> Result<Vec<Value>> {
    Ok(mesh
        .cluster()
        .agent_logs("node-b")?
        .into_iter()
        .filter(|l| {
            l["message"] == "inbound connection closed"
                && l["workload"]
                    .as_str()
                    .is_some_and(|w| w.starts_with("shop/web-"))
        })
        .collect())
}

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

#[test]
fn service_call_across_nodes_is_mutual_tls() -> Result<()> {
    let mesh = start_shop("ambient")?;
    let out = mesh.curl(NS, "client", WEB_URL, CURL_TIME)?;
    if !out.success() {
        bail!(
            "client → web failed: {}; {}",
            out.stderr_str(),
            mesh.cluster().agent_log_tail("node-a")
        );
    }
    let line = poll(
        "node-b's agent logs the mTLS connection",
        Duration::from_secs(10),
        || {
            Ok(inbound_to_web(&mesh)?.into_iter().find(|l| {
                l["security"] == "mutual_tls"
                    && l["peer_identity"] == "spiffe://cluster.local/ns/shop/sa/client"
            }))
        },
    )
    .with_context(|| mesh.cluster().agent_log_tail("node-b"))?;
    assert!(line["bytes_sent"].as_u64() > Some(0), "{line}");
    Ok(())
}
