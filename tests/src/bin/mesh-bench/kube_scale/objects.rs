//! The objects of the scale set, made through the API with kube-rs (many requests in flight,
//! from the control plane's netns): Nodes that no kubelet serves, kept alive through their
//! Leases; ambient Namespaces, ServiceAccounts, Services; Pods bound to those Nodes, and
//! their status as a kubelet would report it (Running, addresses, Ready), so that the agent
//! takes them for mesh workloads and the endpointslice controller gives each Service its
//! endpoints.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use mesh_tests::interrupt;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;

pub const NAMESPACES: usize = 10;
pub const SERVICES: usize = 1_000;
pub const PODS_PER_SERVICE: usize = 10;
pub const PODS: usize = SERVICES * PODS_PER_SERVICE;
pub const FAKE_NODES: usize = 20;
const SERVICES_PER_NAMESPACE: usize = SERVICES / NAMESPACES;
/// Requests in flight at once: enough to keep the API server busy on two cores, few enough
/// that the agent and the controllers still get CPU time.
const CONCURRENCY: usize = 32;
/// A progress line every this many objects.
const PROGRESS_EVERY: usize = 2_000;
/// The field manager of what the benchmark applies.
const FIELD_MANAGER: &str = "mesh-bench";
/// Kubelet's defaults: renew every 10 s; the node lifecycle controller gives up on a Node
/// after 40 s without a renewal (then it taints it and marks its pods not ready).
const LEASE_RENEW: Duration = Duration::from_secs(10);
const LEASE_DURATION_SECONDS: i32 = 40;
/// Never run: there is no kubelet for the fake nodes. Only the field is required.
const IMAGE: &str = "registry.k8s.io/pause:3.10";
/// The pods' container port, and the Services' target port.
const APP_PORT: u16 = 8080;

/// How long one kind of object took to make.
#[derive(Debug, Clone)]
pub struct Step {
    pub what: &'static str,
    pub count: usize,
    pub secs: f64,
}

impl Step {
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.secs.max(1e-9)
    }
}

/// Pod number `i` (0-based) of the scale set; Service `i / PODS_PER_SERVICE` selects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalePod(pub usize);

impl ScalePod {
    fn service(self) -> ScaleService {
        ScaleService(self.0 / PODS_PER_SERVICE)
    }
    pub fn namespace(self) -> String {
        self.service().namespace()
    }
    pub fn name(self) -> String {
        format!("{}-{}", self.service().name(), self.0 % PODS_PER_SERVICE)
    }
    fn node(self) -> usize {
        self.0 % FAKE_NODES
    }
    /// Its addresses in `generation` (0: as created; each churn gives new ones):
    /// 10.(200 + generation).x.y and fd00:(200 + generation)::n, unique within a generation.
    pub fn ips(self, generation: usize) -> (String, String) {
        let n = self.0 + 1;
        (
            format!("10.{}.{}.{}", 200 + generation, n >> 8, n & 0xff),
            format!("fd00:{:x}::{n:x}", 0x200 + generation),
        )
    }
}

/// The highest generation [`ScalePod::ips`] can number (10.255.0.0/16 is the fabric's).
pub const MAX_GENERATION: usize = 54;

/// Service number `k` of the scale set: `app-<k mod 100>` in namespace `scale-<k / 100>`.
#[derive(Debug, Clone, Copy)]
struct ScaleService(usize);

impl ScaleService {
    fn namespace(self) -> String {
        namespace_name(self.0 / SERVICES_PER_NAMESPACE)
    }
    fn name(self) -> String {
        format!("app-{}", self.0 % SERVICES_PER_NAMESPACE)
    }
}

fn namespace_name(n: usize) -> String {
    format!("scale-{n}")
}

/// Whether a namespace is one of the scale set's.
pub fn is_scale_namespace(ns: &str) -> bool {
    ns.strip_prefix("scale-")
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n < NAMESPACES)
}

fn node_name(n: usize) -> String {
    format!("fake-{n:02}")
}

/// The fake nodes' InternalIPs: 10.199.0.0/24, on no network (and below the pods' ranges).
fn node_ip(n: usize) -> String {
    format!("10.199.0.{}", n + 1)
}

/// `f(i)` for every `i` in `0..n`, [`CONCURRENCY`] at a time; how long it took. Stops at the
/// first error, or at Ctrl-C.
async fn in_parallel<F, Fut>(what: &'static str, n: usize, f: F) -> Result<Step>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let began = Instant::now();
    let mut done = 0;
    let mut results = futures::stream::iter(0..n)
        .map(f)
        .buffer_unordered(CONCURRENCY);
    while let Some(result) = results.next().await {
        result?;
        interrupt::check()?;
        done += 1;
        if done % PROGRESS_EVERY == 0 && done < n {
            eprintln!("mesh-bench: kubernetes: {what}: {done}/{n}");
        }
    }
    let step = Step {
        what,
        count: n,
        secs: began.elapsed().as_secs_f64(),
    };
    eprintln!(
        "mesh-bench: kubernetes: {what}: {n} in {:.1} s ({:.0}/s)",
        step.secs,
        step.per_second()
    );
    Ok(step)
}

fn typed<K: DeserializeOwned>(value: Value) -> Result<K> {
    serde_json::from_value(value).context("build an object")
}

/// Now, as the API's `Time` (seconds) serializes it.
fn now() -> Result<Value> {
    serde_json::to_value(Time(Timestamp::now())).context("serialize a time")
}

// ---------------------------------------------------------------- the fake nodes

/// Creates the fake Nodes, unschedulable (the scheduler must not bind the real pods there)
/// and without `kubernetes.io/os` (so the agent's DaemonSet, which selects `linux` nodes,
/// makes no pods for them), with a Ready status, as a kubelet registers its node.
pub async fn create_nodes(client: &Client) -> Result<Step> {
    let nodes: Api<Node> = Api::all(client.clone());
    let now = now()?;
    in_parallel("nodes", FAKE_NODES, |n| {
        let (nodes, now) = (&nodes, &now);
        async move {
            let name = node_name(n);
            let node = typed::<Node>(json!({
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                "spec": {"unschedulable": true},
            }))?;
            nodes
                .create(&PostParams::default(), &node)
                .await
                .with_context(|| format!("create Node {name}"))?;
            let capacity = json!({"cpu": "8", "memory": "16Gi", "pods": "1000"});
            let status = json!({"status": {
                "addresses": [
                    {"type": "InternalIP", "address": node_ip(n)},
                    {"type": "Hostname", "address": name},
                ],
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "mesh-bench keeps this node's lease",
                    "lastHeartbeatTime": now, "lastTransitionTime": now,
                }],
            }});
            nodes
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                .await
                .with_context(|| format!("set the status of Node {name}"))?;
            Ok(())
        }
    })
    .await
}

/// Renews the fake Nodes' Leases every 10 s until `stop`, as their kubelets would: without
/// it the node lifecycle controller would mark the 10,000 pods not ready after 40 s, and
/// evict them later. A failed renewal is reported and tried again at the next round.
pub async fn keep_nodes_alive(client: Client, mut stop: watch::Receiver<bool>) {
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        for n in 0..FAKE_NODES {
            if let Err(e) = renew_lease(&leases, &node_name(n)).await {
                eprintln!(
                    "mesh-bench: kubernetes: renew the lease of {}: {e:#}",
                    node_name(n)
                );
            }
        }
        if tokio::time::timeout(LEASE_RENEW, stop.wait_for(|s| *s))
            .await
            .is_ok()
        {
            return;
        }
    }
}

async fn renew_lease(leases: &Api<Lease>, node: &str) -> Result<()> {
    let renewed = serde_json::to_value(MicroTime(Timestamp::now()))?;
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": node, "namespace": "kube-node-lease"},
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": LEASE_DURATION_SECONDS,
            "renewTime": renewed,
        },
    });
    leases
        .patch(
            node,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(lease),
        )
        .await
        .with_context(|| format!("apply Lease kube-node-lease/{node}"))?;
    Ok(())
}

// ---------------------------------------------------------------- namespaces, services

/// The scale set's namespaces, in the mesh (`istio.io/dataplane-mode=ambient`).
pub async fn create_namespaces(client: &Client) -> Result<Step> {
    let api: Api<Namespace> = Api::all(client.clone());
    in_parallel("namespaces", NAMESPACES, |n| {
        let api = &api;
        async move {
            let name = namespace_name(n);
            let ns = typed::<Namespace>(json!({
                "metadata": {"name": name, "labels": {"istio.io/dataplane-mode": "ambient"}},
            }))?;
            api.create(&PostParams::default(), &ns)
                .await
                .with_context(|| format!("create Namespace {name}"))?;
            Ok(())
        }
    })
    .await
}

/// One ServiceAccount per Service, named like it: each app has an identity of its own.
pub async fn create_service_accounts(client: &Client) -> Result<Step> {
    in_parallel("service accounts", SERVICES, |k| {
        let client = client.clone();
        async move {
            let svc = ScaleService(k);
            let api: Api<ServiceAccount> = Api::namespaced(client, &svc.namespace());
            let sa = typed::<ServiceAccount>(json!({"metadata": {"name": svc.name()}}))?;
            api.create(&PostParams::default(), &sa)
                .await
                .with_context(|| {
                    format!("create ServiceAccount {}/{}", svc.namespace(), svc.name())
                })?;
            Ok(())
        }
    })
    .await
}

/// Service `app-<k>`: port 80 → 8080 (`http`), selecting `app: app-<k>` (its 10 pods).
pub async fn create_services(client: &Client) -> Result<Step> {
    in_parallel("services", SERVICES, |k| {
        let client = client.clone();
        async move {
            let svc = ScaleService(k);
            let api: Api<Service> = Api::namespaced(client, &svc.namespace());
            let object = typed::<Service>(json!({
                "metadata": {"name": svc.name()},
                "spec": {
                    "selector": {"app": svc.name()},
                    "ports": [{"name": "http", "port": 80, "targetPort": APP_PORT}],
                },
            }))?;
            api.create(&PostParams::default(), &object)
                .await
                .with_context(|| format!("create Service {}/{}", svc.namespace(), svc.name()))?;
            Ok(())
        }
    })
    .await
}

// ---------------------------------------------------------------- pods

/// The pods, bound to the fake nodes (`spec.nodeName`: the scheduler is not involved), with
/// their app's label and ServiceAccount.
pub async fn create_pods(client: &Client) -> Result<Step> {
    in_parallel("pods", PODS, |i| {
        let client = client.clone();
        async move {
            let pod = ScalePod(i);
            let svc = pod.service();
            let api: Api<Pod> = Api::namespaced(client, &pod.namespace());
            let object = typed::<Pod>(json!({
                "metadata": {"name": pod.name(), "labels": {"app": svc.name()}},
                "spec": {
                    "nodeName": node_name(pod.node()),
                    "serviceAccountName": svc.name(),
                    "containers": [{
                        "name": "app",
                        "image": IMAGE,
                        "ports": [{"name": "http", "containerPort": APP_PORT}],
                    }],
                },
            }))?;
            api.create(&PostParams::default(), &object)
                .await
                .with_context(|| format!("create Pod {}/{}", pod.namespace(), pod.name()))?;
            Ok(())
        }
    })
    .await
}

/// Each pod's status as its kubelet would write it once the pod runs: phase Running, its
/// node's address, its own (generation 0), started and Ready.
pub async fn start_pods(client: &Client) -> Result<Step> {
    let now = now()?;
    in_parallel("pod statuses (Running, Ready)", PODS, |i| {
        let (client, now) = (client.clone(), &now);
        async move {
            let pod = ScalePod(i);
            let (v4, v6) = pod.ips(0);
            let host = node_ip(pod.node());
            let conditions = [
                "PodReadyToStartContainers",
                "Initialized",
                "ContainersReady",
                "Ready",
                "PodScheduled",
            ]
            .map(|kind| json!({"type": kind, "status": "True", "lastTransitionTime": now}));
            let status = json!({"status": {
                "phase": "Running",
                "hostIP": host,
                "hostIPs": [{"ip": host}],
                "podIP": v4,
                "podIPs": [{"ip": v4}, {"ip": v6}],
                "startTime": now,
                "conditions": conditions,
                "containerStatuses": [{
                    "name": "app", "image": IMAGE, "imageID": "", "ready": true, "started": true,
                    "restartCount": 0, "state": {"running": {"startedAt": now}},
                }],
            }});
            patch_pod_status(client, pod, status).await
        }
    })
    .await
}

/// New addresses (`generation`) for `pods`, through the status as a kubelet reports a
/// recreated sandbox's: a churn the agent and the endpointslice controller both follow.
pub async fn readdress_pods(client: &Client, pods: &[ScalePod], generation: usize) -> Result<Step> {
    ensure!(
        (1..=MAX_GENERATION).contains(&generation),
        "address generation {generation} out of range"
    );
    in_parallel("pod address changes", pods.len(), |i| {
        let (client, pod) = (client.clone(), pods[i]);
        async move {
            let (v4, v6) = pod.ips(generation);
            let status = json!({"status": {"podIP": v4, "podIPs": [{"ip": v4}, {"ip": v6}]}});
            patch_pod_status(client, pod, status).await
        }
    })
    .await
}

async fn patch_pod_status(client: Client, pod: ScalePod, status: Value) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client, &pod.namespace());
    api.patch_status(&pod.name(), &PatchParams::default(), &Patch::Merge(status))
        .await
        .with_context(|| format!("patch the status of Pod {}/{}", pod.namespace(), pod.name()))?;
    Ok(())
}

/// How many of the scale set's Services have all their pods as ready endpoints in their
/// EndpointSlices: how far the endpointslice controller has caught up with the pods.
pub async fn complete_services(client: &Client) -> Result<usize> {
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let list = slices
        .list(&ListParams::default())
        .await
        .context("list EndpointSlices")?;
    let mut ready: std::collections::HashMap<(String, String), usize> = Default::default();
    for slice in list.items {
        let Some(ns) = slice
            .metadata
            .namespace
            .clone()
            .filter(|ns| is_scale_namespace(ns))
        else {
            continue;
        };
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
            .cloned()
        else {
            continue;
        };
        let n = slice
            .endpoints
            .iter()
            .flatten()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .count();
        *ready.entry((ns, svc)).or_default() += n;
    }
    Ok(ready.values().filter(|&&n| n == PODS_PER_SERVICE).count())
}

/// The EndpointSlice changes of the scale set a watch of mesh-bench's received.
#[derive(Debug, Clone, Copy, Default)]
pub struct SliceChanges {
    pub count: usize,
    /// When the last one arrived.
    pub last: Option<SystemTime>,
}

/// Watches the EndpointSlices (from the current version: no list) until `stop`: when the API
/// delivered the endpointslice controller's last change, which no watcher can have before.
/// `ready` is told once the watch is open.
pub async fn watch_slice_changes(
    client: Client,
    ready: std::sync::mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> Result<SliceChanges> {
    let api: Api<EndpointSlice> = Api::all(client);
    let version = api
        .list(&ListParams::default().limit(1))
        .await
        .context("list EndpointSlices")?
        .metadata
        .resource_version
        .context("an EndpointSlice list without a resourceVersion")?;
    let mut events = api
        .watch(&WatchParams::default(), &version)
        .await
        .context("watch EndpointSlices")?
        .boxed();
    let _ = ready.send(());
    let mut seen = SliceChanges::default();
    loop {
        let event = tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(seen),
            event = events.next() => event,
        };
        match event.context("the EndpointSlice watch ended")?? {
            WatchEvent::Added(slice) | WatchEvent::Modified(slice)
                if slice
                    .metadata
                    .namespace
                    .as_deref()
                    .is_some_and(is_scale_namespace) =>
            {
                seen.count += 1;
                seen.last = Some(SystemTime::now());
            }
            WatchEvent::Error(e) => bail!("the EndpointSlice watch failed: {e:?}"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_spread_over_services_namespaces_and_nodes() {
        let p = ScalePod(1234);
        assert_eq!(p.namespace(), "scale-1");
        assert_eq!(p.name(), "app-23-4");
        assert_eq!(node_name(p.node()), "fake-14");
        assert_eq!(ScalePod(PODS - 1).namespace(), "scale-9");
        assert_eq!(ScalePod(PODS - 1).name(), "app-99-9");
    }

    #[test]
    fn addresses_are_unique_per_generation() {
        assert_eq!(
            ScalePod(0).ips(0),
            ("10.200.0.1".to_owned(), "fd00:200::1".to_owned())
        );
        assert_eq!(
            ScalePod(PODS - 1).ips(3),
            ("10.203.39.16".to_owned(), "fd00:203::2710".to_owned())
        );
        let all: std::collections::HashSet<_> = (0..PODS).map(|i| ScalePod(i).ips(1)).collect();
        assert_eq!(all.len(), PODS);
    }

    #[test]
    fn scale_namespaces() {
        assert!(is_scale_namespace("scale-0") && is_scale_namespace("scale-9"));
        assert!(!is_scale_namespace("scale-10") && !is_scale_namespace("default"));
    }
}
