//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_tests::{ChildGuard, Cluster, ConnectionLog, NodeSpec, Pod, PodSpec, http_url};

/// How long an agent may take to log a finished connection.
pub const LOG_WAIT: Duration = Duration::from_secs(10);

/// A directory in the cluster's scratch dir holding `index.html` = `body`.
pub fn web_root(cluster: &Cluster, name: &str, body: &[u8]) -> Result<PathBuf> {
    let dir = cluster.workdir().join(name);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("index.html"), body)?;
    Ok(dir)
}

/// `curl http://ip:port/` from `pod`; must exit 0 and return `body`.
pub fn fetch(pod: &Pod, ip: impl Into<IpAddr>, port: u16, body: &[u8]) -> Result<()> {
    let url = http_url(ip, port);
    let out = pod.curl(&url)?;
    ensure!(
        out.success(),
        "curl {url} from {} exited {:?}: {}",
        pod.name(),
        out.code(),
        out.stderr_str().trim()
    );
    ensure!(
        out.stdout == body,
        "curl {url} from {}: body of {} bytes differs from the {} served",
        pod.name(),
        out.stdout.len(),
        body.len()
    );
    Ok(())
}

/// `node`'s outbound `connection closed` lines with destination `dst`.
pub fn lines_for(cluster: &Cluster, node: &str, dst: &str) -> Result<Vec<ConnectionLog>> {
    Ok(cluster
        .connections(node)?
        .into_iter()
        .filter(|c| c.dst == dst)
        .collect())
}

/// Waits for the outbound `connection closed` line of `src_workload` to `dst` on `node`.
pub fn wait_conn(cluster: &Cluster, node: &str, src: &str, dst: &str) -> Result<ConnectionLog> {
    cluster
        .wait_for_connection(node, |c| c.dst == dst && c.src_workload == src, LOG_WAIT)
        .with_context(|| format!("waiting for {node}'s log of {src} -> {dst}"))
}

/// Gives an agent time to log a connection that it should not have captured,
/// after a later connection that it did capture has been logged.
pub fn settle() {
    thread::sleep(Duration::from_millis(300));
}

/// Waits for `child` to exit, at most `timeout`.
pub fn wait_for_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "process did not exit in {timeout:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Python: holds one echo connection open for `secs` seconds (argv: host, port, secs),
/// exchanging a line twice a second; exits non-zero if the connection breaks.
pub const HOLD_ECHO: &str = r#"
import socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with socket.create_connection((host, port), timeout=10) as s:
    end = time.time() + secs
    i = 0
    while time.time() < end:
        msg = b"line %d\n" % i
        s.sendall(msg)
        if s.recv(64) != msg:
            sys.exit(1)
        i += 1
        time.sleep(0.5)
"#;

/// The smallest mesh: `client` on node-a, `web` on node-b, both enrolled, agents running.
pub fn client_and_web() -> Result<Cluster> {
    let cluster = Cluster::builder()
        .node(NodeSpec::new("node-a").pod(PodSpec::new("client")))
        .node(NodeSpec::new("node-b").pod(PodSpec::new("web")))
        .build()?;
    cluster.start_agents()?;
    Ok(cluster)
}

/// node-a: `client` (in the mesh, service account `client`) and `outside` (not in the mesh: a
/// plaintext client); node-b: `web` (`app=web`). Agents not started.
pub fn client_outside_web() -> Result<Cluster> {
    Cluster::builder()
        .node(
            NodeSpec::new("node-a")
                .pod(PodSpec::new("client").service_account("client"))
                .pod(PodSpec::new("outside").enrolled(false)),
        )
        .node(NodeSpec::new("node-b").pod(PodSpec::new("web").label("app", "web")))
        .build()
}

/// A `security.istio.io/v1` PeerAuthentication; `selector` is an `app` label value.
pub fn peer_auth(name: &str, namespace: &str, selector: Option<&str>, mode: &str) -> String {
    let selector = selector
        .map(|app| format!("  selector:\n    matchLabels:\n      app: {app}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{selector}  mtls:\n    mode: {mode}\n"
    )
}

/// What `curl` got: its exit code, the HTTP status (None without a response) and the body.
#[derive(Debug)]
pub struct HttpGet {
    pub exit: Option<i32>,
    pub status: Option<u16>,
    pub body: Vec<u8>,
    pub stderr: String,
}

impl HttpGet {
    /// Whether this was a 200 with `body`.
    pub fn is_ok_with(&self, body: &[u8]) -> bool {
        self.exit == Some(0) && self.status == Some(200) && self.body == body
    }

    /// One line for messages.
    pub fn describe(&self) -> String {
        format!(
            "curl exit {:?}, status {:?}, {} bytes, {}",
            self.exit,
            self.status,
            self.body.len(),
            self.stderr
        )
    }
}

/// `curl URL` from `pod`, giving up after `max_time`.
pub fn http_get(pod: &Pod, url: &str, max_time: Duration) -> Result<HttpGet> {
    let secs = format!("{:.3}", max_time.as_secs_f64());
    let out = pod.run(
        "curl",
        [
            "-sS",
            "-g",
            "--max-time",
            &secs,
            "-w",
            "\n%{http_code}",
            url,
        ],
        max_time + Duration::from_secs(5),
    )?;
    let mut body = out.stdout.clone();
    // `-w` appends "\n<status>" (000 without a response).
    let cut = body.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    let status = String::from_utf8_lossy(&body[cut..])
        .trim()
        .parse::<u16>()
        .ok();
    body.truncate(cut);
    Ok(HttpGet {
        exit: out.code(),
        status: status.filter(|&s| s != 0),
        body,
        stderr: out.stderr_str().trim().to_owned(),
    })
}

/// Calls `check` every 50 ms until it returns `Ok(Ok(_))`, for at most `timeout`; `Ok(Err(s))`
/// means "not yet, the state is `s`" (named in the timeout error), `Err` stops at once.
pub fn poll_for<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Result<T, String>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match check()? {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() >= deadline => {
                bail!("{what}: not within {timeout:?}; last: {last}")
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Waits for `node`'s outbound `connection closed` line number `seen` (0-based) among those from
/// `src` to `dst`: the first one after `seen` earlier ones.
pub fn wait_next_conn(
    cluster: &Cluster,
    node: &str,
    src: &str,
    dst: &str,
    seen: usize,
) -> Result<ConnectionLog> {
    poll_for(
        LOG_WAIT,
        &format!("{node}'s log of a new {src} -> {dst}"),
        || {
            let lines: Vec<ConnectionLog> = lines_for(cluster, node, dst)?
                .into_iter()
                .filter(|c| c.src_workload == src)
                .collect();
            Ok(lines
                .get(seen)
                .cloned()
                .ok_or_else(|| format!("{} lines so far", lines.len())))
        },
    )
}

/// Python: one echo connection (argv: host, port) that exchanges a line every 100 ms and
/// prints `ok N` after exchange N; on EOF on stdin it prints `done N` (N exchanges) and exits
/// 0. If the connection breaks it prints `broken after N: why` and exits 1.
const HELD_ECHO: &str = r#"
import socket, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
stop = threading.Event()
def wait_stdin():
    sys.stdin.read()
    stop.set()
threading.Thread(target=wait_stdin, daemon=True).start()
i = 0
try:
    s = socket.create_connection((host, port), timeout=5)
    while not stop.is_set():
        msg = b"line %d\n" % i
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(64)
            if not chunk:
                raise OSError("closed by the peer")
            got += chunk
        if got != msg:
            raise OSError("echo differs: %r" % got)
        print("ok %d" % i, flush=True)
        i += 1
        time.sleep(0.1)
except OSError as e:
    print("broken after %d: %s" % (i, e), flush=True)
    sys.exit(1)
print("done %d" % i, flush=True)
"#;

/// The lines `guard`'s program prints on its (piped) stdout, as they come.
pub fn stdout_lines(guard: &mut ChildGuard) -> Result<mpsc::Receiver<String>> {
    let stdout = guard.child_mut().stdout.take().context("stdout")?;
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(lines)
}

/// A held echo connection from a pod; see [`hold_echo`].
pub struct HeldEcho {
    guard: ChildGuard,
    lines: mpsc::Receiver<String>,
    what: String,
}

/// Opens one long-lived echo connection from `from` to `ip:port` (an echo server) and returns
/// once the first line has gone there and back.
pub fn hold_echo(from: &Pod, ip: impl Into<IpAddr>, port: u16) -> Result<HeldEcho> {
    let ip = ip.into();
    let what = format!(
        "held echo {} -> {}",
        from.name(),
        mesh_tests::addr(ip, port)
    );
    let mut guard = from.spawn_piped(
        "/usr/bin/python3",
        ["-c", HELD_ECHO, &ip.to_string(), &port.to_string()],
    )?;
    let lines = stdout_lines(&mut guard)?;
    let mut held = HeldEcho { guard, lines, what };
    held.exchanges(1, LOG_WAIT).context("opening it")?;
    Ok(held)
}

impl HeldEcho {
    /// Waits until `n` more lines have gone there and back (at most `timeout`); fails if the
    /// connection breaks first.
    pub fn exchanges(&mut self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut got = 0;
        while got < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with("ok ") => got += 1,
                Ok(line) => bail!("{}: {line}", self.what),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("{}: {got} of {n} exchanges within {timeout:?}", self.what)
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("{}: the program ended", self.what)
                }
            }
        }
        Ok(())
    }

    /// Fails unless the connection still carries data: 3 more exchanges within 2 s.
    pub fn ensure_up(&mut self) -> Result<()> {
        self.exchanges(3, Duration::from_secs(2))
    }

    /// The program's last line once it has exited.
    fn last_line(&self) -> String {
        let mut last = String::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            last = line;
        }
        last
    }

    /// Ends the exchange (closes stdin); fails unless the connection held until then.
    /// Returns how many lines went there and back.
    pub fn finish(mut self) -> Result<u64> {
        drop(self.guard.child_mut().stdin.take());
        let status = wait_for_exit(self.guard.child_mut(), Duration::from_secs(5))?;
        let last = self.last_line();
        ensure!(status.success(), "{} broke: {last} ({status})", self.what);
        last.strip_prefix("done ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("{}: unexpected last line {last:?}", self.what))
    }

    /// Waits (at most `timeout`) for the connection to break; returns the program's account.
    pub fn wait_broken(mut self, timeout: Duration) -> Result<String> {
        let status = wait_for_exit(self.guard.child_mut(), timeout)
            .with_context(|| format!("{} still up after {timeout:?}", self.what))?;
        let last = self.last_line();
        ensure!(
            !status.success() && last.starts_with("broken"),
            "{} ended with {status}: {last}",
            self.what
        );
        Ok(last)
    }
}

/// That plaintext from `client` to the app's `port` never got an answer: none of the server's
/// requests carries `marker`, no HTTP response is in `pcap` (the app's node link), and as the
/// control, `pcap` saw at least `min_syns` of the client's SYNs (so its silence means something).
pub fn assert_no_plaintext_served(
    server: &mesh_tests::HttpServer,
    pcap: &mesh_tests::Pcap,
    client: &Pod,
    port: u16,
    marker: &str,
    min_syns: usize,
) -> Result<()> {
    let served: Vec<String> = server
        .requests()?
        .into_iter()
        .filter(|l| l.contains(marker))
        .collect();
    ensure!(
        served.is_empty(),
        "the app served plaintext requests: {served:?}"
    );
    let responses = pcap.packets("http.response")?;
    ensure!(
        responses.is_empty(),
        "HTTP responses to the plaintext client crossed the node's link:\n{}",
        responses.join("\n")
    );
    let syns = pcap.count(&format!(
        "tcp.flags.syn == 1 && tcp.flags.ack == 0 && tcp.dstport == {port} && \
         (ip.src == {} || ipv6.src == {})",
        client.ipv4(),
        client.ipv6()
    ))?;
    ensure!(
        syns >= min_syns,
        "the capture saw {syns} SYNs of the plaintext client, want at least {min_syns}: it proves nothing"
    );
    Ok(())
}

/// How many file descriptors process `pid` has open.
pub fn fd_count(pid: u32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(fs::read_dir(&dir)
        .with_context(|| format!("read {dir}"))?
        .count())
}

/// The resident memory of process `pid` (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}
