//! The mesh on Kubernetes, against a real kube-apiserver, etcd, controller-manager and
//! scheduler: installed from deploy/ as an operator does, pods made by Deployments and run by
//! the harness kubelets, the CNI chain calling mesh-cni, and the agents run as the DaemonSet
//! runs them, with exactly the shipped RBAC.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_tests::kube::{CA_SERVICE_ACCOUNT, KubeMesh, MESH_NAMESPACE, two_nodes};
use mesh_tests::kubelet::REQUESTED_IP_ANNOTATION;
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
    // The callers are on node-a: its Service rules must route to web before the tests call.
    let pods = mesh.kubectl(["-n", NS, "get", "pods", "-l", "app=web", "-o", "json"])?;
    let pods: Value = serde_json::from_slice(&pods.stdout)?;
    for pod in pods["items"].as_array().into_iter().flatten() {
        let ip = pod["status"]["podIP"].as_str().context("web has no IP")?;
        mesh.wait_routed_to("node-a", ip)?;
    }
    Ok(mesh)
}

/// The inbound `connection closed` lines of node-b's agent for the web pod (delivered or
/// refused).
fn inbound_to_web(mesh: &KubeMesh) -> Result<Vec<Value>> {
    Ok(mesh
        .cluster()
        .agent_logs("node-b")?
        .into_iter()
        .filter(|l| {
            l["message"] == "connection closed"
                && l["direction"] == "inbound"
                && l["dst_workload"]
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
                    && l["src_identity"] == "spiffe://cluster.local/ns/shop/sa/client"
            }))
        },
    )
    .with_context(|| mesh.cluster().agent_log_tail("node-b"))?;
    assert!(line["bytes_sent"].as_u64() > Some(0), "{line}");

    // A Service whose endpoints are all outside the mesh: passed through as plain TCP.
    mesh.apply(PLAIN_WEB)?;
    mesh.wait_ready("outside", "app=plainweb")?;
    mesh.wait_routed_to("node-a", &mesh.pod_ip("outside", "plainweb")?)?;
    let out = mesh.curl(
        NS,
        "client",
        "http://plainweb.outside.svc.cluster.local/",
        CURL_TIME,
    )?;
    assert!(
        out.success(),
        "client → plainweb: {}; {}",
        out.stderr_str(),
        mesh.cluster().agent_log_tail("node-a")
    );
    Ok(())
}

/// A web server outside the mesh (namespace `outside`) on node-b, behind Service `plainweb`.
const PLAIN_WEB: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: plainweb, namespace: outside, labels: {app: plainweb}}
spec:
  nodeSelector: {kubernetes.io/hostname: node-b}
  containers:
  - name: web
    image: python:3
    command: [python3, -m, http.server, "8080", --directory, /usr/share/doc/curl]
    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: plainweb, namespace: outside}
spec:
  selector: {app: plainweb}
  ports: [{port: 80, targetPort: 8080}]
"#;

/// curl's exit code for `url` from the pod (0: the page came back; 56: the connection was
/// reset, as STRICT does to plaintext callers).
fn curl_code(mesh: &KubeMesh, namespace: &str, pod: &str, url: &str) -> Result<i32> {
    let out = mesh.curl(namespace, pod, url, CURL_TIME)?;
    out.code().context("curl was killed")
}

/// Polls until curl from the pod exits with `code`.
fn wait_curl(mesh: &KubeMesh, namespace: &str, pod: &str, code: i32) -> Result<()> {
    let mut last = None;
    poll(
        &format!("curl from {namespace}/{pod} exits {code}"),
        Duration::from_secs(30),
        || {
            let got = curl_code(mesh, namespace, pod, WEB_URL)?;
            last = Some(got);
            Ok((got == code).then_some(()))
        },
    )
    .with_context(|| format!("last exit code {last:?}"))
}

/// Number of log lines of the node's agent matching `pred` so far.
fn count_logs(mesh: &KubeMesh, node: &str, pred: impl Fn(&Value) -> bool) -> Result<usize> {
    Ok(mesh
        .cluster()
        .agent_logs(node)?
        .iter()
        .filter(|l| pred(l))
        .count())
}

/// Waits until every agent has loaded a policy set with `peer` PeerAuthentications and
/// `authz` AuthorizationPolicies.
fn wait_policy(mesh: &KubeMesh, peer: u64, authz: u64) -> Result<()> {
    for node in ["node-a", "node-b"] {
        poll(
            &format!("{node}'s agent loads {peer} + {authz} policies"),
            Duration::from_secs(30),
            || {
                let last = mesh
                    .cluster()
                    .agent_logs(node)?
                    .into_iter()
                    .rev()
                    .find(|l| l["message"] == "policy loaded");
                Ok(last.filter(|l| {
                    l["peer_authentications"].as_u64() == Some(peer)
                        && l["authorization_policies"].as_u64() == Some(authz)
                }))
            },
        )?;
    }
    Ok(())
}

fn mtls_from(line: &Value, service_account: &str) -> bool {
    line["security"] == "mutual_tls"
        && line["src_identity"]
            == format!("spiffe://cluster.local/ns/shop/sa/{service_account}").as_str()
}

const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
"#;

const ALLOW_CLIENT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-client, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
"#;

/// A pod of namespace shop on node-a with its own service account, not allowed by
/// [`ALLOW_CLIENT`].
fn other_pod(name: &str, annotations: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {name}, namespace: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NS}, labels: {{app: {name}}}, annotations: {{{annotations}}}}}
spec:
  serviceAccountName: {name}
  nodeSelector: {{kubernetes.io/hostname: node-a}}
  containers:
  - {{name: main, image: curlimages/curl, command: [sleep, "3650d"]}}
"#
    )
}

#[test]
fn the_agent_runs_with_the_shipped_rbac_only() -> Result<()> {
    let mesh = KubeMesh::start(&two_nodes()[..1])?;
    let agent = format!("--as=system:serviceaccount:{MESH_NAMESPACE}:mesh-agent");
    let can = |verb: &str, resource: &str| -> Result<bool> {
        let out = mesh.kube().control_plane().kubectl_output([
            "auth",
            "can-i",
            verb,
            resource,
            "--all-namespaces",
            &agent,
        ])?;
        Ok(out.stdout_str().trim() == "yes")
    };
    for (verb, resource) in [
        ("watch", "pods"),
        ("watch", "namespaces"),
        ("watch", "services"),
        ("watch", "endpointslices.discovery.k8s.io"),
        ("watch", "peerauthentications.security.istio.io"),
        ("watch", "authorizationpolicies.security.istio.io"),
        ("create", "events.events.k8s.io"),
    ] {
        assert!(can(verb, resource)?, "the agent needs to {verb} {resource}");
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("list", "secrets"),
        ("list", "nodes"),
        ("update", "pods"),
        ("delete", "pods"),
        ("create", "pods"),
        ("patch", "peerauthentications.security.istio.io"),
        ("list", "configmaps"),
        // No minting tokens of other service accounts, no signing.
        ("create", "serviceaccounts/token"),
        ("create", "certificatesigningrequests.certificates.k8s.io"),
    ] {
        assert!(
            !can(verb, resource)?,
            "the agent must not {verb} {resource}"
        );
    }
    // The CA (deploy/ca/): TokenReview and the pods, nothing else. KubeMesh runs it with its
    // ServiceAccount's token (so it became ready by listing the pods with these rights).
    assert!(mesh.ca().running(), "the CA serves with its shipped RBAC");
    let ca = format!("--as=system:serviceaccount:{MESH_NAMESPACE}:{CA_SERVICE_ACCOUNT}");
    let ca_can = |verb: &str, resource: &str| -> Result<bool> {
        let out = mesh.kube().control_plane().kubectl_output([
            "auth",
            "can-i",
            verb,
            resource,
            "--all-namespaces",
            &ca,
        ])?;
        Ok(out.stdout_str().trim() == "yes")
    };
    for (verb, resource) in [
        ("create", "tokenreviews.authentication.k8s.io"),
        ("get", "pods"),
        ("list", "pods"),
        ("watch", "pods"),
    ] {
        assert!(ca_can(verb, resource)?, "the CA needs to {verb} {resource}");
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("list", "secrets"),
        ("list", "configmaps"),
        ("list", "nodes"),
        ("list", "serviceaccounts"),
        ("create", "serviceaccounts/token"),
        ("create", "pods"),
        ("update", "pods"),
        ("delete", "pods"),
        ("create", "subjectaccessreviews.authorization.k8s.io"),
        ("create", "certificatesigningrequests.certificates.k8s.io"),
        ("impersonate", "serviceaccounts"),
        ("create", "events"),
    ] {
        assert!(
            !ca_can(verb, resource)?,
            "the CA must not {verb} {resource}"
        );
    }
    // And with its own token, for real: the API server refuses it the Secrets.
    let kubeconfig = mesh
        .kube()
        .control_plane()
        .service_account_kubeconfig(MESH_NAMESPACE, "mesh-agent")?;
    let status = mesh
        .kube()
        .control_plane()
        .block_on_as(&kubeconfig, |client| async move {
            let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
                kube::Api::namespaced(client, MESH_NAMESPACE);
            match secrets.list(&Default::default()).await {
                Ok(_) => Ok(200),
                Err(kube::Error::Api(status)) => Ok(status.code),
                Err(other) => Err(anyhow::anyhow!(other)),
            }
        })?;
    assert_eq!(status, 403, "listing Secrets with the agent's token");
    // The uninstall manifests are valid for this API server too (applied for real, they would
    // take the mesh off the nodes).
    let uninstall = mesh_tests::kube::deploy_dir().join("uninstall");
    mesh.kubectl([
        std::ffi::OsStr::new("apply"),
        std::ffi::OsStr::new("--server-side"),
        std::ffi::OsStr::new("--dry-run=server"),
        std::ffi::OsStr::new("-k"),
        uninstall.as_os_str(),
    ])?;
    Ok(())
}

#[test]
fn namespace_label_captures_and_releases_running_pods() -> Result<()> {
    let mesh = start_shop("none")?;
    let uids = |mesh: &KubeMesh| -> Result<Vec<String>> {
        ["client"]
            .into_iter()
            .map(|p| Ok(mesh.pod_placement(NS, p)?.0))
            .collect()
    };
    let before = uids(&mesh)?;
    assert_eq!(
        curl_code(&mesh, NS, "client", WEB_URL)?,
        0,
        "outside the mesh, plain TCP works"
    );
    assert!(inbound_to_web(&mesh)?.is_empty(), "no agent carried it");

    mesh.kubectl([
        "label",
        "namespace",
        NS,
        "istio.io/dataplane-mode=ambient",
        "--overwrite",
    ])?;
    poll(
        "the running client and web pods are captured",
        Duration::from_secs(30),
        || {
            curl_code(&mesh, NS, "client", WEB_URL)?;
            Ok(inbound_to_web(&mesh)?
                .iter()
                .any(|l| mtls_from(l, "client"))
                .then_some(()))
        },
    )
    .with_context(|| mesh.cluster().agent_log_tail("node-a"))?;

    // A pod can be removed and served again while it runs (its sandbox updated): count only
    // the removals the label change makes.
    let served_out = |node: &str, prefix: &'static str| {
        count_logs(&mesh, node, |l| {
            l["message"] == "workload removed"
                && l["workload"]
                    .as_str()
                    .is_some_and(|w| w.starts_with(prefix))
        })
    };
    let (client_before, web_before) = (
        served_out("node-a", "shop/client")?,
        served_out("node-b", "shop/web-")?,
    );
    mesh.kubectl([
        "label",
        "namespace",
        NS,
        "istio.io/dataplane-mode=none",
        "--overwrite",
    ])?;
    poll("both pods are served out", Duration::from_secs(30), || {
        Ok((served_out("node-a", "shop/client")? > client_before
            && served_out("node-b", "shop/web-")? > web_before)
            .then_some(()))
    })?;
    let carried = inbound_to_web(&mesh)?.len();
    assert_eq!(
        curl_code(&mesh, NS, "client", WEB_URL)?,
        0,
        "released, plain TCP works again"
    );
    assert_eq!(inbound_to_web(&mesh)?.len(), carried, "no agent carried it");
    assert_eq!(uids(&mesh)?, before, "no pod was restarted or replaced");
    Ok(())
}

#[test]
fn policies_applied_with_kubectl_are_enforced_and_bad_ones_refused() -> Result<()> {
    let mesh = start_shop("ambient")?;
    mesh.apply(&other_pod("intruder", ""))?;
    mesh.wait_ready(NS, "app=intruder")?;

    // STRICT: the outside-mesh curl pod gets curl: (56), the enrolled client works.
    mesh.apply(STRICT)?;
    wait_policy(&mesh, 1, 0)?;
    assert_eq!(
        curl_code(&mesh, "outside", "curl", WEB_URL)?,
        56,
        "plaintext caller under STRICT"
    );
    assert_eq!(
        curl_code(&mesh, NS, "client", WEB_URL)?,
        0,
        "enrolled client under STRICT"
    );

    // AuthorizationPolicy by principal: the client is allowed, the intruder (another service
    // account of the same namespace) is not.
    mesh.apply(ALLOW_CLIENT)?;
    wait_policy(&mesh, 1, 1)?;
    assert_eq!(
        curl_code(&mesh, NS, "client", WEB_URL)?,
        0,
        "allowed principal"
    );
    assert_eq!(
        curl_code(&mesh, NS, "intruder", WEB_URL)?,
        56,
        "principal not allowed"
    );

    // A PeerAuthentication the CRD schema refuses never reaches the agents.
    let bad_mode = STRICT
        .replace("name: default", "name: sometimes")
        .replace("STRICT", "SOMETIMES");
    let refused = mesh
        .apply(&bad_mode)
        .expect_err("mode SOMETIMES must be refused");
    assert!(format!("{refused:#}").contains("SOMETIMES"), "{refused:#}");

    // One the schema takes but the agent cannot enforce (an L7 field at L4): refused with an
    // Event on it; the policies in force stay.
    let l7 = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-get, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#;
    mesh.apply(l7)?;
    let event = poll(
        "an InvalidPolicy Event on only-get",
        Duration::from_secs(20),
        || {
            let out = mesh.kubectl(["get", "events.events.k8s.io", "-n", NS, "-o", "json"])?;
            let events: Value = serde_json::from_slice(&out.stdout)?;
            Ok(events["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["reason"] == "InvalidPolicy" && e["regarding"]["name"] == "only-get")
                .cloned())
        },
    )?;
    assert!(
        event["note"]
            .as_str()
            .is_some_and(|n| n.contains("methods")),
        "{event}"
    );
    assert_eq!(
        curl_code(&mesh, NS, "client", WEB_URL)?,
        0,
        "the good set stays"
    );
    assert_eq!(
        curl_code(&mesh, NS, "intruder", WEB_URL)?,
        56,
        "the good set stays"
    );
    Ok(())
}

#[test]
fn pod_recreated_under_its_name_and_an_ip_given_to_another_identity() -> Result<()> {
    let mesh = start_shop("ambient")?;
    mesh.apply(ALLOW_CLIENT)?;
    wait_policy(&mesh, 0, 1)?;
    assert_eq!(curl_code(&mesh, NS, "client", WEB_URL)?, 0);
    let (old_uid, _) = mesh.pod_placement(NS, "client")?;
    let old_ip = mesh.pod_ip(NS, "client")?;

    // Same name, new UID and a new IP (host-local does not hand a freed address out at once).
    let client = shop("ambient");
    mesh.kubectl(["delete", "pod", "client", "-n", NS, "--wait=true"])?;
    mesh.apply(&client)?;
    mesh.wait_ready(NS, "app=client")?;
    let (new_uid, _) = mesh.pod_placement(NS, "client")?;
    let new_ip = mesh.pod_ip(NS, "client")?;
    assert_ne!(old_uid, new_uid);
    assert_ne!(old_ip, new_ip);
    let out = mesh.curl(NS, "client", WEB_URL, CURL_TIME)?;
    assert!(
        out.success(),
        "the new client pod is served: {}; {}",
        out.stderr_str(),
        mesh.cluster().agent_log_tail("node-a")
    );

    // The client goes, and its address is given to a pod of another service account: that
    // pod gets its own identity, and nothing the client was allowed.
    mesh.kubectl(["delete", "pod", "client", "-n", NS, "--wait=true"])?;
    let annotation = format!("{REQUESTED_IP_ANNOTATION}: \"{new_ip}\"");
    mesh.apply(&other_pod("impostor", &annotation))?;
    mesh.wait_ready(NS, "app=impostor")?;
    assert_eq!(
        mesh.pod_ip(NS, "impostor")?,
        new_ip,
        "the address was reused"
    );
    assert_eq!(
        curl_code(&mesh, NS, "impostor", WEB_URL)?,
        56,
        "not allowed as the client"
    );
    let line = poll(
        "web's agent sees the impostor's own identity",
        Duration::from_secs(10),
        || {
            Ok(mesh.cluster().agent_logs("node-b")?.into_iter().find(|l| {
                l["message"] == "connection closed"
                    && l["direction"] == "inbound"
                    && l["rejection"] == "policy_denied"
                    && l["src_identity"]
                        .as_str()
                        .is_some_and(|p| p.ends_with("/sa/impostor"))
            }))
        },
    )?;
    assert!(
        line["src_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&new_ip)),
        "{line}"
    );
    Ok(())
}

#[test]
fn cni_add_returns_only_once_the_pod_is_enrolled() -> Result<()> {
    let mesh = start_shop("ambient")?;
    // Under STRICT a first connect that escaped capture would be plaintext and be reset.
    mesh.apply(STRICT)?;
    wait_policy(&mesh, 1, 0)?;
    let first_connect = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: first-connect, namespace: {NS}}}
spec:
  serviceAccountName: client
  restartPolicy: Never
  nodeSelector: {{kubernetes.io/hostname: node-a}}
  containers:
  - {{name: main, image: curlimages/curl, command: [curl, -sS, --max-time, "5", "{WEB_URL}"]}}
"#
    );
    mesh.apply(&first_connect)?;
    mesh.kube()
        .control_plane()
        .wait_for(
            "jsonpath={.status.phase}=Succeeded",
            ["pod/first-connect", "-n", NS],
            Duration::from_secs(60),
        )
        .with_context(|| mesh.cluster().agent_log_tail("node-a"))?;
    let add = mesh
        .cluster()
        .agent_logs("node-a")?
        .into_iter()
        .find(|l| {
            l["message"] == "CNI request"
                && l["pod"] == "shop/first-connect"
                && l["command"] == "Add"
        })
        .context("no CNI ADD for first-connect")?;
    assert!(
        add["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("Enrolled")),
        "{add}"
    );
    Ok(())
}

#[test]
fn api_server_outage_keeps_traffic_and_policy_and_catches_up() -> Result<()> {
    let mesh = start_shop("ambient")?;
    mesh.apply(STRICT)?;
    wait_policy(&mesh, 1, 0)?;
    let cp = mesh.kube().control_plane();

    // The nodes lose the API server, which then goes down for 30 s.
    for node in ["node-a", "node-b"] {
        partition_from_api(&mesh, node, true)?;
    }
    cp.stop_api_server()?;
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(30) {
        assert_eq!(
            curl_code(&mesh, NS, "client", WEB_URL)?,
            0,
            "enrolled traffic continues"
        );
        assert_eq!(
            curl_code(&mesh, "outside", "curl", WEB_URL)?,
            56,
            "STRICT still holds"
        );
        std::thread::sleep(Duration::from_secs(3));
    }
    // Back, but the nodes do not see it yet: a change made meanwhile.
    cp.start_api_server()?;
    cp.delete(["peerauthentication", "default", "-n", NS])?;
    assert_eq!(
        curl_code(&mesh, "outside", "curl", WEB_URL)?,
        56,
        "the agents have not seen it"
    );
    for node in ["node-a", "node-b"] {
        partition_from_api(&mesh, node, false)?;
    }
    wait_policy(&mesh, 0, 0).context("the agents catch up once they reach the API")?;
    wait_curl(&mesh, "outside", "curl", 0)?;
    assert_eq!(curl_code(&mesh, NS, "client", WEB_URL)?, 0);
    Ok(())
}

/// Cuts the node (its kubelet and its agent) off the API server, or joins it again: new
/// connections are reset, and so is every packet of the open ones.
fn partition_from_api(mesh: &KubeMesh, node: &str, cut: bool) -> Result<()> {
    use mesh_tests::kube::{API_SERVER_IPV4, API_SERVER_IPV6, API_SERVER_PORT};
    let out = if cut {
        let rules = format!(
            "table inet api-partition {{\n chain out {{\n  type filter hook output priority 0;\n  \
             ip daddr {API_SERVER_IPV4} tcp dport {API_SERVER_PORT} reject with tcp reset\n  \
             ip6 daddr {API_SERVER_IPV6} tcp dport {API_SERVER_PORT} reject with tcp reset\n }}\n}}\n"
        );
        let file = mesh
            .cluster()
            .workdir()
            .join(format!("{node}-api-partition.nft"));
        std::fs::write(&file, rules)?;
        mesh.cluster().run_in_node(
            node,
            "nft",
            [std::ffi::OsStr::new("-f"), file.as_os_str()],
            Duration::from_secs(10),
        )?
    } else {
        mesh.cluster().run_in_node(
            node,
            "nft",
            ["delete", "table", "inet", "api-partition"],
            Duration::from_secs(10),
        )?
    };
    if !out.success() {
        bail!("nft on {node}: {}", out.stderr_str());
    }
    Ok(())
}
