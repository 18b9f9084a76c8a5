//! Same-node connections: two workloads of one node talk without HBONE or TLS, the caller's
//! identity taken from kernel facts (the listener that captured it), and the destination's
//! PeerAuthentication and AuthorizationPolicy applied exactly as across nodes. A setting, mesh-wide
//! or per destination, sends them through HBONE instead.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{LOG_WAIT, hold_echo, peer_auth, wait_conn, web_root};
use mesh_tests::{Cluster, NodeSpec, PodSpec, RunOutput, http_url};
use serde_json::Value;

const BODY: &[u8] = b"<h1>same node</h1>\n";
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7000;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
/// Denies web to every caller from namespace team.
const DENY_TEAM: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-team, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{from: [{source: {namespaces: [team]}}]}]
"#;

/// node-a: `client` (sa client), `client2` (namespace team, sa other), `outsider` (not in the
/// mesh) and `web` (app=web, sa web: HTTP on 8080, echo on 7000).
struct Setup {
    cluster: Cluster,
    _servers: Vec<mesh_tests::ChildGuard>,
    _http: mesh_tests::HttpServer,
}

fn setup(builder: mesh_tests::ClusterBuilder, web: PodSpec) -> Result<Setup> {
    let cluster = builder
        .node(
            NodeSpec::new("node-a")
                .pod(PodSpec::new("client").service_account("client"))
                .pod(
                    PodSpec::new("client2")
                        .namespace("team")
                        .service_account("other"),
                )
                .pod(PodSpec::new("outsider").enrolled(false))
                .pod(web),
        )
        .build()?;
    cluster.start_agents()?;
    let root = web_root(&cluster, "www", BODY)?;
    let pod = cluster.pod("node-a", "web")?;
    let http = pod.http_server(HTTP_PORT, &root)?;
    let servers = vec![pod.tcp_echo(ECHO_PORT)?];
    Ok(Setup {
        cluster,
        _servers: servers,
        _http: http,
    })
}

fn web() -> PodSpec {
    PodSpec::new("web")
        .label("app", "web")
        .service_account("web")
}

fn default_setup() -> Result<Setup> {
    setup(Cluster::builder(), web())
}

impl Setup {
    fn web_url(&self) -> Result<String> {
        Ok(http_url(
            self.cluster.pod("node-a", "web")?.ipv4(),
            HTTP_PORT,
        ))
    }

    fn curl_web(&self, from: &str) -> Result<RunOutput> {
        self.cluster.pod("node-a", from)?.curl(&self.web_url()?)
    }

    fn expect_ok(&self, from: &str) -> Result<()> {
        let out = self.curl_web(from)?;
        ensure!(
            out.success() && out.stdout == BODY,
            "{from} -> web: exit {:?}, {}\n{}",
            out.code(),
            out.stderr_str().trim(),
            self.cluster.agent_log_tail("node-a"),
        );
        Ok(())
    }

    /// Refused as Istio refuses: a reset (`curl: (56)`).
    fn expect_reset(&self, from: &str) -> Result<()> {
        let out = self.curl_web(from)?;
        ensure!(
            out.code() == Some(56),
            "{from} -> web: want exit 56 (reset), got {:?}: {}\n{}",
            out.code(),
            out.stderr_str().trim(),
            self.cluster.agent_log_tail("node-a"),
        );
        Ok(())
    }

    fn web_dst(&self) -> Result<String> {
        Ok(format!(
            "{}:{HTTP_PORT}",
            self.cluster.pod("node-a", "web")?.ipv4()
        ))
    }

    /// node-a's lines with `message` whose `field` is `value`.
    fn lines(&self, message: &str, field: &str, value: &str) -> Result<Vec<Value>> {
        Ok(self
            .cluster
            .agent_logs("node-a")?
            .into_iter()
            .filter(|l| l["message"] == message && l[field] == value)
            .collect())
    }

    fn metrics(&self) -> Result<String> {
        let out = self.cluster.run_in_node(
            "node-a",
            "curl",
            ["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"],
            Duration::from_secs(10),
        )?;
        ensure!(out.success(), "scrape: {}", out.stderr_str());
        Ok(out.stdout_str())
    }
}

#[test]
fn a_same_node_call_skips_tls_and_carries_the_kernel_proven_identity() -> Result<()> {
    let s = default_setup()?;
    s.expect_ok("client")?;
    let dst = s.web_dst()?;
    let outbound = wait_conn(&s.cluster, "node-a", "default/client", &dst)?;
    ensure!(
        outbound.other["security"] == "same_node" && outbound.other["dst_identity"] == WEB_ID,
        "the source side's line: {outbound:?}"
    );
    ensure!(outbound.bytes_received >= BODY.len() as u64, "{outbound:?}");
    let inbound = s
        .cluster
        .wait_for_log(
            "node-a",
            |l| {
                l["message"] == "connection closed"
                    && l["direction"] == "inbound"
                    && l["dst_addr"] == dst.as_str()
            },
            LOG_WAIT,
        )
        .context("the destination side's line")?;
    // Policy sees the caller at its pod's address, not the loopback it was captured on.
    let client_ip = format!("{}:", s.cluster.pod("node-a", "client")?.ipv4());
    ensure!(
        inbound["security"] == "same_node"
            && inbound["src_identity"] == CLIENT_ID
            && inbound["src_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with(&client_ip)),
        "the destination side's line: {inbound}"
    );
    // No tunnel: the agent accepted no HBONE connection and opened none.
    let hbone = s.lines(
        "inbound mTLS connection accepted",
        "workload",
        "default/web",
    )?;
    ensure!(hbone.is_empty(), "went through HBONE: {hbone:?}");
    // Metrics say what happened, on both reporters, and claim no mTLS.
    let metrics = s.metrics()?;
    for reporter in ["source", "destination"] {
        ensure!(
            metrics.lines().any(|l| {
                l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains(&format!("reporter=\"{reporter}\""))
                    && l.contains("destination_workload=\"web\"")
                    && l.contains("connection_security_policy=\"same_node\"")
            }),
            "no same_node series reported by the {reporter}:\n{metrics}"
        );
    }
    ensure!(
        !metrics
            .lines()
            .any(|l| l.contains("destination_workload=\"web\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "a same-node connection was counted as mutual_tls:\n{metrics}"
    );
    Ok(())
}

#[test]
fn same_node_calls_obey_the_destinations_policies() -> Result<()> {
    let s = default_setup()?;
    // STRICT: the kernel-proven caller is mesh traffic; the outsider's plaintext is not.
    s.cluster.apply_policy(
        "strict",
        &peer_auth("strict", "default", Some("web"), "STRICT"),
    )?;
    s.expect_ok("client")?;
    s.expect_reset("outsider")?;
    // ALLOW only principal client: client2 (another namespace, another account) is denied.
    s.cluster.apply_policy(
        "allow-client",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]}]
"#,
    )?;
    s.expect_ok("client")?;
    s.expect_reset("client2")?;
    let denied = s.lines(
        "connection closed",
        "src_identity",
        "spiffe://cluster.local/ns/team/sa/other",
    )?;
    let denied: Vec<&Value> = denied
        .iter()
        .filter(|l| l["direction"] == "inbound" && l["rejection"] == "policy_denied")
        .collect();
    ensure!(
        denied.iter().any(|l| l["security"] == "same_node"),
        "no same-node denial logged: {denied:?}"
    );
    // By namespace: DENY from team.
    s.cluster.delete_policy("allow-client")?;
    s.cluster.apply_policy("deny-team", DENY_TEAM)?;
    s.expect_reset("client2")?;
    s.expect_ok("client")?;
    Ok(())
}

#[test]
fn a_policy_change_revokes_an_open_same_node_connection() -> Result<()> {
    let s = default_setup()?;
    let web_ip = s.cluster.pod("node-a", "web")?.ipv4();
    let mut held = hold_echo(s.cluster.pod("node-a", "client2")?, web_ip, ECHO_PORT)?;
    held.ensure_up()?;
    s.cluster.apply_policy("deny-team", DENY_TEAM)?;
    held.wait_broken(Duration::from_secs(5))?;
    s.expect_ok("client")?;
    Ok(())
}

/// Whether node-a's agent carried client → web through HBONE (an mTLS line on both sides).
fn went_through_hbone(s: &Setup) -> Result<()> {
    s.expect_ok("client")?;
    let dst = s.web_dst()?;
    let outbound = wait_conn(&s.cluster, "node-a", "default/client", &dst)?;
    ensure!(
        outbound.other["security"] == "mutual_tls",
        "the source side's line: {outbound:?}"
    );
    let hbone = s.lines(
        "inbound mTLS connection accepted",
        "peer_identity",
        CLIENT_ID,
    )?;
    ensure!(!hbone.is_empty(), "no HBONE connection accepted for web");
    Ok(())
}

#[test]
fn mutual_tls_can_be_required_mesh_wide_or_per_destination() -> Result<()> {
    let mesh_wide = setup(Cluster::builder().same_node_mode("mutualTls"), web())?;
    went_through_hbone(&mesh_wide).context("sameNode.mode: mutualTls")?;
    drop(mesh_wide);
    let labelled = setup(
        Cluster::builder(),
        web().label("mesh-agent.dev/same-node", "mutual-tls"),
    )?;
    went_through_hbone(&labelled).context("the destination's label")?;
    Ok(())
}

// ------------------------------------------------------------------ the data path

/// Python: one connection's worth of bulk transfer, each way in turn, each side sending what
/// `PATH` holds `REPEAT` times with `write` (sendall), `sendfile` or `splice` (file → pipe →
/// socket), then half-closing; the other side reads to EOF, prints `recv BYTES SHA256`, then
/// sends its own. `client-first`: the client sends first; `server-first`: the server does.
///   server PORT MODE PATH REPEAT ORDER      (prints `listening` once bound)
///   client HOST PORT MODE PATH REPEAT ORDER
const TRANSFER: &str = r#"
import hashlib, os, socket, sys
if sys.argv[1] == "server":
    _, role, port, mode, path, repeat, order = sys.argv
    ls = socket.create_server(("::", int(port)), family=socket.AF_INET6, dualstack_ipv6=True)
    print("listening", flush=True)
    sock, _ = ls.accept()
else:
    _, role, host, port, mode, path, repeat, order = sys.argv
    sock = socket.create_connection((host, int(port)))
repeat = int(repeat)

def send():
    size = os.path.getsize(path)
    if mode == "write":
        with open(path, "rb") as f:
            data = f.read()
        for _ in range(repeat):
            sock.sendall(data)
    elif mode == "sendfile":
        fd = os.open(path, os.O_RDONLY)
        for _ in range(repeat):
            off = 0
            while off < size:
                off += os.sendfile(sock.fileno(), fd, off, size - off)
    else:
        fd = os.open(path, os.O_RDONLY)
        r, w = os.pipe()
        for _ in range(repeat):
            off = 0
            while off < size:
                n = os.splice(fd, w, min(1 << 16, size - off), offset_src=off)
                off += n
                while n:
                    n -= os.splice(r, sock.fileno(), n)
    sock.shutdown(socket.SHUT_WR)

def recv():
    h, total = hashlib.sha256(), 0
    while True:
        b = sock.recv(1 << 20)
        if not b:
            break
        h.update(b)
        total += len(b)
    print("recv", total, h.hexdigest(), flush=True)

first = (role == "client") == (order == "client-first")
if first:
    send(); recv()
else:
    recv(); send()
sock.close()
"#;

/// Python: resets its connection (SO_LINGER 0) after one byte, or reports the reset it got.
///   server PORT reset|wait          client HOST PORT reset|wait
/// `reset`: read one byte, then reset; `wait`: send one byte, then read until the reset and
/// print `reset` (or `eof` / the bytes, which is wrong).
const RESETS: &str = r#"
import socket, struct, sys, time
if sys.argv[1] == "server":
    _, role, port, action = sys.argv
    ls = socket.create_server(("::", int(port)), family=socket.AF_INET6, dualstack_ipv6=True)
    print("listening", flush=True)
    sock, _ = ls.accept()
else:
    _, role, host, port, action = sys.argv
    sock = socket.create_connection((host, int(port)))
if action == "reset":
    sock.recv(1) if role == "server" else (sock.sendall(b"x"), time.sleep(0.5))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    print("done", flush=True)
else:
    if role == "client":
        sock.sendall(b"x")
    sock.settimeout(10)
    try:
        got = sock.recv(1 << 16) if role == "client" else (sock.recv(1), sock.recv(1 << 16))[1]
        print("eof" if not got else "bytes %r" % got, flush=True)
    except ConnectionResetError:
        print("reset", flush=True)
"#;

/// A 64 MiB file of random bytes in the cluster's scratch directory, and its content.
fn random_file(cluster: &Cluster) -> Result<(std::path::PathBuf, Vec<u8>)> {
    use std::io::Read as _;
    let mut data = vec![0u8; 64 << 20];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut data)?;
    let path = cluster.workdir().join("random.bin");
    std::fs::write(&path, &data)?;
    Ok((path, data))
}

/// Starts a Python server in `pod` and waits until it says it listens.
fn python_server(
    pod: &mesh_tests::Pod,
    script: &str,
    args: &[&str],
) -> Result<mesh_tests::ChildGuard> {
    use std::io::BufRead as _;
    let mut argv = vec!["-c", script, "server"];
    argv.extend_from_slice(args);
    let mut guard = pod.spawn_piped("/usr/bin/python3", argv)?;
    let stdout = guard.child_mut().stdout.as_mut().context("stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    ensure!(line.trim() == "listening", "the server said {line:?}");
    Ok(guard)
}

/// What a spawned Python server printed once it exits (within `timeout`).
fn server_output(mut guard: mesh_tests::ChildGuard, timeout: Duration) -> Result<String> {
    use std::io::Read as _;
    common::wait_for_exit(guard.child_mut(), timeout)?;
    let mut out = String::new();
    if let Some(mut stdout) = guard.child_mut().stdout.take() {
        stdout.read_to_string(&mut out)?;
    }
    Ok(out)
}

#[test]
fn a_gibibyte_each_way_arrives_intact_from_write_sendfile_and_splice_senders() -> Result<()> {
    use sha2::Digest as _;
    const REPEAT: usize = 16;
    let s = default_setup()?;
    let (path, data) = random_file(&s.cluster)?;
    let mut hasher = sha2::Sha256::new();
    for _ in 0..REPEAT {
        hasher.update(&data);
    }
    let want = format!("recv {} {:x}", data.len() * REPEAT, hasher.finalize());
    let (client, web) = (
        s.cluster.pod("node-a", "client")?,
        s.cluster.pod("node-a", "web")?,
    );
    let path = path.display().to_string();
    let repeat = REPEAT.to_string();
    // Each order half-closes first on another side: both directions are covered.
    for (k, (mode, order)) in [
        ("write", "client-first"),
        ("sendfile", "server-first"),
        ("splice", "client-first"),
    ]
    .into_iter()
    .enumerate()
    {
        let port = (9100 + k).to_string();
        let server = python_server(web, TRANSFER, &[&port, mode, &path, &repeat, order])?;
        let out = client.run(
            "/usr/bin/python3",
            [
                "-c",
                TRANSFER,
                "client",
                &web.ipv4().to_string(),
                &port,
                mode,
                &path,
                &repeat,
                order,
            ],
            Duration::from_secs(120),
        )?;
        let served = server_output(server, Duration::from_secs(10))?;
        ensure!(
            out.success() && out.stdout_str().trim() == want && served.trim() == want,
            "{mode}, {order}: the client got {:?} ({}), the server {served:?}; want {want:?}\n{}",
            out.stdout_str().trim(),
            out.stderr_str().trim(),
            s.cluster.agent_log_tail("node-a")
        );
        let line = wait_conn(
            &s.cluster,
            "node-a",
            "default/client",
            &format!("{}:{port}", web.ipv4()),
        )?;
        ensure!(line.other["security"] == "same_node", "{line:?}");
    }
    Ok(())
}

#[test]
fn a_reset_on_either_side_reaches_the_other() -> Result<()> {
    let s = default_setup()?;
    let (client, web) = (
        s.cluster.pod("node-a", "client")?,
        s.cluster.pod("node-a", "web")?,
    );
    let ip = web.ipv4().to_string();
    for (k, (server_does, client_does)) in [("reset", "wait"), ("wait", "reset")]
        .into_iter()
        .enumerate()
    {
        let port = (9200 + k).to_string();
        let server = python_server(web, RESETS, &[&port, server_does])?;
        let out = client.run(
            "/usr/bin/python3",
            ["-c", RESETS, "client", &ip, &port, client_does],
            Duration::from_secs(20),
        )?;
        let served = server_output(server, Duration::from_secs(15))?;
        let (waiter, said) = if client_does == "wait" {
            ("client", out.stdout_str())
        } else {
            ("server", served.clone())
        };
        ensure!(
            said.trim() == "reset",
            "the {waiter} saw {:?} when the other side reset (client: {}, server: {served:?})",
            said.trim(),
            out.stderr_str().trim()
        );
    }
    Ok(())
}

/// Python: sends as fast as the connection takes for SECS seconds, then prints how much went.
const FLOOD: &str = r#"
import socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sock = socket.create_connection((host, port))
sock.settimeout(0.2)
chunk, sent, end = b"x" * 65536, 0, time.time() + secs
while time.time() < end:
    try:
        sent += sock.send(chunk)
    except socket.timeout:
        pass
print(sent, flush=True)
"#;

/// Python: accepts one connection and reads 1 KiB a second from it, for ever.
const SLOW_READER: &str = r#"
import socket, sys, time
ls = socket.create_server(("::", int(sys.argv[2])), family=socket.AF_INET6, dualstack_ipv6=True)
print("listening", flush=True)
sock, _ = ls.accept()
while sock.recv(1024):
    time.sleep(1)
"#;

#[test]
fn a_slow_reader_holds_the_sender_back_without_growing_the_agent() -> Result<()> {
    let s = default_setup()?;
    let (client, web) = (
        s.cluster.pod("node-a", "client")?,
        s.cluster.pod("node-a", "web")?,
    );
    let pid = s.cluster.agent_pid("node-a").context("node-a's agent")?;
    let rss_before = common::rss_kib(pid)?;
    let _reader = python_server(web, SLOW_READER, &["9300"])?;
    let out = client.run(
        "/usr/bin/python3",
        ["-c", FLOOD, &web.ipv4().to_string(), "9300", "6"],
        Duration::from_secs(30),
    )?;
    ensure!(out.success(), "the sender: {}", out.stderr_str());
    let sent: u64 = out
        .stdout_str()
        .trim()
        .parse()
        .context("the sender's count")?;
    let rss_after = common::rss_kib(pid)?;
    // What the socket buffers on the way hold (a few MiB each), not what 6 s could send.
    ensure!(
        sent < 48 << 20,
        "the sender got {} MiB out to a reader of 1 KiB/s",
        sent >> 20
    );
    ensure!(
        rss_after < rss_before + 16 * 1024,
        "the agent grew from {rss_before} KiB to {rss_after} KiB"
    );
    Ok(())
}

/// Python: NUMBER connections to HOST:PORT, `sequential` (each connects, exchanges a byte and
/// closes before the next) or `concurrent` (all open at once, then each exchanges a byte);
/// prints how many exchanges succeeded.
const MANY: &str = r#"
import socket, sys
host, port, n, how = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ok = 0
if how == "sequential":
    for i in range(n):
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(b"x")
                ok += s.recv(1) == b"x"
        except OSError as e:
            print("connection %d: %r" % (i, e), file=sys.stderr, flush=True)
else:
    socks = [socket.create_connection((host, port), timeout=30) for _ in range(n)]
    for s in socks:
        s.sendall(b"x")
    for s in socks:
        ok += s.recv(1) == b"x"
        s.close()
print(ok, flush=True)
"#;

/// Python: an echo server (asyncio), for many connections at once.
const ECHO_SERVER: &str = r#"
import asyncio, sys
async def echo(r, w):
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()
async def main():
    server = await asyncio.start_server(echo, None, int(sys.argv[2]), backlog=2048)
    print("listening", flush=True)
    await server.serve_forever()
asyncio.run(main())
"#;

#[test]
fn ten_thousand_short_and_a_thousand_concurrent_connections_leave_nothing_behind() -> Result<()> {
    let s = default_setup()?;
    let (client, web) = (
        s.cluster.pod("node-a", "client")?,
        s.cluster.pod("node-a", "web")?,
    );
    let _echo = python_server(web, ECHO_SERVER, &["9400"])?;
    let pid = s.cluster.agent_pid("node-a").context("node-a's agent")?;
    let fds_before = common::fd_count(pid)?;
    let ip = web.ipv4().to_string();
    for (n, how) in [(10_000, "sequential"), (1_000, "concurrent")] {
        let out = client.run(
            "/bin/sh",
            [
                "-c",
                "ulimit -n 4096 && exec /usr/bin/python3 -c \"$0\" \"$@\"",
                MANY,
                &ip,
                "9400",
                &n.to_string(),
                how,
            ],
            Duration::from_secs(180),
        )?;
        ensure!(
            out.success() && out.stdout_str().trim() == n.to_string(),
            "{n} {how}: {} exchanges succeeded ({})\n{}",
            out.stdout_str().trim(),
            out.stderr_str().trim(),
            s.cluster.agent_log_tail("node-a")
        );
    }
    common::poll_for(
        Duration::from_secs(10),
        "the agent's fds back to where they were",
        || {
            let now = common::fd_count(pid)?;
            Ok(if now <= fds_before {
                Ok(())
            } else {
                Err(format!("{now} fds, {fds_before} before"))
            })
        },
    )?;
    Ok(())
}
