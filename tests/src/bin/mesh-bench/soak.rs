//! `mesh-bench --soak`: many held connections and a steady stream of new ones through the mesh,
//! cross-node, while certificates renew and the policy is reloaded; writes
//! `bench/results/soak.md`. A benchmark, not a timed test: `cargo xtask soak`.
//!
//! Two nodes. On node-a, three enrolled pods with identities of their own: `holder`
//! (`sa/soak-holder`), `churner` (`sa/soak-churn`) and `outsider` (`sa/soak-outsider`); on
//! node-b, `echo` (`sa/soak-echo`, label `app: soak-echo`) runs `mesh-load serve`. An
//! `AuthorizationPolicy` on `echo` ALLOWs the holder's and the churner's identities on the echo
//! port, so every connection is client → node-a's agent → HBONE (mutual TLS) → node-b's agent →
//! echo, and the outsider is denied. Certificates live `--lifetime` (20 s: renewed about every
//! 10 s). Phases:
//!
//! 1. baseline: warm-up (a few allowed and denied connections), then both agents' RSS and
//!    descriptors;
//! 2. open: `mesh-load hold` in `holder` opens `--held` connections (200 at a time), echoes a
//!    byte on each, keeps them and re-checks a rotating sample of 1,000 every 2 s;
//! 3. churn: `mesh-load churn` in `churner` opens `--rate` new connections per second for
//!    `--seconds` (1 KiB echoed on each, then closed) while the held ones stay; every
//!    `--reload-every` seconds the policy file is rewritten (alternating between two equivalent
//!    forms: the principals in one order, or in the other order with one more principal that no
//!    pod has), each reload is confirmed on both agents by `mesh_agent_policy_reloads_total`,
//!    and the outsider's connections are checked to be still refused;
//! 4. final: the holder checks every connection it holds, then closes them all;
//! 5. after: both agents' descriptors must be back to the baseline (+`--fd-tolerance`) within
//!    `--fd-wait` seconds; RSS and descriptors are read once more after [`END_SETTLE`].
//!
//! Both agents' `VmRSS` and descriptors are sampled every second throughout; CPU time per phase
//! from the cgroups' `cpu.stat` (agents, each pod) and `/proc/stat` (the whole machine). The run
//! fails (after writing its report) if a connection the policy allows failed, the descriptors
//! did not come back, a reload was not confirmed, a denied connection got through, an agent
//! stopped, or no certificate was renewed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use mesh_tests::{ChildGuard, Cluster, NodeSpec, Pod, PodSpec, interrupt};
use serde_json::Value;

use crate::idle::{AgentFootprint, agent_footprints};
use crate::report::{date_utc, machine, median, mib};
use crate::usage::{Snapshot, Usage, read_pids};

/// The held connections' port; the churn's are the next `--churn-ports`.
const ECHO_PORT: u16 = 7100;
const POLICY_NAME: &str = "soak-allow";
/// After the descriptors are back: the agents' end RSS is read this much later.
const END_SETTLE: Duration = Duration::from_secs(5);
/// A policy reload must be seen by both agents within this (they poll every 500 ms).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the outsider tries after each reload (all must be refused).
const DENIED_PROBE: u32 = 5;

const USAGE: &str = "usage: mesh-bench --soak [--held=N] [--rate=R] [--seconds=S] \
     [--reload-every=S] [--lifetime=DURATION] [--max-in-flight=N] [--churn-ports=N] [--fd-tolerance=N] \
     [--fd-wait=S] [--out=DIR] [--load-bin=PATH]";

#[derive(Debug, Clone)]
pub struct Params {
    held: usize,
    rate: f64,
    seconds: f64,
    reload_every: f64,
    lifetime: String,
    fd_tolerance: u64,
    fd_wait: Duration,
    /// New connections in flight at most: past it the churn falls behind its schedule (and
    /// says so) instead of piling up connections that time out.
    max_in_flight: usize,
    /// Server ports the new connections are spread over (see [`run`]).
    churn_ports: u16,
    out: PathBuf,
    load_bin: PathBuf,
}

impl Params {
    /// From the arguments after `--soak` (`--name=value` or `--name value`).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self> {
        let mut p = Params {
            held: 10_000,
            rate: 2000.0,
            seconds: 60.0,
            reload_every: 10.0,
            lifetime: "20s".into(),
            fd_tolerance: 10,
            fd_wait: Duration::from_secs(20),
            max_in_flight: 512,
            churn_ports: 16,
            out: crate::workspace_root().join("bench/results"),
            load_bin: default_load_bin(),
        };
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            if a == "-h" || a == "--help" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let (name, value) = match a.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => {
                    let v = args
                        .next()
                        .ok_or_else(|| anyhow!("{a} needs a value ({USAGE})"))?;
                    (a.clone(), v)
                }
            };
            let bad = |e: &dyn std::fmt::Display| anyhow!("{name} {value}: {e} ({USAGE})");
            match name.as_str() {
                "--held" => p.held = value.parse().map_err(|e| bad(&e))?,
                "--rate" => p.rate = value.parse().map_err(|e| bad(&e))?,
                "--seconds" => p.seconds = value.parse().map_err(|e| bad(&e))?,
                "--reload-every" => p.reload_every = value.parse().map_err(|e| bad(&e))?,
                "--lifetime" => p.lifetime = value,
                "--fd-tolerance" => p.fd_tolerance = value.parse().map_err(|e| bad(&e))?,
                "--fd-wait" => {
                    p.fd_wait = Duration::from_secs_f64(value.parse().map_err(|e| bad(&e))?)
                }
                "--max-in-flight" => p.max_in_flight = value.parse().map_err(|e| bad(&e))?,
                "--churn-ports" => p.churn_ports = value.parse().map_err(|e| bad(&e))?,
                "--out" => p.out = PathBuf::from(value),
                "--load-bin" => p.load_bin = PathBuf::from(value),
                other => bail!("unknown argument {other} ({USAGE})"),
            }
        }
        if p.churn_ports == 0 || p.churn_ports > 100 {
            bail!("--churn-ports must be 1 to 100 ({USAGE})");
        }
        if p.held == 0 || !(p.rate > 0.0) || !(p.seconds > 0.0) || !(p.reload_every > 0.0) {
            bail!("--held, --rate, --seconds and --reload-every must be positive ({USAGE})");
        }
        Ok(p)
    }

    fn command_line(&self) -> String {
        format!(
            "mesh-bench --soak --held={} --rate={} --seconds={} --reload-every={} --lifetime={} \
             --max-in-flight={} --churn-ports={}",
            self.held,
            self.rate,
            self.seconds,
            self.reload_every,
            self.lifetime,
            self.max_in_flight,
            self.churn_ports
        )
    }
}

/// `mesh-load`, next to this program (cargo builds both into the same directory).
fn default_load_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("mesh-load")))
        .unwrap_or_else(|| crate::workspace_root().join("target/release/mesh-load"))
}

// ------------------------------------------------------------------ phases

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Phase {
    Baseline = 0,
    Open = 1,
    Churn = 2,
    Final = 3,
    After = 4,
}
const PHASES: [Phase; 5] = [
    Phase::Baseline,
    Phase::Open,
    Phase::Churn,
    Phase::Final,
    Phase::After,
];

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Baseline => "baseline",
            Phase::Open => "open",
            Phase::Churn => "churn",
            Phase::Final => "final check and close",
            Phase::After => "after",
        }
    }
    fn from_u8(v: u8) -> Phase {
        PHASES[usize::from(v).min(PHASES.len() - 1)]
    }
}

/// One second's reading of both agents.
#[derive(Debug, Clone)]
struct Sample {
    t_s: f64,
    phase: Phase,
    agents: BTreeMap<String, AgentFootprint>,
}

/// CPU time (seconds) of everything measured, at one instant.
#[derive(Debug, Clone, Default)]
struct CpuMark {
    at: Option<Instant>,
    /// Per group: `node-a agent`, `holder pod`, ...
    groups: BTreeMap<String, f64>,
    /// This process (the harness).
    harness: f64,
    /// All CPUs of the machine: busy (user, nice, system, irq, softirq, steal), seconds.
    machine_busy: f64,
}

/// One policy rewrite during the churn.
#[derive(Debug, Clone)]
struct Reload {
    t_s: f64,
    variant: usize,
    /// Write → both agents' `mesh_agent_policy_reloads_total{result="loaded"}` went up.
    confirmed_ms: Option<f64>,
    error: Option<String>,
    /// Outsider connections tried after it, and how many got through (must be 0).
    denied_tried: u64,
    denied_through: u64,
}

/// The few agent metrics the soak follows.
#[derive(Debug, Clone, Default)]
struct AgentCounters {
    renewals_ok: f64,
    renewals_failed: f64,
    reloads_loaded: f64,
    reloads_rejected: f64,
    rejections: BTreeMap<String, f64>,
    hbone_connections: f64,
}

#[derive(Debug, Default)]
struct HoldResult {
    opened: Option<Value>,
    checks: Vec<Value>,
    final_: Option<Value>,
    closed: Option<Value>,
    broken: Vec<Value>,
    /// Anything else that went wrong with the holder process.
    problem: Option<String>,
}

#[derive(Debug, Default)]
struct Outcome {
    started_utc: String,
    load_before: String,
    load_after: String,
    lifetime: String,
    samples: Vec<Sample>,
    /// Phase → instant it began (seconds since the start of the baseline).
    phase_start: BTreeMap<Phase, f64>,
    cpu: BTreeMap<Phase, (CpuMark, CpuMark)>,
    baseline: BTreeMap<String, AgentFootprint>,
    held_fp: BTreeMap<String, AgentFootprint>,
    end_fp: BTreeMap<String, AgentFootprint>,
    /// Seconds after the holder closed until both agents' descriptors were back.
    fds_back_s: Option<f64>,
    /// Each agent's `VmHWM` since the baseline, and its CPU from the baseline to the end.
    peak: BTreeMap<String, Usage>,
    threads: BTreeMap<String, u64>,
    counters_before: BTreeMap<String, AgentCounters>,
    counters_after: BTreeMap<String, AgentCounters>,
    /// `certificate issued` lines each agent logged during the soak.
    issued_lines: BTreeMap<String, u64>,
    /// warn and error messages each agent logged during the soak: (level, message) → count.
    log_problems: BTreeMap<String, BTreeMap<(String, String), u64>>,
    /// `connection closed` lines during the soak, per agent.
    closed_lines: BTreeMap<String, u64>,
    hold: HoldResult,
    churn: Option<Value>,
    churn_problem: Option<String>,
    warm_up: Option<Value>,
    reloads: Vec<Reload>,
    initial_denied: Option<(u64, u64)>,
    agents_running_at_end: BTreeMap<String, bool>,
    /// This harness's open-files limit (hard) after raising it: the agents' limit.
    nofile: Option<u64>,
    /// Each agent's `Max open files` (soft) from /proc/<pid>/limits.
    agent_nofile: BTreeMap<String, String>,
    failures: Vec<String>,
    elapsed_s: f64,
}

// -------------------------------------------------------------------- run

pub fn run(params: &Params) -> Result<()> {
    let started = Instant::now();
    eprintln!("mesh-bench soak: {params:?}");
    if !params.load_bin.exists() {
        bail!(
            "{} not found (build it: cargo build --release -p mesh-tests --bin mesh-load, \
             or give --load-bin=PATH)",
            params.load_bin.display()
        );
    }
    // The agents inherit this process's open-files limit and raise their soft limit to its hard
    // one: as high as the kernel allows, as in a container (containerd's default is 1048576),
    // rather than whatever this shell was given.
    let nofile = raise_nofile();
    let node_a = NodeSpec::new("node-a")
        .pod(PodSpec::new("holder").service_account("soak-holder"))
        .pod(PodSpec::new("churner").service_account("soak-churn"))
        .pod(PodSpec::new("outsider").service_account("soak-outsider"));
    let node_b = NodeSpec::new("node-b").pod(
        PodSpec::new("echo")
            .service_account("soak-echo")
            .label("app", "soak-echo"),
    );
    let cluster = Arc::new(
        Cluster::builder()
            .certificate_lifetime(&params.lifetime)
            .node(node_a)
            .node(node_b)
            .build()?,
    );
    interrupt::watch(&cluster);
    interrupt::check()?;
    cluster.start_agents()?;
    eprintln!("mesh-bench soak: cluster {} up, agents ready", cluster.id());
    cluster.apply_policy(
        POLICY_NAME,
        &policy_yaml(cluster.trust_domain(), 0, 0, params.churn_ports),
    )?;

    let mut out = Outcome {
        started_utc: date_utc(),
        load_before: loadavg(),
        lifetime: params.lifetime.clone(),
        nofile,
        ..Outcome::default()
    };
    let result = soak(&cluster, params, &mut out);
    if let Err(e) = &result {
        out.failures.push(format!("the soak stopped: {e:#}"));
    }
    out.load_after = loadavg();
    out.elapsed_s = started.elapsed().as_secs_f64();
    for n in cluster.nodes() {
        out.agents_running_at_end
            .insert(n.name().to_owned(), cluster.agent_running(n.name()));
    }
    for (node, running) in &out.agents_running_at_end {
        if !running {
            out.failures.push(format!(
                "the agent of {node} is not running at the end; {}",
                cluster.agent_log_tail(node)
            ));
        }
    }
    let text = report(params, &out);
    println!("{text}");
    fs::create_dir_all(&params.out).with_context(|| format!("create {}", params.out.display()))?;
    let file = params.out.join("soak.md");
    fs::write(&file, &text).with_context(|| format!("write {}", file.display()))?;
    eprintln!("mesh-bench soak: written to {}", file.display());
    interrupt::forget();
    drop(cluster);
    if !out.failures.is_empty() {
        bail!("soak failed:\n- {}", out.failures.join("\n- "));
    }
    Ok(())
}

fn soak(cluster: &Cluster, params: &Params, out: &mut Outcome) -> Result<()> {
    let holder = cluster.pod("node-a", "holder")?;
    let churner = cluster.pod("node-a", "churner")?;
    let outsider = cluster.pod("node-a", "outsider")?;
    let echo = cluster.pod("node-b", "echo")?;
    let to = format!("{}:{ECHO_PORT}", echo.ipv4());
    let churn_to = format!("{}:{}", echo.ipv4(), ECHO_PORT + 1);
    let bin = params.load_bin.as_path();

    let server_log = cluster.workdir().join("soak-echo.log");
    let _server = start_server(echo, bin, &server_log, params.churn_ports)?;

    // Warm-up: certificates issued, HBONE pools up, the policy in force both ways.
    let warm_up = run_churn(
        churner,
        bin,
        &churn_to,
        (50.0, 1.0, 50, params.churn_ports),
        Duration::from_secs(30),
    )
    .context("warm-up connections from churner")?;
    let warm_failed = warm_up["failed"].as_u64().unwrap_or(u64::MAX);
    out.warm_up = Some(warm_up.clone());
    if warm_failed != 0 || warm_up["ok"].as_u64() == Some(0) {
        bail!("warm-up connections failed: {warm_up}");
    }
    out.initial_denied = Some(denied_probe(outsider, bin, &to)?);
    if let Some((_, through)) = out.initial_denied
        && through > 0
    {
        out.failures.push(format!(
            "{through} connections of the outsider (not allowed by the policy) got through \
             before the soak"
        ));
    }

    let agent_pids = |node: &str| -> Vec<u32> {
        cluster
            .node(node)
            .map(|n| read_pids(&n.agent_cgroup().join("cgroup.procs")))
            .unwrap_or_default()
    };
    let nodes: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| n.name().to_owned())
        .collect();
    let log_offsets: BTreeMap<String, u64> = nodes
        .iter()
        .map(|n| {
            let len = fs::metadata(cluster.agent_log_path(n)).map_or(0, |m| m.len());
            (n.clone(), len)
        })
        .collect();
    for n in &nodes {
        out.counters_before.insert(n.clone(), scrape(cluster, n)?);
    }
    let cpu_groups = cpu_groups(cluster);

    // The sampler: both agents every second, until the end.
    let t0 = Instant::now();
    let phase = AtomicU8::new(Phase::Baseline as u8);
    let stop = AtomicBool::new(false);
    let churn_done = AtomicBool::new(false);
    let samples: Mutex<Vec<Sample>> = Mutex::new(Vec::new());
    let mut marks: BTreeMap<Phase, CpuMark> = BTreeMap::new();
    let mut phase_at: BTreeMap<Phase, f64> = BTreeMap::new();
    let mut enter = |p: Phase, marks: &mut BTreeMap<Phase, CpuMark>| {
        marks.insert(p, cpu_mark(&cpu_groups));
        phase_at.insert(p, t0.elapsed().as_secs_f64());
        phase.store(p as u8, Ordering::SeqCst);
        eprintln!(
            "mesh-bench soak: {:>6.1} s: phase {}",
            t0.elapsed().as_secs_f64(),
            p.label()
        );
    };
    let result = thread::scope(|s| -> Result<()> {
        enter(Phase::Baseline, &mut marks);
        let usage: BTreeMap<String, Snapshot> = nodes
            .iter()
            .map(|n| (n.clone(), Snapshot::take(&agent_pids(n))))
            .collect();
        let sampler = s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let tick = Instant::now();
                if let Ok(agents) = agent_footprints(cluster) {
                    samples.lock().unwrap().push(Sample {
                        t_s: t0.elapsed().as_secs_f64(),
                        phase: Phase::from_u8(phase.load(Ordering::SeqCst)),
                        agents,
                    });
                }
                let next = tick + Duration::from_secs(1);
                while Instant::now() < next && !stop.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(50));
                }
            }
        });
        let mut body = || -> Result<()> {
            thread::sleep(Duration::from_secs(3));
            out.baseline = agent_footprints(cluster)?;
            for n in &nodes {
                let threads = agent_pids(n).iter().filter_map(|&p| threads_of(p)).sum();
                out.threads.insert(n.clone(), threads);
                if let Some(limit) = agent_pids(n).first().and_then(|&p| nofile_of(p)) {
                    out.agent_nofile.insert(n.clone(), limit);
                }
            }

            // Open and hold.
            interrupt::check()?;
            enter(Phase::Open, &mut marks);
            let mut hold = start_holder(holder, bin, &to, params.held)?;
            let (lines, first) = hold_lines(&mut hold, Duration::from_secs(600))?;
            out.hold.opened = Some(first.clone());
            let opened = first["held"].as_u64().unwrap_or(0);
            eprintln!(
                "mesh-bench soak: holder opened {opened} connections in {:.1} s ({} failed)",
                first["open_s"].as_f64().unwrap_or(f64::NAN),
                first["failed"]
            );
            thread::sleep(Duration::from_secs(2));
            out.held_fp = agent_footprints(cluster)?;

            // Churn with reloads.
            interrupt::check()?;
            enter(Phase::Churn, &mut marks);
            let reloader =
                s.spawn(|| reload_loop(cluster, params, outsider, bin, &to, &churn_done));
            let churn = run_churn(
                churner,
                bin,
                &churn_to,
                (
                    params.rate,
                    params.seconds,
                    params.max_in_flight,
                    params.churn_ports,
                ),
                Duration::from_secs_f64(params.seconds + 120.0),
            );
            churn_done.store(true, Ordering::SeqCst);
            let reloads = reloader
                .join()
                .map_err(|_| anyhow!("the policy reloader panicked"))?;
            out.reloads = reloads;
            match churn {
                Ok(v) => {
                    eprintln!(
                        "mesh-bench soak: churn: {} ok, {} failed, {:.0}/s achieved",
                        v["ok"],
                        v["failed"],
                        v["achieved_rate"].as_f64().unwrap_or(f64::NAN)
                    );
                    out.churn = Some(v);
                }
                Err(e) => out.churn_problem = Some(format!("{e:#}")),
            }

            // Final check of every held connection, then close them.
            enter(Phase::Final, &mut marks);
            finish_holder(&mut hold, lines, &mut out.hold, Duration::from_secs(300));
            drop(hold);

            // Back to the baseline?
            enter(Phase::After, &mut marks);
            let closed_at = Instant::now();
            let back = |now: &BTreeMap<String, AgentFootprint>| {
                out.baseline.iter().all(|(n, b)| {
                    now.get(n)
                        .is_some_and(|f| f.fds <= b.fds + params.fd_tolerance)
                })
            };
            loop {
                let now = agent_footprints(cluster)?;
                if back(&now) {
                    out.fds_back_s = Some(closed_at.elapsed().as_secs_f64());
                    break;
                }
                if closed_at.elapsed() >= params.fd_wait {
                    break;
                }
                thread::sleep(Duration::from_millis(250));
            }
            thread::sleep(END_SETTLE);
            out.end_fp = agent_footprints(cluster)?;
            Ok(())
        };
        let result = body();
        stop.store(true, Ordering::SeqCst);
        let _ = sampler.join();
        for (n, snap) in &usage {
            out.peak.insert(n.clone(), snap.usage());
        }
        result
    });
    let end = cpu_mark(&cpu_groups);
    // Each phase runs until the next one starts.
    let mut order: Vec<(Phase, CpuMark)> = marks.into_iter().collect();
    order.sort_by_key(|(p, _)| *p);
    for i in 0..order.len() {
        let next = order.get(i + 1).map_or(end.clone(), |(_, m)| m.clone());
        out.cpu.insert(order[i].0, (order[i].1.clone(), next));
    }
    out.phase_start = phase_at;
    out.samples = samples.into_inner().unwrap();
    for n in &nodes {
        match scrape(cluster, n) {
            Ok(c) => {
                out.counters_after.insert(n.clone(), c);
            }
            Err(e) => out
                .failures
                .push(format!("metrics of {n} at the end: {e:#}")),
        }
        let (issued, problems, closed) = scan_log(
            &cluster.agent_log_path(n),
            log_offsets.get(n).copied().unwrap_or(0),
        );
        out.issued_lines.insert(n.clone(), issued);
        out.log_problems.insert(n.clone(), problems);
        out.closed_lines.insert(n.clone(), closed);
    }
    judge(params, out);
    result
}

/// The failures of a finished soak, into `out.failures`.
fn judge(params: &Params, out: &mut Outcome) {
    let mut f = Vec::new();
    let h = &out.hold;
    match (&h.opened, &h.final_) {
        (Some(o), Some(fin)) => {
            let opened = o["held"].as_u64().unwrap_or(0);
            if opened < params.held as u64 {
                f.push(format!(
                    "the holder opened {opened} of {} connections ({} failed: {})",
                    params.held, o["failed"], o["errors"]
                ));
            }
            let total = fin["failed_total"].as_u64().unwrap_or(u64::MAX);
            if total > 0 {
                f.push(format!(
                    "{total} held connections failed (opening: {}, sample checks: {}, final \
                     check: {}; {})",
                    o["failed"],
                    fin["failed_before_final"]
                        .as_u64()
                        .unwrap_or(0)
                        .saturating_sub(o["failed"].as_u64().unwrap_or(0)),
                    fin["failed"],
                    fin["errors"]
                ));
            }
        }
        _ => f.push(format!(
            "the holder did not report {}",
            if h.opened.is_none() {
                "its opened connections"
            } else {
                "its final check"
            }
        )),
    }
    if let Some(p) = &h.problem {
        f.push(format!("holder: {p}"));
    }
    match (&out.churn, &out.churn_problem) {
        (_, Some(p)) => f.push(format!("churn: {p}")),
        (Some(c), None) => {
            let failed = c["failed"].as_u64().unwrap_or(0) + c["unfinished"].as_u64().unwrap_or(0);
            if failed > 0 {
                f.push(format!(
                    "{failed} new connections failed or did not finish: {}",
                    c["errors"]
                ));
            }
        }
        (None, None) => f.push("churn did not run".into()),
    }
    if out.fds_back_s.is_none() {
        let detail: Vec<String> = out
            .baseline
            .iter()
            .map(|(n, b)| {
                let last = last_fds_after(out, n);
                format!(
                    "{n} {} → {}",
                    b.fds,
                    last.map_or("?".into(), |v| v.to_string())
                )
            })
            .collect();
        f.push(format!(
            "the agents' descriptors were not back to the baseline (+{}) within {:.0} s of \
             closing: {}",
            params.fd_tolerance,
            params.fd_wait.as_secs_f64(),
            detail.join(", ")
        ));
    }
    for r in &out.reloads {
        if let Some(e) = &r.error {
            f.push(format!("policy reload at {:.1} s: {e}", r.t_s));
        }
        if r.denied_through > 0 {
            f.push(format!(
                "{} of {} outsider connections got through after the reload at {:.1} s",
                r.denied_through, r.denied_tried, r.t_s
            ));
        }
    }
    let churn_s = out.churn.as_ref().and_then(|c| c["seconds"].as_f64());
    let expected = churn_s.map_or(0, |s| (s / params.reload_every).floor() as usize);
    if out.reloads.len() < expected.min(1) {
        f.push("no policy reload happened during the churn".into());
    }
    let renewals: f64 = out
        .counters_after
        .iter()
        .map(|(n, a)| a.renewals_ok - out.counters_before.get(n).map_or(0.0, |b| b.renewals_ok))
        .sum();
    let lifetime = humantime_secs(&out.lifetime);
    if renewals < 1.0 && lifetime.is_some_and(|l| l < out.elapsed_s.max(params.seconds)) {
        f.push(format!(
            "no certificate was renewed (lifetime {}), so the soak did not test renewals",
            out.lifetime
        ));
    }
    out.failures.extend(f);
}

fn last_fds_after(out: &Outcome, node: &str) -> Option<u64> {
    out.samples
        .iter()
        .rev()
        .find(|s| s.phase == Phase::After)
        .and_then(|s| s.agents.get(node).map(|f| f.fds))
}

/// "20s", "1m", "500ms" → seconds (the forms a soak uses).
fn humantime_secs(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    })
}

// ------------------------------------------------------------ the programs

/// `mesh-load serve` on [`ECHO_PORT`] and the `churn_ports` after it.
fn start_server(echo: &Pod, bin: &Path, log: &Path, churn_ports: u16) -> Result<ChildGuard> {
    let file = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut cmd = echo.command(
        bin,
        [
            "serve".to_string(),
            "--port".into(),
            ECHO_PORT.to_string(),
            "--ports".into(),
            (churn_ports + 1).to_string(),
        ],
    )?;
    cmd.stdout(file.try_clone()?).stderr(file);
    let child = cmd.spawn().context("spawn mesh-load serve")?;
    let mut g = ChildGuard::new(child, "mesh-load serve in pod echo".into());
    echo.wait_for_port(&mut g, ECHO_PORT)?;
    echo.wait_for_port(&mut g, ECHO_PORT + churn_ports)?;
    Ok(g)
}

/// `mesh-load churn` in `pod`, to completion; its summary line.
fn run_churn(
    pod: &Pod,
    bin: &Path,
    to: &str,
    (rate, seconds, max_in_flight, ports): (f64, f64, usize, u16),
    timeout: Duration,
) -> Result<Value> {
    let out = pod.run(
        bin,
        [
            "churn".to_string(),
            "--to".into(),
            to.into(),
            "--rate".into(),
            rate.to_string(),
            "--seconds".into(),
            seconds.to_string(),
            "--max-in-flight".into(),
            max_in_flight.to_string(),
            "--ports".into(),
            ports.to_string(),
        ],
        timeout,
    )?;
    let text = out.stdout_str();
    let summary = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "churn");
    match summary {
        Some(v) if out.success() => Ok(v),
        _ => bail!(
            "mesh-load churn in {} exited {:?}: {}{}",
            pod.name(),
            out.code(),
            text.lines().last().unwrap_or(""),
            out.stderr_str()
        ),
    }
}

/// The outsider's connections (the policy does not allow its identity): (tried, got through).
fn denied_probe(outsider: &Pod, bin: &Path, to: &str) -> Result<(u64, u64)> {
    let v = run_churn(
        outsider,
        bin,
        to,
        (f64::from(DENIED_PROBE) * 4.0, 0.25, 10, 1),
        Duration::from_secs(30),
    )
    .context("the outsider's connections")?;
    Ok((
        v["launched"].as_u64().unwrap_or(0),
        v["ok"].as_u64().unwrap_or(0),
    ))
}

fn start_holder(holder: &Pod, bin: &Path, to: &str, n: usize) -> Result<ChildGuard> {
    holder.spawn_piped(
        bin,
        [
            "hold".to_string(),
            "--to".into(),
            to.into(),
            "--count".into(),
            n.to_string(),
        ],
    )
}

/// The holder's stdout as JSON lines on a channel, and its first line (`opened`).
fn hold_lines(hold: &mut ChildGuard, timeout: Duration) -> Result<(mpsc::Receiver<Value>, Value)> {
    let stdout = hold
        .child_mut()
        .stdout
        .take()
        .context("the holder's stdout is not piped")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let v = serde_json::from_str::<Value>(&line)
                .unwrap_or_else(|_| serde_json::json!({"event": "text", "text": line}));
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if v["event"] == "opened" => return Ok((rx, v)),
            Ok(v) => eprintln!("mesh-bench soak: holder: {v}"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("the holder did not finish opening within {timeout:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = hold.child_mut().try_wait().ok().flatten();
                bail!("the holder exited while opening ({status:?})")
            }
        }
    }
}

/// Closes the holder's stdin (it checks every connection, closes them and exits) and collects
/// what it said since it opened them.
fn finish_holder(
    hold: &mut ChildGuard,
    lines: mpsc::Receiver<Value>,
    res: &mut HoldResult,
    timeout: Duration,
) {
    fn take(v: Value, res: &mut HoldResult) {
        match v["event"].as_str() {
            Some("check") => res.checks.push(v),
            Some("broken") => res.broken.push(v),
            Some("final") => res.final_ = Some(v),
            Some("closed") => res.closed = Some(v),
            _ => eprintln!("mesh-bench soak: holder: {v}"),
        }
    }
    while let Ok(v) = lines.try_recv() {
        take(v, res);
    }
    if let Ok(Some(status)) = hold.child_mut().try_wait() {
        res.problem = Some(format!("exited during the churn ({status})"));
    }
    drop(hold.child_mut().stdin.take());
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(v) => take(v, res),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                res.problem = Some(format!("no final check within {timeout:?}"));
                return;
            }
        }
    }
    match hold.child_mut().wait() {
        Ok(s) if s.success() => {}
        Ok(s) => {
            res.problem
                .get_or_insert_with(|| format!("exited with {s}"));
        }
        Err(e) => {
            res.problem.get_or_insert_with(|| format!("wait: {e}"));
        }
    }
}

// ----------------------------------------------------------------- policy

/// The policy, in one of two equivalent forms: variant 0 allows the holder and the churner,
/// variant 1 lists them the other way round with one more principal that no pod has. `seq` goes
/// into an annotation (ignored by the agent) so that each write differs.
fn policy_yaml(td: &str, variant: usize, seq: usize, churn_ports: u16) -> String {
    let ports = (0..=churn_ports)
        .map(|k| format!("\"{}\"", ECHO_PORT + k))
        .collect::<Vec<_>>()
        .join(", ");
    let p = |sa: &str| format!("\"{td}/ns/default/sa/{sa}\"");
    let principals = if variant % 2 == 0 {
        [p("soak-holder"), p("soak-churn")].join(", ")
    } else {
        [p("soak-churn"), p("soak-holder"), p("soak-spare")].join(", ")
    };
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {POLICY_NAME}
  namespace: default
  annotations:
    soak/sequence: \"{seq}\"
spec:
  selector:
    matchLabels:
      app: soak-echo
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [{principals}]
    to:
    - operation:
        ports: [{ports}]
"
    )
}

/// Writes the policy file as the agents read it (a temporary hidden file renamed over it).
fn write_policy(cluster: &Cluster, yaml: &str) -> Result<()> {
    let dir = cluster.policy_dir();
    let tmp = dir.join(format!(".{POLICY_NAME}.yaml.tmp"));
    fs::write(&tmp, yaml).with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, dir.join(format!("{POLICY_NAME}.yaml"))).context("rename the policy file")
}

/// Every `reload_every` seconds until `done`: rewrite the policy, wait for both agents to say
/// they loaded it, check the outsider is still refused.
fn reload_loop(
    cluster: &Cluster,
    params: &Params,
    outsider: &Pod,
    bin: &Path,
    to: &str,
    done: &AtomicBool,
) -> Vec<Reload> {
    let start = Instant::now();
    let every = Duration::from_secs_f64(params.reload_every);
    let nodes: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| n.name().to_owned())
        .collect();
    let mut reloads = Vec::new();
    let mut next = start + every;
    loop {
        while Instant::now() < next {
            if done.load(Ordering::SeqCst) {
                return reloads;
            }
            thread::sleep(Duration::from_millis(50));
        }
        next += every;
        let seq = reloads.len() + 1;
        let variant = seq % 2;
        let mut r = Reload {
            t_s: start.elapsed().as_secs_f64(),
            variant,
            confirmed_ms: None,
            error: None,
            denied_tried: 0,
            denied_through: 0,
        };
        let before: Result<Vec<f64>> = nodes
            .iter()
            .map(|n| scrape(cluster, n).map(|c| c.reloads_loaded))
            .collect();
        let written = Instant::now();
        let outcome = before.and_then(|before| {
            let yaml = policy_yaml(cluster.trust_domain(), variant, seq, params.churn_ports);
            write_policy(cluster, &yaml)?;
            for (n, b) in nodes.iter().zip(&before) {
                loop {
                    let c = scrape(cluster, n)?;
                    if c.reloads_rejected > 0.0 {
                        bail!("{n}'s agent rejected the policy");
                    }
                    if c.reloads_loaded > *b {
                        break;
                    }
                    if written.elapsed() > RELOAD_TIMEOUT {
                        bail!("{n}'s agent did not reload within {RELOAD_TIMEOUT:?}");
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
            Ok(())
        });
        match outcome {
            Ok(()) => r.confirmed_ms = Some(written.elapsed().as_secs_f64() * 1e3),
            Err(e) => r.error = Some(format!("{e:#}")),
        }
        match denied_probe(outsider, bin, to) {
            Ok((tried, through)) => {
                r.denied_tried = tried;
                r.denied_through = through;
            }
            Err(e) => {
                r.error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        eprintln!(
            "mesh-bench soak: reload {seq} (variant {variant}) at {:.1} s: {}; outsider {}/{} \
             refused",
            r.t_s,
            match (&r.confirmed_ms, &r.error) {
                (Some(ms), _) => format!("loaded by both agents in {ms:.0} ms"),
                (None, Some(e)) => e.clone(),
                (None, None) => "?".into(),
            },
            r.denied_tried - r.denied_through,
            r.denied_tried
        );
        reloads.push(r);
    }
}

// ---------------------------------------------------------------- metrics

/// The node's agent metrics (`:15020/metrics`, fetched with curl in the node's netns).
fn scrape(cluster: &Cluster, node: &str) -> Result<AgentCounters> {
    let out = cluster.run_in_node(
        node,
        "curl",
        ["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"],
        Duration::from_secs(10),
    )?;
    if !out.success() {
        bail!("metrics of {node}: {}", out.stderr_str());
    }
    Ok(parse_counters(&out.stdout_str()))
}

fn parse_counters(text: &str) -> AgentCounters {
    let mut c = AgentCounters::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let label = |key: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == key).then(|| v.trim_matches('"').to_owned())
            })
        };
        match name {
            "mesh_agent_certificate_renewals_total" => match label("result").as_deref() {
                Some("success") => c.renewals_ok += value,
                Some("failure") => c.renewals_failed += value,
                _ => {}
            },
            "mesh_agent_policy_reloads_total" => match label("result").as_deref() {
                Some("loaded") => c.reloads_loaded += value,
                Some("rejected") => c.reloads_rejected += value,
                _ => {}
            },
            "mesh_agent_inbound_rejections_total" => {
                *c.rejections
                    .entry(label("reason").unwrap_or_else(|| "?".into()))
                    .or_default() += value;
            }
            "mesh_agent_hbone_connections" => c.hbone_connections = value,
            _ => {}
        }
    }
    c
}

/// From the agent's log after `offset`: `certificate issued` lines, warn/error lines by
/// (level, message), and `connection closed` lines.
fn scan_log(path: &Path, offset: u64) -> (u64, BTreeMap<(String, String), u64>, u64) {
    let mut issued = 0;
    let mut closed = 0;
    let mut problems = BTreeMap::new();
    let Ok(mut file) = fs::File::open(path) else {
        return (0, problems, 0);
    };
    if file.seek(SeekFrom::Start(offset)).is_err() {
        return (0, problems, 0);
    }
    let mut text = Vec::new();
    if file.read_to_end(&mut text).is_err() {
        return (0, problems, 0);
    }
    for line in text.split(|&b| b == b'\n') {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        let message = v
            .pointer("/fields/message")
            .or_else(|| v.get("message"))
            .and_then(Value::as_str)
            .unwrap_or("");
        match message {
            "certificate issued" => issued += 1,
            "connection closed" => closed += 1,
            _ => {}
        }
        let level = v.get("level").and_then(Value::as_str).unwrap_or("");
        if level.eq_ignore_ascii_case("warn") || level.eq_ignore_ascii_case("error") {
            // A closed connection's line says why: its rejection, flags or error.
            let field = |k: &str| {
                v.pointer(&format!("/fields/{k}"))
                    .or_else(|| v.get(k))
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
            };
            let why = ["rejection", "response_flags", "error"]
                .iter()
                .find_map(|k| field(k).map(|x| format!("{k}={}", clip(&x, 80))));
            let what = match why {
                Some(w) if message == "connection closed" => format!("{message} ({w})"),
                _ => message.to_owned(),
            };
            *problems
                .entry((level.to_ascii_lowercase(), what))
                .or_default() += 1;
        }
    }
    (issued, problems, closed)
}

fn clip(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

// -------------------------------------------------------------------- CPU

/// (name, cgroup directory) of everything whose CPU the report shows.
fn cpu_groups(cluster: &Cluster) -> Vec<(String, PathBuf)> {
    let mut groups = Vec::new();
    for n in cluster.nodes() {
        groups.push((format!("{} agent", n.name()), n.agent_cgroup()));
    }
    for n in cluster.nodes() {
        for p in n.pods() {
            groups.push((format!("{} pod", p.name()), p.cgroup().to_path_buf()));
        }
    }
    groups
}

fn cpu_mark(groups: &[(String, PathBuf)]) -> CpuMark {
    CpuMark {
        at: Some(Instant::now()),
        groups: groups
            .iter()
            .map(|(name, dir)| (name.clone(), cgroup_cpu_s(dir).unwrap_or(0.0)))
            .collect(),
        harness: crate::usage::cpu_seconds(std::process::id()).unwrap_or(0.0),
        machine_busy: machine_busy_s().unwrap_or(0.0),
    }
}

/// `usage_usec` of the cgroup's `cpu.stat` (every process that ran in it, exited ones too).
fn cgroup_cpu_s(dir: &Path) -> Option<f64> {
    let stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
    let usec: f64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))?
        .trim()
        .parse()
        .ok()?;
    Some(usec / 1e6)
}

/// Busy time of all CPUs since boot, seconds (`/proc/stat`: user, nice, system, irq, softirq,
/// steal).
fn machine_busy_s() -> Option<f64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(busy as f64 / hz)
}

fn threads_of(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// Raises RLIMIT_NOFILE (soft and hard) to `fs.nr_open`; the hard limit after, if known.
fn raise_nofile() -> Option<u64> {
    let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let want = libc::rlimit {
        rlim_cur: nr_open,
        rlim_max: nr_open,
    };
    // SAFETY: a valid pointer to an rlimit; raising the hard limit needs root, which the
    // cluster needs anyway.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
        eprintln!(
            "mesh-bench soak: cannot raise the open-files limit to {nr_open}: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) } == 0).then_some(now.rlim_max)
}

/// The soft `Max open files` of a process.
fn nofile_of(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()
        .map(str::to_owned)
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ----------------------------------------------------------------- report

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn ms(us: Option<f64>) -> String {
    us.map_or("–".into(), |v| format!("{:.2}", v / 1000.0))
}

/// CPU seconds of a group over a phase.
fn cpu_of(span: &(CpuMark, CpuMark), group: &str) -> f64 {
    span.1.groups.get(group).copied().unwrap_or(0.0)
        - span.0.groups.get(group).copied().unwrap_or(0.0)
}

fn span_s(span: &(CpuMark, CpuMark)) -> f64 {
    match (span.0.at, span.1.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    }
}

fn report(params: &Params, out: &Outcome) -> String {
    let (nproc, kernel, cpu) = machine();
    let ncpu: f64 = nproc.parse().unwrap_or(1.0);
    let mut s = String::new();
    let _ = writeln!(s, "# mesh soak results\n");
    let _ = writeln!(
        s,
        "{}; `{}`; run took {:.0} s. **Verdict: {}**{}\n",
        out.started_utc,
        params.command_line(),
        out.elapsed_s,
        if out.failures.is_empty() {
            "PASS"
        } else {
            "FAIL"
        },
        if out.failures.is_empty() {
            String::new()
        } else {
            format!(
                " — {}",
                out.failures
                    .iter()
                    .map(|f| f.replace('\n', " "))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        }
    );
    let _ = writeln!(
        s,
        "Machine: {nproc} CPUs (nproc), kernel {kernel}, CPU model: {cpu}; load average \
         (1, 5, 15 min) {} before and {} after the soak. All nodes and pods are network \
         namespaces of this one machine, so the agents, the load generators and anything else \
         running on the machine share its CPUs.\n",
        out.load_before, out.load_after
    );
    let _ = writeln!(
        s,
        "Setup: two nodes. node-a: `holder` (`sa/soak-holder`), `churner` (`sa/soak-churn`), \
         `outsider` (`sa/soak-outsider`); node-b: `echo` (`sa/soak-echo`) running \
         `mesh-load serve` on port {ECHO_PORT} (the held connections) and {} to {} (the new \
         ones, in turn: node-b's agent delivers every connection from echo's own address, and \
         one (source address, destination address and port) allows about 28,000 connections \
         per 60 s of TIME_WAIT, see docs/performance.md). All four enrolled, so every \
         connection is client → node-a's agent → HBONE (mutual TLS) → node-b's agent → echo. \
         Certificate lifetime {} (renewed at about half of it). An AuthorizationPolicy on `echo` \
         ALLOWs the holder and the churner on those ports; during the churn it is rewritten every {} \
         s, alternating between two equivalent forms, each reload confirmed on both agents by \
         `mesh_agent_policy_reloads_total{{result=\"loaded\"}}`, and after each the outsider's \
         {DENIED_PROBE} connections must all be refused. Load: `mesh-load` (Rust, tokio, one \
         worker thread each; tests/src/bin/mesh-load.rs); the churn keeps at most {} new \
         connections in flight and falls behind its schedule rather than exceed that. Agent \
         worker threads: default (half the CPUs); agent threads in total: {}. Agents' open-files \
         limit: {} (the harness raised its own to {} before starting them).\n",
        ECHO_PORT + 1,
        ECHO_PORT + params.churn_ports,
        out.lifetime,
        params.reload_every,
        params.max_in_flight,
        out.threads
            .iter()
            .map(|(n, t)| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join(", "),
        out.agent_nofile
            .iter()
            .map(|(n, l)| format!("{n} {l}"))
            .collect::<Vec<_>>()
            .join(", "),
        out.nofile.map_or("?".into(), |n| n.to_string())
    );

    // Summary.
    let _ = writeln!(s, "## Summary\n");
    let _ = writeln!(s, "| figure | result |\n|---|---|");
    if let Some(o) = &out.hold.opened {
        let _ = writeln!(
            s,
            "| held connections | {} of {} opened in {:.1} s (200 at a time, 1 byte echoed on \
             each), {} failed |",
            o["held"],
            params.held,
            num(o, "open_s"),
            o["failed"]
        );
    }
    if let Some(f) = &out.hold.final_ {
        let _ = writeln!(
            s,
            "| held connections checked | {} sample checks in {} rounds during the churn (1,000 \
             every 2 s, in turn); final check of {}: {} failed; failed in total: **{}** |",
            f["sample_checks"], f["rounds"], f["checked"], f["failed"], f["failed_total"]
        );
    }
    if let Some(c) = &out.churn {
        let _ = writeln!(
            s,
            "| new connections | target {:.0}/s for {:.0} s ({} planned, 1 KiB echoed on each): \
             {} launched ({} not: held back by the in-flight limit until the end), {} ok, **{} \
             failed**, {} unfinished |",
            num(c, "target_rate"),
            num(c, "seconds"),
            c["planned"],
            c["launched"],
            c["not_launched"],
            c["ok"],
            c["failed"],
            c["unfinished"]
        );
        let _ = writeln!(
            s,
            "| new connections/s achieved | **{:.0}** (ok ÷ {:.1} s, from the start to the last \
             one done); per second: min {}, median {}, max {}; at most {} in flight (limit {}; it held \
             launches back at {} of the 2 ms ticks) |",
            num(c, "achieved_rate"),
            num(c, "last_done_s").max(num(c, "seconds")),
            c["per_second_min"],
            c["per_second_median"],
            c["per_second_max"],
            c["max_in_flight_seen"],
            params.max_in_flight,
            c["held_back_ticks"]
        );
        let lat = &c["latency_us"];
        let _ = writeln!(
            s,
            "| new connection latency (connect → echo read) | p50 {} ms, p90 {} ms, p99 {} ms, \
             p99.9 {} ms, max {} ms |",
            ms(lat["p50"].as_f64()),
            ms(lat["p90"].as_f64()),
            ms(lat["p99"].as_f64()),
            ms(lat["p999"].as_f64()),
            ms(lat["max"].as_f64())
        );
        if let Some(errors) = c["errors"].as_object()
            && !errors.is_empty()
        {
            let _ = writeln!(s, "| new connection failures | {} |", c["errors"]);
        }
    } else if let Some(p) = &out.churn_problem {
        let _ = writeln!(s, "| new connections | failed to run: {p} |");
    }
    let delta = |n: &str, f: fn(&AgentCounters) -> f64| -> f64 {
        out.counters_after.get(n).map_or(f64::NAN, f)
            - out.counters_before.get(n).map_or(f64::NAN, f)
    };
    let nodes: Vec<&String> = out.baseline.keys().collect();
    let renewals: Vec<String> = nodes
        .iter()
        .map(|n| {
            format!(
                "{n} {:.0} ({:.0} failed; {} `certificate issued` lines)",
                delta(n, |c| c.renewals_ok),
                delta(n, |c| c.renewals_failed),
                out.issued_lines.get(*n).copied().unwrap_or(0)
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "| certificate renewals during the soak | {} |",
        renewals.join("; ")
    );
    let confirmed: Vec<f64> = out.reloads.iter().filter_map(|r| r.confirmed_ms).collect();
    let refused: u64 = out
        .reloads
        .iter()
        .map(|r| r.denied_tried - r.denied_through)
        .sum();
    let tried: u64 = out.reloads.iter().map(|r| r.denied_tried).sum();
    let _ = writeln!(
        s,
        "| policy reloads during the churn | {} written, {} confirmed on both agents (write → \
         both loaded: median {:.0} ms, max {:.0} ms); agents' reload counters: {}; outsider \
         connections refused after the reloads: {refused} of {tried} |",
        out.reloads.len(),
        confirmed.len(),
        median(&confirmed).unwrap_or(f64::NAN),
        confirmed.iter().copied().fold(f64::NAN, f64::max),
        nodes
            .iter()
            .map(|n| format!(
                "{n} +{:.0} loaded, +{:.0} rejected",
                delta(n, |c| c.reloads_loaded),
                delta(n, |c| c.reloads_rejected)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rejections: Vec<String> = nodes
        .iter()
        .filter_map(|n| {
            let after = out.counters_after.get(*n)?;
            let before = out.counters_before.get(*n);
            let items: Vec<String> = after
                .rejections
                .iter()
                .map(|(reason, v)| {
                    let b = before
                        .and_then(|b| b.rejections.get(reason))
                        .unwrap_or(&0.0);
                    (reason, v - b)
                })
                .filter(|(_, d)| *d > 0.0)
                .map(|(reason, d)| format!("{reason} {d:.0}"))
                .collect();
            Some(format!(
                "{n}: {}",
                if items.is_empty() {
                    "none".into()
                } else {
                    items.join(", ")
                }
            ))
        })
        .collect();
    let _ = writeln!(
        s,
        "| inbound rejections during the soak (`mesh_agent_inbound_rejections_total`) | {} \
         (the outsider's are `policy_denied`) |",
        rejections.join("; ")
    );
    if let Some(b) = out.fds_back_s {
        let _ = writeln!(
            s,
            "| descriptors back to the baseline (+{}) | {b:.1} s after the holder closed its \
             connections |",
            params.fd_tolerance
        );
    } else {
        let _ = writeln!(
            s,
            "| descriptors back to the baseline (+{}) | **not within {:.0} s** |",
            params.fd_tolerance,
            params.fd_wait.as_secs_f64()
        );
    }
    let _ = writeln!(s);

    // Memory and descriptors.
    let _ = writeln!(s, "## Agents' memory and descriptors\n");
    let _ = writeln!(
        s,
        "`VmRSS` and the number of entries of `/proc/<pid>/fd` of each agent (pids from its \
         cgroup), sampled every second ({} samples); baseline after the warm-up; held: 2 s after \
         the last held connection opened; peak: the largest 1 s sample (`VmHWM`, the kernel's \
         peak since the baseline, in brackets); churn first/last 10 s: the mean of the samples; \
         end: {:.0} s after the descriptors were back.\n",
        out.samples.len(),
        END_SETTLE.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "| agent | RSS baseline MiB | RSS held MiB | RSS churn first 10 s → last 10 s MiB | RSS \
         peak MiB | RSS end MiB | fds baseline | fds held | fds peak | fds end |"
    );
    let _ = writeln!(s, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    let churn_start = out.phase_start.get(&Phase::Churn).copied();
    let churn_end = out.phase_start.get(&Phase::Final).copied();
    for n in &nodes {
        let node = n.as_str();
        let vals = |f: fn(&AgentFootprint) -> u64| -> Vec<u64> {
            out.samples
                .iter()
                .filter_map(|smp| smp.agents.get(node).map(f))
                .collect()
        };
        let rss = vals(|f| f.rss_kib);
        let fds = vals(|f| f.fds);
        let mean_rss = |from: f64, to: f64| -> Option<f64> {
            let v: Vec<f64> = out
                .samples
                .iter()
                .filter(|smp| smp.phase == Phase::Churn && smp.t_s >= from && smp.t_s < to)
                .filter_map(|smp| smp.agents.get(node).map(|f| mib(f.rss_kib)))
                .collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let (first, last) = match (churn_start, churn_end) {
            (Some(a), Some(b)) => (mean_rss(a, a + 10.0), mean_rss(b - 10.0, b)),
            _ => (None, None),
        };
        let fmt = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.1}"));
        let fp = |m: &BTreeMap<String, AgentFootprint>| m.get(node).copied();
        let _ = writeln!(
            s,
            "| {node} | {} | {} | {} → {} | {} ({}) | {} | {} | {} | {} | {} |",
            fmt(fp(&out.baseline).map(|f| mib(f.rss_kib))),
            fmt(fp(&out.held_fp).map(|f| mib(f.rss_kib))),
            fmt(first),
            fmt(last),
            fmt(rss.iter().max().map(|&k| mib(k))),
            fmt(out.peak.get(node).map(|u| u.peak_rss_mib)),
            fmt(fp(&out.end_fp).map(|f| mib(f.rss_kib))),
            fp(&out.baseline).map_or("–".into(), |f| f.fds.to_string()),
            fp(&out.held_fp).map_or("–".into(), |f| f.fds.to_string()),
            fds.iter().max().map_or("–".into(), u64::to_string),
            fp(&out.end_fp).map_or("–".into(), |f| f.fds.to_string()),
        );
    }
    let _ = writeln!(s);

    // CPU.
    let _ = writeln!(s, "## CPU per phase\n");
    let groups: Vec<String> = out
        .cpu
        .values()
        .next()
        .map(|(a, _)| a.groups.keys().cloned().collect())
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "CPU seconds per phase from the cgroups' `cpu.stat` `usage_usec` (agents; each pod, \
         with the `mesh-load` process in it), this harness's own (`/proc/self/stat`), and the \
         whole machine's busy time (`/proc/stat`: everything but idle and iowait, over all {nproc} \
         CPUs). \"Rest\" is the machine's busy time minus all of these: other processes (the \
         other builds on this machine), and kernel work not charged to them. In brackets: share \
         of one CPU over the phase.\n"
    );
    let mut header = String::from("| phase | s |");
    let mut rule = String::from("|---|---:|");
    for g in &groups {
        let _ = write!(header, " {g} |");
        rule.push_str("---:|");
    }
    header.push_str(" harness | rest | machine busy (of all CPUs) |");
    rule.push_str("---:|---:|---:|");
    let _ = writeln!(s, "{header}\n{rule}");
    for (phase, span) in &out.cpu {
        let secs = span_s(span);
        let share = |cpu_s: f64| {
            if secs > 0.0 {
                format!("{cpu_s:.2} ({:.0} %)", 100.0 * cpu_s / secs)
            } else {
                format!("{cpu_s:.2}")
            }
        };
        let mut row = format!("| {} | {secs:.1} |", phase.label());
        let mut ours = 0.0;
        for g in &groups {
            let c = cpu_of(span, g);
            ours += c;
            let _ = write!(row, " {} |", share(c));
        }
        let harness = span.1.harness - span.0.harness;
        ours += harness;
        let busy = span.1.machine_busy - span.0.machine_busy;
        let _ = write!(
            row,
            " {} | {} | {:.1} s ({:.0} % of {nproc} CPUs) |",
            share(harness),
            share((busy - ours).max(0.0)),
            busy,
            if secs > 0.0 {
                100.0 * busy / (secs * ncpu)
            } else {
                0.0
            }
        );
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(s);
    let limit = limiting(params, out, &groups, ncpu);
    if !limit.is_empty() {
        let _ = writeln!(s, "{limit}\n");
    }

    // Reloads.
    if !out.reloads.is_empty() {
        let _ = writeln!(s, "## Policy reloads\n");
        let _ = writeln!(
            s,
            "| # | at s (of the churn) | form | write → loaded by both agents ms | outsider refused |"
        );
        let _ = writeln!(s, "|---:|---:|---|---:|---:|");
        for (i, r) in out.reloads.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {} | {} | {}/{} |",
                i + 1,
                r.t_s,
                if r.variant == 0 {
                    "holder, churner"
                } else {
                    "churner, holder, spare"
                },
                match (&r.confirmed_ms, &r.error) {
                    (Some(v), _) => format!("{v:.0}"),
                    (None, Some(e)) => format!("**{e}**"),
                    _ => "?".into(),
                },
                r.denied_tried - r.denied_through,
                r.denied_tried
            );
        }
        let _ = writeln!(s);
    }

    // Time series.
    let _ = writeln!(s, "## Time series\n");
    let _ = writeln!(
        s,
        "Every 5th one-second sample (t from the start of the baseline; the churn began at {} \
         s and ended at {} s).\n",
        churn_start.map_or("?".into(), |v| format!("{v:.0}")),
        churn_end.map_or("?".into(), |v| format!("{v:.0}"))
    );
    let mut header = String::from("| t s | phase |");
    let mut rule = String::from("|---:|---|");
    for n in &nodes {
        let _ = write!(header, " {n} RSS MiB | {n} fds |");
        rule.push_str("---:|---:|");
    }
    let _ = writeln!(s, "{header}\n{rule}");
    for smp in out.samples.iter().step_by(5) {
        let mut row = format!("| {:.0} | {} |", smp.t_s, smp.phase.label());
        for n in &nodes {
            match smp.agents.get(*n) {
                Some(f) => {
                    let _ = write!(row, " {:.1} | {} |", mib(f.rss_kib), f.fds);
                }
                None => row.push_str(" – | – |"),
            }
        }
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(s);
    if let Some(c) = &out.churn
        && let Some(per) = c["per_second"].as_array()
    {
        let _ = writeln!(
            s,
            "New connections completed in each second of the churn: {}\n",
            per.iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // The agents' own words.
    let _ = writeln!(s, "## Agents' logs during the soak\n");
    for n in &nodes {
        let problems = out.log_problems.get(*n).cloned().unwrap_or_default();
        let _ = writeln!(
            s,
            "- {n}: {} `connection closed` lines; {}",
            out.closed_lines.get(*n).copied().unwrap_or(0),
            if problems.is_empty() {
                "no warn or error line".to_string()
            } else {
                problems
                    .iter()
                    .map(|((level, msg), count)| format!("{count}× {level} `{msg}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    let _ = writeln!(s);
    if !out.hold.broken.is_empty() {
        let _ = writeln!(
            s,
            "First held-connection failures (the holder's own lines):\n"
        );
        for b in &out.hold.broken {
            let _ = writeln!(s, "- `{b}`");
        }
        let _ = writeln!(s);
    }
    s
}

/// What kept the churn from its target rate, from the CPU figures: a sentence, or nothing when
/// the target was reached.
fn limiting(params: &Params, out: &Outcome, groups: &[String], ncpu: f64) -> String {
    let (Some(c), Some(span)) = (&out.churn, out.cpu.get(&Phase::Churn)) else {
        return String::new();
    };
    let achieved = num(c, "achieved_rate");
    let secs = span_s(span);
    if secs <= 0.0 {
        return String::new();
    }
    let busy = (span.1.machine_busy - span.0.machine_busy) / (secs * ncpu);
    let mut shares: Vec<(String, f64)> = groups
        .iter()
        .map(|g| (g.clone(), cpu_of(span, g) / secs))
        .collect();
    shares.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<String> = shares
        .iter()
        .take(4)
        .map(|(g, v)| format!("{g} {:.0} %", v * 100.0))
        .collect();
    let reached = achieved >= params.rate * 0.99;
    // Seconds of the window in which fewer than half the target completed.
    let slow: Vec<(usize, u64)> = c["per_second"]
        .as_array()
        .map(|v| {
            v.iter()
                .enumerate()
                .filter_map(|(i, n)| Some((i, n.as_u64()?)))
                .filter(|&(_, n)| (n as f64) < params.rate / 2.0)
                .collect()
        })
        .unwrap_or_default();
    let stalls = if slow.is_empty() {
        String::new()
    } else {
        format!(
            " Seconds of the churn with fewer than half the target done (second: connections): \
             {}; while they lasted the in-flight limit held launches back.",
            slow.iter()
                .map(|(i, n)| format!("{i}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let cpus = if reached {
        ""
    } else if busy >= 0.9 {
        " The CPUs were saturated: the agents, the load generators and the machine's other work \
         competed for them."
    } else {
        " The CPUs were not saturated over the phase as a whole (each agent runs one worker \
         thread on this 2-CPU machine: a share near 100 % is an agent at its limit)."
    };
    format!(
        "**Rate:** {} {achieved:.0} new connections/s against a target of {:.0}/s. During the \
         churn the machine's CPUs were {:.0} % busy; the largest consumers (share of one CPU): \
         {}.{cpus}{stalls}",
        if reached { "reached" } else { "achieved only" },
        params.rate,
        busy * 100.0,
        top.join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_counters() {
        let text = "# HELP x\n\
            mesh_agent_certificate_renewals_total{result=\"success\"} 7\n\
            mesh_agent_certificate_renewals_total{result=\"failure\"} 1\n\
            mesh_agent_policy_reloads_total{result=\"loaded\"} 3\n\
            mesh_agent_inbound_rejections_total{reason=\"policy_denied\"} 5\n\
            mesh_agent_hbone_connections 2\n";
        let c = parse_counters(text);
        assert_eq!(c.renewals_ok, 7.0);
        assert_eq!(c.renewals_failed, 1.0);
        assert_eq!(c.reloads_loaded, 3.0);
        assert_eq!(c.reloads_rejected, 0.0);
        assert_eq!(c.rejections.get("policy_denied"), Some(&5.0));
        assert_eq!(c.hbone_connections, 2.0);
    }

    #[test]
    fn parses_the_arguments() {
        let p = Params::parse(
            [
                "--held=200",
                "--rate",
                "100",
                "--seconds=5",
                "--lifetime=4s",
            ]
            .map(String::from),
        )
        .unwrap();
        assert_eq!((p.held, p.rate, p.seconds), (200, 100.0, 5.0));
        assert_eq!(p.lifetime, "4s");
        assert!(Params::parse(["--held=0".to_string()]).is_err());
        assert!(Params::parse(["--bogus=1".to_string()]).is_err());
    }

    #[test]
    fn reads_durations() {
        assert_eq!(humantime_secs("20s"), Some(20.0));
        assert_eq!(humantime_secs("500ms"), Some(0.5));
        assert_eq!(humantime_secs("2m"), Some(120.0));
        assert_eq!(humantime_secs("soon"), None);
    }

    #[test]
    fn the_two_policy_forms_differ_only_in_order_and_the_spare() {
        let principals = |variant| {
            let yaml = policy_yaml("cluster.local", variant, 1, 8);
            let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
            let mut p: Vec<String> = v["spec"]["rules"][0]["from"][0]["source"]["principals"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_owned())
                .collect();
            p.sort();
            p
        };
        let a = principals(0);
        let mut b = principals(1);
        b.retain(|x| !x.ends_with("/soak-spare"));
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
    }
}
