//! Pooled HBONE connections belong to one source workload: two replicas with one service
//! account on one node each reach the far side from their own IP, so `ipBlocks` tells them
//! apart even while their connections are pooled. A peer that allows few streams per
//! connection gets more connections, not queued streams; a peer that vanishes without a reset
//! is given up within about 2 s, and a Service's other endpoint takes over.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{http_get, poll_for, web_root};
use mesh_tests::{Cluster, NodeSpec, PodSpec, http_url};
use serde_json::Value;

#[test]
fn two_replicas_of_one_service_account_are_seen_from_their_own_ips() -> Result<()> {
    let cluster = Cluster::builder()
        .node(
            NodeSpec::new("node-a")
                .pod(PodSpec::new("client-1").service_account("client"))
                .pod(PodSpec::new("client-2").service_account("client")),
        )
        .node(NodeSpec::new("node-b").pod(PodSpec::new("web").label("app", "web")))
        .build()?;
    cluster.start_agents()?;
    let (one, two) = (
        cluster.pod("node-a", "client-1")?,
        cluster.pod("node-a", "client-2")?,
    );
    let web = cluster.pod("node-b", "web")?;
    let server = web.http_server(8080, &web_root(&cluster, "www", b"web\n")?)?;
    let url = http_url(web.ipv4(), 8080);
    // Both pooled first, under no policy: the second replica's streams must not ride the
    // first one's connection.
    for pod in [one, two] {
        let out = pod.curl(&url)?;
        ensure!(
            out.success(),
            "{} before the policy: {}",
            pod.name(),
            out.stderr_str()
        );
    }
    cluster.apply_policy(
        "deny-client-2",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client-2\n  namespace: default\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{}/32\"]\n",
            two.ipv4()
        ),
    )?;
    for round in 0..3 {
        let allowed = one.curl(&url)?;
        ensure!(
            allowed.success(),
            "round {round}: client-1 was refused: {}",
            allowed.stderr_str()
        );
        let denied = two.curl(&url)?;
        ensure!(
            !denied.success(),
            "round {round}: client-2 got through although its IP is denied"
        );
    }
    let served = server.requests()?.len();
    ensure!(
        served == 5,
        "web served {served} requests, want 2 + 3 from client-1"
    );
    Ok(())
}

// ------------------------------------------------------------ stream limits and dead peers

/// The port of the TCP echo server in the stream-limit test.
const ECHO_PORT: u16 = 7000;

/// `node`'s agent log lines whose `message` is `message` and whose `dst` is `dst`.
fn lines_with(cluster: &Cluster, node: &str, message: &str, dst: &str) -> Result<Vec<Value>> {
    Ok(cluster
        .agent_logs(node)?
        .into_iter()
        .filter(|l| l["message"] == message && l["dst"] == dst)
        .collect())
}

/// How `node`'s `connection closed` lines to `dst` ended: `ok` or the error, with a count.
fn outcomes_to(
    cluster: &Cluster,
    node: &str,
    dst: &str,
) -> Result<std::collections::BTreeMap<String, usize>> {
    let mut outcomes = std::collections::BTreeMap::new();
    for line in cluster
        .connections(node)?
        .into_iter()
        .filter(|c| c.dst == dst)
    {
        *outcomes
            .entry(line.error.unwrap_or_else(|| "ok".into()))
            .or_default() += 1;
    }
    Ok(outcomes)
}

/// A copy of the cluster file, next to it, whose `hbone` section also sets
/// `maxConcurrentStreams: limit`; returns its path.
fn cluster_file_with_stream_limit(cluster: &Cluster, limit: u32) -> Result<PathBuf> {
    let text = cluster.cluster_file_text()?;
    let mut doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).context("parse the harness's cluster file")?;
    let root = doc
        .as_mapping_mut()
        .context("the cluster file is not a mapping")?;
    let hbone = root
        .entry("hbone".into())
        .or_insert_with(|| serde_yaml_ng::Mapping::new().into());
    if hbone.is_null() {
        *hbone = serde_yaml_ng::Mapping::new().into();
    }
    hbone
        .as_mapping_mut()
        .context("`hbone` is not a mapping")?
        .insert("maxConcurrentStreams".into(), limit.into());
    let path = cluster
        .workdir()
        .join(format!("cluster-max-streams-{limit}.yaml"));
    std::fs::write(&path, serde_yaml_ng::to_string(&doc)?)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// Python (argv: port): a dual-stack TCP echo server, one thread per connection, with a
/// backlog deep enough for a burst of connections (socat's default of 5 makes part of a burst
/// of 50 wait for a SYN retransmission, a second).
const ECHO_SERVER: &str = r#"
import socket, sys, threading
srv = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6,
                           dualstack_ipv6=True, backlog=256)
def echo(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"#;

/// Starts [`ECHO_SERVER`] on `port` in `pod` and waits until it accepts connections.
fn echo_server(pod: &mesh_tests::Pod, port: u16) -> Result<mesh_tests::ChildGuard> {
    let mut guard = pod.spawn("/usr/bin/python3", ["-c", ECHO_SERVER, &port.to_string()])?;
    pod.wait_for_port(&mut guard, port)?;
    Ok(guard)
}

/// Python (argv: host, port, n, secs): opens `n` connections to an echo server and keeps them
/// all open; only once all are connected it sends one line on each, then reads every echo back,
/// all within `secs` from the start. Prints `connected N`, then `echoed E of N` and up to 10
/// `failed I: why` lines; exits 0 only if every echo came back.
const MANY_ECHOES: &str = r#"
import socket, sys, time
host, port, n, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.time() + secs
left = lambda: max(0.01, deadline - time.time())
socks = [socket.create_connection((host, port), timeout=left()) for _ in range(n)]
print("connected %d" % len(socks), flush=True)
for i, s in enumerate(socks):
    s.sendall(b"conn %d\n" % i)
ok, failed = 0, []
for i, s in enumerate(socks):
    want, got = b"conn %d\n" % i, b""
    try:
        while len(got) < len(want):
            s.settimeout(left())
            chunk = s.recv(64)
            if not chunk:
                raise OSError("closed by the peer after %r" % got)
            got += chunk
        if got == want:
            ok += 1
        else:
            failed.append("%d: echo %r" % (i, got))
    except OSError as e:
        failed.append("%d: %s" % (i, e or type(e).__name__))
print("echoed %d of %d" % (ok, n), flush=True)
for f in failed[:10]:
    print("failed " + f, flush=True)
for s in socks:
    s.close()
sys.exit(0 if ok == n else 1)
"#;

#[test]
fn a_peer_allowing_10_streams_gets_several_connections() -> Result<()> {
    const LIMIT: u32 = 10;
    const CONNECTIONS: usize = 50;
    let cluster = Cluster::builder()
        .node(NodeSpec::new("node-a").pod(PodSpec::new("client")))
        .node(NodeSpec::new("node-b").pod(PodSpec::new("web").label("app", "web")))
        .build()?;
    let limited = cluster_file_with_stream_limit(&cluster, LIMIT)?;
    cluster.start_agent("node-a")?;
    cluster.start_agent_with("node-b", &limited)?;
    let (client, web) = (
        cluster.pod("node-a", "client")?,
        cluster.pod("node-b", "web")?,
    );
    let _echo = echo_server(web, ECHO_PORT)?;

    let started = Instant::now();
    let out = client.run(
        "/usr/bin/python3",
        [
            "-c",
            MANY_ECHOES,
            &web.ipv4().to_string(),
            &ECHO_PORT.to_string(),
            &CONNECTIONS.to_string(),
            "10",
        ],
        Duration::from_secs(20),
    )?;
    let took = started.elapsed();
    let report = out.stdout_str();
    let via = mesh_tests::addr(web.ipv4(), 15008);
    let established = lines_with(&cluster, "node-a", "hbone connection established", &via)?.len();
    let accepted = cluster
        .agent_logs("node-b")?
        .into_iter()
        .filter(|l| l["message"] == "inbound mTLS connection accepted")
        .count();
    // Each connection is logged when it ends: give node-a's agent a moment to log them all.
    let echo = mesh_tests::addr(web.ipv4(), ECHO_PORT);
    let logged = poll_for(
        Duration::from_secs(5),
        "node-a logs every connection",
        || {
            let outcomes = outcomes_to(&cluster, "node-a", &echo)?;
            let n: usize = outcomes.values().sum();
            Ok(if n >= CONNECTIONS {
                Ok(outcomes)
            } else {
                Err(format!("{outcomes:?}"))
            })
        },
    );
    let outcomes = match logged {
        Ok(outcomes) => format!("{outcomes:?}"),
        Err(e) => format!("{e:#}"),
    };
    let seen = format!(
        "node-a established {established} HBONE connections to {via}, node-b accepted \
         {accepted}; node-a's relayed connections: {outcomes}"
    );
    eprintln!(
        "{CONNECTIONS} concurrent echo connections took {took:?}:\n{report}{}{seen}",
        out.stderr_str()
    );
    ensure!(
        out.success() && report.contains(&format!("echoed {CONNECTIONS} of {CONNECTIONS}")),
        "{CONNECTIONS} concurrent connections to a peer allowing {LIMIT} streams per HBONE \
         connection (exit {:?}, {took:?}):\n{report}{}\n{seen}",
        out.code(),
        out.stderr_str().trim()
    );
    ensure!(
        took < Duration::from_secs(11),
        "{CONNECTIONS} echoes took {took:?}; {seen}"
    );
    let want = CONNECTIONS.div_ceil(LIMIT as usize);
    ensure!(
        established >= want,
        "node-a opened {established} HBONE connections to {via} for {CONNECTIONS} concurrent \
         streams, want at least {want} (the peer allows {LIMIT} per connection): it queued \
         streams instead of opening connections; {seen}"
    );
    Ok(())
}

const DEAD_PEER_VIP: &str = "10.96.0.20";

/// Which endpoint answered one request to the VIP, when it was sent (after the link went down)
/// and how long it took.
#[derive(Debug)]
struct Attempt {
    at: Duration,
    took: Duration,
    /// The body (the endpoint's name), or why the request failed.
    outcome: Result<String, String>,
}

/// What `ip link set eth0 down` took from the node and `up` does not give back: its IPv6
/// address (no `keep_addr_on_down`) and the routes to the other nodes' pods through `eth0`.
fn restore_node_link(cluster: &Cluster, node: &str) -> Result<()> {
    use mesh_tests::sys::ip_in;
    let n = cluster.node(node)?;
    let ns = n.netns_name();
    ip_in(ns, &["link", "set", "eth0", "up"])?;
    let v6 = format!("{}/64", n.ipv6());
    ip_in(ns, &["addr", "replace", &v6, "dev", "eth0", "nodad"])?;
    for other in cluster.nodes().iter().filter(|o| o.index() != n.index()) {
        let k = other.index();
        let (cidr4, via4) = (format!("10.{k}.0.0/24"), other.ipv4().to_string());
        ip_in(ns, &["route", "replace", &cidr4, "via", &via4])?;
        let (cidr6, via6) = (format!("fd00:{k}::/64"), other.ipv6().to_string());
        ip_in(ns, &["-6", "route", "replace", &cidr6, "via", &via6])?;
    }
    Ok(())
}

#[test]
fn a_peer_that_vanishes_silently_fails_over_or_fails_fast() -> Result<()> {
    let web = |name: &str| {
        PodSpec::new(name)
            .service_account("web")
            .label("app", "web")
    };
    let cluster = Cluster::builder()
        .node(NodeSpec::new("node-a").pod(PodSpec::new("client")))
        .node(NodeSpec::new("node-b").pod(web("web-1")))
        .node(NodeSpec::new("node-c").pod(web("web-2")))
        .build()?;
    cluster.start_agents()?;
    let mut servers = Vec::new();
    for (node, pod) in [("node-b", "web-1"), ("node-c", "web-2")] {
        let root = web_root(&cluster, pod, format!("{pod}\n").as_bytes())?;
        servers.push(cluster.pod(node, pod)?.http_server(8080, &root)?);
    }
    let mut text = cluster.cluster_file_text()?;
    text.push_str(&format!(
        "services:\n- name: web\n  namespace: default\n  addresses: [{DEAD_PEER_VIP}]\n  ports:\n  - {{port: 80, targetPort: 8080}}\n  selector: {{app: web}}\n"
    ));
    for (node, reload) in cluster.write_raw_cluster_file(&text)? {
        ensure!(
            matches!(reload, mesh_tests::Reload::Loaded(_)),
            "{node}'s agent did not load the Service: {reload:?}"
        );
    }
    let client = cluster.pod("node-a", "client")?;
    let url = format!("http://{DEAD_PEER_VIP}:80/");
    let ask = |max: Duration| -> Result<Result<String, String>> {
        let got = http_get(client, &url, max)?;
        Ok(if got.exit == Some(0) && got.status == Some(200) {
            Ok(String::from_utf8_lossy(&got.body).trim().to_owned())
        } else {
            Err(format!(
                "curl exit {:?}, status {:?}: {}",
                got.exit, got.status, got.stderr
            ))
        })
    };

    // Warm-up: both endpoints answer, so node-a has a pooled connection to each.
    let mut seen = std::collections::BTreeSet::new();
    poll_for(Duration::from_secs(10), "both endpoints answer", || {
        match ask(Duration::from_secs(5))? {
            Ok(name) => {
                seen.insert(name);
            }
            Err(why) => return Ok(Err(why)),
        }
        Ok(if seen.len() == 2 {
            Ok(())
        } else {
            Err(format!("answered so far: {seen:?}"))
        })
    })?;
    let web1_via = mesh_tests::addr(cluster.pod("node-b", "web-1")?.ipv4(), 15008);
    let gone_lines = || -> Result<Vec<Value>> {
        let mut lines = lines_with(
            &cluster,
            "node-a",
            "hbone peer does not answer PINGs; no new streams on this connection",
            &web1_via,
        )?;
        lines.extend(lines_with(
            &cluster,
            "node-a",
            "hbone connection closed",
            &web1_via,
        )?);
        Ok(lines)
    };
    let gone_before = gone_lines()?.len();
    ensure!(
        lines_with(
            &cluster,
            "node-a",
            "hbone connection established",
            &web1_via
        )?
        .len()
            == 1,
        "node-a should hold one pooled connection to {web1_via} after the warm-up"
    );

    // node-b vanishes: its link goes down, the fabric drops what is sent to it, no reset.
    let node_b = cluster.node("node-b")?.netns_name().to_owned();
    mesh_tests::sys::ip_in(&node_b, &["link", "set", "eth0", "down"])?;
    let down = Instant::now();
    let mut attempts = Vec::new();
    while attempts
        .iter()
        .filter(|a: &&Attempt| a.at >= Duration::from_secs(4))
        .count()
        < 6
    {
        let at = down.elapsed();
        let outcome = ask(Duration::from_secs(5))?;
        attempts.push(Attempt {
            at,
            took: down.elapsed() - at,
            outcome,
        });
    }
    for a in &attempts {
        eprintln!(
            "+{:>6.3}s took {:>6.3}s: {:?}",
            a.at.as_secs_f64(),
            a.took.as_secs_f64(),
            a.outcome
        );
    }
    let slow: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.took > Duration::from_millis(2500))
        .collect();
    ensure!(
        slow.is_empty(),
        "requests to the VIP took longer than 2.5 s after web-1's node vanished: {slow:#?}"
    );
    // Once the agent has found web-1 unreachable it tries it last: no more 2 s connect waits.
    let waited: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.at >= Duration::from_secs(4) && a.took > Duration::from_millis(1000))
        .collect();
    ensure!(
        waited.is_empty(),
        "requests still waited for the unreachable endpoint: {waited:#?}"
    );
    let wrong: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| match &a.outcome {
            Ok(name) => name != "web-2",
            Err(_) => a.at >= Duration::from_secs(3),
        })
        .collect();
    ensure!(
        wrong.is_empty(),
        "after web-1's node vanished, requests must be answered by web-2 (any failure only in \
         the first 3 s): {wrong:#?}"
    );
    let gone = gone_lines()?;
    ensure!(
        gone.len() > gone_before,
        "node-a never gave up its pooled connection to {web1_via}; {}",
        cluster.agent_log_tail("node-a")
    );
    for line in &gone[gone_before..] {
        eprintln!("node-a: {line}");
    }

    // node-b comes back: web-1 answers again.
    restore_node_link(&cluster, "node-b")?;
    let back = Instant::now();
    poll_for(Duration::from_secs(5), "web-1 answers again", || {
        Ok(match ask(Duration::from_secs(3))? {
            Ok(name) if name == "web-1" => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })?;
    eprintln!(
        "web-1 answered again {:?} after its link came back",
        back.elapsed()
    );
    Ok(())
}
