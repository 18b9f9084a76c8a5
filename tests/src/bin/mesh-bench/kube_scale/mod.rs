//! Kubernetes scale: the agent's memory and CPU, and the API server's load, with 10,000 pods
//! and 1,000 Services in the cluster (`mesh-bench --kubernetes`, `cargo xtask bench
//! --kubernetes`; writes `bench/results/kubernetes.md`).
//!
//! A [`KubeMesh`] with one node, node-a: the control plane, the harness kubelet and one real
//! agent, run as the DaemonSet runs it (its arguments, its ServiceAccount's RBAC). The scale
//! set is made through the API ([`objects`]): 20 Nodes no kubelet serves (their Leases kept
//! fresh by mesh-bench, so the node lifecycle controller leaves their pods alone), 10 ambient
//! namespaces, 1,000 ServiceAccounts and Services, 10,000 pods bound to the fake nodes with a
//! Running, Ready status and unique addresses; the endpointslice controller gives each
//! Service its 10 endpoints. The agent watches all of it, as every node's agent does.
//!
//! In order:
//! 1. the agent's memory and start with the cluster nearly empty, and the enrolment of 50 new
//!    pods of node-a ([`enrol`]), which are then deleted;
//! 2. the scale set created while the agent follows; the creation rate per kind, and how long
//!    after the last write the EndpointSlices and the agent's state were complete;
//! 3. `reps` times: 1,000 pod address changes (one pod of each Service) with the agent
//!    running, until it has followed them (its counters still) — when a watch of mesh-bench's
//!    received the EndpointSlices' last change, the agent's last state build, its CPU, the
//!    API server's; the agent stopped and 1,000 more changes without it (the API server's CPU
//!    with one watcher fewer, the EndpointSlices without the agent's CPU use); the agent
//!    started again: its initial sync of the 10,000 pods, its memory, what it asked of the API
//!    server;
//! 4. 10 s idle at that size;
//! 5. the enrolment of 50 new pods again, with the 10,000 there.
//!
//! What the agent asked of the API server is counted by a FlowSchema that matches its
//! ServiceAccount alone ([`probe::AGENT_FLOW_SCHEMA_YAML`]); the API server's CPU seconds and
//! memory come from its /proc entries.

mod enrol;
mod objects;
mod probe;
mod report;

use std::fs;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail, ensure};
use mesh_tests::interrupt;
use mesh_tests::kube::{CgroupDriver, ControlPlane, KubeMesh};
use tokio::sync::watch;

use crate::Opts;
use crate::state_scale::load_average;
use crate::usage::{Snapshot, Usage, cpu_seconds, peak_rss_kib};
use enrol::Enrolment;
use objects::{PODS_PER_SERVICE, SERVICES, ScalePod, SliceChanges, Step, is_scale_namespace};
use probe::{AGENT_FLOW_SCHEMA_YAML, Agent, AgentCounters, ApiCounters, ApiServer};

/// The node whose agent is measured (the only node with a kubelet).
pub const AGENT_NODE: &str = "node-a";
/// Before an agent's memory is read: time to finish what it was doing.
const SETTLE: Duration = Duration::from_secs(2);
/// The agent has followed a change once its counters stood still this long.
const QUIET: Duration = Duration::from_secs(2);
const WATCH_OPEN_TIMEOUT: Duration = Duration::from_secs(20);
const CHURN_TIMEOUT: Duration = Duration::from_secs(120);
/// From the last write of the scale set until the EndpointSlices and the agent have it all.
const SYNC_TIMEOUT: Duration = Duration::from_secs(300);
const IDLE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

/// Everything measured (see the module's doc).
#[derive(Debug, Default)]
pub struct KubeScale {
    pub reps: usize,
    pub setup_s: f64,
    pub elapsed_s: f64,
    /// The machine's 1-minute load average at the start (others' processes only) and at the
    /// end (this benchmark's included).
    pub load: (Option<f64>, Option<f64>),
    /// The agent's first start, on the nearly empty cluster: `following the Kubernetes API`
    /// to `agent ready`.
    pub empty_sync_s: f64,
    /// The agent's RSS at its first start, MiB.
    pub empty_rss_mib: f64,
    pub enrol_empty: Enrolled,
    pub creation: Creation,
    /// (component, bytes) before and after the scale set was made.
    pub control_plane_rss: [Vec<(&'static str, u64)>; 2],
    pub churns: Vec<Churn>,
    pub quiet_churns: Vec<QuietChurn>,
    pub restarts: Vec<Restart>,
    pub idle: Window,
    pub idle_rss_mib: f64,
    pub enrol_scale: Enrolled,
}

/// New pods of node-a enrolled, and what the agent and the API server did meanwhile.
#[derive(Debug, Clone, Default)]
pub struct Enrolled {
    pub pods: Enrolment,
    pub window: Window,
}

/// A stretch of time: the API server's CPU and what it served, the agent's CPU and events.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub secs: f64,
    pub api: Usage,
    pub api_counters: ApiCounters,
    /// `None` when the agent did not run throughout.
    pub agent: Option<(Usage, AgentCounters)>,
}

#[derive(Debug, Clone, Default)]
pub struct Creation {
    pub steps: Vec<Step>,
    /// From the first write to the agent's state having every Service complete.
    pub window: Window,
    /// From the last write until every Service's EndpointSlice had its 10 ready endpoints.
    pub slices_s: f64,
    /// From the last write until the agent's state had every Service with its 10 endpoints.
    pub agent_s: f64,
    /// The agent's RSS [`SETTLE`] after that, MiB.
    pub rss_mib: f64,
}

/// 1,000 address changes with the agent running.
#[derive(Debug, Clone)]
pub struct Churn {
    pub patch: Step,
    /// EndpointSlice changes a watch of mesh-bench's saw, and when the last one arrived
    /// (seconds from the first address change).
    pub slice_changes: usize,
    pub slices_last_s: Option<f64>,
    /// From the first change sent to the agent's last state build that followed.
    pub reflected_s: f64,
    pub window: Window,
    /// The agent's RSS after the window, MiB.
    pub rss_mib: f64,
}

/// 1,000 address changes with no agent running.
#[derive(Debug, Clone)]
pub struct QuietChurn {
    pub patch: Step,
    /// When the last EndpointSlice change arrived (seconds from the first address change).
    pub slices_last_s: Option<f64>,
    pub window: Window,
}

/// The agent started again with the scale set in the cluster.
#[derive(Debug, Clone)]
pub struct Restart {
    /// `following the Kubernetes API` to `agent ready`: the initial list of everything and
    /// the first state.
    pub sync_s: f64,
    /// What the new agent had counted when ready.
    pub counters: AgentCounters,
    pub agent_cpu_s: f64,
    /// Its peak RSS (VmHWM) when ready, and its RSS [`SETTLE`] later, MiB.
    pub peak_rss_mib: f64,
    pub rss_mib: f64,
    /// From starting it until it was ready (the API server's side).
    pub window: Window,
}

pub fn run(opts: &Opts) -> Result<()> {
    let began = Instant::now();
    let load_before = load_average();
    progress("starting the control plane, node-a's kubelet and its agent");
    let mesh = KubeMesh::start(&[(AGENT_NODE, CgroupDriver::Systemd)])?;
    let setup_s = began.elapsed().as_secs_f64();
    let mut m = thread::scope(|scope| measure(scope, &mesh, opts.reps))?;
    m.setup_s = setup_s;
    m.elapsed_s = began.elapsed().as_secs_f64();
    m.load = (load_before, load_average());
    let text = report::render(&m);
    println!("{text}");
    fs::create_dir_all(&opts.out).with_context(|| format!("create {}", opts.out.display()))?;
    let file = opts.out.join("kubernetes.md");
    fs::write(&file, &text).with_context(|| format!("write {}", file.display()))?;
    progress(&format!("written to {}", file.display()));
    Ok(())
}

fn progress(what: &str) {
    eprintln!("mesh-bench: kubernetes: {what}");
}

fn measure<'scope, 'env>(
    scope: &'scope thread::Scope<'scope, 'env>,
    mesh: &'env KubeMesh,
    reps: usize,
) -> Result<KubeScale> {
    ensure!(
        2 * reps <= objects::MAX_GENERATION,
        "at most {} repetitions",
        objects::MAX_GENERATION / 2
    );
    let cp = mesh.kube().control_plane();
    cp.apply(AGENT_FLOW_SCHEMA_YAML)?;
    let agent = Agent {
        mesh,
        node: AGENT_NODE,
    };
    let api = ApiServer::find(cp)?;
    let mut m = KubeScale {
        reps,
        empty_sync_s: startup_span(&agent)?,
        empty_rss_mib: agent.rss_mib()?,
        ..KubeScale::default()
    };
    progress(&format!(
        "agent ready in {:.2} s, {:.1} MiB; enrolment of {} pods, cluster nearly empty",
        m.empty_sync_s,
        m.empty_rss_mib,
        enrol::LOCAL_PODS
    ));
    m.enrol_empty = enrol_measured(&agent, &api, "local-empty")?;
    enrol::remove(mesh, "local-empty")?;

    m.control_plane_rss[0] = cp.resident_memory()?;
    let (creation, _heartbeat) = populate(scope, cp, &agent, &api)?;
    m.creation = creation;
    m.control_plane_rss[1] = cp.resident_memory()?;

    for rep in 0..reps {
        interrupt::check()?;
        progress(&format!("repetition {}/{reps}", rep + 1));
        m.churns.push(churn(cp, &agent, &api, 2 * rep)?);
        let status = mesh.stop_agent(AGENT_NODE)?;
        ensure!(
            status.success(),
            "the agent exited with {status} on SIGTERM"
        );
        let length = Duration::from_secs_f64(m.churns[rep].window.secs);
        m.quiet_churns
            .push(churn_without_agent(cp, &api, 2 * rep + 1, length)?);
        m.restarts.push(restart(mesh, &agent, &api)?);
    }

    progress(&format!("{} s idle", IDLE.as_secs()));
    let meter = Meter::start(Some(&agent), &api)?;
    thread::sleep(IDLE);
    m.idle = meter.finish(Some(&agent), &api)?;
    m.idle_rss_mib = agent.rss_mib()?;

    progress(&format!(
        "enrolment of {} pods with the scale set",
        enrol::LOCAL_PODS
    ));
    m.enrol_scale = enrol_measured(&agent, &api, "local-scale")?;
    Ok(m)
}

fn enrol_measured(agent: &Agent, api: &ApiServer, namespace: &str) -> Result<Enrolled> {
    let meter = Meter::start(Some(agent), api)?;
    let pods = enrol::measure(agent, namespace)?;
    Ok(Enrolled {
        pods,
        window: meter.finish(Some(agent), api)?,
    })
}

/// Stops the fake nodes' heartbeat when dropped (the scope then joins its thread).
struct Heartbeat(watch::Sender<bool>);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

/// Makes the scale set (the agent following) and waits until the EndpointSlices and the
/// agent's state are complete; the fake nodes' heartbeat runs until the returned guard goes.
fn populate<'scope, 'env>(
    scope: &'scope thread::Scope<'scope, 'env>,
    cp: &'env ControlPlane,
    agent: &Agent,
    api: &ApiServer,
) -> Result<(Creation, Heartbeat)> {
    progress(&format!(
        "creating {} fake nodes, {} namespaces, {SERVICES} services and {} pods",
        objects::FAKE_NODES,
        objects::NAMESPACES,
        objects::PODS
    ));
    let meter = Meter::start(Some(agent), api)?;
    let nodes = cp.block_on(|client| async move { objects::create_nodes(&client).await })?;
    let (stop, stopped) = watch::channel(false);
    scope.spawn(move || {
        let alive = cp.block_on(move |client| async move {
            objects::keep_nodes_alive(client, stopped).await;
            Ok(())
        });
        if let Err(e) = alive {
            eprintln!("mesh-bench: kubernetes: the fake nodes' heartbeat: {e:#}");
        }
    });
    let heartbeat = Heartbeat(stop);
    let mut steps = vec![nodes];
    steps.extend(cp.block_on(|client| async move {
        Ok(vec![
            objects::create_namespaces(&client).await?,
            objects::create_service_accounts(&client).await?,
            objects::create_services(&client).await?,
            objects::create_pods(&client).await?,
            objects::start_pods(&client).await?,
        ])
    })?);
    let (slices_s, agent_s) = wait_synced(cp, agent)?;
    let window = meter.finish(Some(agent), api)?;
    thread::sleep(SETTLE);
    let creation = Creation {
        steps,
        window,
        slices_s,
        agent_s,
        rss_mib: agent.rss_mib()?,
    };
    progress(&format!(
        "EndpointSlices complete {slices_s:.1} s after the last write, the agent's state {agent_s:.1} s; agent RSS {:.1} MiB",
        creation.rss_mib
    ));
    Ok((creation, heartbeat))
}

/// Seconds from now until every Service has its 10 ready endpoints in its EndpointSlices, and
/// until the agent's state has every Service with its 10 endpoints (workloads).
fn wait_synced(cp: &ControlPlane, agent: &Agent) -> Result<(f64, f64)> {
    let began = Instant::now();
    let (mut slices, mut state) = (None, None);
    loop {
        interrupt::check()?;
        if slices.is_none() {
            let n =
                cp.block_on(|client| async move { objects::complete_services(&client).await })?;
            if n == SERVICES {
                slices = Some(began.elapsed().as_secs_f64());
            }
        }
        if state.is_none()
            && agent.services_with_endpoints(is_scale_namespace, PODS_PER_SERVICE)? == SERVICES
        {
            state = Some(began.elapsed().as_secs_f64());
        }
        if let (Some(slices), Some(state)) = (slices, state) {
            return Ok((slices, state));
        }
        if began.elapsed() > SYNC_TIMEOUT {
            bail!(
                "after {SYNC_TIMEOUT:?}: EndpointSlices complete: {}, the agent's state complete: {}",
                slices.is_some(),
                state.is_some()
            );
        }
        thread::sleep(Duration::from_secs(1));
    }
}

/// Churn `c` (0-based): pod `c mod 10` of every Service gets addresses of generation `c + 1`.
fn churned_pods(c: usize) -> Vec<ScalePod> {
    (0..SERVICES)
        .map(|k| ScalePod(k * PODS_PER_SERVICE + c % PODS_PER_SERVICE))
        .collect()
}

fn readdress(cp: &ControlPlane, c: usize) -> Result<Step> {
    let pods = churned_pods(c);
    cp.block_on(move |client| async move { objects::readdress_pods(&client, &pods, c + 1).await })
}

/// Churn `c` with the agent running, until it has followed it; its state must then have every
/// Service complete again (the new addresses both in the pods and in the EndpointSlices).
fn churn(cp: &ControlPlane, agent: &Agent, api: &ApiServer, c: usize) -> Result<Churn> {
    let meter = Meter::start(Some(agent), api)?;
    let before = meter.agent_counters()?;
    let ((first, patch), slices) = with_slice_watch(cp, || {
        let first = SystemTime::now();
        let patch = readdress(cp, c)?;
        wait_quiet(agent, &before, patch.count)?;
        Ok((first, patch))
    })?;
    let window = meter.finish(Some(agent), api)?;
    let reflected_s = agent
        .log_lines("kubernetes state updated")?
        .into_iter()
        .map(|(at, _)| at)
        .filter(|&at| at >= first)
        .max()
        .and_then(|at| at.duration_since(first).ok())
        .context("no state build after the address changes")?
        .as_secs_f64();
    let complete = agent.services_with_endpoints(is_scale_namespace, PODS_PER_SERVICE)?;
    ensure!(
        complete == SERVICES,
        "after the address changes, {complete} of the agent's {SERVICES} Services have all their endpoints"
    );
    let churn = Churn {
        patch,
        slice_changes: slices.count,
        slices_last_s: since(first, slices.last),
        reflected_s,
        window,
        rss_mib: agent.rss_mib()?,
    };
    if let Some((usage, counters)) = &churn.window.agent {
        progress(&format!(
            "{} address changes: the EndpointSlices' last change {} s after the first, the \
             agent's last state build {:.2} s; {} events, {} builds, {:.2} s CPU",
            churn.patch.count,
            churn
                .slices_last_s
                .map_or("?".into(), |s| format!("{s:.2}")),
            churn.reflected_s,
            counters.events(),
            counters.builds,
            usage.cpu_s
        ));
    }
    Ok(churn)
}

/// Churn `c` with no agent running: the API server's side, for `length` (the churn with the
/// agent's).
fn churn_without_agent(
    cp: &ControlPlane,
    api: &ApiServer,
    c: usize,
    length: Duration,
) -> Result<QuietChurn> {
    let meter = Meter::start(None, api)?;
    let ((first, patch), slices) = with_slice_watch(cp, || {
        let first = SystemTime::now();
        let patch = readdress(cp, c)?;
        thread::sleep(length.saturating_sub(meter.began.elapsed()));
        Ok((first, patch))
    })?;
    let churn = QuietChurn {
        patch,
        slices_last_s: since(first, slices.last),
        window: meter.finish(None, api)?,
    };
    progress(&format!(
        "{} address changes without the agent: the EndpointSlices' last change {} s after the first",
        churn.patch.count,
        churn
            .slices_last_s
            .map_or("?".into(), |s| format!("{s:.2}")),
    ));
    Ok(churn)
}

/// Seconds from `from` to `to`, if it is later.
fn since(from: SystemTime, to: Option<SystemTime>) -> Option<f64> {
    Some(to?.duration_since(from).ok()?.as_secs_f64())
}

/// Runs `during` while a thread of its own watches the scale set's EndpointSlices (open
/// before `during` starts); what it saw.
fn with_slice_watch<T>(
    cp: &ControlPlane,
    during: impl FnOnce() -> Result<T>,
) -> Result<(T, SliceChanges)> {
    thread::scope(|scope| {
        let (ready, opened) = std::sync::mpsc::channel();
        let (stop, stopped) = watch::channel(false);
        let watcher = scope.spawn(move || {
            cp.block_on(move |client| objects::watch_slice_changes(client, ready, stopped))
        });
        let out = match opened.recv_timeout(WATCH_OPEN_TIMEOUT) {
            Ok(()) => during(),
            Err(_) => Err(anyhow!("the EndpointSlice watch did not open")),
        };
        let _ = stop.send(true);
        let seen = watcher
            .join()
            .map_err(|_| anyhow!("the EndpointSlice watch panicked"))?;
        Ok((out?, seen?))
    })
}

/// Waits until the agent has counted `pods` more Pod events than `before` and its counters
/// then stood still for [`QUIET`].
fn wait_quiet(agent: &Agent, before: &AgentCounters, pods: usize) -> Result<AgentCounters> {
    let began = Instant::now();
    let mut last = agent.counters()?;
    let mut still_since = Instant::now();
    loop {
        interrupt::check()?;
        thread::sleep(POLL);
        let now = agent.counters()?;
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if now.since(before).pods >= pods as f64 && still_since.elapsed() >= QUIET {
            return Ok(now);
        }
        if began.elapsed() > CHURN_TIMEOUT {
            bail!(
                "the agent counted {} of {pods} pod events within {CHURN_TIMEOUT:?}",
                now.since(before).pods
            );
        }
    }
}

/// Starts the agent again and measures its initial sync.
fn restart(mesh: &KubeMesh, agent: &Agent, api: &ApiServer) -> Result<Restart> {
    let meter = Meter::start(None, api)?;
    mesh.start_agent(AGENT_NODE)?;
    let pid = agent.pid()?;
    let agent_cpu_s = cpu_seconds(pid).context("the agent's CPU time")?;
    let peak_rss_mib = peak_rss_kib(pid).context("the agent's VmHWM")? as f64 / 1024.0;
    let window = meter.finish(None, api)?;
    let counters = agent.counters()?;
    thread::sleep(SETTLE);
    let r = Restart {
        sync_s: startup_span(agent)?,
        counters,
        agent_cpu_s,
        peak_rss_mib,
        rss_mib: agent.rss_mib()?,
        window,
    };
    progress(&format!(
        "agent restarted: ready {:.2} s after following the API, {} events, {:.2} s CPU, \
         peak {:.1} MiB, {:.1} MiB settled",
        r.sync_s,
        r.counters.events(),
        r.agent_cpu_s,
        r.peak_rss_mib,
        r.rss_mib
    ));
    Ok(r)
}

/// The agent's last start, from its log: `following the Kubernetes API` to the `agent ready`
/// after it, seconds.
fn startup_span(agent: &Agent) -> Result<f64> {
    let follows = agent.log_lines("following the Kubernetes API")?;
    let (from, _) = follows.last().context("the agent never followed the API")?;
    let (ready, _) = agent
        .log_lines("agent ready")?
        .into_iter()
        .find(|(at, _)| at >= from)
        .context("no `agent ready` after `following the Kubernetes API`")?;
    Ok(ready.duration_since(*from)?.as_secs_f64())
}

/// Takes a [`Window`]. The metrics pages are read outside the CPU measurement: before its
/// start and after its end (the API server's is several MiB, its rendering not free).
struct Meter {
    api_counters: ApiCounters,
    agent: Option<(AgentCounters, Snapshot)>,
    api_cpu: Snapshot,
    began: Instant,
}

impl Meter {
    fn start(agent: Option<&Agent>, api: &ApiServer) -> Result<Self> {
        let api_counters = api.counters()?;
        let agent = match agent {
            Some(a) => Some((a.counters()?, Snapshot::take(&[a.pid()?]))),
            None => None,
        };
        Ok(Self {
            api_counters,
            agent,
            api_cpu: Snapshot::take(&[api.pid]),
            began: Instant::now(),
        })
    }

    fn agent_counters(&self) -> Result<AgentCounters> {
        self.agent
            .as_ref()
            .map(|(c, _)| *c)
            .context("the window was started without the agent")
    }

    fn finish(self, agent: Option<&Agent>, api: &ApiServer) -> Result<Window> {
        let secs = self.began.elapsed().as_secs_f64();
        let api_usage = self.api_cpu.usage();
        let agent = match (self.agent, agent) {
            (Some((before, cpu)), Some(a)) => {
                let usage = cpu.usage();
                Some((usage, a.counters()?.since(&before)))
            }
            _ => None,
        };
        Ok(Window {
            secs,
            api: api_usage,
            api_counters: api.counters()?.since(&self.api_counters),
            agent,
        })
    }
}
