//! Fair sharing: one workload that opens 20,000 connections gets its limit and no more, and
//! another workload's requests on the same node still succeed meanwhile, at about their normal
//! latency. Outbound, the source's agent holds the noisy pod to its limit; inbound, the
//! destination's agent holds a caller it does not control (a pod outside the mesh, in
//! plaintext) to the same limit.

mod common;

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{fd_count, stdout_lines, web_root};
use mesh_tests::{ChildGuard, Cluster, NodeSpec, Pod, PodSpec, http_url};
use serde_json::Value;

const LIMIT: usize = 1000;
const NOISY_CONNECTIONS: usize = 20_000;
const OUTSIDER_CONNECTIONS: usize = 3_000;
const ECHO_PORT: u16 = 7000;
const WEB_PORT: u16 = 8080;

/// Opens `n` connections to `host:port`, sends one byte on each, and after a while counts how
/// each one fared: echoed (`alive`), reset, closed, or silent. Prints the counts as one JSON
/// line, then holds the connections until its stdin closes. A process may not raise its hard
/// limit of descriptors (CI has no CAP_SYS_RESOURCE), so the connections are shared among as
/// many processes as that limit needs.
const FLOOD: &str = r#"
import errno, json, os, resource, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
per_process = max(1, hard - 100)

def flood(count):
    socks, failed, reset_early, errors = [], 0, 0, {}
    for _ in range(count):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect((host, port))
        except ConnectionResetError:
            # Reset by the agent before connect() looked at the socket again.
            reset_early += 1
            s.close()
            continue
        except OSError as e:
            failed += 1
            name = errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__
            errors[name] = errors.get(name, 0) + 1
            s.close()
            continue
        try:
            s.sendall(b"x")
            socks.append(s)
        except (ConnectionResetError, BrokenPipeError):
            # The agent accepted and reset it before the byte went out.
            reset_early += 1
            s.close()
    time.sleep(3)
    counts = {"alive": 0, "reset": reset_early, "closed": 0, "silent": 0, "connect_failed": failed}
    counts.update({"connect_" + name: n for name, n in errors.items()})
    for s in socks:
        try:
            got = s.recv(1, socket.MSG_DONTWAIT)
            counts["alive" if got == b"x" else "closed"] += 1
        except BlockingIOError:
            counts["silent"] += 1
        except ConnectionResetError:
            counts["reset"] += 1
    return counts, socks

children, left = [], n
while left > 0:
    share = min(left, per_process)
    left -= share
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        counts, socks = flood(share)
        os.write(w, json.dumps(counts).encode())
        os.close(w)
        sys.stdin.read()
        os._exit(0)
    os.close(w)
    children.append((pid, r))
total = {}
for _, r in children:
    with os.fdopen(r) as f:
        for key, value in json.loads(f.read()).items():
            total[key] = total.get(key, 0) + value
print(json.dumps(total), flush=True)
sys.stdin.read()
for pid, _ in children:
    os.waitpid(pid, 0)
"#;

/// A single-thread echo server for many connections.
const ECHO: &str = r#"
import resource, selectors, socket, sys
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()
srv = socket.socket(socket.AF_INET6)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", int(sys.argv[1])))
srv.listen(4096)
srv.setblocking(False)
sel.register(srv, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is srv:
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ)
        else:
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if data:
                try:
                    key.fileobj.send(data)
                except OSError:
                    pass
            else:
                sel.unregister(key.fileobj)
                key.fileobj.close()
"#;

#[test]
fn a_workload_that_opens_20000_connections_gets_its_limit_and_others_are_still_served() -> Result<()>
{
    let cluster = Cluster::builder()
        .limits(LIMIT, 32)
        .node(
            NodeSpec::new("node-a")
                .pod(PodSpec::new("noisy"))
                .pod(PodSpec::new("quiet"))
                .pod(PodSpec::new("outsider").enrolled(false)),
        )
        .node(NodeSpec::new("node-b").pod(PodSpec::new("web").label("app", "web")))
        .build()?;
    cluster.start_agents()?;
    let web = cluster.pod("node-b", "web")?;
    let _site = web.http_server(WEB_PORT, &web_root(&cluster, "www", b"web\n")?)?;
    let scripts = cluster.workdir().join("fair-sharing");
    std::fs::create_dir_all(&scripts)?;
    let (flood, echo) = (scripts.join("flood.py"), scripts.join("echo.py"));
    std::fs::write(&flood, FLOOD)?;
    std::fs::write(&echo, ECHO)?;
    let mut echo_server = web.spawn("python3", [path(&echo), ECHO_PORT.to_string()])?;
    web.wait_for_port(&mut echo_server, ECHO_PORT)?;

    let quiet = cluster.pod("node-a", "quiet")?;
    let url = http_url(web.ipv4(), WEB_PORT);
    let baseline = request_times(quiet, &url, 10)?;
    let agent = cluster.agent_pid("node-a").context("node-a's agent")?;
    let fds_before = fd_count(agent)?;

    // Outbound: node-a's agent is the noisy pod's.
    let noisy = cluster.pod("node-a", "noisy")?;
    let mut held = Flood::spawn(noisy, &flood, web, NOISY_CONNECTIONS)?;
    let during = held.requests_meanwhile(quiet, &url)?;
    let counts = held.counts.clone();
    eprintln!("noisy pod's {NOISY_CONNECTIONS} connections: {counts}");
    check_refused_over_limit("the noisy pod", &counts, NOISY_CONNECTIONS)?;
    check_latency(&baseline, &during)?;
    let fds_held = fd_count(agent)?;
    ensure!(
        fds_held < fds_before + 2 * LIMIT + 100,
        "node-a's agent has {fds_held} fds with the noisy pod at its limit ({fds_before} before)"
    );
    drop(held);
    common::poll_for(
        Duration::from_secs(20),
        "node-a's fds back to baseline",
        || {
            let now = fd_count(agent)?;
            Ok(if now <= fds_before + 10 {
                Ok(())
            } else {
                Err(format!("{now} fds, {fds_before} before the flood"))
            })
        },
    )?;
    let over = closed_with_flags(&cluster, "node-a", "outbound", "noisy", "UO")?;
    check_logged_over_limit("node-a", over, &counts)?;

    // Inbound: the outsider is no workload of the mesh; only node-b's agent can limit it.
    let outsider = cluster.pod("node-a", "outsider")?;
    let held = Flood::start(outsider, &flood, web, OUTSIDER_CONNECTIONS)?;
    let counts = held.counts.clone();
    eprintln!("outsider's {OUTSIDER_CONNECTIONS} plaintext connections: {counts}");
    check_refused_over_limit("the outsider", &counts, OUTSIDER_CONNECTIONS)?;
    let served = quiet.curl_within(&url, Duration::from_secs(3))?;
    ensure!(
        served.success(),
        "quiet's request while the outsider holds its limit: {}",
        served.stderr_str()
    );
    drop(held);
    let over = closed_with_flags(&cluster, "node-b", "inbound", "", "UO")?;
    check_logged_over_limit("node-b", over, &counts)?;
    Ok(())
}

/// Of `opened` connections, exactly `LIMIT` were served end to end and the agent reset every
/// other one; none failed otherwise or was left open and silent.
fn check_refused_over_limit(who: &str, counts: &Value, opened: usize) -> Result<()> {
    let count = |key: &str| counts[key].as_u64().unwrap_or(0);
    ensure!(
        count("alive") == LIMIT as u64,
        "{} of {who}'s connections were served end to end, want its limit {LIMIT}: {counts}",
        count("alive")
    );
    ensure!(
        count("reset") == (opened - LIMIT) as u64,
        "{who}'s connections over the limit must all be reset: {counts}"
    );
    Ok(())
}

/// Every connection the agent reset was logged `UO`.
fn check_logged_over_limit(node: &str, over: usize, counts: &Value) -> Result<()> {
    let reset = counts["reset"].as_u64().unwrap_or(0) as usize;
    ensure!(
        over == reset,
        "{node} logged {over} connections as UO, want one per reset ({reset}): {counts}"
    );
    Ok(())
}

/// A flood of connections from one pod, held until dropped.
struct Flood {
    guard: ChildGuard,
    lines: mpsc::Receiver<String>,
    counts: Value,
}

impl Flood {
    /// Starts it and waits for its counts.
    fn start(from: &Pod, script: &Path, to: &Pod, n: usize) -> Result<Self> {
        let mut flood = Self::spawn(from, script, to, n)?;
        flood.wait_for_counts(Duration::ZERO, |_| Ok(()))?;
        Ok(flood)
    }

    fn spawn(from: &Pod, script: &Path, to: &Pod, n: usize) -> Result<Self> {
        let mut guard = from.spawn_piped(
            "python3",
            [
                path(script),
                to.ipv4().to_string(),
                ECHO_PORT.to_string(),
                n.to_string(),
            ],
        )?;
        let lines = stdout_lines(&mut guard)?;
        Ok(Self {
            guard,
            lines,
            counts: Value::Null,
        })
    }

    /// Until the flood reports its counts, calls `meanwhile` every `period`.
    fn wait_for_counts(
        &mut self,
        period: Duration,
        mut meanwhile: impl FnMut(Duration) -> Result<()>,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(180);
        let started = Instant::now();
        loop {
            match self
                .lines
                .recv_timeout(period.max(Duration::from_millis(10)))
            {
                Ok(line) => {
                    self.counts = serde_json::from_str(&line)
                        .with_context(|| format!("the flood's counts: {line}"))?;
                    return Ok(());
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    meanwhile(started.elapsed())?;
                }
                Err(_) => bail!("the flood did not report its counts"),
            }
        }
    }

    /// Times requests from `pod` while the flood opens its connections and while it holds
    /// them.
    fn requests_meanwhile(&mut self, pod: &Pod, url: &str) -> Result<Vec<Duration>> {
        let mut times = Vec::new();
        self.wait_for_counts(Duration::from_millis(200), |_| {
            times.push(timed_request(pod, url)?);
            Ok(())
        })?;
        times.extend(request_times(pod, url, 5)?);
        Ok(times)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        drop(self.guard.child_mut().stdin.take());
        let _ = self.guard.child_mut().wait();
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn timed_request(pod: &Pod, url: &str) -> Result<Duration> {
    let started = Instant::now();
    let out = pod.curl_within(url, Duration::from_secs(3))?;
    let took = started.elapsed();
    ensure!(
        out.success() && out.stdout_str() == "web\n",
        "{}'s request to {url} failed after {took:?}: {}",
        pod.name(),
        out.stderr_str()
    );
    Ok(took)
}

fn request_times(pod: &Pod, url: &str, n: usize) -> Result<Vec<Duration>> {
    (0..n).map(|_| timed_request(pod, url)).collect()
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// "Normal latency": each request of `curl` (a process started in the pod's namespace) takes
/// some milliseconds on its own; a starved one would time out (3 s) or wait for the flood.
fn check_latency(baseline: &[Duration], during: &[Duration]) -> Result<()> {
    let (before, meanwhile) = (median(baseline), median(during));
    eprintln!(
        "quiet's requests: median {before:?} before, {meanwhile:?} during the flood ({} requests)",
        during.len()
    );
    ensure!(
        meanwhile <= before * 5 + Duration::from_millis(200),
        "quiet's median request took {meanwhile:?} during the flood, {before:?} before"
    );
    Ok(())
}

/// How many `connection closed` lines of `direction` on `node` have `flags`, from a source
/// workload whose name contains `src` (any, if empty).
fn closed_with_flags(
    cluster: &Cluster,
    node: &str,
    direction: &str,
    src: &str,
    flags: &str,
) -> Result<usize> {
    // The access log is written as connections close; give the last ones a moment.
    std::thread::sleep(Duration::from_millis(500));
    let lines = cluster.agent_logs(node)?;
    Ok(lines
        .iter()
        .filter(|l| mesh_tests::is_connection_closed(l, direction))
        .filter(|l| l.get("response_flags").and_then(Value::as_str) == Some(flags))
        .filter(|l| {
            src.is_empty()
                || l.get("src_workload")
                    .and_then(Value::as_str)
                    .is_some_and(|w| w.contains(src))
        })
        .count())
}
