//! Whether the size of the mesh's state matters.
//!
//! Both agents are restarted first, so that their memory starts clean (the idle-connections
//! measurement before leaves tens of MiB behind). The mesh path's new connections per second
//! and 1 KiB request/response latency are then measured with the bench cluster's own state (its
//! few workloads) and with a large one: the same cluster file plus a node entry that no agent
//! serves (`bench-scale`) holding 10,000 workloads, and 1,000 Services selecting 10 of them
//! each. Both agents still read, check and index all of it on every reload (by IP, by UID, each
//! Service's endpoints) although none of it is theirs to serve. The two states alternate between
//! repetitions (small first, then large first, ...), switched live: the harness rewrites the
//! cluster file and both agents reload it.
//!
//! At the large state, the file is then written again with one more workload each time, and per
//! agent the time from the write to its `cluster file loaded` line (that line's `timestamp`), its
//! CPU seconds and its memory are read. fanotify on the file's directory gives the instant the
//! harness closed the new file (it renames it right after) and the instant each agent opened it:
//! the time splits into the wait for the agent's next poll of the file (every 500 ms) and the
//! reading, checking and indexing of the file.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use mesh_tests::{Cluster, Reload, interrupt};
use serde_json::Value;

use crate::idle::{AgentFootprint, agent_footprints};
use crate::report::{median, mib};
use crate::usage::{Snapshot, read_pids};
use crate::{Figure, Opts};

/// Workloads and Services added for the large state.
pub const EXTRA_WORKLOADS: usize = 10_000;
pub const EXTRA_SERVICES: usize = 1_000;
/// Workloads each extra Service selects.
const PER_SERVICE: usize = EXTRA_WORKLOADS / EXTRA_SERVICES;
/// The node entry that holds the extra workloads; no agent runs for it.
pub const SCALE_NODE: &str = "bench-scale";
/// The figures compared, all on the mesh path.
pub const FIGURES: [Figure; 3] = [Figure::ConnsPerS, Figure::RrP50Us, Figure::RrP99Us];
/// After an agent's verdict, before its memory is read: time to finish following the change.
pub const SETTLE: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StateSize {
    Small,
    Large,
}

/// What a rewrite of the cluster file changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    ToLarge,
    OneMore,
    ToSmall,
}
pub const CHANGES: [Change; 3] = [Change::ToLarge, Change::OneMore, Change::ToSmall];

impl Change {
    pub fn label(self) -> String {
        match self {
            Change::ToLarge => {
                format!("small → large (+{EXTRA_WORKLOADS} workloads, +{EXTRA_SERVICES} services)")
            }
            Change::OneMore => "one more workload, at the large state".into(),
            Change::ToSmall => "large → small (the bench cluster's own file)".into(),
        }
    }
}

/// One agent's handling of one rewrite of the cluster file.
#[derive(Debug, Clone, Copy)]
pub struct ReloadTiming {
    /// From the write (the harness's close of the new file, just before its rename; else the
    /// instant before the harness was asked to write) to the agent's `cluster file loaded`.
    pub write_to_loaded_ms: f64,
    /// From the same instant to the agent's first open of the file afterwards (fanotify).
    pub write_to_open_ms: Option<f64>,
    /// Whether the write instant is the harness's close of the new file (else: before the call).
    pub write_seen: bool,
    /// From that open to `cluster file loaded`: read, check, index.
    pub open_to_loaded_ms: Option<f64>,
    /// The agent's CPU from the write to [`SETTLE`] after the verdict.
    pub cpu_s: f64,
    /// Its peak RSS over that time (VmHWM, reset before the write).
    pub peak_rss_mib: f64,
    pub before: AgentFootprint,
    /// [`SETTLE`] after the verdict.
    pub after: AgentFootprint,
}

#[derive(Debug, Clone, Default)]
pub struct AgentScale {
    pub node: String,
    pub reloads: BTreeMap<Change, Vec<ReloadTiming>>,
}

impl AgentScale {
    fn first(&self, c: Change) -> Option<&ReloadTiming> {
        self.reloads.get(&c).and_then(|v| v.first())
    }
    fn last(&self, c: Change) -> Option<&ReloadTiming> {
        self.reloads.get(&c).and_then(|v| v.last())
    }
    fn median_of(&self, c: Change, f: impl Fn(&ReloadTiming) -> Option<f64>) -> Option<f64> {
        let v: Vec<f64> = self
            .reloads
            .get(&c)
            .map_or(&[][..], |v| v)
            .iter()
            .filter_map(f)
            .collect();
        median(&v)
    }
}

#[derive(Debug, Clone, Default)]
pub struct StateScale {
    pub reps: usize,
    /// Exchanges per request/response run and connections per new-connections run.
    pub rr_n: usize,
    pub cr_n: usize,
    /// One-workload changes applied at the large state.
    pub changes: usize,
    /// Restarting both agents (stop, start, warm-up) before the measurement.
    pub restart_s: f64,
    /// The machine's 1-minute load average before and after (other processes share the CPUs).
    pub load: (Option<f64>, Option<f64>),
    /// Workloads and Services of the bench cluster's own file.
    pub small_workloads: usize,
    pub small_services: usize,
    pub small_bytes: usize,
    pub large_bytes: usize,
    pub figures: BTreeMap<(Figure, StateSize), Vec<f64>>,
    pub agents: Vec<AgentScale>,
    /// Why the open instants are missing, if they are.
    pub opens_unavailable: Option<String>,
    /// Figure runs that failed (the rest of the measurement went on).
    pub errors: Vec<String>,
}

impl StateScale {
    pub fn median(&self, f: Figure, s: StateSize) -> Option<f64> {
        median(self.figures.get(&(f, s)).map_or(&[][..], |v| v))
    }
}

/// What the agents must report after loading a file.
struct Expect {
    services: usize,
    /// Each node's own workloads (what `cluster file loaded` counts as `workloads`).
    local: BTreeMap<String, usize>,
}

/// How much to measure.
pub struct Plan {
    pub reps: usize,
    pub rr_n: usize,
    pub cr_n: usize,
    pub changes: usize,
}

impl Plan {
    pub fn of(opts: &Opts) -> Self {
        if opts.quick {
            // Shorter runs than the main tests': the section must stay within ~25 s.
            Plan {
                reps: opts.reps,
                rr_n: 3000,
                cr_n: 1000,
                changes: 2,
            }
        } else {
            Plan {
                reps: opts.reps,
                rr_n: opts.rr_n,
                cr_n: opts.cr_n,
                changes: 5,
            }
        }
    }
}

/// Restarts both agents, then measures the mesh figures (`figures(rr_n, cr_n)`) at both sizes,
/// `plan.reps` times, then `plan.changes` one-workload changes at the large state; leaves the
/// small state in force. `warm_up` proves the mesh path works after the restart.
pub fn measure(
    cluster: &Cluster,
    plan: &Plan,
    warm_up: impl FnOnce() -> Result<()>,
    mut figures: impl FnMut(usize, usize) -> Result<Vec<(Figure, f64)>>,
) -> Result<StateScale> {
    let load_before = load_average();
    let restarted = Instant::now();
    restart_agents(cluster)?;
    warm_up().context("the mesh path after restarting the agents")?;
    let restart_s = restarted.elapsed().as_secs_f64();
    let small = cluster.cluster_file_text()?;
    let base = BaseFile::parse(&small)?;
    let large = scale_text(&small, EXTRA_WORKLOADS)?;
    check_large_text(&large, &base)?;
    let small_expect = Expect {
        services: base.services,
        local: base.local.clone(),
    };
    let large_expect = Expect {
        services: base.services + EXTRA_SERVICES,
        local: base.local.clone(),
    };
    let mut out = StateScale {
        reps: plan.reps,
        rr_n: plan.rr_n,
        cr_n: plan.cr_n,
        changes: plan.changes,
        restart_s,
        small_workloads: base.local.values().sum(),
        small_services: base.services,
        small_bytes: small.len(),
        large_bytes: large.len(),
        ..StateScale::default()
    };
    let watcher = match FileWatcher::start(cluster.cluster_file()) {
        Ok(w) => Some(w),
        Err(e) => {
            eprintln!("mesh-bench: state size: no open instants: {e:#}");
            out.opens_unavailable = Some(format!("{e:#}"));
            None
        }
    };
    let texts = Texts {
        small: &small,
        large: &large,
        small_expect,
        large_expect,
    };
    let measured = measure_states(
        cluster,
        plan,
        &texts,
        watcher.as_ref(),
        &mut figures,
        &mut out,
    );
    if measured.is_err() {
        // Leave the cluster as it was for what follows (best effort).
        let _ = cluster.write_raw_cluster_file(&small);
    }
    out.agents = measured?;
    out.load = (load_before, load_average());
    Ok(out)
}

/// The two cluster files and what the agents must report for each.
struct Texts<'a> {
    small: &'a str,
    large: &'a str,
    small_expect: Expect,
    large_expect: Expect,
}

/// The alternating repetitions, then the one-workload changes, then back to the small state.
fn measure_states(
    cluster: &Cluster,
    plan: &Plan,
    texts: &Texts,
    watcher: Option<&FileWatcher>,
    figures: &mut impl FnMut(usize, usize) -> Result<Vec<(Figure, f64)>>,
    out: &mut StateScale,
) -> Result<Vec<AgentScale>> {
    let Texts {
        small,
        large,
        small_expect,
        large_expect,
    } = texts;
    let mut agents: BTreeMap<String, AgentScale> = BTreeMap::new();
    let mut record = |change: Change, timings: BTreeMap<String, ReloadTiming>| {
        for (node, t) in timings {
            eprintln!(
                "mesh-bench: state size: {node} {}: write → loaded {:.0} ms (opened after {} ms), \
                 {:.2} s CPU, peak {:.1} MiB, RSS {:.1} → {:.1} MiB",
                change.label(),
                t.write_to_loaded_ms,
                t.write_to_open_ms.map_or("?".into(), |v| format!("{v:.0}")),
                t.cpu_s,
                t.peak_rss_mib,
                mib(t.before.rss_kib),
                mib(t.after.rss_kib)
            );
            let a = agents.entry(node.clone()).or_insert_with(|| AgentScale {
                node,
                ..AgentScale::default()
            });
            a.reloads.entry(change).or_default().push(t);
        }
    };

    let mut current = StateSize::Small;
    for rep in 0..plan.reps {
        let order = if rep % 2 == 0 {
            [StateSize::Small, StateSize::Large]
        } else {
            [StateSize::Large, StateSize::Small]
        };
        for size in order {
            interrupt::check()?;
            if size != current {
                let (text, expect, change) = match size {
                    StateSize::Large => (large, large_expect, Change::ToLarge),
                    StateSize::Small => (small, small_expect, Change::ToSmall),
                };
                record(change, apply(cluster, text, expect, watcher)?);
                current = size;
            }
            match figures(plan.rr_n, plan.cr_n) {
                Ok(figs) => {
                    eprintln!(
                        "rep {}/{} state size {:<5} mesh {}",
                        rep + 1,
                        plan.reps,
                        format!("{size:?}").to_lowercase(),
                        figs.iter()
                            .map(|(f, v)| format!("{}={v:.1}", crate::short(*f)))
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                    for (f, v) in figs {
                        out.figures.entry((f, size)).or_default().push(v);
                    }
                }
                Err(e) => out
                    .errors
                    .push(format!("state size rep {} {size:?}: {e:#}", rep + 1)),
            }
        }
    }
    if current != StateSize::Large {
        record(
            Change::ToLarge,
            apply(cluster, large, large_expect, watcher)?,
        );
    }
    for k in 1..=plan.changes {
        interrupt::check()?;
        let text = scale_text(small, EXTRA_WORKLOADS + k)?;
        record(
            Change::OneMore,
            apply(cluster, &text, large_expect, watcher)?,
        );
    }
    record(
        Change::ToSmall,
        apply(cluster, small, small_expect, watcher)?,
    );
    Ok(agents.into_values().collect())
}

/// The 1-minute load average (`/proc/loadavg`).
pub fn load_average() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Stops both agents and starts them again (each waits for `agent ready`).
fn restart_agents(cluster: &Cluster) -> Result<()> {
    for n in cluster.nodes() {
        let status = cluster.stop_agent(n.name())?;
        ensure!(
            status.success(),
            "{}'s agent exited with {status} on SIGTERM",
            n.name()
        );
    }
    cluster.start_agents()
}

/// Writes `text` as the cluster file and waits for every running agent's verdict; each must
/// have loaded it with the expected counts.
fn apply(
    cluster: &Cluster,
    text: &str,
    expect: &Expect,
    watcher: Option<&FileWatcher>,
) -> Result<BTreeMap<String, ReloadTiming>> {
    let pids: BTreeMap<String, Vec<u32>> = cluster
        .nodes()
        .iter()
        .map(|n| {
            let pids = read_pids(&n.agent_cgroup().join("cgroup.procs"));
            (n.name().to_owned(), pids)
        })
        .collect();
    let before = agent_footprints(cluster)?;
    let snapshots: BTreeMap<&str, Snapshot> = pids
        .iter()
        .map(|(node, p)| (node.as_str(), Snapshot::take(p)))
        .collect();
    let mark = watcher.map(FileWatcher::mark);
    let called = SystemTime::now();
    let verdicts = cluster.write_raw_cluster_file(text)?;
    let events = watcher
        .zip(mark)
        .map(|(w, m)| w.since(m))
        .unwrap_or_default();
    // The write: the harness's close of the new file, just before it renames it (the harness
    // reads the agents' logs first); else the instant before the call.
    let closed =
        first_event(&events, libc::FAN_CLOSE_WRITE, &[std::process::id()]).filter(|&c| c >= called);
    let written = closed.unwrap_or(called);
    thread::sleep(SETTLE);
    let after = agent_footprints(cluster)?;
    let ms = |from: SystemTime, to: SystemTime| -> Result<f64> {
        Ok(to
            .duration_since(from)
            .map_err(|e| anyhow!("a log timestamp before the write: {e}"))?
            .as_secs_f64()
            * 1e3)
    };
    let mut out = BTreeMap::new();
    for (node, want) in &expect.local {
        let line = match verdicts.get(node) {
            Some(Reload::Loaded(line)) => line,
            Some(Reload::Rejected(line)) => bail!(
                "{node}'s agent rejected the cluster file ({} bytes): {}",
                text.len(),
                line.get("error").unwrap_or(line)
            ),
            None => bail!("{node}'s agent gave no verdict on the cluster file (not running?)"),
        };
        let count = |k: &str| line.get(k).and_then(Value::as_u64);
        ensure!(
            count("services") == Some(expect.services as u64)
                && count("workloads") == Some(*want as u64),
            "{node}'s agent loaded the cluster file with workloads {:?} (want {want}) and \
             services {:?} (want {}): {line}",
            count("workloads"),
            count("services"),
            expect.services
        );
        let loaded = line
            .get("timestamp")
            .and_then(Value::as_str)
            .and_then(parse_log_timestamp)
            .ok_or_else(|| anyhow!("no readable timestamp in {node}'s verdict: {line}"))?;
        // The watcher stamps an open when its thread reads the event, which can be later than
        // the log line when the file is small: capped at the line's instant.
        let opened = first_event(&events, libc::FAN_OPEN, &pids[node]).map(|o| o.min(loaded));
        let usage = snapshots[node.as_str()].usage();
        let footprint = |m: &BTreeMap<String, AgentFootprint>| {
            m.get(node)
                .copied()
                .ok_or_else(|| anyhow!("{node}'s agent gone during the reload"))
        };
        out.insert(
            node.clone(),
            ReloadTiming {
                write_to_loaded_ms: ms(written, loaded)?,
                write_to_open_ms: opened.and_then(|o| ms(written, o).ok()),
                write_seen: closed.is_some(),
                open_to_loaded_ms: opened.and_then(|o| ms(o, loaded).ok()),
                cpu_s: usage.cpu_s,
                peak_rss_mib: usage.peak_rss_mib,
                before: footprint(&before)?,
                after: footprint(&after)?,
            },
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------- the cluster file

/// What the bench cluster's own file holds.
struct BaseFile {
    /// Workloads per node.
    local: BTreeMap<String, usize>,
    services: usize,
}

impl BaseFile {
    fn parse(text: &str) -> Result<Self> {
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).context("parse the harness's cluster file")?;
        let nodes = doc
            .get("nodes")
            .and_then(|n| n.as_sequence())
            .context("no nodes in the harness's cluster file")?;
        let mut local = BTreeMap::new();
        for n in nodes {
            let name = n
                .get("name")
                .and_then(|v| v.as_str())
                .context("a node without a name in the harness's cluster file")?;
            ensure!(
                name != SCALE_NODE,
                "the bench cluster has a node {SCALE_NODE}"
            );
            let workloads = n
                .get("workloads")
                .and_then(|w| w.as_sequence())
                .map_or(0, Vec::len);
            local.insert(name.to_owned(), workloads);
        }
        let services = doc
            .get("services")
            .and_then(|s| s.as_sequence())
            .map_or(0, Vec::len);
        Ok(Self { local, services })
    }
}

/// The harness's cluster file `base` plus the node [`SCALE_NODE`] with `workloads` workloads and
/// [`EXTRA_SERVICES`] Services over the first [`EXTRA_WORKLOADS`] of them.
pub fn scale_text(base: &str, workloads: usize) -> Result<String> {
    let with_node = append_to_list(base, "nodes", |ind, s| {
        let _ = writeln!(s, "{ind}- name: {SCALE_NODE}");
        let _ = writeln!(s, "{ind}  workloadCgroup: /sys/fs/cgroup/{SCALE_NODE}/pods");
        let _ = writeln!(s, "{ind}  workloads:");
        for i in 0..workloads {
            let (v4, v6) = scale_ips(i);
            let _ = writeln!(s, "{ind}  - name: scale-{i}");
            let _ = writeln!(s, "{ind}    serviceAccount: scale");
            let _ = writeln!(s, "{ind}    labels: {{app: scale-{}}}", i / PER_SERVICE);
            let _ = writeln!(s, "{ind}    ips: [{v4}, \"{v6}\"]");
            let _ = writeln!(s, "{ind}    netns: /var/run/netns/{SCALE_NODE}-{i}");
            let _ = writeln!(
                s,
                "{ind}    cgroup: /sys/fs/cgroup/{SCALE_NODE}/pods/scale-{i}"
            );
        }
    })?;
    append_to_list(&with_node, "services", |ind, s| {
        for k in 0..EXTRA_SERVICES {
            let n = k + 1;
            let _ = writeln!(s, "{ind}- name: scale-svc-{k}");
            let _ = writeln!(s, "{ind}  addresses: [10.97.{}.{}]", n >> 8, n & 0xff);
            let _ = writeln!(s, "{ind}  ports: [{{port: 80, targetPort: 8080}}]");
            let _ = writeln!(s, "{ind}  selector: {{app: scale-{k}}}");
        }
    })
}

/// The `i`-th extra workload's addresses: 10.200.0.0/16 and fd00:200::/64, from .1 on.
fn scale_ips(i: usize) -> (String, String) {
    let n = i + 1;
    assert!(n < 1 << 16, "10.200.0.0/16 holds fewer workloads");
    (
        format!("10.200.{}.{}", n >> 8, n & 0xff),
        format!("fd00:200::{n:x}"),
    )
}

/// Adds entries at the end of the block sequence under the top-level `key` (written by `items`
/// with the sequence's own indentation), or adds `key` at the end of the document.
fn append_to_list(text: &str, key: &str, items: impl FnOnce(&str, &mut String)) -> Result<String> {
    let lines: Vec<&str> = text.lines().collect();
    let top_level = |l: &str| !l.is_empty() && !l.starts_with([' ', '-', '#']);
    let head = format!("{key}:");
    let mut out = String::with_capacity(text.len() + (4 << 20));
    let Some(k) = lines.iter().position(|l| l.trim_end() == head) else {
        ensure!(
            !lines.iter().any(|l| l.starts_with(&head)),
            "`{key}` of the harness's cluster file is not a block sequence"
        );
        out.push_str(text.trim_end_matches('\n'));
        let _ = writeln!(out, "\n{head}");
        items("", &mut out);
        return Ok(out);
    };
    let end = lines[k + 1..]
        .iter()
        .position(|l| top_level(l))
        .map_or(lines.len(), |p| k + 1 + p);
    let indent = lines[k + 1..end]
        .iter()
        .find(|l| l.trim_start().starts_with("- "))
        .map(|l| &l[..l.len() - l.trim_start().len()])
        .with_context(|| format!("`{key}` of the harness's cluster file has no entries"))?;
    for l in &lines[..end] {
        let _ = writeln!(out, "{l}");
    }
    items(indent, &mut out);
    for l in &lines[end..] {
        let _ = writeln!(out, "{l}");
    }
    Ok(out)
}

/// The generated file holds what it should (the agents check the rest).
fn check_large_text(text: &str, base: &BaseFile) -> Result<()> {
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).context("parse the generated large cluster file")?;
    let nodes = doc
        .get("nodes")
        .and_then(|n| n.as_sequence())
        .context("no nodes in the generated file")?;
    let scale = nodes
        .iter()
        .find(|n| n.get("name").and_then(|v| v.as_str()) == Some(SCALE_NODE))
        .context("no scale node in the generated file")?;
    let workloads = scale
        .get("workloads")
        .and_then(|w| w.as_sequence())
        .map_or(0, Vec::len);
    let services = doc
        .get("services")
        .and_then(|s| s.as_sequence())
        .map_or(0, Vec::len);
    ensure!(
        nodes.len() == base.local.len() + 1
            && workloads == EXTRA_WORKLOADS
            && services == base.services + EXTRA_SERVICES,
        "the generated file has {} nodes, {workloads} scale workloads and {services} services",
        nodes.len()
    );
    Ok(())
}

// ---------------------------------------------------------------- timestamps

/// `2026-12-01T20:05:48.532785Z` (tracing-subscriber's JSON `timestamp`, UTC).
pub fn parse_log_timestamp(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':');
    let h: u64 = t.next()?.parse().ok()?;
    let m: u64 = t.next()?.parse().ok()?;
    let sec: u64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 9 {
        return None;
    }
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    let days = u64::try_from(days_from_civil(year, month, day)).ok()?;
    Some(UNIX_EPOCH + Duration::new(days * 86_400 + h * 3_600 + m * 60 + sec, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---------------------------------------------------------------- file events

/// One event on the cluster file (or the temporary file that becomes it).
#[derive(Debug, Clone, Copy)]
struct FileEvent {
    /// When the watcher's thread read it.
    at: SystemTime,
    pid: u32,
    /// `FAN_OPEN` and/or `FAN_CLOSE_WRITE`.
    mask: u64,
}

/// Records, with fanotify (`FAN_OPEN | FAN_CLOSE_WRITE` on the file's directory), when
/// processes open the cluster file (an agent starting to read a change) and when the harness
/// closes the new file it wrote (just before renaming it over the old one).
struct FileWatcher {
    events: Arc<Mutex<Vec<FileEvent>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FileWatcher {
    fn start(file: &Path) -> Result<Self> {
        let dir = file.parent().context("the cluster file has no directory")?;
        let name = file
            .file_name()
            .context("the cluster file has no name")?
            .to_string_lossy()
            .into_owned();
        let dir_path =
            fs::canonicalize(dir).with_context(|| format!("canonicalize {}", dir.display()))?;
        let flags = libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK;
        let event_flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_LARGEFILE) as u32;
        // SAFETY: plain system calls; the descriptor is owned below.
        let fd = unsafe { libc::fanotify_init(flags, event_flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("fanotify_init");
        }
        // SAFETY: fd was just returned by fanotify_init and is owned here.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let c_dir = CString::new(dir.as_os_str().as_bytes())?;
        // SAFETY: valid descriptor and NUL-terminated path.
        let r = unsafe {
            libc::fanotify_mark(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::FAN_MARK_ADD,
                libc::FAN_OPEN | libc::FAN_CLOSE_WRITE | libc::FAN_EVENT_ON_CHILD,
                libc::AT_FDCWD,
                c_dir.as_ptr(),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("fanotify_mark {}", dir.display()));
        }
        // The file itself, or the harness's temporary file for it (`.NAME.tmp-...`).
        let temp_prefix = format!(".{name}.tmp-");
        let wanted = move |p: &Path| {
            p.parent() == Some(dir_path.as_path())
                && p.file_name().is_some_and(|f| {
                    let f = f.to_string_lossy();
                    f == name || f.starts_with(&temp_prefix)
                })
        };
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (events, stop) = (events.clone(), stop.clone());
            thread::Builder::new()
                .name("fanotify".into())
                .spawn(move || read_events(&fd, wanted, &events, &stop))?
        };
        Ok(Self {
            events,
            stop,
            thread: Some(thread),
        })
    }

    /// Where the events recorded from now on start.
    fn mark(&self) -> usize {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The events recorded after `mark`.
    fn since(&self, mark: usize) -> Vec<FileEvent> {
        // The reader thread may still hold the last events for a moment.
        thread::sleep(Duration::from_millis(30));
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.get(mark..).unwrap_or_default().to_vec()
    }
}

/// The first of `events` with a bit of `mask`, by one of `pids`.
fn first_event(events: &[FileEvent], mask: u64, pids: &[u32]) -> Option<SystemTime> {
    events
        .iter()
        .find(|e| e.mask & mask != 0 && pids.contains(&e.pid))
        .map(|e| e.at)
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads fanotify events until `stop`, keeping those on the paths `wanted` accepts.
fn read_events(
    fd: &std::os::fd::OwnedFd,
    wanted: impl Fn(&Path) -> bool,
    events: &Mutex<Vec<FileEvent>>,
    stop: &AtomicBool,
) {
    use std::os::fd::AsRawFd as _;
    let raw = fd.as_raw_fd();
    let meta_len = std::mem::size_of::<libc::fanotify_event_metadata>();
    // u64s: aligned for the event structs.
    let mut buf = vec![0u64; 2048];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: raw,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 20) } <= 0 {
            continue;
        }
        // SAFETY: the buffer is writable for its whole length.
        let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len() * 8) };
        let now = SystemTime::now();
        let Ok(n) = usize::try_from(n) else {
            continue;
        };
        let bytes = buf.as_ptr().cast::<u8>();
        let mut off = 0;
        while off + meta_len <= n {
            // SAFETY: within the bytes read; read_unaligned needs no alignment.
            let m: libc::fanotify_event_metadata =
                unsafe { std::ptr::read_unaligned(bytes.add(off).cast()) };
            if m.vers != libc::FANOTIFY_METADATA_VERSION || (m.event_len as usize) < meta_len {
                break;
            }
            if m.fd >= 0 {
                // The path now: a temporary file already renamed shows the final name.
                let path = fs::read_link(format!("/proc/self/fd/{}", m.fd));
                // SAFETY: the event's descriptor is ours to close.
                unsafe { libc::close(m.fd) };
                if path.is_ok_and(|p| wanted(&p)) {
                    events
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(FileEvent {
                            at: now,
                            pid: m.pid as u32,
                            mask: m.mask,
                        });
                }
            }
            off += m.event_len as usize;
        }
    }
}

// ---------------------------------------------------------------- report

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

pub fn write_report(s: &mut String, m: Option<&StateScale>) {
    let _ = writeln!(s, "\n## State size\n");
    let Some(m) = m else {
        let _ = writeln!(s, "Not measured in this run (see Errors).");
        return;
    };
    let _ = writeln!(
        s,
        "Measured last: both agents were restarted first ({:.1} s with the warm-up), so their \
         memory starts clean. The mesh path (client on node-a → server on node-b) with the bench \
         cluster's own state \
         ({} workloads, {} services in the cluster file; {:.1} KiB) and with a large one: the \
         same file plus a node entry `{SCALE_NODE}` that no agent serves, with {EXTRA_WORKLOADS} \
         workloads (one address in 10.200.0.0/16 and one in fd00:200::/64 each; their netns and \
         cgroup paths do not exist), and {EXTRA_SERVICES} Services (virtual IPs in 10.97.0.0/16, \
         port 80 → 8080, each selecting {PER_SERVICE} of those workloads by label); {:.1} KiB. \
         The harness rewrites the file (temporary file + rename) while the agents run; both \
         reload it (each `cluster file loaded` line checked: `services` = all Services, \
         `workloads` = the node's own, which is what the line counts). The two states alternate \
         in each of {} repetitions (small first, then large first, ...); per repetition, one \
         request/response run ({} exchanges) and one new-connections run ({} connections), with \
         the same clients as above; medians. The machine's 1-minute load average was {} before \
         and {} after this measurement (other processes share its CPUs).\n",
        m.restart_s,
        m.small_workloads,
        m.small_services,
        m.small_bytes as f64 / 1024.0,
        m.large_bytes as f64 / 1024.0,
        m.reps,
        m.rr_n,
        m.cr_n,
        m.load.0.map_or("?".into(), |l| format!("{l:.2}")),
        m.load.1.map_or("?".into(), |l| format!("{l:.2}")),
    );
    let _ = writeln!(
        s,
        "| figure (mesh, cross-node) | small state | large state | large / small |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for f in FIGURES {
        let (a, b) = (m.median(f, StateSize::Small), m.median(f, StateSize::Large));
        let _ = writeln!(
            s,
            "| state size: {} | {} | {} | {} |",
            f.label(),
            fmt(a),
            fmt(b),
            match (a, b) {
                (Some(a), Some(b)) if a != 0.0 => format!("{:.2}×", b / a),
                _ => "–".into(),
            }
        );
    }
    let _ = writeln!(s);
    for f in FIGURES {
        for size in [StateSize::Small, StateSize::Large] {
            let v = m.figures.get(&(f, size)).cloned().unwrap_or_default();
            let _ = writeln!(
                s,
                "- {} / {} state: {}",
                f.label(),
                format!("{size:?}").to_lowercase(),
                v.iter()
                    .map(|x| format!("{x:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }

    let _ = writeln!(
        s,
        "\nApplying a change. Each row is a rewrite of the cluster file, medians over its \
         occurrences (n). The instants of the write and of the agents' opens come from fanotify \
         on the file's directory{}, each stamped when a thread of mesh-bench read the event (late \
         by its wake-up; an open is capped at the log line's instant). **write → loaded**: from \
         the write, the harness's close of the new file (`FAN_CLOSE_WRITE` by mesh-bench's pid), \
         which it renames over the old one right after ({} of the {} reloads below; the others from \
         just before the harness was asked to write, which adds its reading of the agents' logs), to \
         the `timestamp` of the agent's `cluster file loaded` line (µs resolution); it includes \
         the wait for the agent's next poll of the file (every 500 ms). **write → opened**: to \
         the agent process's first open of the file afterwards (`FAN_OPEN`, the event's pid \
         among the agent's): that wait. **opened → loaded**: reading, checking and indexing the \
         file until the log line. CPU: the agent's CPU seconds from the write to {} ms after its \
         verdict; peak RSS: `VmHWM`, reset before the write, the largest of the occurrences; RSS \
         (`VmRSS`) just before the write and {} ms after the verdict, for each occurrence in \
         order. \"One more workload\": the large file with `scale-{EXTRA_WORKLOADS}`, \
         `scale-{}`, ... added one per rewrite ({} rewrites).\n",
        match &m.opens_unavailable {
            Some(why) => format!(" (not available in this run: {why})"),
            None => String::new(),
        },
        m.agents
            .iter()
            .flat_map(|a| a.reloads.values().flatten())
            .filter(|t| t.write_seen)
            .count(),
        m.agents
            .iter()
            .flat_map(|a| a.reloads.values().flatten())
            .count(),
        SETTLE.as_millis(),
        SETTLE.as_millis(),
        EXTRA_WORKLOADS + 1,
        m.changes,
    );
    let _ = writeln!(
        s,
        "| agent | change | n | write → loaded ms | write → opened ms | opened → loaded ms | \
         agent CPU s | peak RSS MiB (max) | RSS before → after MiB, each |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---|");
    for a in &m.agents {
        for c in CHANGES {
            let Some(v) = a.reloads.get(&c) else {
                continue;
            };
            let med = |f: &dyn Fn(&ReloadTiming) -> Option<f64>| a.median_of(c, f);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                a.node,
                c.label(),
                v.len(),
                fmt(med(&|t| Some(t.write_to_loaded_ms))),
                fmt(med(&|t| t.write_to_open_ms)),
                fmt(med(&|t| t.open_to_loaded_ms)),
                fmt(med(&|t| Some(t.cpu_s))),
                fmt(v.iter().map(|t| t.peak_rss_mib).reduce(f64::max)),
                v.iter()
                    .map(|t| format!("{:.1} → {:.1}", mib(t.before.rss_kib), mib(t.after.rss_kib)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let _ = writeln!(s);
    for a in &m.agents {
        for c in CHANGES {
            let v = a.reloads.get(&c).map_or(&[][..], |v| v);
            let _ = writeln!(
                s,
                "- {} {}: write → loaded {} ms; opened → loaded {} ms; RSS after {} MiB",
                a.node,
                c.label(),
                v.iter()
                    .map(|t| format!("{:.0}", t.write_to_loaded_ms))
                    .collect::<Vec<_>>()
                    .join(", "),
                v.iter()
                    .map(|t| t
                        .open_to_loaded_ms
                        .map_or("–".into(), |x| format!("{x:.0}")))
                    .collect::<Vec<_>>()
                    .join(", "),
                v.iter()
                    .map(|t| format!("{:.1}", mib(t.after.rss_kib)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }

    let _ = writeln!(
        s,
        "\n**Agent RSS, small → large state:** {}.",
        m.agents
            .iter()
            .map(|a| {
                let small = a.first(Change::ToLarge).map(|t| mib(t.before.rss_kib));
                let large = a.first(Change::ToLarge).map(|t| mib(t.after.rss_kib));
                let back = a.last(Change::ToSmall).map(|t| mib(t.after.rss_kib));
                format!(
                    "{} {} → {} MiB ({} MiB back at the small state at the end)",
                    a.node,
                    fmt(small),
                    fmt(large),
                    fmt(back)
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        s,
        "**One change at the large state:** {}.",
        m.agents
            .iter()
            .map(|a| {
                format!(
                    "{} write → loaded {} ms, of which opened → loaded {} ms",
                    a.node,
                    fmt(a.median_of(Change::OneMore, |t| Some(t.write_to_loaded_ms))),
                    fmt(a.median_of(Change::OneMore, |t| t.open_to_loaded_ms))
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "trustDomain: cluster.local\nnodes:\n- name: node-a\n  workloadCgroup: /x\n  workloads:\n  - name: client\n    ips:\n    - 10.1.0.2\n    netns: /n\n    cgroup: /c\n- name: node-b\n  workloadCgroup: /y\n  workloads: []\n";

    #[test]
    fn log_timestamps() {
        assert_eq!(
            parse_log_timestamp("1970-01-01T00:00:00Z"),
            Some(UNIX_EPOCH)
        );
        assert_eq!(
            parse_log_timestamp("2000-03-01T00:00:01.5Z"),
            Some(UNIX_EPOCH + Duration::new(11_017 * 86_400 + 1, 500_000_000))
        );
        let t = parse_log_timestamp("2026-12-01T20:05:48.532785Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::new(1_796_155_548, 532_785_000)
        );
        assert_eq!(parse_log_timestamp("2026-12-01 20:05:48Z"), None);
        assert_eq!(parse_log_timestamp("2026-13-01T20:05:48Z"), None);
    }

    #[test]
    fn scale_file_adds_a_node_and_services() {
        let base = BaseFile::parse(BASE).unwrap();
        assert_eq!(base.services, 0);
        assert_eq!(base.local["node-a"], 1);
        let text = scale_text(BASE, 25).unwrap();
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        let nodes = doc["nodes"].as_sequence().unwrap();
        assert_eq!(nodes.len(), 3);
        let w = nodes[2]["workloads"].as_sequence().unwrap();
        assert_eq!(w.len(), 25);
        assert_eq!(w[11]["labels"]["app"].as_str(), Some("scale-1"));
        assert_eq!(w[11]["ips"][1].as_str(), Some("fd00:200::c"));
        let svc = doc["services"].as_sequence().unwrap();
        assert_eq!(svc.len(), EXTRA_SERVICES);
        assert_eq!(svc[255]["addresses"][0].as_str(), Some("10.97.1.0"));
        assert_eq!(svc[0]["ports"][0]["targetPort"].as_u64(), Some(8080));
    }

    #[test]
    fn appends_to_an_existing_services_list() {
        let base = format!(
            "{BASE}services:\n- name: web\n  addresses: [10.96.1.1]\n  ports: [{{port: 80}}]\n"
        );
        let text = scale_text(&base, 10).unwrap();
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(doc["nodes"].as_sequence().unwrap().len(), 3);
        assert_eq!(
            doc["services"].as_sequence().unwrap().len(),
            EXTRA_SERVICES + 1
        );
        assert_eq!(BaseFile::parse(&base).unwrap().services, 1);
    }
}
