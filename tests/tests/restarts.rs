//! An agent that dies (`kill -9`) at any point, during its start-up or while it relays
//! connections, never lets a workload be reached around the mesh, and the next agent serves at
//! once. And an IP that passes to another identity gets nothing the old identity had: no pooled
//! connection that proved the old identity carries a stream to the new one, no connection opened
//! to the old one goes on, and the workload's own calls no longer present the old certificate.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::net::IpAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use common::{LOG_WAIT, hold_echo, http_get, peer_auth, poll_for, web_root};
use mesh_tests::{
    ChildGuard, Cluster, ConnectionLog, NodeSpec, Pod, PodSpec, Reload, addr, agent_bin, http_url,
    sys,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

const BODY: &[u8] = b"<h1>restarts</h1>\n";
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7000;
/// Kill-and-restart iterations; even ones kill an agent during its start-up, odd ones kill a
/// ready agent while the client loads it.
const ITERATIONS: usize = 20;
/// Kills land at a random point at most this long after the agent was started (start-up
/// kills) or after the client's load was seen flowing (kills under load). A start-up kill waits
/// at most as long as node-b's agent takes to be ready (the median of its starts so far, ~100 ms
/// here, so that most kills land in the start-up: drawn from 0-300 ms, most would hit a ready
/// agent), capped at this.
const MAX_KILL_DELAY_MS: u64 = 300;
/// How soon after `start_agent` returns (the agent logged `agent ready`) the mesh serves again.
const RECOVERY: Duration = Duration::from_secs(1);
/// Environment variable that replays a run: the seed it printed.
const SEED_VAR: &str = "MESH_TESTS_SEED";

/// The pinned cgroup attachments ([agent.md](../../docs/agent.md), "Pinned state").
const CGROUP_LINKS: [&str; 5] = [
    "mesh_connect4",
    "mesh_connect6",
    "mesh_sock_ops",
    "mesh_guard_ingress",
    "mesh_guard_egress",
];
/// Their attach types, as bpftool names them.
const CGROUP_ATTACH_TYPES: [&str; 5] = [
    "cgroup_inet4_connect",
    "cgroup_inet6_connect",
    "cgroup_sock_ops",
    "cgroup_inet_ingress",
    "cgroup_inet_egress",
];

const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
const IMPOSTOR_ID: &str = "spiffe://cluster.local/ns/default/sa/impostor";

// ---------------------------------------------------------------- helpers

/// xorshift64: randomness without a crate. Seeded from the clock unless [`SEED_VAR`] is set.
struct XorShift(u64);

impl XorShift {
    fn from_env_or_clock() -> Result<Self> {
        let seed = match std::env::var(SEED_VAR) {
            Ok(s) => s
                .parse()
                .with_context(|| format!("{SEED_VAR}={s:?} is not a u64"))?,
            Err(_) => SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64,
        };
        let seed = seed.max(1);
        eprintln!("random seed {seed} (replay with {SEED_VAR}={seed})");
        Ok(XorShift(seed))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform enough in `0..=max`.
    fn up_to(&mut self, max: u64) -> u64 {
        self.next() % (max + 1)
    }
}

/// The processes in the node's `agent` cgroup.
fn agent_pids(cluster: &Cluster, node: &str) -> Result<Vec<i32>> {
    let procs = cluster.node(node)?.agent_cgroup().join("cgroup.procs");
    fs::read_to_string(&procs)
        .with_context(|| format!("read {}", procs.display()))?
        .split_whitespace()
        .map(|p| {
            p.parse()
                .with_context(|| format!("{p:?} in {}", procs.display()))
        })
        .collect()
}

/// The PID of the node's agent: the one process in its `agent` cgroup.
fn agent_pid(cluster: &Cluster, node: &str) -> Result<i32> {
    match agent_pids(cluster, node)?[..] {
        [pid] => Ok(pid),
        ref pids => bail!("{node}'s agent cgroup holds {pids:?}, want exactly one agent"),
    }
}

/// `kill -9` the agent the harness started for `node`, then has the harness forget it
/// (`stop_agent` on a dead child only reaps it); checks that SIGKILL is what ended it.
fn kill_9_harness_agent(cluster: &Cluster, node: &str) -> Result<()> {
    let pid = agent_pid(cluster, node)?;
    kill(Pid::from_raw(pid), Signal::SIGKILL).with_context(|| format!("kill -9 {pid}"))?;
    let status = cluster
        .stop_agent(node)
        .context("the harness reaping the killed agent")?;
    ensure!(
        status.signal() == Some(libc::SIGKILL),
        "{node}'s agent (pid {pid}) ended with {status}, not by the SIGKILL"
    );
    ensure!(
        !cluster.agent_running(node),
        "the harness still thinks {node}'s agent runs"
    );
    no_agent_left(cluster, node)
}

fn no_agent_left(cluster: &Cluster, node: &str) -> Result<()> {
    poll_for(
        Duration::from_secs(2),
        &format!("{node}'s agent cgroup empty"),
        || {
            let pids = agent_pids(cluster, node)?;
            Ok(if pids.is_empty() {
                Ok(())
            } else {
                Err(format!("{pids:?}"))
            })
        },
    )
}

/// What the kernel must hold for node-b's workloads while no agent runs: the pinned links
/// (the five cgroup attachments and `web`'s `sk_lookup`), and the five programs attached to
/// the workload cgroup as `bpftool cgroup show` lists them, one of each kind.
fn attached(cluster: &Cluster, node: &str, web: &Pod) -> Result<()> {
    let n = cluster.node(node)?;
    let links_dir = n.pin_dir().join("v1/links");
    let links: Vec<String> = fs::read_dir(&links_dir)
        .with_context(|| format!("read {}", links_dir.display()))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    let sk_lookup = format!("mesh_sk_lookup_{}", web.netns_inode()?);
    for want in CGROUP_LINKS.iter().copied().chain([sk_lookup.as_str()]) {
        ensure!(
            links.iter().any(|l| l == want),
            "pinned link {want} missing from {}: {links:?}",
            links_dir.display()
        );
    }
    let mut cmd = Command::new("bpftool");
    cmd.args(["cgroup", "show"]).arg(n.pods_cgroup()).arg("-j");
    let out = mesh_tests::run_with_timeout(&mut cmd, Duration::from_secs(10))?;
    ensure!(
        out.success(),
        "bpftool cgroup show {}: {}",
        n.pods_cgroup().display(),
        out.stderr_str().trim()
    );
    let shown: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool cgroup show: {}", out.stdout_str()))?;
    let types: Vec<&str> = shown
        .as_array()
        .context("bpftool cgroup show: not a list")?
        .iter()
        .filter_map(|p| p["attach_type"].as_str())
        .collect();
    for want in CGROUP_ATTACH_TYPES {
        let count = types.iter().filter(|t| **t == want).count();
        ensure!(
            count == 1,
            "{count} programs attached as {want} to {}, want one: {shown}",
            n.pods_cgroup().display()
        );
    }
    Ok(())
}

/// `start_agent`, timed: how long until the agent logged `agent ready` (and the harness saw
/// it, polling every 50 ms).
fn timed_start(cluster: &Cluster, node: &str) -> Result<Duration> {
    let started = Instant::now();
    cluster.start_agent(node)?;
    Ok(started.elapsed())
}

/// The `message` of each JSON line of `path` from byte `offset` on.
fn messages_since(path: &Path, offset: u64) -> Result<Vec<String>> {
    let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    file.seek(SeekFrom::Start(offset))?;
    let mut out = Vec::new();
    for line in BufReader::new(file).split(b'\n') {
        let Ok(v) = serde_json::from_slice::<Value>(&line?) else {
            continue;
        };
        let message = v
            .get("message")
            .or_else(|| v.get("fields").and_then(|f| f.get("message")))
            .and_then(Value::as_str);
        if let Some(m) = message {
            out.push(m.to_owned());
        }
    }
    Ok(out)
}

/// Starts `mesh-agent run` for `node` as the harness does (its cgroup, netns, flags and log),
/// SIGKILLs it `delay` later and reaps it. Returns the messages it logged before it died.
fn start_and_kill(cluster: &Cluster, node: &str, delay: Duration) -> Result<Vec<String>> {
    let n = cluster.node(node)?;
    let log_path = cluster.agent_log_path(node);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let offset = log.metadata()?.len();
    let mut cmd = Command::new(agent_bin());
    cmd.arg("run")
        .arg("--cluster")
        .arg(cluster.cluster_file())
        .args(["--node", node, "--bpf-pin-dir"])
        .arg(n.pin_dir())
        .args(["--log-format", "json"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    sys::place(&mut cmd, &n.agent_cgroup(), &n.netns_path())?;
    let child = cmd.spawn().context("spawn an agent to kill")?;
    let mut agent = ChildGuard::new(child, format!("agent of {node} killed in start-up"));
    thread::sleep(delay);
    if let Some(status) = agent.child_mut().try_wait()? {
        bail!(
            "{node}'s agent exited by itself ({status}) {delay:?} into its start-up; {}",
            cluster.agent_log_tail(node)
        );
    }
    kill(Pid::from_raw(agent.pid() as i32), Signal::SIGKILL)?;
    let status = agent.child_mut().wait()?;
    ensure!(
        status.signal() == Some(libc::SIGKILL),
        "the agent killed in start-up ended with {status}"
    );
    no_agent_left(cluster, node)?;
    messages_since(&log_path, offset)
}

/// Both agents' last log lines, for errors.
fn logs(cluster: &Cluster) -> String {
    format!(
        "node-a: {}\nnode-b: {}",
        cluster.agent_log_tail("node-a"),
        cluster.agent_log_tail("node-b")
    )
}

/// `client` gets [`BODY`] from `url`, attempt after attempt, and must within `within` of now:
/// returns how long it took.
fn served_within(client: &Pod, url: &str, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut last = String::from("no attempt");
    loop {
        let left = within.saturating_sub(started.elapsed());
        if left.is_zero() {
            bail!(
                "{} got no 200 from {url} within {within:?}; last: {last}",
                client.name()
            );
        }
        let got = http_get(client, url, left.max(Duration::from_millis(100)))?;
        let took = started.elapsed();
        if got.is_ok_with(BODY) {
            ensure!(
                took <= within,
                "{} got 200 from {url} only after {took:?} (more than {within:?})",
                client.name()
            );
            return Ok(took);
        }
        last = got.describe();
        thread::sleep(Duration::from_millis(20));
    }
}

/// Python: requests `url` in a loop (1 s timeout each, 20 ms apart) until stdin closes,
/// printing `ok` or `fail <why>` per request, then `done OK FAIL`.
const LOAD: &str = r#"
import sys, threading, time, urllib.request
url = sys.argv[1]
stop = threading.Event()
def wait_stdin():
    sys.stdin.read()
    stop.set()
threading.Thread(target=wait_stdin, daemon=True).start()
ok = fail = 0
while not stop.is_set():
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            r.read()
        ok += 1
        print("ok", flush=True)
    except Exception as e:
        fail += 1
        print("fail %r" % e, flush=True)
    time.sleep(0.02)
print("done %d %d" % (ok, fail), flush=True)
"#;

/// A client making requests in a loop; see [`LOAD`].
struct Load {
    guard: ChildGuard,
    lines: mpsc::Receiver<String>,
}

impl Load {
    fn start(client: &Pod, url: &str) -> Result<Self> {
        let mut guard = client.spawn_piped("/usr/bin/python3", ["-c", LOAD, url])?;
        let lines = common::stdout_lines(&mut guard)?;
        Ok(Load { guard, lines })
    }

    /// Waits until `n` requests have succeeded (at most `timeout`).
    fn wait_ok(&mut self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut got = 0;
        let mut last = String::new();
        while got < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == "ok" => got += 1,
                Ok(line) => last = line,
                Err(_) => bail!("the load made {got} of {n} requests within {timeout:?}; {last}"),
            }
        }
        Ok(())
    }

    /// Stops the loop; returns (ok, failed) over its whole run.
    fn finish(mut self) -> Result<(u64, u64)> {
        drop(self.guard.child_mut().stdin.take());
        let status = common::wait_for_exit(self.guard.child_mut(), Duration::from_secs(5))?;
        ensure!(status.success(), "the load script failed: {status}");
        let mut done = None;
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            if let Some(counts) = line.strip_prefix("done ") {
                done = Some(counts.to_owned());
            }
        }
        let done = done.context("the load script printed no `done` line")?;
        let mut counts = done.split_whitespace().map(str::parse::<u64>);
        match (counts.next(), counts.next()) {
            (Some(Ok(ok)), Some(Ok(fail))) => Ok((ok, fail)),
            _ => bail!("the load script's last line: done {done}"),
        }
    }
}

// ---------------------------------------------------------------- kill -9

#[test]
fn kill_9_at_random_points_never_bypasses() -> Result<()> {
    let test_started = Instant::now();
    let mut rng = XorShift::from_env_or_clock()?;
    let cluster = common::client_outside_web()?;
    cluster.start_agent("node-a")?;
    let mut starts = vec![timed_start(&cluster, "node-b")?];
    cluster.apply_policy(
        "strict",
        &peer_auth("default", "istio-system", None, "STRICT"),
    )?;
    let client = cluster.pod("node-a", "client")?;
    let outside = cluster.pod("node-a", "outside")?;
    let web = cluster.pod("node-b", "web")?;
    let server = web.http_server(HTTP_PORT, &web_root(&cluster, "www", BODY)?)?;
    let url = http_url(web.ipv4(), HTTP_PORT);
    served_within(client, &url, Duration::from_secs(5)).context("the mesh before any kill")?;
    let capture = cluster.capture("node-b", "app-port", &format!("tcp port {HTTP_PORT}"))?;

    let mut attempts = 0;
    let mut recoveries = Vec::new();
    for i in 0..ITERATIONS {
        let mut load = None;
        let what = if i % 2 == 0 {
            starts.sort();
            let max = (starts[starts.len() / 2].as_millis() as u64).min(MAX_KILL_DELAY_MS);
            let delay = Duration::from_millis(rng.up_to(max));
            // The running agent crashes; its successor is killed at a random point of its
            // start-up.
            kill_9_harness_agent(&cluster, "node-b")?;
            let logged = start_and_kill(&cluster, "node-b", delay)?;
            format!(
                "killed {delay:?} (of 0-{max} ms) into its start-up, after {} lines {logged:?}",
                logged.len(),
            )
        } else {
            let delay = Duration::from_millis(rng.up_to(MAX_KILL_DELAY_MS));
            // A ready agent dies while client's requests go through it.
            let mut running = Load::start(client, &url)?;
            running
                .wait_ok(3, Duration::from_secs(5))
                .with_context(|| format!("iteration {i}: the load before the kill"))?;
            thread::sleep(delay);
            kill_9_harness_agent(&cluster, "node-b")?;
            load = Some(running);
            format!("killed under load {delay:?} after the load flowed")
        };

        // No agent for node-b now: the capture stays attached, whatever the kill interrupted.
        attached(&cluster, "node-b", web)
            .with_context(|| format!("iteration {i} ({what}), no agent running"))?;
        // And plaintext to web must not be answered, either family.
        let mut exits = Vec::new();
        for ip in [IpAddr::from(web.ipv4()), web.ipv6().into()] {
            let marker = format!("marker-{i}-{attempts}-{}", cluster.id());
            attempts += 1;
            let marked = format!("{}?m={marker}", http_url(ip, HTTP_PORT));
            let got = http_get(outside, &marked, Duration::from_secs(1))?;
            ensure!(
                got.exit != Some(0),
                "iteration {i} ({what}): plaintext {marked} from outside was answered with no \
                 agent for node-b ({}); {}",
                got.describe(),
                cluster.agent_log_tail("node-b")
            );
            exits.push(got.exit);
        }

        let took_to_start = timed_start(&cluster, "node-b")
            .with_context(|| format!("iteration {i} ({what}): restart"))?;
        starts.push(took_to_start);
        let took = served_within(client, &url, RECOVERY).with_context(|| {
            format!(
                "iteration {i} ({what}): the mesh after start_agent returned; {}",
                logs(&cluster)
            )
        })?;
        recoveries.push(took);
        let load = match load {
            Some(l) => format!(", load ok/failed {:?}", l.finish()?),
            None => String::new(),
        };
        eprintln!(
            "iteration {i}: {what}; plaintext curl exits {exits:?}; restart took {took_to_start:?}, \
             served {took:?} after it{load}"
        );
    }
    let pcap = capture.stop()?;

    common::assert_no_plaintext_served(&server, &pcap, outside, HTTP_PORT, "marker-", attempts)
        .context("while no agent ran")?;
    recoveries.sort();
    eprintln!(
        "{ITERATIONS} kills, {attempts} plaintext attempts refused; the mesh served again \
         {:?} to {:?} after start_agent; test took {:?}",
        recoveries.first(),
        recoveries.last(),
        test_started.elapsed()
    );
    Ok(())
}

// ---------------------------------------------------------------- IP reuse

/// node-a's outbound `connection closed` lines from client to `dst`.
fn client_lines(cluster: &Cluster, dst: &str) -> Result<Vec<ConnectionLog>> {
    Ok(cluster
        .connections("node-a")?
        .into_iter()
        .filter(|c| c.src_workload == "default/client" && c.dst == dst)
        .collect())
}

fn field<'a>(c: &'a ConnectionLog, name: &str) -> Option<&'a str> {
    c.other.get(name).and_then(Value::as_str)
}

/// Waits for node-a's log of a successful connection from client to `dst` after the first
/// `seen`; returns every line after `seen` up to and including it.
fn wait_served_line(cluster: &Cluster, dst: &str, seen: usize) -> Result<Vec<ConnectionLog>> {
    poll_for(
        LOG_WAIT,
        &format!("node-a logs a served connection from client to {dst}"),
        || {
            let new: Vec<ConnectionLog> = client_lines(cluster, dst)?.split_off(seen);
            Ok(
                match new
                    .iter()
                    .position(|c| c.error.is_none() && c.bytes_received > 0)
                {
                    Some(k) => Ok(new[..=k].to_vec()),
                    None => Err(format!("{} new lines: {new:?}", new.len())),
                },
            )
        },
    )
}

/// `web` asks `client` for `url`, which node-a's agent must deny (the ALLOW policy admits sa/client
/// only): returns node-a's first inbound `connection closed` line refused as `policy_denied`
/// from its log line number `from` on.
fn web_calls_client(cluster: &Cluster, web: &Pod, url: &str, from: usize) -> Result<Value> {
    let got = http_get(web, url, Duration::from_secs(2))?;
    ensure!(
        !got.is_ok_with(BODY),
        "client served web's call, which the ALLOW policy denies: {}",
        got.describe()
    );
    poll_for(LOG_WAIT, "node-a denies web's call to client", || {
        let logs = cluster.agent_logs("node-a")?;
        Ok(logs[from.min(logs.len())..]
            .iter()
            .find(|l| {
                l["message"] == "connection closed"
                    && l["direction"] == "inbound"
                    && l["rejection"] == "policy_denied"
                    && l["dst_workload"] == "default/client"
            })
            .cloned()
            .ok_or_else(|| format!("web's call: {}", got.describe())))
    })
}

/// The ALLOW policy that admits client's identity only, for every workload of `default`.
const ALLOW_CLIENT: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-client
  namespace: default
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/default/sa/client\"]
";

#[test]
fn an_ip_reused_by_another_identity_gets_nothing_of_the_old_one() -> Result<()> {
    let test_started = Instant::now();
    let cluster = Cluster::builder()
        .node(NodeSpec::new("node-a").pod(PodSpec::new("client").service_account("client")))
        .node(
            NodeSpec::new("node-b").pod(
                PodSpec::new("web")
                    .service_account("web")
                    .label("app", "web"),
            ),
        )
        .build()?;
    cluster.start_agents()?;
    cluster.apply_policy("allow-client", ALLOW_CLIENT)?;
    let loaded = cluster
        .agent_logs("node-b")?
        .into_iter()
        .rev()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("policy "))
        })
        .context("node-b logged nothing about the policy")?;
    ensure!(
        loaded["message"] == "policy loaded",
        "node-b did not load the ALLOW policy: {loaded}"
    );
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let _server = web.http_server(HTTP_PORT, &web_root(&cluster, "www", BODY)?)?;
    let url = http_url(web.ipv4(), HTTP_PORT);
    let dst = addr(web.ipv4(), HTTP_PORT);
    let hbone_dst = addr(web.ipv4(), 15008);

    // A pooled HBONE connection from client to web's IP, that proved sa/web.
    served_within(client, &url, Duration::from_secs(5)).context("client -> web at first")?;
    let first = wait_served_line(&cluster, &dst, 0)?;
    let first = first.last().expect("one line at least");
    ensure!(
        field(first, "security") == Some("mutual_tls")
            && field(first, "dst_identity") == Some(WEB_ID),
        "client -> web at first: {first:?}"
    );
    let established_web = cluster.wait_for_log(
        "node-a",
        |l| {
            l["message"] == "hbone connection established"
                && l["dst"] == hbone_dst.as_str()
                && l["peer_identity"] == WEB_ID
        },
        LOG_WAIT,
    )?;
    eprintln!("pooled: {established_web}");
    // The other way: web calls client, which the policy denies to every identity but client's;
    // node-b pools an HBONE connection from web that presented sa/web's certificate.
    let _client_server = client.http_server(HTTP_PORT, &web_root(&cluster, "www-client", BODY)?)?;
    let client_url = http_url(client.ipv4(), HTTP_PORT);
    let denied_web = web_calls_client(&cluster, web, &client_url, 0)?;
    ensure!(
        denied_web["src_identity"] == WEB_ID,
        "node-a denied web's call, but not as sa/web: {denied_web}"
    );
    // And a connection open across the change, on a stream of that HBONE connection.
    let _echo = web.tcp_echo(ECHO_PORT)?;
    let held = hold_echo(client, web.ipv4(), ECHO_PORT)?;
    let seen = client_lines(&cluster, &dst)?.len();
    let node_a_lines = cluster.agent_logs("node-a")?.len();

    // web's IPs (netns, cgroup, server: all the same) now belong to service account impostor.
    let text = cluster.cluster_file_text()?;
    ensure!(
        text.matches("serviceAccount: web").count() == 1,
        "want one `serviceAccount: web` in the cluster file:\n{text}"
    );
    let changed = text.replace("serviceAccount: web", "serviceAccount: impostor");
    for (node, verdict) in cluster.write_raw_cluster_file(&changed)? {
        ensure!(
            matches!(verdict, Reload::Loaded(_)),
            "{node}'s agent did not load the file with web as impostor: {verdict:?}"
        );
    }
    let took = served_within(client, &url, Duration::from_secs(2))
        .with_context(|| format!("client -> web's IP after the change; {}", logs(&cluster)))?;
    let after = wait_served_line(&cluster, &dst, seen)?;
    let served = after.last().expect("one line at least");
    ensure!(
        field(served, "security") == Some("mutual_tls")
            && field(served, "dst_identity") == Some(IMPOSTOR_ID),
        "client -> web's IP after the change was not served by the impostor identity: {served:?}"
    );
    let stale: Vec<&ConnectionLog> = after
        .iter()
        .filter(|c| field(c, "dst_identity") == Some(WEB_ID))
        .collect();
    ensure!(
        stale.is_empty(),
        "connections after the change still went to a peer that proved sa/web: {stale:?}"
    );
    eprintln!(
        "served by {IMPOSTOR_ID} {took:?} after the change ({} attempts logged)",
        after.len()
    );
    // web's workload, now impostor, calling out presents impostor's certificate: not the one of
    // the connection node-b pooled for it as sa/web.
    let denied_impostor = web_calls_client(&cluster, web, &client_url, node_a_lines)?;
    ensure!(
        denied_impostor["src_identity"] == IMPOSTOR_ID,
        "after the change node-a saw web's workload call as {}, not as sa/impostor: \
         {denied_impostor}",
        denied_impostor["src_identity"]
    );
    // The connection opened to sa/web does not go on with sa/impostor.
    let why = held
        .wait_broken(Duration::from_secs(2))
        .context("the echo connection opened to sa/web, across the change")?;
    eprintln!("the echo connection opened to sa/web: {why}");

    let removed = cluster.wait_for_log(
        "node-b",
        |l| {
            l["message"] == "workload removed"
                && l["workload"] == "default/web"
                && l["change"] == "changed"
        },
        LOG_WAIT,
    )?;
    eprintln!("node-b: {removed}");
    let established = poll_for(
        LOG_WAIT,
        "node-a establishes an HBONE connection to web's IP proving sa/impostor",
        || {
            let logs = cluster.agent_logs("node-a")?;
            Ok(logs[node_a_lines.min(logs.len())..]
                .iter()
                .find(|l| {
                    l["message"] == "hbone connection established"
                        && l["dst"] == hbone_dst.as_str()
                        && l["peer_identity"] == IMPOSTOR_ID
                })
                .cloned()
                .ok_or_else(|| "not yet".to_owned()))
        },
    )?;
    eprintln!("node-a: {established}");
    let old_closed = cluster.agent_logs("node-a")?.into_iter().find(|l| {
        l["message"] == "hbone connection closed"
            && l["dst"] == hbone_dst.as_str()
            && l["peer_identity"] == WEB_ID
    });
    eprintln!("the pooled connection that proved sa/web: closed: {old_closed:?}");

    // Requests keep succeeding under the ALLOW policy, all to the new identity.
    for round in 0..3 {
        let seen = client_lines(&cluster, &dst)?.len();
        served_within(client, &url, Duration::from_secs(2))
            .with_context(|| format!("round {round} after the change"))?;
        let lines = wait_served_line(&cluster, &dst, seen)?;
        let line = lines.last().expect("one line at least");
        ensure!(
            lines.len() == 1 && field(line, "dst_identity") == Some(IMPOSTOR_ID),
            "round {round} after the change: {lines:?}"
        );
    }
    eprintln!("test took {:?}", test_started.elapsed());
    Ok(())
}
