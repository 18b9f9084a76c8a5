//! Benchmarks of the mesh data plane on a two-node test cluster built on this machine.
//!
//! `cargo run --release -p mesh-tests --bin mesh-bench -- [--quick]` (as root, with
//! `target/release/mesh-agent` built), or `cargo xtask bench [--quick]`.
//!
//! Topology: node-a has `client` (enrolled), `plain-client` (not enrolled), `local-server`
//! (enrolled) and `plain-local-server` (not enrolled); node-b has `server` (enrolled) and
//! `plain-server` (not enrolled). Paths measured:
//!
//! - direct: plain-client -> plain-server (no mesh; an enrolled server's inbound would be
//!   captured even from a non-enrolled client, so both ends are outside the mesh);
//! - mesh: client -> server, cross-node through both agents (mutual TLS, HBONE);
//! - peer: plain-client -> a `stunnel4` client in plain-client (127.0.0.1) -> mutual TLS ->
//!   a `stunnel4` server in plain-server -> the same servers on 127.0.0.1;
//! - direct same-node: plain-client -> plain-local-server (no mesh, one node's bridge);
//! - mesh same-node: client -> local-server, short-circuited by node-a's agent (identity and
//!   policy checked, no TLS, the bytes relayed in user space; kernel splicing is off, see
//!   docs/agent.md);
//! - ztunnel, only with `--ztunnel PATH` (a binary the user built): zt-client (node-a) ->
//!   its own ztunnel -> HBONE -> zt-server's ztunnel (node-b) -> the same servers; two more
//!   pods outside our mesh, one ztunnel each, dedicated mode, iptables capture, ztunnel's fake
//!   CA ([`ztunnel`]).
//!
//! Figures: iperf3 bulk throughput with 1 and 8 streams, 1 KiB request/response latency
//! p50/p99 on one persistent connection, new connections per second (1 byte each way), and the
//! CPU seconds and peak RSS of the agents (and of the stunnel and ztunnel processes) during each
//! run, and from them each proxy pair's CPU seconds per GB moved and CPU µs per new connection. Each
//! figure is the median over the repetitions; paths are interleaved. Once per run: the eBPF
//! programs' cost per captured connection (kernel BPF statistics around the mesh path's
//! new-connections runs, [`bpf_stats`]) and the agents' RSS idle and with 10,000 idle
//! connections held through the mesh ([`idle`]). Last, the mesh path's new connections and
//! request/response latency with the cluster's own state and with 10,000 more workloads and
//! 1,000 Services, switched live, and the time and memory an agent needs to apply one change at
//! that size ([`state_scale`]). The markdown report is printed and written to
//! `bench/results/latest.md`.
//!
//! `--kubernetes` runs only the Kubernetes scale benchmark instead ([`kube_scale`]): one agent
//! with 10,000 pods and 1,000 Services in a real control plane; `bench/results/kubernetes.md`.
//! `--ca` runs only the CA service's benchmark ([`ca`]): CSR latency and signatures per second;
//! `bench/results/ca.md`.
//! `--soak [...]` (first argument, with options of its own) runs the soak instead ([`soak`]):
//! 10,000 held connections and 2,000 new ones per second through the mesh for 60 s, with
//! certificate renewals and policy reloads; `bench/results/soak.md`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use mesh_tests::{ChildGuard, Cluster, NodeSpec, Pod, PodSpec, interrupt};
use serde_json::Value;

mod bpf_stats;
mod ca;
mod chart;
mod idle;
mod kube_scale;
mod profile;
mod report;
mod soak;
mod state_scale;
mod stunnel;
mod usage;
mod ztunnel;

use report::{mib, report};
use stunnel::start_stunnel;
use usage::{Snapshot, Usage, read_pids};
use ztunnel::Ztunnels;

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
    /// Run the Kubernetes scale benchmark instead.
    kubernetes: bool,
    /// Run the CA service benchmark instead.
    ca: bool,
    /// Where the report and the chart go.
    out: PathBuf,
    /// A ztunnel binary to measure as a second peer.
    ztunnel: Option<PathBuf>,
    reps: usize,
    iperf_secs: u32,
    rr_n: usize,
    cr_n: usize,
}

const USAGE: &str = "usage: mesh-bench [--quick] [--profile] [--kubernetes | --ca] [--reps=N] \
     [--out=DIR] [--ztunnel=PATH]";

impl Opts {
    fn parse() -> Result<Self> {
        let mut quick = false;
        let mut profile = false;
        let mut kubernetes = false;
        let mut ca = false;
        let mut reps = None;
        let mut out = workspace_root().join("bench/results");
        let mut ztunnel = None;
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => quick = true,
                "--profile" => profile = true,
                "--kubernetes" => kubernetes = true,
                "--ca" => ca = true,
                s if s.starts_with("--reps=") => reps = Some(s[7..].parse()?),
                s if s.starts_with("--out=") => out = PathBuf::from(&s[6..]),
                s if s.starts_with("--ztunnel=") => ztunnel = Some(PathBuf::from(&s[10..])),
                "--ztunnel" => {
                    let p = args
                        .next()
                        .ok_or_else(|| anyhow!("--ztunnel needs a PATH"))?;
                    ztunnel = Some(PathBuf::from(p));
                }
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other} ({USAGE})"),
            }
        }
        if ztunnel.is_some() && (profile || kubernetes || ca) {
            bail!("--ztunnel goes with the data-path benchmark only ({USAGE})");
        }
        Ok(if quick {
            Opts {
                quick,
                profile,
                kubernetes,
                ca,
                out,
                ztunnel: ztunnel.clone(),
                reps: reps.unwrap_or(3),
                iperf_secs: 2,
                rr_n: 5000,
                cr_n: 2000,
            }
        } else {
            Opts {
                quick,
                profile,
                kubernetes,
                ca,
                out,
                ztunnel: ztunnel.clone(),
                // The Kubernetes benchmark's repetitions (churns, restarts) are long.
                reps: reps.unwrap_or(if kubernetes { 3 } else { 5 }),
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
    SameNodeDirect,
    SameNode,
    Ztunnel,
}
/// Every path, in the report's and the chart's order; [`Results::paths`] are those measured.
const PATHS: [PathKind; 6] = [
    PathKind::Direct,
    PathKind::Mesh,
    PathKind::Peer,
    PathKind::Ztunnel,
    PathKind::SameNodeDirect,
    PathKind::SameNode,
];

impl PathKind {
    fn label(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Mesh => "mesh",
            PathKind::Peer => "stunnel peer",
            PathKind::SameNodeDirect => "direct same-node",
            PathKind::SameNode => "mesh same-node",
            PathKind::Ztunnel => "ztunnel",
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

/// What one run did besides its figures: for the proxies' cost per unit and the ztunnel check.
#[derive(Debug)]
struct Measured {
    figures: Vec<(Figure, f64)>,
    /// Application bytes moved (iperf3: received by the server; request/response and new
    /// connections: both ways).
    bytes: f64,
    /// TCP connections the client opened.
    connections: u64,
}

#[derive(Default)]
struct Results {
    /// The paths measured in this run, in [`PATHS`] order.
    paths: Vec<PathKind>,
    figures: BTreeMap<(Figure, PathKind), Vec<f64>>,
    agents: BTreeMap<(Test, PathKind), Vec<Usage>>,
    stunnel: BTreeMap<(Test, PathKind), Vec<Usage>>,
    ztunnel: BTreeMap<(Test, PathKind), Vec<Usage>>,
    /// Per run of a cross-node tunnel path, its proxy pair's CPU cost per unit: CPU seconds per
    /// GB moved for the throughput tests, CPU µs per connection for new connections.
    cpu_cost: BTreeMap<(Test, PathKind), Vec<f64>>,
    /// `ztunnel version`, when ztunnel was measured.
    ztunnel_version: Option<String>,
    /// Both ztunnels' totals at the end, when ztunnel was measured.
    ztunnel_check: Option<String>,
    /// eBPF cost over the mesh path's new-connections runs.
    bpf: Option<bpf_stats::BpfCost>,
    /// Agent memory with many idle connections open.
    idle: Option<idle::IdleConnections>,
    /// The mesh path with a small and a large state, and the cost of one change.
    state_scale: Option<state_scale::StateScale>,
    errors: Vec<String>,
}

fn main() -> ExitCode {
    // A benchmark of its own, with its own arguments.
    if std::env::args().nth(1).as_deref() == Some("--soak") {
        return interrupt::run_main("mesh-bench", || {
            soak::Params::parse(std::env::args().skip(2)).and_then(|p| soak::run(&p))
        });
    }
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
    if opts.kubernetes {
        return kube_scale::run(opts);
    }
    if opts.ca {
        return ca::run(opts);
    }
    // The ztunnel binary is checked before anything is built.
    let ztunnel_version = match &opts.ztunnel {
        Some(bin) => {
            ztunnel::check_iptables()?;
            let v = ztunnel::version(bin)?;
            eprintln!("mesh-bench: ztunnel {}: {v}", bin.display());
            Some(v)
        }
        None => None,
    };
    let mut node_a = NodeSpec::new("node-a")
        .pod(PodSpec::new("client"))
        .pod(PodSpec::new("plain-client").enrolled(false))
        .pod(PodSpec::new("local-server"))
        .pod(PodSpec::new("plain-local-server").enrolled(false));
    let mut node_b = NodeSpec::new("node-b")
        .pod(PodSpec::new("server"))
        .pod(PodSpec::new("plain-server").enrolled(false));
    // Last on their nodes, so the other pods keep their addresses.
    if opts.ztunnel.is_some() {
        let (zt_client, zt_server) = ztunnel::pod_specs();
        node_a = node_a.pod(zt_client);
        node_b = node_b.pod(zt_server);
    }
    let cluster = Arc::new(Cluster::builder().node(node_a).node(node_b).build()?);
    interrupt::watch(&cluster);
    interrupt::check()?;
    cluster.start_agents()?;
    eprintln!("mesh-bench: cluster {} up, agents ready", cluster.id());
    // Before any traffic: what an agent needs with nothing to do.
    let agents_at_start = idle::agent_footprints(&cluster).unwrap_or_else(|e| {
        eprintln!("mesh-bench: agents' memory at start: {e:#}");
        BTreeMap::new()
    });

    let client = cluster.pod("node-a", "client")?;
    let plain_client = cluster.pod("node-a", "plain-client")?;
    let server = cluster.pod("node-b", "server")?;
    let plain_server = cluster.pod("node-b", "plain-server")?;
    let local_server = cluster.pod("node-a", "local-server")?;
    let plain_local_server = cluster.pod("node-a", "plain-local-server")?;
    let zt_pods = match opts.ztunnel {
        Some(_) => Some((
            cluster.pod("node-a", ztunnel::CLIENT_POD)?,
            cluster.pod("node-b", ztunnel::SERVER_POD)?,
        )),
        None => None,
    };
    let paths: Vec<PathKind> = PATHS
        .into_iter()
        .filter(|&p| p != PathKind::Ztunnel || zt_pods.is_some())
        .collect();

    let helper = cluster.workdir().join("mesh-bench.py");
    fs::write(&helper, HELPER).with_context(|| format!("write {}", helper.display()))?;

    // Servers: iperf3 and the echo server in every server pod.
    let mut guards: Vec<ChildGuard> = Vec::new();
    let server_pods = [server, plain_server, local_server, plain_local_server]
        .into_iter()
        .chain(zt_pods.map(|(_, s)| s));
    for pod in server_pods {
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
    let mut ztunnels = match (&opts.ztunnel, zt_pods) {
        (Some(bin), Some((c, s))) => Some(Ztunnels::start(&cluster, bin, c, s)?),
        _ => None,
    };
    let ztunnel_pids: Vec<u32> = ztunnels.as_ref().map_or_else(Vec::new, Ztunnels::pids);

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
        PathKind::SameNodeDirect => Target {
            client: plain_client,
            host: plain_local_server.ipv4().to_string(),
            iperf_port: IPERF_PORT,
            echo_port: ECHO_PORT,
        },
        PathKind::SameNode => Target {
            client,
            host: local_server.ipv4().to_string(),
            iperf_port: IPERF_PORT,
            echo_port: ECHO_PORT,
        },
        PathKind::Ztunnel => {
            let (c, s) = zt_pods.expect("the ztunnel path is measured only with --ztunnel");
            Target {
                client: c,
                host: s.ipv4().to_string(),
                iperf_port: IPERF_PORT,
                echo_port: ECHO_PORT,
            }
        }
    };

    // Warm-up: every path works end to end (certificates issued, HBONE pool up); ztunnel's
    // carried by both ztunnels with mutual TLS, or the benchmark stops here.
    for &p in &paths {
        let t = target(p);
        let zt_before = match &ztunnels {
            Some(z) if p == PathKind::Ztunnel => Some(z.counters()?),
            _ => None,
        };
        const WARM_UP_CONNS: usize = 5;
        conn_rate(&t, &helper, WARM_UP_CONNS)
            .with_context(|| format!("warm-up of path {}", p.label()))?;
        let (_, bytes) =
            iperf(&t, 1, 1).with_context(|| format!("warm-up iperf3 of path {}", p.label()))?;
        if let (Some(z), Some(before)) = (ztunnels.as_mut(), zt_before) {
            z.check_run(before, WARM_UP_CONNS as u64 + 2, bytes)
                .context("warm-up of the ztunnel path")?;
        }
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
        return profile_mesh_path(
            &cluster,
            &target(PathKind::Mesh),
            &helper,
            &agent_pids(),
            opts,
        );
    }

    let mut res = Results::default();
    let pin_dirs = cluster
        .nodes()
        .iter()
        .map(|n| n.pin_dir().to_path_buf())
        .collect();
    let mut bpf = bpf_stats::Recorder::new(pin_dirs);
    res.paths = paths.clone();
    res.ztunnel_version = ztunnel_version;
    for rep in 0..opts.reps {
        for test in TESTS {
            // Rotate the path order between repetitions.
            for k in 0..paths.len() {
                interrupt::check()?;
                let path = paths[(k + rep) % paths.len()];
                let t = target(path);
                // Outside the measured window: scraping costs ztunnel a little CPU.
                let zt_before = match &ztunnels {
                    Some(z) if path == PathKind::Ztunnel => Some(z.counters()?),
                    _ => None,
                };
                let apids = agent_pids();
                let before_a = Snapshot::take(&apids);
                let before_s = Snapshot::take(&stunnel_pids);
                let before_z = Snapshot::take(&ztunnel_pids);
                let out = if (test, path) == (Test::ConnRate, PathKind::Mesh) {
                    bpf.measure(opts.cr_n as u64, || run_test(test, &t, &helper, opts))
                } else {
                    run_test(test, &t, &helper, opts)
                };
                let ua = before_a.usage();
                let us = before_s.usage();
                let uz = before_z.usage();
                // Never a figure for a ztunnel run that did not go through both ztunnels.
                if let (Some(z), Some(before), Ok(m)) = (ztunnels.as_mut(), zt_before, &out) {
                    z.check_run(before, m.connections, m.bytes)
                        .with_context(|| {
                            format!("rep {} {} on the ztunnel path", rep + 1, test.label())
                        })?;
                }
                match out {
                    Ok(m) => {
                        eprintln!(
                            "rep {}/{} {:<32} {:<16} {}  agents {:.2} s CPU, {:.1} MiB; stunnel {:.2} s CPU{}",
                            rep + 1,
                            opts.reps,
                            test.label(),
                            path.label(),
                            m.figures
                                .iter()
                                .map(|(f, v)| format!("{}={v:.1}", short(*f)))
                                .collect::<Vec<_>>()
                                .join(" "),
                            ua.cpu_s,
                            ua.peak_rss_mib,
                            us.cpu_s,
                            if ztunnels.is_some() {
                                format!("; ztunnel {:.2} s CPU", uz.cpu_s)
                            } else {
                                String::new()
                            }
                        );
                        let proxies = match path {
                            PathKind::Mesh => Some(ua),
                            PathKind::Peer => Some(us),
                            PathKind::Ztunnel => Some(uz),
                            _ => None,
                        };
                        if let Some(cost) = proxies.and_then(|u| cpu_cost(test, &m, u)) {
                            res.cpu_cost.entry((test, path)).or_default().push(cost);
                        }
                        for (f, v) in m.figures {
                            res.figures.entry((f, path)).or_default().push(v);
                        }
                        res.agents.entry((test, path)).or_default().push(ua);
                        res.stunnel.entry((test, path)).or_default().push(us);
                        res.ztunnel.entry((test, path)).or_default().push(uz);
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
    let local = local_server.ipv4().to_string();
    let short_circuited = mesh_conns
        .iter()
        .filter(|c| c.dst.starts_with(&format!("{local}:")))
        .filter(|c| c.other.get("security").and_then(Value::as_str) == Some("same_node"))
        .count();
    let check = format!("{check}; {short_circuited} same-node connections short-circuited");
    if short_circuited == 0 {
        res.errors.push(format!(
            "same-node path not short-circuited by the agent: {check}"
        ));
    }
    record_bpf_cost(bpf, &mut res);
    if let Some(z) = ztunnels.as_mut() {
        z.check_alive()?;
        let summary = z.summary()?;
        eprintln!("mesh-bench: ztunnel check: {summary}");
        res.ztunnel_check = Some(summary);
    }

    interrupt::check()?;
    measure_idle_connections(
        &cluster,
        client,
        server,
        &helper,
        &agents_at_start,
        &mut res,
    );
    let mesh = target(PathKind::Mesh);
    if let Err(e) = idle::check_agents_healthy(&cluster, || conn_rate(&mesh, &helper, 5)) {
        res.errors.push(format!(
            "agents after the {} idle connections: {e:#}",
            idle::IDLE_CONNECTIONS
        ));
    }

    interrupt::check()?;
    measure_state_scale(&cluster, &mesh, &helper, opts, &mut res);
    if let Err(e) = idle::check_agents_healthy(&cluster, || conn_rate(&mesh, &helper, 5)) {
        res.errors
            .push(format!("agents after the state-size measurement: {e:#}"));
    }

    drop(ztunnels);
    drop(stunnels);
    drop(guards);
    let elapsed = started.elapsed();
    let report = report(opts, &res, &check, elapsed);
    println!("{report}");
    fs::create_dir_all(&opts.out).with_context(|| format!("create {}", opts.out.display()))?;
    let file = opts.out.join("latest.md");
    fs::write(&file, &report).with_context(|| format!("write {}", file.display()))?;
    eprintln!("mesh-bench: written to {}", file.display());
    let png = opts.out.join("latest.png");
    chart::draw(&png, &chart_title(opts), &chart_rows(&res))
        .with_context(|| format!("draw {}", png.display()))?;
    eprintln!("mesh-bench: chart written to {}", png.display());
    // `cluster` is dropped (torn down) here; the signal thread only holds a Weak.
    interrupt::forget();
    drop(cluster);
    if res.figures.is_empty() {
        bail!("no measurement succeeded");
    }
    Ok(())
}

/// Keeps the eBPF cost, or why it is missing, and checks every connection was captured.
fn record_bpf_cost(bpf: bpf_stats::Recorder, res: &mut Results) {
    match bpf.finish() {
        Ok(cost) => {
            if let Err(e) = cost.check_capture() {
                res.errors.push(format!("eBPF statistics: {e:#}"));
            }
            eprintln!(
                "mesh-bench: eBPF: {:.0} ns per captured connection over {} connections ({})",
                cost.ns_per_connection().unwrap_or(f64::NAN),
                cost.connections,
                bpf_stats::MESH_PROGRAMS
                    .iter()
                    .map(|n| format!("{n} {} calls", cost.delta.get(n).run_cnt))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            res.bpf = Some(cost);
        }
        Err(e) => res.errors.push(format!("{e:#}")),
    }
}

/// Holds [`idle::IDLE_CONNECTIONS`] connections client -> server and keeps the agents' memory.
fn measure_idle_connections(
    cluster: &Cluster,
    client: &Pod,
    server: &Pod,
    helper: &Path,
    agents_at_start: &BTreeMap<String, idle::AgentFootprint>,
    res: &mut Results,
) {
    let n = idle::IDLE_CONNECTIONS;
    match idle::measure(cluster, client, server, helper, n, agents_at_start) {
        Ok(m) => {
            for a in &m.agents {
                eprintln!(
                    "mesh-bench: {n} idle connections: {} agent RSS {:.1} -> {:.1} MiB \
                     ({:.1} KiB per connection, {} -> {} fds), {:.1} MiB after closing",
                    a.node,
                    mib(a.idle.rss_kib),
                    mib(a.held.rss_kib),
                    a.per_connection_kib(n),
                    a.idle.fds,
                    a.held.fds,
                    mib(a.closed.rss_kib)
                );
            }
            eprintln!("mesh-bench: opening them took {:.1} s", m.open_s);
            res.idle = Some(m);
        }
        Err(e) => res.errors.push(format!("{n} idle connections: {e:#}")),
    }
}

/// The mesh path's figures with the small and the large state, and one change at the large one.
fn measure_state_scale(
    cluster: &Cluster,
    mesh: &Target,
    helper: &Path,
    opts: &Opts,
    res: &mut Results,
) {
    let started = Instant::now();
    let warm_up = || conn_rate(mesh, helper, 5).map(drop);
    let figures = |rr_n, cr_n| -> Result<Vec<(Figure, f64)>> {
        let (p50, p99) = rr(mesh, helper, rr_n)?;
        let conns = conn_rate(mesh, helper, cr_n)?;
        Ok(vec![
            (Figure::RrP50Us, p50),
            (Figure::RrP99Us, p99),
            (Figure::ConnsPerS, conns),
        ])
    };
    let plan = state_scale::Plan::of(opts);
    match state_scale::measure(cluster, &plan, warm_up, figures) {
        Ok(m) => {
            res.errors.extend(m.errors.iter().cloned());
            res.state_scale = Some(m);
        }
        Err(e) => res.errors.push(format!("state size: {e:#}")),
    }
    eprintln!(
        "mesh-bench: state size measured in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn chart_title(opts: &Opts) -> String {
    format!(
        "mesh-bench{}: medians of {} repetitions, ratio to direct TCP",
        if opts.quick { " --quick" } else { "" },
        opts.reps
    )
}

/// One row per figure: direct first (the baseline), then the other paths measured.
fn chart_rows(res: &Results) -> Vec<chart::ChartRow> {
    let paths = &res.paths;
    FIGURES
        .iter()
        .map(|&f| chart::ChartRow {
            figure: f.label().to_owned(),
            lower_is_better: matches!(f, Figure::RrP50Us | Figure::RrP99Us),
            values: paths
                .iter()
                .map(|&p| (p.label().to_owned(), res.median(f, p)))
                .collect(),
            baselines: paths
                .iter()
                .map(|&p| paths.iter().position(|&q| q == baseline_of(p)).unwrap_or(0))
                .collect(),
        })
        .collect()
}

/// A proxy pair's CPU cost of one run: CPU seconds per GB moved (throughput tests) or CPU µs
/// per new connection.
fn cpu_cost(test: Test, m: &Measured, u: Usage) -> Option<f64> {
    match test {
        Test::Tput1 | Test::Tput8 if m.bytes > 0.0 => Some(u.cpu_s / (m.bytes / 1e9)),
        Test::ConnRate if m.connections > 0 => Some(u.cpu_s * 1e6 / m.connections as f64),
        _ => None,
    }
}

/// The path a path's ratio is to: direct TCP between the same places.
fn baseline_of(p: PathKind) -> PathKind {
    match p {
        PathKind::SameNodeDirect | PathKind::SameNode => PathKind::SameNodeDirect,
        _ => PathKind::Direct,
    }
}

fn short(f: Figure) -> &'static str {
    match f {
        Figure::Tput1Gbps | Figure::Tput8Gbps => "Gbit/s",
        Figure::RrP50Us => "p50us",
        Figure::RrP99Us => "p99us",
        Figure::ConnsPerS => "conn/s",
    }
}

fn run_test(test: Test, t: &Target, helper: &Path, opts: &Opts) -> Result<Measured> {
    let tput = |figure, streams| -> Result<Measured> {
        let (bps, bytes) = iperf(t, streams, opts.iperf_secs)?;
        Ok(Measured {
            figures: vec![(figure, bps / 1e9)],
            bytes,
            // The control connection and one per stream.
            connections: 1 + u64::from(streams),
        })
    };
    Ok(match test {
        Test::Tput1 => tput(Figure::Tput1Gbps, 1)?,
        Test::Tput8 => tput(Figure::Tput8Gbps, 8)?,
        Test::Rr => {
            let (p50, p99) = rr(t, helper, opts.rr_n)?;
            Measured {
                figures: vec![(Figure::RrP50Us, p50), (Figure::RrP99Us, p99)],
                // Without the helper's 50 warm-up exchanges: a lower bound.
                bytes: 2.0 * 1024.0 * opts.rr_n as f64,
                connections: 1,
            }
        }
        Test::ConnRate => Measured {
            figures: vec![(Figure::ConnsPerS, conn_rate(t, helper, opts.cr_n)?)],
            bytes: 2.0 * opts.cr_n as f64,
            connections: opts.cr_n as u64,
        },
    })
}

/// iperf3 client; (received bits per second, bytes received).
fn iperf(t: &Target, streams: u32, secs: u32) -> Result<(f64, f64)> {
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
    let get = |k: &str| {
        json.pointer(&format!("/end/sum_received/{k}"))
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("iperf3 JSON without end.sum_received.{k}"))
    };
    Ok((get("bits_per_second")?, get("bytes")?))
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
        let (figures, profile) = profile::record(test.label(), &data, agent_pids, || {
            run_test(test, t, helper, opts)
        })?;
        eprintln!(
            "mesh-bench: profiled {} on the mesh path: {figures:?}",
            test.label()
        );
        profiles.push(profile);
    }
    let intro = format!(
        "Each test ran once on the mesh path (client on node-a → server on node-b through both \
         agents) under `perf record -a -F 999`; the agents' share is taken from their pids ({}). \
         The run's own figures are lower than `mesh-bench`'s because perf samples every CPU.",
        agent_pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let text = profile::report(&profiles, &intro);
    fs::create_dir_all(&opts.out).with_context(|| format!("create {}", opts.out.display()))?;
    let file = opts.out.join("profile.md");
    fs::write(&file, &text).with_context(|| format!("write {}", file.display()))?;
    println!("{text}");
    eprintln!("mesh-bench: written to {}", file.display());
    Ok(())
}
