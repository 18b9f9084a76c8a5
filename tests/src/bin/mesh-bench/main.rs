//! Benchmarks of the mesh data plane on a two-node test cluster built on this machine.
//!
//! `cargo run --release -p mesh-tests --bin mesh-bench -- [--quick]` (as root, with
//! `target/release/mesh-agent` built), or `cargo xtask bench [--quick]`.
//!
//! Topology: node-a has `client` (enrolled) and `plain-client` (not enrolled); node-b has
//! `server` (enrolled) and `plain-server` (not enrolled). Paths measured:
//!
//! - direct: plain-client -> plain-server (no mesh; an enrolled server's inbound would be
//!   captured even from a non-enrolled client, so both ends are outside the mesh);
//! - mesh: client -> server, cross-node through both agents (mutual TLS, HBONE);
//! - peer: plain-client -> a `stunnel4` client in plain-client (127.0.0.1) -> mutual TLS ->
//!   a `stunnel4` server in plain-server -> the same servers on 127.0.0.1;
//! - mesh same-node (kernel short-circuit): not yet available.
//!
//! Figures: iperf3 bulk throughput with 1 and 8 streams, 1 KiB request/response latency
//! p50/p99 on one persistent connection, new connections per second (1 byte each way), and the
//! CPU seconds and peak RSS of the agents (and of the stunnel processes) during each run. Each
//! figure is the median over the repetitions; paths are interleaved. The markdown report is
//! printed and written to `bench/results/latest.md`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use mesh_tests::{ChildGuard, Cluster, NodeSpec, Pod, PodSpec, interrupt};
use serde_json::Value;

mod profile;
mod report;
mod stunnel;
mod usage;

use report::report;
use stunnel::start_stunnel;
use usage::{Snapshot, Usage, read_pids};

const PYTHON: &str = "/usr/bin/python3";
const HELPER: &str = include_str!("helper.py");

const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7000;
/// stunnel client listeners in plain-client (127.0.0.1).
const TUN_IPERF_PORT: u16 = 15201;
const TUN_ECHO_PORT: u16 = 17000;
/// stunnel server listeners in plain-server.
const TUN_SRV_IPERF_PORT: u16 = 16201;
const TUN_SRV_ECHO_PORT: u16 = 17001;

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    /// Profile each test once on the mesh path instead of measuring.
    profile: bool,
    reps: usize,
    iperf_secs: u32,
    rr_n: usize,
    cr_n: usize,
}

impl Opts {
    fn parse() -> Result<Self> {
        let mut quick = false;
        let mut profile = false;
        let mut reps = None;
        for a in std::env::args().skip(1) {
            match a.as_str() {
                "--quick" => quick = true,
                "--profile" => profile = true,
                s if s.starts_with("--reps=") => reps = Some(s[7..].parse()?),
                "-h" | "--help" => {
                    println!("usage: mesh-bench [--quick] [--profile] [--reps=N]");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other} (usage: mesh-bench [--quick] [--profile] [--reps=N])"),
            }
        }
        Ok(if quick {
            Opts {
                quick,
                profile,
                reps: reps.unwrap_or(3),
                iperf_secs: 2,
                rr_n: 5000,
                cr_n: 2000,
            }
        } else {
            Opts {
                quick,
                profile,
                reps: reps.unwrap_or(5),
                iperf_secs: 10,
                rr_n: 20000,
                cr_n: 2000,
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PathKind {
    Direct,
    Mesh,
    Peer,
}
const PATHS: [PathKind; 3] = [PathKind::Direct, PathKind::Mesh, PathKind::Peer];

impl PathKind {
    fn label(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Mesh => "mesh",
            PathKind::Peer => "stunnel peer",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Test {
    Tput1,
    Tput8,
    Rr,
    ConnRate,
}
const TESTS: [Test; 4] = [Test::Tput1, Test::Tput8, Test::Rr, Test::ConnRate];

impl Test {
    fn label(self) -> &'static str {
        match self {
            Test::Tput1 => "throughput, 1 stream",
            Test::Tput8 => "throughput, 8 streams",
            Test::Rr => "1 KiB request/response",
            Test::ConnRate => "new connections (1 B each way)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Figure {
    Tput1Gbps,
    Tput8Gbps,
    RrP50Us,
    RrP99Us,
    ConnsPerS,
}
const FIGURES: [Figure; 5] = [
    Figure::Tput1Gbps,
    Figure::Tput8Gbps,
    Figure::RrP50Us,
    Figure::RrP99Us,
    Figure::ConnsPerS,
];

impl Figure {
    fn label(self) -> &'static str {
        match self {
            Figure::Tput1Gbps => "throughput 1 stream (Gbit/s)",
            Figure::Tput8Gbps => "throughput 8 streams (Gbit/s)",
            Figure::RrP50Us => "RR 1 KiB latency p50 (µs)",
            Figure::RrP99Us => "RR 1 KiB latency p99 (µs)",
            Figure::ConnsPerS => "new connections/s",
        }
    }
}

/// Where a path's client runs and what it connects to.
struct Target<'a> {
    client: &'a Pod,
    host: String,
    iperf_port: u16,
    echo_port: u16,
}

#[derive(Default)]
struct Results {
    figures: BTreeMap<(Figure, PathKind), Vec<f64>>,
    agents: BTreeMap<(Test, PathKind), Vec<Usage>>,
    stunnel: BTreeMap<(Test, PathKind), Vec<Usage>>,
    errors: Vec<String>,
}

fn main() -> ExitCode {
    interrupt::run_main("mesh-bench", || Opts::parse().and_then(|o| run(&o)))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives in the workspace")
        .to_path_buf()
}

fn run(opts: &Opts) -> Result<()> {
    let started = Instant::now();
    eprintln!("mesh-bench: {opts:?}");
    let cluster = Arc::new(
        Cluster::builder()
            .node(
                NodeSpec::new("node-a")
                    .pod(PodSpec::new("client"))
                    .pod(PodSpec::new("plain-client").enrolled(false)),
            )
            .node(
                NodeSpec::new("node-b")
                    .pod(PodSpec::new("server"))
                    .pod(PodSpec::new("plain-server").enrolled(false)),
            )
            .build()?,
    );
    interrupt::watch(&cluster);
    interrupt::check()?;
    cluster.start_agents()?;
    eprintln!("mesh-bench: cluster {} up, agents ready", cluster.id());

    let client = cluster.pod("node-a", "client")?;
    let plain_client = cluster.pod("node-a", "plain-client")?;
    let server = cluster.pod("node-b", "server")?;
    let plain_server = cluster.pod("node-b", "plain-server")?;

    let helper = cluster.workdir().join("mesh-bench.py");
    fs::write(&helper, HELPER).with_context(|| format!("write {}", helper.display()))?;

    // Servers: iperf3 and the echo server in both server pods.
    let mut guards: Vec<ChildGuard> = Vec::new();
    for pod in [server, plain_server] {
        let log = cluster.workdir().join(format!("{}-iperf3.log", pod.name()));
        // Through sh for the redirection: iperf3 prints some errors (e.g. about the
        // readiness probe's connection) to stderr even with --logfile.
        let mut g = pod.spawn(
            "/bin/sh",
            [
                "-c".to_string(),
                format!("exec iperf3 -s -p {IPERF_PORT} >'{}' 2>&1", log.display()),
            ],
        )?;
        pod.wait_for_port(&mut g, IPERF_PORT)?;
        guards.push(g);
        let mut g = pod.spawn(
            PYTHON,
            [
                "-u",
                &helper.to_string_lossy(),
                "server",
                &ECHO_PORT.to_string(),
            ],
        )?;
        pod.wait_for_port(&mut g, ECHO_PORT)?;
        guards.push(g);
    }
    let stunnels = start_stunnel(&cluster, plain_client, plain_server)?;
    let stunnel_pids: Vec<u32> = stunnels.iter().map(ChildGuard::pid).collect();

    let target = |p: PathKind| match p {
        PathKind::Direct => Target {
            client: plain_client,
            host: plain_server.ipv4().to_string(),
            iperf_port: IPERF_PORT,
            echo_port: ECHO_PORT,
        },
        PathKind::Mesh => Target {
            client,
            host: server.ipv4().to_string(),
            iperf_port: IPERF_PORT,
            echo_port: ECHO_PORT,
        },
        PathKind::Peer => Target {
            client: plain_client,
            host: "127.0.0.1".into(),
            iperf_port: TUN_IPERF_PORT,
            echo_port: TUN_ECHO_PORT,
        },
    };

    // Warm-up: every path works end to end (certificates issued, HBONE pool up).
    for p in PATHS {
        let t = target(p);
        conn_rate(&t, &helper, 5).with_context(|| format!("warm-up of path {}", p.label()))?;
        iperf(&t, 1, 1).with_context(|| format!("warm-up iperf3 of path {}", p.label()))?;
    }

    let agent_pids = || -> Vec<u32> {
        cluster
            .nodes()
            .iter()
            .flat_map(|n| read_pids(&n.agent_cgroup().join("cgroup.procs")))
            .collect()
    };
    if agent_pids().is_empty() {
        bail!("no agent processes found in the nodes' agent cgroups");
    }

    if opts.profile {
        return profile_mesh_path(&cluster, &target(PathKind::Mesh), &helper, &agent_pids(), opts);
    }

    let mut res = Results::default();
    for rep in 0..opts.reps {
        for test in TESTS {
            // Rotate the path order between repetitions.
            for k in 0..PATHS.len() {
                interrupt::check()?;
                let path = PATHS[(k + rep) % PATHS.len()];
                let t = target(path);
                let apids = agent_pids();
                let before_a = Snapshot::take(&apids);
                let before_s = Snapshot::take(&stunnel_pids);
                let out = run_test(test, &t, &helper, opts);
                let ua = before_a.usage();
                let us = before_s.usage();
                match out {
                    Ok(figs) => {
                        eprintln!(
                            "rep {}/{} {:<32} {:<13} {}  agents {:.2} s CPU, {:.1} MiB; stunnel {:.2} s CPU",
                            rep + 1,
                            opts.reps,
                            test.label(),
                            path.label(),
                            figs.iter()
                                .map(|(f, v)| format!("{}={v:.1}", short(*f)))
                                .collect::<Vec<_>>()
                                .join(" "),
                            ua.cpu_s,
                            ua.peak_rss_mib,
                            us.cpu_s
                        );
                        for (f, v) in figs {
                            res.figures.entry((f, path)).or_default().push(v);
                        }
                        res.agents.entry((test, path)).or_default().push(ua);
                        res.stunnel.entry((test, path)).or_default().push(us);
                    }
                    Err(e) => {
                        let msg =
                            format!("rep {} {} {}: {e:#}", rep + 1, test.label(), path.label());
                        eprintln!("mesh-bench: {msg}");
                        res.errors.push(msg);
                    }
                }
            }
        }
    }

    // Sanity: the mesh path went through the agents with mutual TLS, the others did not.
    let conns = cluster.connections("node-a")?;
    let mesh_conns: Vec<_> = conns
        .iter()
        .filter(|c| c.src_workload == client.workload_id())
        .collect();
    let mtls = mesh_conns
        .iter()
        .filter(|c| {
            c.other
                .get("security")
                .and_then(Value::as_str)
                .is_some_and(|s| s.contains("tls") || s.contains("TLS"))
        })
        .count();
    let plain_captured = conns
        .iter()
        .filter(|c| c.src_workload == plain_client.workload_id())
        .count();
    let check = format!(
        "node-a's agent logged {} closed connections of {} ({} with mutual TLS) and {} of {}",
        mesh_conns.len(),
        client.workload_id(),
        mtls,
        plain_captured,
        plain_client.workload_id()
    );
    eprintln!("mesh-bench: {check}");
    if mesh_conns.is_empty() || mtls == 0 {
        res.errors.push(format!(
            "mesh path not seen as mutual TLS by the agent: {check}"
        ));
    }

    drop(stunnels);
    drop(guards);
    let elapsed = started.elapsed();
    let report = report(opts, &res, &check, elapsed);
    println!("{report}");
    let dir = workspace_root().join("bench/results");
    fs::create_dir_all(&dir)?;
    let file = dir.join("latest.md");
    fs::write(&file, &report).with_context(|| format!("write {}", file.display()))?;
    eprintln!("mesh-bench: written to {}", file.display());
    // `cluster` is dropped (torn down) here; the signal thread only holds a Weak.
    interrupt::forget();
    drop(cluster);
    if res.figures.is_empty() {
        bail!("no measurement succeeded");
    }
    Ok(())
}

fn short(f: Figure) -> &'static str {
    match f {
        Figure::Tput1Gbps | Figure::Tput8Gbps => "Gbit/s",
        Figure::RrP50Us => "p50us",
        Figure::RrP99Us => "p99us",
        Figure::ConnsPerS => "conn/s",
    }
}

fn run_test(test: Test, t: &Target, helper: &Path, opts: &Opts) -> Result<Vec<(Figure, f64)>> {
    Ok(match test {
        Test::Tput1 => vec![(Figure::Tput1Gbps, iperf(t, 1, opts.iperf_secs)? / 1e9)],
        Test::Tput8 => vec![(Figure::Tput8Gbps, iperf(t, 8, opts.iperf_secs)? / 1e9)],
        Test::Rr => {
            let (p50, p99) = rr(t, helper, opts.rr_n)?;
            vec![(Figure::RrP50Us, p50), (Figure::RrP99Us, p99)]
        }
        Test::ConnRate => vec![(Figure::ConnsPerS, conn_rate(t, helper, opts.cr_n)?)],
    })
}

/// iperf3 client; received bits per second.
fn iperf(t: &Target, streams: u32, secs: u32) -> Result<f64> {
    let out = t.client.run(
        "iperf3",
        [
            "-c",
            &t.host,
            "-p",
            &t.iperf_port.to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
        Duration::from_secs(u64::from(secs) + 30),
    )?;
    let json: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output not JSON: {}", out.stderr_str()))?;
    if let Some(err) = json.get("error").and_then(Value::as_str) {
        bail!("iperf3: {err}");
    }
    json.pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("iperf3 JSON without end.sum_received.bits_per_second"))
}

fn helper_json(t: &Target, helper: &Path, args: &[String], timeout: Duration) -> Result<Value> {
    let mut argv = vec![helper.to_string_lossy().into_owned()];
    argv.extend_from_slice(args);
    let out = t.client.run(PYTHON, &argv, timeout)?.check()?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("helper output not JSON: {}", out.stdout_str()))
}

/// (p50, p99) in µs.
fn rr(t: &Target, helper: &Path, n: usize) -> Result<(f64, f64)> {
    let v = helper_json(
        t,
        helper,
        &[
            "rr".into(),
            t.host.clone(),
            t.echo_port.to_string(),
            n.to_string(),
            "1024".into(),
        ],
        Duration::from_secs(120),
    )?;
    let get = |k: &str| {
        v.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("no {k} in {v}"))
    };
    Ok((get("p50_us")?, get("p99_us")?))
}

fn conn_rate(t: &Target, helper: &Path, n: usize) -> Result<f64> {
    let v = helper_json(
        t,
        helper,
        &[
            "cr".into(),
            t.host.clone(),
            t.echo_port.to_string(),
            n.to_string(),
        ],
        Duration::from_secs(120),
    )?;
    v.get("conns_per_s")
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("no conns_per_s in {v}"))
}

/// `--profile`: each test once on the mesh path under perf; writes bench/results/profile.md.
fn profile_mesh_path(
    cluster: &Cluster,
    t: &Target,
    helper: &Path,
    agent_pids: &[u32],
    opts: &Opts,
) -> Result<()> {
    let mut profiles = Vec::new();
    for test in TESTS {
        interrupt::check()?;
        let data = cluster.workdir().join(format!("perf-{test:?}.data"));
        let (figures, profile) =
            profile::record(test.label(), &data, agent_pids, || run_test(test, t, helper, opts))?;
        eprintln!("mesh-bench: profiled {} on the mesh path: {figures:?}", test.label());
        profiles.push(profile);
    }
    let intro = format!(
        "Each test ran once on the mesh path (client on node-a → server on node-b through both \
         agents) under `perf record -a -F 999`; the agents' share is taken from their pids ({}). \
         The run's own figures are lower than `mesh-bench`'s because perf samples every CPU.",
        agent_pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
    );
    let text = profile::report(&profiles, &intro);
    let file = workspace_root().join("bench/results/profile.md");
    fs::write(&file, &text).with_context(|| format!("write {}", file.display()))?;
    println!("{text}");
    eprintln!("mesh-bench: written to {}", file.display());
    Ok(())
}
