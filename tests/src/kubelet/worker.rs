//! One pod's worker, as kubelet's pod workers: it drives the pod towards its spec (sandbox,
//! containers, restarts, readiness), reports its status, and on deletion stops it, tears the
//! sandbox down and lets the API server remove the object.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource as _};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::cgroups::container_cgroup;
use super::container::{self, Exit, Placement};
use super::probe::Prober;
use super::sandbox::{self, ContainerRecord, RunRecord, SandboxRecord};
use super::{Ctx, blocking, status};
use crate::sys;

/// Kubelet waits at most this long for a deleted pod's processes to exit after SIGTERM
/// (the pod's own grace period, 30 s by default, would only slow tests down).
const MAX_GRACE: Duration = Duration::from_secs(5);
/// Kubelet re-syncs a pod this often even when nothing happened.
const RESYNC: Duration = Duration::from_secs(10);
/// Crash-loop backoff (kubelet's): the first restart at once, then 10 s doubling up to 5 min,
/// forgotten once a run lasted 10 min.
const BACKOFF_BASE: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
const BACKOFF_RESET: SignedDuration = SignedDuration::from_secs(600);
/// Retries of a failed sandbox creation or teardown: 1 s doubling up to 10 s (kubelet retries
/// a failed pod sync every 10 s; starting lower lets a pod start soon after, say, the mesh
/// agent whose absence made mesh-cni fail).
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Events carry at most 1 kB of message.
const NOTE_MAX: usize = 1000;

/// What a pod's background tasks tell its worker.
enum Signal {
    /// A container's run ended.
    Exited { run: String, exit: Exit },
    /// A container's readiness probe changed its verdict.
    Ready { run: String, ready: bool },
}

/// A task that is aborted when its handle goes (a container's exit watcher or prober).
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A container of the pod, by name.
#[derive(Default)]
struct Ctr {
    /// What is kept on disk of it (restarts, last exit, current run).
    rec: ContainerRecord,
    /// Its readiness probe passed (or it has none), for the current run.
    ready: bool,
    /// Why it cannot be created (`CreateContainerConfigError`).
    config_error: Option<String>,
    /// Back-to-back crashes, for the backoff, and no restart before `not_before`.
    crashes: u32,
    not_before: Option<Instant>,
    /// The current run's exit watcher and prober.
    tasks: Vec<Task>,
}

/// Failures in a row of something retried (sandbox creation, teardown, API deletion).
#[derive(Default)]
struct Retry {
    failures: u32,
    not_before: Option<Instant>,
}

impl Retry {
    fn due(&self) -> bool {
        self.not_before.is_none_or(|t| Instant::now() >= t)
    }
    fn failed(&mut self) {
        let delay = RETRY_BASE
            .saturating_mul(1 << self.failures.min(8))
            .min(RETRY_MAX);
        self.failures += 1;
        self.not_before = Some(Instant::now() + delay);
    }
    fn succeeded(&mut self) {
        *self = Retry::default();
    }
}

pub(crate) struct Worker {
    ctx: Arc<Ctx>,
    uid: String,
    /// The pod's latest version; kept once it is gone, for the teardown.
    pod: Option<Arc<Pod>>,
    /// The API no longer has the pod (or the kubelet stops with `--cleanup-on-exit`).
    gone: bool,
    updates: watch::Receiver<Option<Arc<Pod>>>,
    signals: mpsc::UnboundedSender<Signal>,
    signals_rx: mpsc::UnboundedReceiver<Signal>,
    sandbox: Option<SandboxRecord>,
    sandbox_error: Option<String>,
    retry: Retry,
    containers: BTreeMap<String, Ctr>,
    /// The pod reached a terminal phase: its status is final and nothing runs any more.
    done: bool,
    start_time: Time,
    /// The last status written, so an unchanged one is not written again.
    published: Option<Value>,
    /// Warnings already given as events (once each).
    warned: BTreeSet<String>,
}

impl Worker {
    /// A worker for pod `uid`; it adopts the pod's sandbox and containers if a record of them
    /// exists (an earlier kubelet made them).
    pub(crate) fn new(
        ctx: Arc<Ctx>,
        uid: String,
        updates: watch::Receiver<Option<Arc<Pod>>>,
    ) -> Self {
        let (signals, signals_rx) = mpsc::unbounded_channel();
        let mut worker = Worker {
            ctx,
            uid,
            pod: None,
            gone: false,
            updates,
            signals,
            signals_rx,
            sandbox: None,
            sandbox_error: None,
            retry: Retry::default(),
            containers: BTreeMap::new(),
            done: false,
            start_time: Time(Timestamp::now()),
            published: None,
            warned: BTreeSet::new(),
        };
        worker.take_update();
        if let Some(status) = worker.pod.as_ref().and_then(|p| p.status.as_ref()) {
            worker.done = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
            if let Some(t) = &status.start_time {
                worker.start_time = t.clone();
            }
        }
        match SandboxRecord::load(&worker.ctx.config, &worker.uid) {
            Ok(Some(record)) => worker.adopt(record),
            Ok(None) => {}
            Err(e) => tracing::warn!("pod {}: cannot adopt its sandbox: {e:#}", worker.uid),
        }
        worker
    }

    /// Takes over a sandbox and the runs of its containers: a run whose cgroup still has
    /// processes goes on (watched through its cgroup); one that has none ended unseen.
    fn adopt(&mut self, record: SandboxRecord) {
        tracing::info!(pod = %self.uid, sandbox = %record.id, "adopting the pod's sandbox");
        for (name, rec) in &record.containers {
            let mut ctr = Ctr {
                rec: rec.clone(),
                ..Ctr::default()
            };
            if let Some(run) = &rec.run {
                if matches!(sys::cgroup_populated(&run.cgroup), Ok(true)) {
                    self.watch_run(&mut ctr, run.clone(), None);
                    let spec = self.pod.as_ref().and_then(|p| {
                        p.spec
                            .as_ref()?
                            .containers
                            .iter()
                            .find(|c| c.name == *name)
                            .cloned()
                    });
                    let probed = spec.map(|spec| self.start_prober(&mut ctr, &spec, &record));
                    if let Some(Err(e)) = probed {
                        tracing::warn!(pod = %self.uid, container = %name, "readiness probe: {e:#}");
                    }
                } else {
                    end_run(&mut ctr, Exit::Unknown);
                }
            }
            self.containers.insert(name.clone(), ctr);
        }
        self.sandbox = Some(record);
    }

    /// Runs until the pod is gone and torn down, or the kubelet stops.
    pub(crate) async fn run(mut self) {
        loop {
            if self.sync().await {
                return;
            }
            let wake = tokio::time::Instant::from_std(self.next_wake());
            tokio::select! {
                changed = self.updates.changed() => {
                    if changed.is_err() {
                        // The kubelet stops and leaves the pod as it is.
                        return;
                    }
                    self.take_update();
                }
                Some(signal) = self.signals_rx.recv() => self.handle(signal).await,
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn take_update(&mut self) {
        match self.updates.borrow_and_update().clone() {
            Some(pod) => self.pod = Some(pod),
            None => self.gone = true,
        }
    }

    /// The next time something is due: a retry, a restart after backoff, a resync.
    fn next_wake(&self) -> Instant {
        let resync = Instant::now() + RESYNC;
        self.containers
            .values()
            .filter_map(|c| c.not_before)
            .chain(self.retry.not_before)
            .filter(|t| *t > Instant::now())
            .fold(resync, Instant::min)
    }

    /// One pass towards what the pod should be; true once the worker is finished (the pod is
    /// gone and torn down).
    async fn sync(&mut self) -> bool {
        if self.gone {
            return self.tear_down().await;
        }
        let Some(pod) = self.pod.clone() else {
            return false;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            if self.tear_down().await {
                self.delete_from_api(&pod).await;
            }
            return false;
        }
        if self.done {
            // Nothing runs; a sandbox adopted from a kubelet that stopped before removing it
            // goes now.
            self.tear_down().await;
            return false;
        }
        match unsupported(&pod) {
            Some(why) => self.warn_once(&pod, "Unsupported", why).await,
            None => {
                self.ensure_sandbox(&pod).await;
                if self.sandbox.is_some() {
                    self.ensure_containers(&pod).await;
                }
            }
        }
        let status = self.status(&pod);
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) && self.tear_down().await
        {
            self.done = true;
        }
        self.publish(&pod, status).await;
        false
    }

    // ------------------------------------------------------------ sandbox

    /// Makes the sandbox unless it is up; a broken one (half made, or its netns gone) is torn
    /// down and made again, as kubelet does with a dead sandbox.
    async fn ensure_sandbox(&mut self, pod: &Pod) {
        let broken = self
            .sandbox
            .as_ref()
            .is_some_and(|s| s.cni_result.is_none() || !s.netns_path().exists());
        if (self.sandbox.is_some() && !broken) || !self.retry.due() {
            return;
        }
        if broken && !self.tear_down().await {
            return;
        }
        match sandbox::create(&self.ctx.config, pod, &self.uid).await {
            Ok(record) => {
                tracing::info!(pod = %self.uid, sandbox = %record.id, ips = ?record.ips().unwrap_or_default(), "sandbox up");
                self.sandbox = Some(record);
                self.sandbox_error = None;
                self.retry.succeeded();
            }
            Err(e) => {
                let message = format!("Failed to create pod sandbox: {e:#}");
                tracing::warn!(pod = %self.uid, "{message}");
                self.event(pod, EventType::Warning, "FailedCreatePodSandBox", &message)
                    .await;
                self.sandbox_error = Some(message);
                self.retry.failed();
            }
        }
    }

    /// Stops every container (SIGTERM, the grace period, SIGKILL) and tears the sandbox down;
    /// true when nothing of the pod is left on the node. A failure is reported and retried.
    async fn tear_down(&mut self) -> bool {
        if self.sandbox.is_none() {
            return true;
        }
        if !self.retry.due() {
            return false;
        }
        match self.try_tear_down().await {
            Ok(()) => {
                self.retry.succeeded();
                true
            }
            Err(e) => {
                let message = format!("error killing pod: {e:#}");
                tracing::warn!(pod = %self.uid, "{message}");
                if let Some(pod) = self.pod.clone() {
                    self.event(&pod, EventType::Warning, "FailedKillPod", &message)
                        .await;
                }
                self.retry.failed();
                false
            }
        }
    }

    async fn try_tear_down(&mut self) -> Result<()> {
        self.stop_containers().await?;
        if let Some(record) = &self.sandbox {
            sandbox::destroy(&self.ctx.config, record).await?;
            tracing::info!(pod = %self.uid, sandbox = %record.id, "sandbox removed");
        }
        self.sandbox = None;
        Ok(())
    }

    /// Stops the running containers and records how each run ended: the exit watchers report
    /// it once the processes are gone (within a second of SIGKILL at most).
    async fn stop_containers(&mut self) -> Result<()> {
        let cgroups: Vec<_> = self
            .containers
            .values()
            .filter_map(|c| c.rec.run.as_ref().map(|r| r.cgroup.clone()))
            .collect();
        if cgroups.is_empty() {
            return Ok(());
        }
        container::stop(cgroups, self.grace()).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.containers.values().any(|c| c.rec.run.is_some()) {
            match tokio::time::timeout_at(deadline, self.signals_rx.recv()).await {
                Ok(Some(signal)) => self.handle(signal).await,
                _ => break,
            }
        }
        for ctr in self.containers.values_mut().filter(|c| c.rec.run.is_some()) {
            end_run(ctr, Exit::Unknown);
        }
        Ok(())
    }

    /// The pod's grace period (the deletion's, else the spec's), at most [`MAX_GRACE`].
    fn grace(&self) -> Duration {
        let pod = self.pod.as_deref();
        let seconds = pod
            .and_then(|p| p.metadata.deletion_grace_period_seconds)
            .or_else(|| pod.and_then(|p| p.spec.as_ref()?.termination_grace_period_seconds))
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(30);
        Duration::from_secs(seconds).min(MAX_GRACE)
    }

    /// Once the pod's processes and sandbox are gone: deletes the object with grace period 0
    /// and a precondition on its uid (a new pod of the same name is not ours), as kubelet
    /// does. The worker ends when the watch reports the deletion.
    async fn delete_from_api(&mut self, pod: &Pod) {
        if !self.retry.due() {
            return;
        }
        let (Some(name), Some(namespace)) = (&pod.metadata.name, &pod.metadata.namespace) else {
            return;
        };
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => self.retry.succeeded(),
            // Gone already, or a different pod now (uid precondition failed).
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => self.retry.succeeded(),
            Err(e) => {
                tracing::warn!(pod = %self.uid, "delete pod {namespace}/{name}: {e}");
                self.retry.failed();
            }
        }
    }

    // ------------------------------------------------------------ containers

    /// Starts each container that should run and does not: the first time, or again after
    /// it ended when the restart policy says so and its backoff has passed.
    async fn ensure_containers(&mut self, pod: &Pod) {
        let policy = restart_policy(pod).to_owned();
        for spec in pod.spec.iter().flat_map(|s| &s.containers) {
            let ctr = self.containers.entry(spec.name.clone()).or_default();
            if ctr.rec.run.is_some() || !should_start(ctr, &policy) {
                continue;
            }
            match container::process(spec) {
                Ok(process) => {
                    ctr.config_error = None;
                    self.start(pod, spec, &process).await;
                }
                Err(message) => {
                    ctr.config_error = Some(message.clone());
                    let note = format!("Error: container {}: {message}", spec.name);
                    self.warn_once(pod, "Failed", note).await;
                }
            }
        }
    }

    /// Starts one run of a container in the sandbox, with its readiness prober. A failure to
    /// start is how the run ends (`StartError`, exit code 128, as containerd reports it).
    async fn start(&mut self, pod: &Pod, spec: &Container, process: &container::Process) {
        let Some(record) = self.sandbox.clone() else {
            return;
        };
        let mut ctr = self.containers.remove(&spec.name).unwrap_or_default();
        match self.start_run(&mut ctr, spec, process, &record) {
            Ok(cgroup) => {
                tracing::info!(pod = %self.uid, container = %spec.name, "container started");
                let note = format!("Started container {}", spec.name);
                self.event(pod, EventType::Normal, "Started", &note).await;
                if let Err(e) = self.start_prober(&mut ctr, spec, &record) {
                    let note = format!("Readiness probe of container {}: {e:#}", spec.name);
                    self.warn_once(pod, "Unhealthy", note).await;
                }
                let first = pod.spec.as_ref().and_then(|s| s.containers.first());
                if first.is_some_and(|c| c.name == spec.name)
                    && let Err(e) = record.publish(&self.ctx.config, &cgroup)
                {
                    tracing::warn!(pod = %self.uid, "write the pod state file: {e:#}");
                }
            }
            Err(e) => {
                let note = format!("Error: failed to start container {}: {e:#}", spec.name);
                self.event(pod, EventType::Warning, "Failed", &note).await;
            }
        }
        self.containers.insert(spec.name.clone(), ctr);
        self.save();
    }

    /// Makes the run's cgroup and starts its process; returns the cgroup. On failure the run
    /// is over before it began (recorded as the container's last state).
    fn start_run(
        &self,
        ctr: &mut Ctr,
        spec: &Container,
        process: &container::Process,
        record: &SandboxRecord,
    ) -> Result<std::path::PathBuf> {
        let config = &self.ctx.config;
        let id = sandbox::new_id()?;
        let cgroup = container_cgroup(&record.pod_cgroup, config.cgroup_driver, &id);
        if ctr.rec.last.is_some() {
            ctr.rec.restart_count += 1;
        }
        let log = container::log_path(
            &config.state_dir,
            [&record.namespace, &record.name, &self.uid],
            &spec.name,
            ctr.rec.restart_count,
        );
        let netns = record.netns_path();
        let at = Placement {
            cgroup: &cgroup,
            netns: &netns,
            hosts_file: &config.hosts_file,
            log: &log,
        };
        let now = Time(Timestamp::now());
        let started = sys::mkdir_all(&cgroup).and_then(|()| container::spawn(process, &at));
        let (child, program) = match started {
            Ok(started) => started,
            Err(e) => {
                let _ = std::fs::remove_dir(&cgroup);
                ctr.rec.last = Some(ContainerStateTerminated {
                    exit_code: 128,
                    reason: Some("StartError".into()),
                    message: Some(format!("{e:#}")),
                    started_at: Some(now.clone()),
                    finished_at: Some(now),
                    container_id: Some(format!("containerd://{id}")),
                    ..ContainerStateTerminated::default()
                });
                back_off(ctr);
                return Err(e);
            }
        };
        let run = RunRecord {
            id,
            cgroup: cgroup.clone(),
            started_at: now,
            image_id: format!("host://{}", program.display()),
        };
        self.watch_run(ctr, run, Some(child));
        Ok(cgroup)
    }

    /// Makes `run` the container's current run and watches for its end: through `child`
    /// (its main process, a child of this kubelet) or, for an adopted run, its cgroup.
    fn watch_run(&self, ctr: &mut Ctr, run: RunRecord, child: Option<tokio::process::Child>) {
        let (signals, id, cgroup) = (self.signals.clone(), run.id.clone(), run.cgroup.clone());
        let watcher = tokio::spawn(async move {
            let exit = match child {
                Some(child) => container::wait_child(child).await,
                None => container::wait_cgroup_empty(cgroup).await,
            };
            let _ = signals.send(Signal::Exited { run: id, exit });
        });
        ctr.tasks = vec![Task(watcher)];
        ctr.ready = false;
        ctr.rec.run = Some(run);
    }

    /// Starts the current run's readiness prober, if the container has a readiness probe;
    /// without one it is ready once started. Until the probe passes the container is not
    /// ready; one this kubelet cannot run leaves it never ready (the error says why).
    fn start_prober(&self, ctr: &mut Ctr, spec: &Container, record: &SandboxRecord) -> Result<()> {
        let Some(probe) = &spec.readiness_probe else {
            ctr.ready = true;
            return Ok(());
        };
        let run = ctr
            .rec
            .run
            .as_ref()
            .map(|r| r.id.clone())
            .context("the container is not running")?;
        let pod_ip = *record.ips()?.first().context("the pod has no address")?;
        let prober = Prober::new(probe, spec, pod_ip)?;
        let signals = self.signals.clone();
        let task = tokio::spawn(prober.run(record.netns_path(), move |ready| {
            let _ = signals.send(Signal::Ready {
                run: run.clone(),
                ready,
            });
        }));
        ctr.tasks.push(Task(task));
        Ok(())
    }

    async fn handle(&mut self, signal: Signal) {
        match signal {
            Signal::Exited { run, exit } => {
                let Some((name, ctr)) = self
                    .containers
                    .iter_mut()
                    .find(|(_, c)| c.rec.run.as_ref().is_some_and(|r| r.id == run))
                else {
                    return;
                };
                tracing::info!(pod = %self.uid, container = %name, ?exit, "container exited");
                if let Some(cgroup) = end_run(ctr, exit) {
                    // What the main process left behind goes with it, as with a PID namespace.
                    if let Err(e) = blocking(move || sys::kill_and_remove_cgroup(&cgroup)).await {
                        tracing::warn!(pod = %self.uid, "remove a container cgroup: {e:#}");
                    }
                }
                back_off(ctr);
                self.save();
            }
            Signal::Ready { run, ready } => {
                let ctr = self
                    .containers
                    .values_mut()
                    .find(|c| c.rec.run.as_ref().is_some_and(|r| r.id == run));
                if let Some(ctr) = ctr {
                    ctr.ready = ready;
                }
            }
        }
    }

    /// Writes the containers' records into the sandbox record.
    fn save(&mut self) {
        let Some(record) = &mut self.sandbox else {
            return;
        };
        record.containers = self
            .containers
            .iter()
            .map(|(name, c)| (name.clone(), c.rec.clone()))
            .collect();
        if let Err(e) = record.save(&self.ctx.config) {
            tracing::warn!(pod = %self.uid, "save the sandbox record: {e:#}");
        }
    }

    // ------------------------------------------------------------ status

    fn status(&self, pod: &Pod) -> PodStatus {
        let policy = restart_policy(pod);
        let unsupported = unsupported(pod);
        let containers: Vec<ContainerStatus> = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .map(|spec| self.container_status(spec, policy, unsupported))
            .collect();
        let phase = if self.sandbox.is_none() && !self.done {
            "Pending"
        } else {
            status::phase(policy, &containers)
        };
        let ips: Vec<IpAddr> = self
            .sandbox
            .as_ref()
            .and_then(|s| s.ips().ok())
            .unwrap_or_default();
        let node_ips = self.ctx.config.node_ips();
        let existing = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default();
        PodStatus {
            phase: Some(phase.into()),
            conditions: Some(status::merge_conditions(
                existing,
                self.conditions(&containers, unsupported),
            )),
            host_ip: Some(node_ips[0].to_string()),
            host_ips: Some(
                node_ips
                    .iter()
                    .map(|ip| HostIP { ip: ip.to_string() })
                    .collect(),
            ),
            pod_ip: ips.first().map(ToString::to_string),
            pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
            start_time: Some(self.start_time.clone()),
            container_statuses: Some(containers),
            observed_generation: pod.metadata.generation,
            ..PodStatus::default()
        }
    }

    fn conditions(
        &self,
        containers: &[ContainerStatus],
        unsupported: Option<&str>,
    ) -> Vec<k8s_openapi::api::core::v1::PodCondition> {
        let unready: Vec<&str> = containers
            .iter()
            .filter(|c| !c.ready)
            .map(|c| c.name.as_str())
            .collect();
        let ready = unready.is_empty() && !containers.is_empty();
        let (reason, message) = if ready {
            (None, None)
        } else {
            (
                Some("ContainersNotReady"),
                Some(format!(
                    "containers with unready status: [{}]",
                    unready.join(" ")
                )),
            )
        };
        let (sandbox_reason, sandbox_message) = match (unsupported, &self.sandbox_error) {
            (Some(why), _) => (Some("Unsupported"), Some(why.to_owned())),
            (None, Some(error)) => (Some("FailedCreatePodSandBox"), Some(error.clone())),
            (None, None) => (None, None),
        };
        vec![
            status::condition(
                "PodReadyToStartContainers",
                self.sandbox.is_some(),
                sandbox_reason,
                sandbox_message,
            ),
            status::condition("Initialized", unsupported.is_none(), None, None),
            status::condition("ContainersReady", ready, reason, message.clone()),
            status::condition("Ready", ready, reason, message),
        ]
    }

    fn container_status(
        &self,
        spec: &Container,
        policy: &str,
        unsupported: Option<&str>,
    ) -> ContainerStatus {
        let ctr = self.containers.get(&spec.name);
        let run = ctr.and_then(|c| c.rec.run.as_ref());
        let last = ctr.and_then(|c| c.rec.last.as_ref());
        let state = self.container_state(spec, ctr, policy, unsupported);
        let last_state = last
            .filter(|_| state.terminated.is_none())
            .map(|l| terminated(l.clone()));
        let container_id = run
            .map(|r| format!("containerd://{}", r.id))
            .or_else(|| last.and_then(|l| l.container_id.clone()));
        ContainerStatus {
            name: spec.name.clone(),
            image: spec.image.clone().unwrap_or_default(),
            image_id: run.map(|r| r.image_id.clone()).unwrap_or_default(),
            container_id,
            ready: run.is_some() && ctr.is_some_and(|c| c.ready),
            started: Some(run.is_some()),
            restart_count: ctr.map_or(0, |c| c.rec.restart_count),
            state: Some(state),
            last_state,
            ..ContainerStatus::default()
        }
    }

    /// Running; else waiting for a reason (a spec it cannot run, a crash-loop backoff, being
    /// made); else terminated, once it ended for good.
    fn container_state(
        &self,
        spec: &Container,
        ctr: Option<&Ctr>,
        policy: &str,
        unsupported: Option<&str>,
    ) -> ContainerState {
        let rec = ctr.map(|c| &c.rec);
        if let Some(run) = rec.and_then(|r| r.run.as_ref()) {
            return ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(run.started_at.clone()),
                }),
                ..ContainerState::default()
            };
        }
        let config_error = ctr.and_then(|c| c.config_error.clone());
        if let Some(why) = unsupported.map(str::to_owned).or(config_error) {
            return waiting("CreateContainerConfigError", Some(why));
        }
        if let Some(last) = rec.and_then(|r| r.last.as_ref())
            && !restarts(policy, last)
        {
            return terminated(last.clone());
        }
        let backing_off = ctr
            .and_then(|c| c.not_before)
            .is_some_and(|t| t > Instant::now());
        if backing_off {
            let message = format!(
                "back-off restarting failed container {} in pod {}",
                spec.name, self.uid
            );
            return waiting("CrashLoopBackOff", Some(message));
        }
        waiting("ContainerCreating", None)
    }

    /// Writes the status through the status subresource, unless it is what was written last.
    /// A JSON merge patch: kubelet's lists (conditions, podIPs, containerStatuses) are
    /// replaced whole, so no stale entry survives (the conditions keep the others').
    async fn publish(&mut self, pod: &Pod, status: PodStatus) {
        let Ok(value) = serde_json::to_value(&status) else {
            return;
        };
        if self.published.as_ref() == Some(&value) {
            return;
        }
        let (Some(name), Some(namespace)) = (&pod.metadata.name, &pod.metadata.namespace) else {
            return;
        };
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), namespace);
        let patch = Patch::Merge(json!({ "status": value }));
        match api
            .patch_status(name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => self.published = Some(value),
            Err(e) => {
                tracing::warn!(pod = %self.uid, "update the status of pod {namespace}/{name}: {e}")
            }
        }
    }

    // ------------------------------------------------------------ events

    async fn event(&self, pod: &Pod, type_: EventType, reason: &str, note: &str) {
        let mut note = note.to_owned();
        if note.len() > NOTE_MAX {
            let mut end = NOTE_MAX;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&event, &pod.object_ref(&()))
            .await
        {
            tracing::warn!(pod = %self.uid, "publish event {reason}: {e}");
        }
    }

    /// A warning event, the first time only (for conditions that do not change by
    /// themselves, such as a spec this kubelet cannot run).
    async fn warn_once(&mut self, pod: &Pod, reason: &str, note: impl Into<String>) {
        let note = note.into();
        if self.warned.insert(format!("{reason}: {note}")) {
            self.event(pod, EventType::Warning, reason, &note).await;
        }
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..ContainerState::default()
    }
}

fn terminated(how: ContainerStateTerminated) -> ContainerState {
    ContainerState {
        terminated: Some(how),
        ..ContainerState::default()
    }
}

/// Why this kubelet does not run the pod, if it does not: it has no network of its own
/// (the harness runs node agents itself), or init containers.
fn unsupported(pod: &Pod) -> Option<&'static str> {
    let Some(spec) = &pod.spec else {
        return Some("the pod has no spec");
    };
    if spec.host_network == Some(true) {
        return Some("mesh-kubelet does not run hostNetwork pods");
    }
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Some("mesh-kubelet does not run init containers");
    }
    None
}

fn restart_policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
}

/// Whether the restart policy restarts a container that ended so.
fn restarts(policy: &str, last: &ContainerStateTerminated) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => last.exit_code != 0,
        _ => true,
    }
}

/// Whether a container that does not run should start now: never ran yet, or ended, is
/// restarted by the policy, and its backoff has passed.
fn should_start(ctr: &Ctr, policy: &str) -> bool {
    match &ctr.rec.last {
        None => true,
        Some(last) => restarts(policy, last) && ctr.not_before.is_none_or(|t| Instant::now() >= t),
    }
}

/// Ends the container's current run as `exit` says (its watcher and prober stop); returns
/// the run's cgroup.
fn end_run(ctr: &mut Ctr, exit: Exit) -> Option<std::path::PathBuf> {
    ctr.tasks.clear();
    ctr.ready = false;
    let run = ctr.rec.run.take()?;
    let (exit_code, signal, reason, message) = match exit {
        Exit::Code(code) => (
            code,
            None,
            if code == 0 { "Completed" } else { "Error" },
            None,
        ),
        Exit::Signal(sig) => (128 + sig, Some(sig), "Error", None),
        Exit::Unknown => (
            137,
            None,
            "ContainerStatusUnknown",
            Some("The container ended while mesh-kubelet could not see how".to_owned()),
        ),
    };
    if Timestamp::now().duration_since(run.started_at.0) >= BACKOFF_RESET {
        ctr.crashes = 0;
    }
    ctr.rec.last = Some(ContainerStateTerminated {
        exit_code,
        signal,
        reason: Some(reason.into()),
        message,
        started_at: Some(run.started_at.clone()),
        finished_at: Some(Time(Timestamp::now())),
        container_id: Some(format!("containerd://{}", run.id)),
    });
    Some(run.cgroup)
}

/// Schedules the container's next start after its crash-loop backoff.
fn back_off(ctr: &mut Ctr) {
    let delay = match ctr.crashes {
        0 => Duration::ZERO,
        n => BACKOFF_BASE
            .saturating_mul(1 << (n - 1).min(5))
            .min(BACKOFF_MAX),
    };
    ctr.crashes += 1;
    ctr.not_before = Some(Instant::now() + delay);
}
