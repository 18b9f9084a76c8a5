//! How long new pods of the agent's node take to be enrolled: real pods, run by the harness
//! kubelet of node-a, created one after the other at a steady pace (as a rollout makes them)
//! in an ambient namespace of their own.
//!
//! Per pod, on the machine's one clock: **created**, when the API server answered its
//! creation; **served**, the `timestamp` of the agent's `workload served` line for it (its
//! listeners up in the pod's netns, its inbound captured); **Running**, when a watch of
//! mesh-bench's on the namespace received the pod's status with `phase: Running`, i.e. when
//! the API announced it to every watcher. The pod's own timestamps (`status.startTime`, the
//! Ready condition's `lastTransitionTime`, `startedAt`) have whole seconds only, too coarse
//! for this. In ambient mode the CNI ADD of the pod's sandbox waits for the agent to serve the
//! pod before its containers start, so a pod is served *before* it is Running: the interval
//! reported is served → Running (how long before the API shows the pod Running its traffic
//! is already captured), next to created → served (the whole enrolment: scheduling, the
//! kubelet's sandbox, the CNI chain, the agent).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use mesh_tests::interrupt;
use mesh_tests::kube::KubeMesh;
use serde_json::json;

use super::probe::Agent;

/// Pods per measurement.
pub const LOCAL_PODS: usize = 50;
/// One pod created every this long.
pub const PACE: Duration = Duration::from_millis(200);
/// From the last creation until every pod is Running.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(120);
/// From every pod Running until the agent has logged each one served (it already has: the
/// CNI ADD waited for it; this only covers the log's flushing).
const SERVED_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

/// One pod's instants (see the module's doc).
#[derive(Debug, Clone, Copy)]
pub struct PodTimes {
    pub created: SystemTime,
    pub running: SystemTime,
    pub served: SystemTime,
}

/// `to − from` in ms, negative when `to` is earlier.
fn ms(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

impl PodTimes {
    pub fn created_to_served_ms(&self) -> f64 {
        ms(self.created, self.served)
    }
    pub fn served_to_running_ms(&self) -> f64 {
        ms(self.served, self.running)
    }
    pub fn created_to_running_ms(&self) -> f64 {
        ms(self.created, self.running)
    }
}

/// One measurement: the pods of a namespace, by name.
#[derive(Debug, Clone, Default)]
pub struct Enrolment {
    pub namespace: String,
    pub pods: BTreeMap<String, PodTimes>,
}

/// Creates [`LOCAL_PODS`] pods on node-a in the ambient namespace `namespace` (made here, with
/// ServiceAccount `local`), one every [`PACE`], and takes their instants.
pub fn measure(agent: &Agent, namespace: &str) -> Result<Enrolment> {
    let mesh = agent.mesh;
    mesh.apply(&format!(
        r#"
apiVersion: v1
kind: Namespace
metadata:
  name: {namespace}
  labels: {{istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: local, namespace: {namespace}}}
"#
    ))?;
    let ns = namespace.to_owned();
    let seen = mesh
        .kube()
        .control_plane()
        .block_on(move |client| create_and_watch(client, ns))
        .with_context(|| format!("the pods of {namespace}"))?;
    let served = wait_served(agent, namespace, seen.len())?;
    let pods = seen
        .into_iter()
        .map(|(name, (created, running))| {
            let workload = format!("{namespace}/{name}");
            let served = *served
                .get(&workload)
                .with_context(|| format!("the agent never served {workload}"))?;
            let times = PodTimes {
                created,
                running,
                served,
            };
            Ok((name, times))
        })
        .collect::<Result<_>>()?;
    Ok(Enrolment {
        namespace: namespace.to_owned(),
        pods,
    })
}

/// Deletes the namespace and waits until its pods are gone, so that they are not the agent's
/// to serve in what is measured next.
pub fn remove(mesh: &KubeMesh, namespace: &str) -> Result<()> {
    mesh.kube()
        .control_plane()
        .delete(["namespace", namespace, "--wait=true", "--timeout=120s"])
}

fn pod_object(name: &str) -> Result<Pod> {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "local"}},
        "spec": {
            "serviceAccountName": "local",
            "nodeSelector": {"kubernetes.io/hostname": super::AGENT_NODE},
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "3650d"]}],
        },
    }))
    .context("build the pod object")
}

/// Creates the pods at [`PACE`] while watching the namespace; each pod's creation and first
/// Running instants, once all are Running.
async fn create_and_watch(
    client: Client,
    namespace: String,
) -> Result<BTreeMap<String, (SystemTime, SystemTime)>> {
    let api: Api<Pod> = Api::namespaced(client, &namespace);
    let running: RefCell<BTreeMap<String, SystemTime>> = RefCell::default();
    let watch = async {
        let mut pods = watcher(api.clone(), watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(pod) = pods.try_next().await.context("watch the pods")? {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if let (Some("Running"), Some(name)) = (phase, pod.metadata.name) {
                running
                    .borrow_mut()
                    .entry(name)
                    .or_insert_with(SystemTime::now);
            }
        }
        bail!("the pod watch ended")
    };
    let create = async {
        let mut created = BTreeMap::new();
        for i in 0..LOCAL_PODS {
            interrupt::check()?;
            let name = format!("local-{i:02}");
            api.create(&PostParams::default(), &pod_object(&name)?)
                .await
                .with_context(|| format!("create pod {namespace}/{name}"))?;
            created.insert(name, SystemTime::now());
            tokio::time::sleep(PACE).await;
        }
        let deadline = Instant::now() + RUNNING_TIMEOUT;
        while running.borrow().len() < LOCAL_PODS {
            interrupt::check()?;
            if Instant::now() > deadline {
                bail!(
                    "{} of {LOCAL_PODS} pods Running after {RUNNING_TIMEOUT:?}",
                    running.borrow().len()
                );
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(created)
    };
    let created = tokio::select! {
        created = create => created?,
        ended = watch => return ended,
    };
    let running = running.into_inner();
    created
        .into_iter()
        .map(|(name, at)| {
            let run = *running
                .get(&name)
                .with_context(|| format!("pod {name} was never seen Running"))?;
            Ok((name, (at, run)))
        })
        .collect()
}

/// The first `workload served` instant of each of the namespace's workloads, once there are
/// `n`.
fn wait_served(agent: &Agent, namespace: &str, n: usize) -> Result<BTreeMap<String, SystemTime>> {
    let prefix = format!("{namespace}/");
    let deadline = Instant::now() + SERVED_TIMEOUT;
    loop {
        let mut served = BTreeMap::new();
        for (at, line) in agent.log_lines("workload served")? {
            if let Some(w) = line["workload"].as_str().filter(|w| w.starts_with(&prefix)) {
                served.entry(w.to_owned()).or_insert(at);
            }
        }
        if served.len() >= n {
            return Ok(served);
        }
        if Instant::now() > deadline {
            bail!(
                "the agent logged {} of the {n} pods of {namespace} served; {}",
                served.len(),
                agent.mesh.cluster().agent_log_tail(agent.node)
            );
        }
        std::thread::sleep(POLL);
    }
}
