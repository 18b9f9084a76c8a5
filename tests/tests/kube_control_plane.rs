//! The Kubernetes control plane of the harness is the real thing: TLS with the cluster CA,
//! authentication by client certificates and ServiceAccount tokens, RBAC, the Node
//! authorizer, CRD schema validation, working controllers and scheduler; and it leaves
//! nothing behind, also when a test panics.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::authentication::v1::{
    SelfSubjectReview, TokenReview, TokenReviewSpec, UserInfo,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use mesh_tests::kube::{CgroupDriver, ControlPlane, KubeCluster};

const NS: &str = "cp-test";
const SA: &str = "reader";
const POLL: Duration = Duration::from_millis(200);

#[test]
fn control_plane_is_real() -> Result<()> {
    let began = Instant::now();
    let kc = KubeCluster::builder()
        .node("node-a", CgroupDriver::Systemd)
        .node("node-b", CgroupDriver::Cgroupfs)
        .build()?;
    let built = began.elapsed();
    let cp = kc.control_plane();
    let startup = cp.startup();
    eprintln!(
        "control plane: kube-apiserver ready after {:?}, controllers after {:?} \
         (whole KubeCluster with 2 nodes: {built:?})",
        startup.api_server_ready, startup.controllers_ready
    );

    serves_real_tls(&kc)?;
    cp.kubectl(["create", "namespace", NS])?;
    cp.kubectl(["create", "serviceaccount", SA, "-n", NS])?;
    rbac_is_enforced(cp)?;
    token_review_works(cp)?;
    node_credentials_are_restricted(cp)?;
    crd_schema_is_enforced(cp)?;
    deployment_gets_pods(cp)?;
    report_memory(cp)?;

    let leftovers = Leftovers::of(&kc)?;
    drop(kc);
    leftovers.check_gone()
}

#[test]
fn torn_down_on_panic() -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let outcome = thread::spawn(move || {
        let kc = KubeCluster::builder()
            .node("node-a", CgroupDriver::Systemd)
            .build()
            .expect("build a KubeCluster");
        tx.send(Leftovers::of(&kc).expect("note what the cluster made"))
            .expect("send to the test thread");
        panic!("a test failing while its control plane runs");
    })
    .join();
    ensure!(outcome.is_err(), "the thread was meant to panic");
    rx.recv()
        .context("the cluster was never built")?
        .check_gone()
}

/// The API server is reachable from a node, at both its addresses and its Service names,
/// with a certificate that the cluster CA (and nothing else) vouches for, and only for the
/// names it was made for.
fn serves_real_tls(kc: &KubeCluster) -> Result<()> {
    let cp = kc.control_plane();
    let ca = cp.ca_cert_path().to_str().context("CA path")?.to_owned();
    let curl = |args: &[&str]| {
        kc.cluster()
            .run_in_node("node-a", "curl", args, Duration::from_secs(15))
    };
    for url in [
        "https://10.255.0.254:6443/version",
        "https://[fd00:ff::fe]:6443/version",
    ] {
        let out = curl(&["-sS", "-g", "--max-time", "5", "--cacert", &ca, url])?.check()?;
        let version: serde_json::Value =
            serde_json::from_slice(&out.stdout).with_context(|| format!("GET {url}"))?;
        ensure!(
            version["major"] == "1" && version["minor"] == "36",
            "GET {url}: {version}"
        );
    }
    let by_name = curl(&[
        "-sS",
        "--max-time",
        "5",
        "--cacert",
        &ca,
        "--resolve",
        "kubernetes.default.svc.cluster.local:6443:10.255.0.254",
        "https://kubernetes.default.svc.cluster.local:6443/version",
    ])?;
    ensure!(
        by_name.success(),
        "by Service name: {}",
        by_name.stderr_str()
    );

    let untrusted = curl(&[
        "-sS",
        "--max-time",
        "5",
        "https://10.255.0.254:6443/version",
    ])?;
    ensure!(
        untrusted.code() == Some(60),
        "without the cluster CA curl must fail to verify (exit 60), got {:?}: {}",
        untrusted.code(),
        untrusted.stderr_str()
    );
    let wrong_name = curl(&[
        "-sS",
        "--max-time",
        "5",
        "--cacert",
        &ca,
        "--resolve",
        "not-the-apiserver.example:6443:10.255.0.254",
        "https://not-the-apiserver.example:6443/version",
    ])?;
    ensure!(
        wrong_name.code() == Some(60),
        "a name outside the certificate must fail (exit 60), got {:?}: {}",
        wrong_name.code(),
        wrong_name.stderr_str()
    );

    let anonymous = curl(&[
        "-sS",
        "--max-time",
        "5",
        "--cacert",
        &ca,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "https://10.255.0.254:6443/api/v1/secrets",
    ])?
    .check()?;
    ensure!(
        anonymous.stdout_str() == "403",
        "anonymous list of secrets: HTTP {}",
        anonymous.stdout_str()
    );
    Ok(())
}

/// A ServiceAccount without bindings may not list secrets, by `kubectl auth can-i` and by a
/// real request with its token; a RoleBinding lets it, in its namespace only.
fn rbac_is_enforced(cp: &ControlPlane) -> Result<()> {
    let who = format!("--as=system:serviceaccount:{NS}:{SA}");
    let can_list = |ns: &str| -> Result<String> {
        let out = cp.kubectl_output(["auth", "can-i", "list", "secrets", "-n", ns, &who])?;
        Ok(out.stdout_str().trim().to_owned())
    };
    ensure!(can_list(NS)? == "no", "can-i before any binding");

    let kubeconfig = cp.service_account_kubeconfig(NS, SA)?;
    let status = list_secrets_status(cp, &kubeconfig, NS)?;
    ensure!(status == 403, "list secrets with the token: HTTP {status}");

    cp.apply(&format!(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: secret-reader, namespace: {NS}}}
rules:
- apiGroups: [""]
  resources: [secrets]
  verbs: [list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: secret-reader, namespace: {NS}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: secret-reader}}
subjects:
- {{kind: ServiceAccount, name: {SA}, namespace: {NS}}}
"#
    ))?;
    // The RBAC authorizer reads bindings from an informer: allowed a moment later.
    poll(
        "the RoleBinding to take effect",
        Duration::from_secs(10),
        || Ok(list_secrets_status(cp, &kubeconfig, NS)? == 200),
    )?;
    ensure!(can_list(NS)? == "yes", "can-i after the binding");
    ensure!(can_list("default")? == "no", "can-i in another namespace");
    let elsewhere = list_secrets_status(cp, &kubeconfig, "default")?;
    ensure!(
        elsewhere == 403,
        "list secrets in default: HTTP {elsewhere}"
    );
    Ok(())
}

/// The HTTP status of listing secrets in `ns` with the credentials of `kubeconfig`.
fn list_secrets_status(cp: &ControlPlane, kubeconfig: &Path, ns: &str) -> Result<u16> {
    cp.block_on_as(kubeconfig, |client| async move {
        match Api::<Secret>::namespaced(client, ns)
            .list(&ListParams::default())
            .await
        {
            Ok(_) => Ok(200),
            Err(kube::Error::Api(status)) => Ok(status.code),
            Err(e) => Err(e).context("list secrets"),
        }
    })
}

/// A token from the TokenRequest API authenticates as its ServiceAccount; the same token
/// with its signature altered does not.
fn token_review_works(cp: &ControlPlane) -> Result<()> {
    let token = cp.service_account_token(NS, SA)?;
    let user = review(cp, &token)?.context("the fresh token was not authenticated")?;
    ensure!(
        user.username.as_deref() == Some(&format!("system:serviceaccount:{NS}:{SA}")),
        "user: {user:?}"
    );
    let groups = user.groups.unwrap_or_default();
    ensure!(
        groups.iter().any(|g| g == "system:serviceaccounts"),
        "groups: {groups:?}"
    );

    // The first character of the signature (the last one may carry only padding bits).
    let at = token.rfind('.').context("the token is no JWT")? + 1;
    let mut forged = token.into_bytes();
    let c = forged.get_mut(at).context("the token has no signature")?;
    *c = if *c == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged)?;
    ensure!(
        review(cp, &forged)?.is_none(),
        "a token with a broken signature was authenticated"
    );
    Ok(())
}

/// Who the API server says `token` is (None: not authenticated).
fn review(cp: &ControlPlane, token: &str) -> Result<Option<UserInfo>> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviewed = cp.block_on(|client| async move {
        Api::<TokenReview>::all(client)
            .create(&PostParams::default(), &request)
            .await
            .context("create TokenReview")
    })?;
    let status = reviewed.status.context("TokenReview without status")?;
    Ok(match status.authenticated {
        Some(true) => Some(status.user.context("authenticated without user")?),
        _ => None,
    })
}

/// A node's kubeconfig is user `system:node:<name>` in `system:nodes`, and the Node
/// authorizer gives it no secrets it has no pod for.
fn node_credentials_are_restricted(cp: &ControlPlane) -> Result<()> {
    let kubeconfig = cp.node_kubeconfig("node-a")?.to_owned();
    let review = cp.block_on_as(&kubeconfig, |client| async move {
        Api::<SelfSubjectReview>::all(client)
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await
            .context("create SelfSubjectReview")
    })?;
    let user = review
        .status
        .and_then(|s| s.user_info)
        .context("SelfSubjectReview without user")?;
    ensure!(
        user.username.as_deref() == Some("system:node:node-a"),
        "user: {user:?}"
    );
    ensure!(
        user.groups
            .unwrap_or_default()
            .iter()
            .any(|g| g == "system:nodes"),
        "not in system:nodes"
    );
    let status = list_secrets_status(cp, &kubeconfig, NS)?;
    ensure!(status == 403, "node lists secrets: HTTP {status}");
    Ok(())
}

/// A CRD's structural schema is enforced: a conforming object is stored, others rejected.
fn crd_schema_is_enforced(cp: &ControlPlane) -> Result<()> {
    cp.apply(
        r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.mesh-tests.example}
spec:
  group: mesh-tests.example
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 10}
"#,
    )?;
    cp.wait_for(
        "condition=Established",
        ["crd/widgets.mesh-tests.example"],
        Duration::from_secs(30),
    )?;
    let widget = |name: &str, size: &str| {
        format!(
            "apiVersion: mesh-tests.example/v1\nkind: Widget\n\
             metadata: {{name: {name}, namespace: {NS}}}\nspec: {{size: {size}}}\n"
        )
    };
    cp.apply(&widget("small", "3"))?;
    for (name, bad) in [("huge", "100"), ("vague", "\"big\"")] {
        let Err(e) = cp.apply(&widget(name, bad)) else {
            bail!("a Widget with size {bad} was accepted");
        };
        let message = format!("{e:#}");
        ensure!(
            message.contains("spec.size"),
            "rejected for another reason: {message}"
        );
    }
    let stored = cp.kubectl(["get", "widgets", "-n", NS, "-o", "name"])?;
    ensure!(
        stored.stdout_str().trim() == "widget.mesh-tests.example/small",
        "stored widgets: {}",
        stored.stdout_str()
    );
    Ok(())
}

/// kube-controller-manager turns a Deployment into a ReplicaSet and Pods; kube-scheduler
/// finds no Node for them (none is registered), so they stay Pending, marked unschedulable.
fn deployment_gets_pods(cp: &ControlPlane) -> Result<()> {
    cp.apply(&format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {NS}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - {{name: web, image: registry.invalid/web:1}}
"#
    ))?;
    let mut last = String::new();
    let done = poll(
        "2 unschedulable pods of deployment web",
        Duration::from_secs(60),
        || {
            let (replica_sets, pods) = cp.block_on(|client: Client| async move {
                let selector = ListParams::default().labels("app=web");
                let rs = Api::<ReplicaSet>::namespaced(client.clone(), NS)
                    .list(&selector)
                    .await?;
                let pods = Api::<Pod>::namespaced(client, NS).list(&selector).await?;
                Ok((rs.items, pods.items))
            })?;
            last = format!("{} replica sets, {} pods", replica_sets.len(), pods.len());
            Ok(deployment_settled(&replica_sets, &pods))
        },
    );
    done.with_context(|| format!("last seen: {last}"))
}

/// One ReplicaSet owned by Deployment `web`, owning both pods, each Pending without a node
/// and marked `PodScheduled=False` (`Unschedulable`) by the scheduler.
fn deployment_settled(replica_sets: &[ReplicaSet], pods: &[Pod]) -> bool {
    let [rs] = replica_sets else {
        return false;
    };
    let owned_by = |refs: &Option<Vec<_>>, kind: &str, name: &str| {
        refs.iter().flatten().any(
            |r: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference| {
                r.kind == kind && r.name == name && r.controller == Some(true)
            },
        )
    };
    let rs_name = rs.metadata.name.clone().unwrap_or_default();
    owned_by(&rs.metadata.owner_references, "Deployment", "web")
        && pods.len() == 2
        && pods.iter().all(|p| {
            let status = p.status.clone().unwrap_or_default();
            let unschedulable = status.conditions.iter().flatten().any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            });
            owned_by(&p.metadata.owner_references, "ReplicaSet", &rs_name)
                && status.phase.as_deref() == Some("Pending")
                && p.spec.as_ref().is_some_and(|s| s.node_name.is_none())
                && unschedulable
        })
}

fn report_memory(cp: &ControlPlane) -> Result<()> {
    let memory = cp.resident_memory()?;
    let total: u64 = memory.iter().map(|(_, bytes)| bytes).sum();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let each: Vec<String> = memory
        .iter()
        .map(|(name, bytes)| format!("{name} {:.0} MiB", mib(*bytes)))
        .collect();
    eprintln!(
        "control plane resident memory: {} (total {:.0} MiB)",
        each.join(", "),
        mib(total)
    );
    Ok(())
}

/// What a cluster made outside its workdir and must remove: the control plane's netns and
/// processes, and the scratch dir.
struct Leftovers {
    netns: PathBuf,
    cgroup: PathBuf,
    pids: Vec<u32>,
    workdir: PathBuf,
}

impl Leftovers {
    fn of(kc: &KubeCluster) -> Result<Leftovers> {
        let cp = kc.control_plane();
        let procs = cp.cgroup().join("cgroup.procs");
        let pids = fs::read_to_string(&procs)
            .with_context(|| format!("read {}", procs.display()))?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<Vec<u32>, _>>()?;
        ensure!(pids.len() >= 4, "control plane processes: {pids:?}");
        Ok(Leftovers {
            netns: cp.netns_path(),
            cgroup: cp.cgroup().to_owned(),
            pids,
            workdir: kc.cluster().workdir().to_owned(),
        })
    }

    fn check_gone(&self) -> Result<()> {
        let alive: BTreeMap<u32, String> = self
            .pids
            .iter()
            .filter_map(|pid| {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                Some((*pid, comm.trim().to_owned()))
            })
            .collect();
        ensure!(alive.is_empty(), "still running after teardown: {alive:?}");
        for path in [&self.netns, &self.cgroup, &self.workdir] {
            ensure!(!path.exists(), "{} still exists", path.display());
        }
        Ok(())
    }
}

/// Calls `cond` until it holds; fails after `timeout`.
fn poll(what: &str, timeout: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond()? {
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}");
        }
        thread::sleep(POLL);
    }
    Ok(())
}
