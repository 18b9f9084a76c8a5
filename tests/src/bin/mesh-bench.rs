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
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use mesh_tests::{ChildGuard, Cluster, NodeSpec, Pod, PodSpec, interrupt};
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";
const HELPER: &str = include_str!("mesh-bench.py");

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
    reps: usize,
    iperf_secs: u32,
    rr_n: usize,
    cr_n: usize,
}

impl Opts {
    fn parse() -> Result<Self> {
        let mut quick = false;
        let mut reps = None;
        for a in std::env::args().skip(1) {
            match a.as_str() {
                "--quick" => quick = true,
                s if s.starts_with("--reps=") => reps = Some(s[7..].parse()?),
                "-h" | "--help" => {
                    println!("usage: mesh-bench [--quick] [--reps=N]");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other} (usage: mesh-bench [--quick] [--reps=N])"),
            }
        }
        Ok(if quick {
            Opts {
                quick,
                reps: reps.unwrap_or(3),
                iperf_secs: 2,
                rr_n: 5000,
                cr_n: 2000,
            }
        } else {
            Opts {
                quick,
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

/// CPU and peak RSS of a set of processes over one run.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu_s: f64,
    /// Largest per-process peak RSS (VmHWM, reset before the run), MiB.
    peak_rss_mib: f64,
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

// ------------------------------------------------------------------ stunnel peer

/// Self-signed P-256 certificates for both ends, then a stunnel client in `client_pod`
/// (127.0.0.1 listeners) and a stunnel server in `server_pod` forwarding to its local
/// iperf3 and echo servers; mutual TLS (`verify = 2` against the other end's certificate).
fn start_stunnel(cluster: &Cluster, client_pod: &Pod, server_pod: &Pod) -> Result<Vec<ChildGuard>> {
    let dir = cluster.workdir().join("stunnel");
    fs::create_dir_all(&dir)?;
    for side in ["client", "server"] {
        let mut c = std::process::Command::new("openssl");
        c.args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=bench-{side}"),
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{side}.key")))
        .arg("-out")
        .arg(dir.join(format!("{side}.pem")));
        mesh_tests::run_with_timeout(&mut c, Duration::from_secs(20))?
            .check()
            .context("openssl req")?;
    }
    let d = dir.display();
    let server_ip = server_pod.ipv4();
    let client_conf = format!(
        "foreground = quiet\npid =\ndebug = 4\noutput = {d}/client.log\n\
         cert = {d}/client.pem\nkey = {d}/client.key\nCAfile = {d}/server.pem\nverify = 2\n\
         client = yes\n\
         [iperf]\naccept = 127.0.0.1:{TUN_IPERF_PORT}\nconnect = {server_ip}:{TUN_SRV_IPERF_PORT}\n\
         [echo]\naccept = 127.0.0.1:{TUN_ECHO_PORT}\nconnect = {server_ip}:{TUN_SRV_ECHO_PORT}\n"
    );
    let server_conf = format!(
        "foreground = quiet\npid =\ndebug = 4\noutput = {d}/server.log\n\
         cert = {d}/server.pem\nkey = {d}/server.key\nCAfile = {d}/client.pem\nverify = 2\n\
         [iperf]\naccept = 0.0.0.0:{TUN_SRV_IPERF_PORT}\nconnect = 127.0.0.1:{IPERF_PORT}\n\
         [echo]\naccept = 0.0.0.0:{TUN_SRV_ECHO_PORT}\nconnect = 127.0.0.1:{ECHO_PORT}\n"
    );
    fs::write(dir.join("client.conf"), client_conf)?;
    fs::write(dir.join("server.conf"), server_conf)?;
    let mut srv = server_pod.spawn("stunnel4", [dir.join("server.conf")])?;
    server_pod
        .wait_for_port(&mut srv, TUN_SRV_ECHO_PORT)
        .with_context(|| fs::read_to_string(dir.join("server.log")).unwrap_or_default())?;
    let mut cli = client_pod.spawn("stunnel4", [dir.join("client.conf")])?;
    client_pod
        .wait_for_port(&mut cli, TUN_ECHO_PORT)
        .with_context(|| fs::read_to_string(dir.join("client.log")).unwrap_or_default())?;
    Ok(vec![cli, srv])
}

// ------------------------------------------------------------------ process usage

fn read_pids(path: &Path) -> Vec<u32> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// utime + stime of a process (all threads), clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU ticks of some processes at the start of a run; their peak RSS is reset then.
struct Snapshot {
    ticks: Vec<(u32, u64)>,
}

impl Snapshot {
    fn take(pids: &[u32]) -> Self {
        let ticks = pids
            .iter()
            .filter_map(|&pid| {
                // "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
                let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
                Some((pid, cpu_ticks(pid)?))
            })
            .collect();
        Snapshot { ticks }
    }

    fn usage(&self) -> Usage {
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let mut u = Usage::default();
        for &(pid, t0) in &self.ticks {
            if let Some(t1) = cpu_ticks(pid) {
                u.cpu_s += t1.saturating_sub(t0) as f64 / hz;
            }
            if let Some(kib) = peak_rss_kib(pid) {
                u.peak_rss_mib = u.peak_rss_mib.max(kib as f64 / 1024.0);
            }
        }
        u
    }
}

// ------------------------------------------------------------------ report

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn fmt_val(v: Option<f64>) -> String {
    match v {
        None => "error".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_owned()
}

fn machine() -> (String, String, String) {
    let nproc = thread::available_parallelism().map_or("?".into(), |n| n.to_string());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| first_line(&s))
        .unwrap_or_else(|_| "?".into());
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "?".into());
    (nproc, kernel, cpu)
}

fn report(opts: &Opts, res: &Results, check: &str, elapsed: Duration) -> String {
    let (nproc, kernel, cpu) = machine();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| first_line(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default();
    let mut s = String::new();
    let _ = writeln!(s, "# mesh-bench results\n");
    let _ = writeln!(
        s,
        "{date}; `mesh-bench{}`; {} repetitions, paths interleaved, median of the repetitions; \
         run took {:.0} s.\n",
        if opts.quick { " --quick" } else { "" },
        opts.reps,
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "Machine: {nproc} CPUs (nproc), kernel {kernel}, CPU model: {cpu}. All nodes and pods \
         are network namespaces of this one machine (veth + bridges), so the figures compare \
         paths, not networks.\n"
    );
    let _ = writeln!(
        s,
        "Paths: **direct** = plain-client (node-a) → plain-server (node-b), both outside the \
         mesh; **mesh** = client (node-a) → server (node-b), both enrolled, through both agents \
         (mutual TLS, HBONE); **stunnel peer** = plain-client → stunnel4 client (same pod) → \
         mutual TLS (TLS 1.3, P-256 self-signed certificates, `verify = 2`) → stunnel4 server in \
         plain-server → the same servers. Tests: iperf3 {} s per run (`-P 1`, `-P 8`, \
         `end.sum_received`); 1 KiB each way request/response, {} exchanges on one connection \
         (TCP_NODELAY, Python client); {} sequential new connections with 1 byte each way \
         (Python client).\n",
        opts.iperf_secs, opts.rr_n, opts.cr_n
    );

    let m = |f: Figure, p: PathKind| median(res.figures.get(&(f, p)).map_or(&[][..], |v| v));
    let _ = writeln!(
        s,
        "| figure | direct | mesh (cross-node) | stunnel peer | mesh same-node | mesh / direct | \
         stunnel / direct | mesh / stunnel |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---|---:|---:|---:|");
    for f in FIGURES {
        let (d, me, pe) = (
            m(f, PathKind::Direct),
            m(f, PathKind::Mesh),
            m(f, PathKind::Peer),
        );
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | not yet available | {} | {} | {} |",
            f.label(),
            fmt_val(d),
            fmt_val(me),
            fmt_val(pe),
            ratio(me, d),
            ratio(pe, d),
            ratio(me, pe)
        );
    }

    let _ = writeln!(
        s,
        "\nRatios are the first path's figure divided by the second's: below 1× is less \
         throughput or fewer connections/s, above 1× is more latency. For new connections, the \
         mesh reuses the pooled HBONE connection between the agents (one HTTP/2 connection over \
         mutual TLS per source identity and destination workload: no TLS handshake per \
         connection) while stunnel makes one TLS handshake per connection; for the same reason \
         the mesh's 8 iperf3 streams share one TLS connection, stunnel's use 8. On a small \
         shared machine figures can vary between runs (see the raw values).\n"
    );
    let _ = writeln!(
        s,
        "Resources during each run (median over repetitions). Agents: CPU seconds of both \
         nodes' `mesh-agent` processes (utime+stime from `/proc/<pid>/stat`, pids from the \
         nodes' agent cgroup `cgroup.procs`), and the larger of the two agents' peak RSS \
         (`VmHWM` of `/proc/<pid>/status`, reset through `clear_refs` before each run). \
         Same for the two stunnel4 processes.\n"
    );
    let _ = writeln!(
        s,
        "| test | mesh: agents CPU s | mesh: agent peak RSS MiB | stunnel: CPU s | \
         stunnel: peak RSS MiB | mesh agents CPU / stunnel CPU | direct: agents CPU s |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    let um = |map: &BTreeMap<(Test, PathKind), Vec<Usage>>, t: Test, p: PathKind| {
        let v = map.get(&(t, p)).map_or(&[][..], |v| v);
        (
            median(&v.iter().map(|u| u.cpu_s).collect::<Vec<_>>()),
            median(&v.iter().map(|u| u.peak_rss_mib).collect::<Vec<_>>()),
        )
    };
    for t in TESTS {
        let (mc, mr) = um(&res.agents, t, PathKind::Mesh);
        let (sc, sr) = um(&res.stunnel, t, PathKind::Peer);
        let (dc, _) = um(&res.agents, t, PathKind::Direct);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            t.label(),
            fmt_val(mc),
            fmt_val(mr),
            fmt_val(sc),
            fmt_val(sr),
            ratio(mc, sc),
            fmt_val(dc)
        );
    }

    let _ = writeln!(s, "\nRaw values per repetition:\n");
    for f in FIGURES {
        for p in PATHS {
            let v = res.figures.get(&(f, p)).cloned().unwrap_or_default();
            let _ = writeln!(
                s,
                "- {} / {}: {}",
                f.label(),
                p.label(),
                v.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let _ = writeln!(s, "\nMesh path check: {check}.");
    if !res.errors.is_empty() {
        let _ = writeln!(s, "\nErrors:\n");
        for e in &res.errors {
            let _ = writeln!(s, "- {}", first_line(e));
        }
    }
    let _ = writeln!(
        s,
        "\nNot measured yet: same-node mesh path (kernel short-circuit not available), PNG chart, \
         eBPF program run-time statistics, 10k idle connections, profiles."
    );
    s
}
