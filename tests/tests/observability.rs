//! Counts that are right: after known traffic, the `istio_tcp_*` metrics of both reporters, the
//! access log and the admin API's open connections say exactly what happened, including a
//! connection while it is still open, one revoked by a policy change and one denied.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::LOG_WAIT;
use mesh_tests::{ChildGuard, Cluster, NodeSpec, Pod, PodSpec};
use serde_json::Value;

const ECHO_PORT: u16 = 7000;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/default";
/// Longer than the agent's flush period (5 s), with room for a busy machine.
const FLUSH_WAIT: Duration = Duration::from_secs(12);

/// Python (argv: host, port, n): one connection that sends `n` bytes, reads the `n` echoed
/// back, prints `echoed`, then holds the connection until stdin closes and prints `closed`.
/// If the connection breaks it prints `broken: why` and exits 1.
const EXACT_ECHO: &str = r#"
import select, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(bytes(i % 251 for i in range(n)))
    got = 0
    while got < n:
        chunk = s.recv(65536)
        if not chunk:
            raise OSError("closed by the peer after %d bytes" % got)
        got += len(chunk)
    print("echoed", flush=True)
    s.settimeout(None)
    # Until stdin closes; a connection that breaks meanwhile is reported at once.
    while True:
        ready, _, _ = select.select([sys.stdin, s], [], [])
        if s in ready:
            if not s.recv(1):
                raise OSError("closed by the peer")
            raise OSError("unexpected data")
        if not sys.stdin.readline():
            break
    s.shutdown(socket.SHUT_WR)
    if s.recv(1):
        raise OSError("unexpected data")
    print("closed", flush=True)
except OSError as e:
    print("broken: %s" % e, flush=True)
    sys.exit(1)
"#;

/// node-a: `client` (sa client), `client2` (sa other) and `outsider` (not in the mesh); node-b:
/// `web` (app=web) with an echo server on 7000.
struct Setup {
    cluster: Cluster,
    _echo: ChildGuard,
}

fn setup() -> Result<Setup> {
    let cluster = Cluster::builder()
        .node(
            NodeSpec::new("node-a")
                .pod(PodSpec::new("client").service_account("client"))
                .pod(PodSpec::new("client2").service_account("other"))
                .pod(PodSpec::new("outsider").enrolled(false)),
        )
        .node(NodeSpec::new("node-b").pod(PodSpec::new("web").label("app", "web")))
        .build()?;
    cluster.start_agents()?;
    let echo = cluster.pod("node-b", "web")?.tcp_echo(ECHO_PORT)?;
    Ok(Setup {
        cluster,
        _echo: echo,
    })
}

/// One [`EXACT_ECHO`] connection.
struct Exact {
    guard: ChildGuard,
    lines: mpsc::Receiver<String>,
}

impl Exact {
    /// Connects from `from` to web's echo port and returns once `n` bytes went there and back.
    fn open(s: &Setup, from: &str, n: usize) -> Result<Exact> {
        let web = s.cluster.pod("node-b", "web")?.ipv4().to_string();
        let mut guard = s.pod(from)?.spawn_piped(
            "/usr/bin/python3",
            [
                "-c",
                EXACT_ECHO,
                &web,
                &ECHO_PORT.to_string(),
                &n.to_string(),
            ],
        )?;
        let lines = common::stdout_lines(&mut guard)?;
        let mut exact = Exact { guard, lines };
        exact.expect("echoed")?;
        Ok(exact)
    }

    fn expect(&mut self, want: &str) -> Result<()> {
        match self.lines.recv_timeout(LOG_WAIT) {
            Ok(line) if line == want => Ok(()),
            Ok(line) => bail!("want {want:?}, the client said {line:?}"),
            Err(err) => bail!("want {want:?}: {err}"),
        }
    }

    /// Closes the connection cleanly, both ways.
    fn close(mut self) -> Result<()> {
        drop(self.guard.child_mut().stdin.take());
        self.expect("closed")
    }

    /// Waits for the connection to break (the client says why).
    fn wait_broken(&mut self) -> Result<String> {
        match self.lines.recv_timeout(LOG_WAIT) {
            Ok(line) if line.starts_with("broken") => Ok(line),
            Ok(line) => bail!("the connection should have broken; the client said {line:?}"),
            Err(err) => bail!("the connection did not break: {err}"),
        }
    }
}

impl Setup {
    fn pod(&self, name: &str) -> Result<&Pod> {
        let node = if name == "web" { "node-b" } else { "node-a" };
        self.cluster.pod(node, name)
    }

    fn get(&self, node: &str, url: &str) -> Result<String> {
        let out = self.cluster.run_in_node(
            node,
            "curl",
            ["-sS", "--max-time", "5", url],
            Duration::from_secs(10),
        )?;
        ensure!(out.success(), "GET {url} on {node}: {}", out.stderr_str());
        Ok(out.stdout_str())
    }

    fn metrics(&self, node: &str) -> Result<String> {
        self.get(node, "http://127.0.0.1:15020/metrics")
    }

    fn open_connections(&self, node: &str) -> Result<Vec<Value>> {
        let body = self.get(node, "http://127.0.0.1:15000/connections")?;
        serde_json::from_str(&body).with_context(|| format!("/connections: {body}"))
    }

    /// Polls `node`'s metrics until `check` passes (at most `wait`); the error says what the
    /// last scrape had.
    fn wait_metrics(
        &self,
        node: &str,
        wait: Duration,
        check: impl Fn(&Series) -> Result<()>,
    ) -> Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            let text = self.metrics(node)?;
            let outcome = check(&Series(&text));
            match outcome {
                Ok(()) => return Ok(()),
                Err(err) if Instant::now() >= deadline => {
                    let edge: Vec<_> = text
                        .lines()
                        .filter(|l| l.starts_with("istio_tcp_") && l.contains("\"web\""))
                        .collect();
                    bail!("{node}: {err:#}\n{}", edge.join("\n"));
                }
                Err(_) => thread::sleep(Duration::from_millis(250)),
            }
        }
    }
}

/// One scrape, summed over the series that match.
struct Series<'a>(&'a str);

impl Series<'_> {
    /// The sum of `name` over the series to web whose labels contain every one of `labels`.
    fn sum(&self, name: &str, labels: &[&str]) -> u64 {
        self.0
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter(|l| l.contains("destination_workload=\"web\""))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    fn expect(&self, name: &str, labels: &[&str], want: u64) -> Result<()> {
        let got = self.sum(name, labels);
        ensure!(got == want, "{name}{labels:?} is {got}, want {want}");
        Ok(())
    }
}

const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
/// Source to destination (the request direction), whoever reports.
const RECEIVED: &str = "istio_tcp_received_bytes_total";
/// Destination to source.
const SENT: &str = "istio_tcp_sent_bytes_total";
const MTLS: &str = "connection_security_policy=\"mutual_tls\"";
const FROM_CLIENT: &str = "source_workload=\"client\"";

fn reporter(node: &str) -> &'static str {
    if node == "node-a" {
        "reporter=\"source\""
    } else {
        "reporter=\"destination\""
    }
}

/// An AuthorizationPolicy denying `principal` (a SPIFFE ID) access to web.
fn deny(name: &str, principal: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: web\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"{}\"]\n",
        principal.trim_start_matches("spiffe://")
    )
}

#[test]
fn metrics_count_connections_as_they_open_flow_and_close_on_both_reporters() -> Result<()> {
    let s = setup()?;
    // A long-lived connection: opened and its bytes counted while it is open.
    let held = Exact::open(&s, "client", 10_000)?;
    for node in ["node-a", "node-b"] {
        let r = reporter(node);
        s.wait_metrics(node, FLUSH_WAIT, |m| {
            m.expect(OPENED, &[r, MTLS, FROM_CLIENT], 1)?;
            m.expect(CLOSED, &[r], 0)?;
            m.expect(RECEIVED, &[r, MTLS, FROM_CLIENT], 10_000)?;
            m.expect(SENT, &[r, MTLS, FROM_CLIENT], 10_000)
        })
        .context("while the connection is open")?;
        let open = s.open_connections(node)?;
        ensure!(
            open.len() == 1
                && open[0]["security"] == "mutual_tls"
                && open[0]["src_identity"] == CLIENT_ID
                && open[0]["dst_identity"] == WEB_ID
                && open[0]["bytes_sent"] == 10_000
                && open[0]["bytes_received"] == 10_000,
            "{node}'s /connections: {open:?}"
        );
    }
    held.close()?;
    for node in ["node-a", "node-b"] {
        let r = reporter(node);
        s.wait_metrics(node, LOG_WAIT, |m| {
            m.expect(OPENED, &[r], 1)?;
            m.expect(CLOSED, &[r, "response_flags=\"-\""], 1)?;
            m.expect(CLOSED, &[r], 1)?;
            m.expect(RECEIVED, &[r], 10_000)?;
            m.expect(SENT, &[r], 10_000)
        })
        .context("once it closed")?;
        ensure!(
            s.open_connections(node)?.is_empty(),
            "{node} lists a closed connection"
        );
    }

    // Plaintext from outside the mesh (PERMISSIVE): counted by the destination, no lock.
    Exact::open(&s, "outsider", 3_000)?.close()?;
    s.wait_metrics("node-b", LOG_WAIT, |m| {
        let plaintext = [
            "reporter=\"destination\"",
            "connection_security_policy=\"unknown\"",
            "source_workload=\"unknown\"",
        ];
        m.expect(OPENED, &plaintext, 1)?;
        m.expect(CLOSED, &plaintext, 1)?;
        m.expect(RECEIVED, &plaintext, 3_000)?;
        m.expect(SENT, &plaintext, 3_000)
    })?;

    // Revoked by a policy change: its bytes still count, and it closes as denied.
    let mut revoked = Exact::open(&s, "client", 20_000)?;
    s.cluster
        .apply_policy("deny-client", &deny("deny-client", CLIENT_ID))?;
    revoked.wait_broken().context("the revoked connection")?;
    // Denied: refused before any byte reaches web.
    ensure!(
        Exact::open(&s, "client", 100).is_err(),
        "a denied connection got its echo"
    );

    let b = "reporter=\"destination\"";
    s.wait_metrics("node-b", LOG_WAIT, |m| {
        m.expect(OPENED, &[b, MTLS], 3)?;
        m.expect(CLOSED, &[b, MTLS, "response_flags=\"-\""], 1)?;
        m.expect(CLOSED, &[b, MTLS, "response_flags=\"DENY\""], 2)?;
        m.expect(RECEIVED, &[b, MTLS], 30_000)?;
        m.expect(SENT, &[b, MTLS], 30_000)
    })?;
    let a = "reporter=\"source\"";
    s.wait_metrics("node-a", LOG_WAIT, |m| {
        m.expect(OPENED, &[a, MTLS], 3)?;
        m.expect(CLOSED, &[a, MTLS], 3)?;
        m.expect(CLOSED, &[a, MTLS, "response_flags=\"DENY\""], 1)?;
        // The revoked one: the far agent reset the stream.
        m.expect(CLOSED, &[a, MTLS, "response_flags=\"UC\""], 1)?;
        m.expect(RECEIVED, &[a, MTLS, "response_flags=\"-\""], 10_000)?;
        m.expect(RECEIVED, &[a, MTLS, "response_flags=\"UC\""], 20_000)?;
        m.expect(SENT, &[a, MTLS], 30_000)?;
        // The source counts what it forwarded: the denied client's bytes, if they went into
        // the tunnel before the refusal came back (then the far agent dropped them).
        let early = m.sum(RECEIVED, &[a, MTLS, "response_flags=\"DENY\""]);
        ensure!(
            early <= 100,
            "{early} bytes of a 100-byte denied connection"
        );
        Ok(())
    })?;
    let text = s.metrics("node-b")?;
    ensure!(
        text.contains("mesh_agent_inbound_rejections_total{reason=\"policy_denied\"} 1\n"),
        "the denial is not counted with its reason:\n{text}"
    );

    // The agent's own health.
    s.cluster.apply_policy(
        "broken",
        "apiVersion: security.istio.io/v1\nkind: Nonsense\n",
    )?;
    let b = s.metrics("node-b")?;
    let a = s.metrics("node-a")?;
    let value = |text: &str, series: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(series))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    };
    for (node, text) in [("node-a", &a), ("node-b", &b)] {
        ensure!(
            value(text, "mesh_agent_workloads_unserved ") == Some(0),
            "{node}: unserved"
        );
        ensure!(
            value(text, "mesh_agent_ebpf_attachments ").is_some_and(|n| n >= 5),
            "{node}: attachments:\n{text}"
        );
        // Loaded at start and with deny-client; the broken file rejected.
        ensure!(
            value(text, "mesh_agent_policy_reloads_total{result=\"loaded\"}")
                .is_some_and(|n| n >= 2)
                && value(text, "mesh_agent_policy_reloads_total{result=\"rejected\"}") == Some(1),
            "{node}: policy reloads:\n{text}"
        );
    }
    ensure!(
        value(&a, "mesh_agent_hbone_connections ").is_some_and(|n| n >= 1),
        "node-a's HBONE pool:\n{a}"
    );
    Ok(())
}

#[test]
fn one_access_log_line_per_connection_with_one_schema_both_ways() -> Result<()> {
    let s = setup()?;
    Exact::open(&s, "client", 1_234)?.close()?;
    let web = s.cluster.pod("node-b", "web")?;
    let dst = format!("{}:{ECHO_PORT}", web.ipv4());
    let client_ip = s.pod("client")?.ipv4().to_string();
    let closed = |node: &str, direction: &str| -> Result<Value> {
        s.cluster
            .wait_for_log(
                node,
                |l| {
                    l["message"] == "connection closed"
                        && l["direction"] == direction
                        && l["dst_addr"] == dst.as_str()
                },
                LOG_WAIT,
            )
            .with_context(|| format!("{node}'s {direction} line"))
    };
    for (node, direction) in [("node-a", "outbound"), ("node-b", "inbound")] {
        let line = closed(node, direction)?;
        let src_addr = line["src_addr"].as_str().unwrap_or_default();
        ensure!(
            src_addr.starts_with(&format!("{client_ip}:"))
                && line["src_workload"] == "default/client"
                && line["src_identity"] == CLIENT_ID
                && line["dst_workload"] == "default/web"
                && line["dst_identity"] == WEB_ID
                && line["security"] == "mutual_tls"
                && line["response_flags"] == "-"
                && line["bytes_sent"] == 1_234
                && line["bytes_received"] == 1_234
                && line["duration_ms"].is_u64()
                && line.get("error").is_none(),
            "{node}'s line: {line}"
        );
        let lines = s
            .cluster
            .agent_logs(node)?
            .into_iter()
            .filter(|l| l["message"] == "connection closed" && l["dst_addr"] == dst.as_str())
            .count();
        ensure!(lines == 1, "{node} logged {lines} lines for one connection");
    }
    Ok(())
}

#[test]
fn the_log_level_changes_at_run_time_and_text_logs_carry_no_colours() -> Result<()> {
    let s = setup()?;
    let post = |level: &str| {
        s.cluster.run_in_node(
            "node-a",
            "curl",
            [
                "-sS",
                "-X",
                "POST",
                "-w",
                "%{http_code}",
                &format!("http://127.0.0.1:15000/logging?level={level}"),
            ],
            Duration::from_secs(10),
        )
    };
    ensure!(
        s.get("node-a", "http://127.0.0.1:15000/logging")?.trim() == "info",
        "the default filter"
    );
    let bad = post("no%3D%3Dsuch")?;
    ensure!(
        bad.stdout_str().ends_with("400"),
        "a bad filter: {}",
        bad.stdout_str()
    );
    let ok = post("debug")?;
    ensure!(
        ok.stdout_str().trim_end().ends_with("200"),
        "{}",
        ok.stdout_str()
    );
    Exact::open(&s, "client", 10)?.close()?;
    s.cluster
        .wait_for_log(
            "node-a",
            |l| l["message"] == "connection opened" && l["direction"] == "outbound",
            LOG_WAIT,
        )
        .context("at debug, a `connection opened` line")?;
    // The text format, written to a pipe (not a terminal), has no escape sequences.
    let failed = std::process::Command::new(mesh_tests::agent_bin())
        .args([
            "run",
            "--cluster",
            "/nonexistent/cluster.yaml",
            "--node",
            "n",
        ])
        .output()?;
    let log = String::from_utf8_lossy(&failed.stdout);
    ensure!(
        !failed.status.success() && log.contains("ERROR") && log.contains("mesh-agent failed"),
        "the text log of a failed start: {log}"
    );
    ensure!(
        !failed.stdout.contains(&0x1b),
        "escape sequences in a text log that is not a terminal: {log:?}"
    );
    Ok(())
}

#[test]
fn status_lists_the_node_and_the_plaintext_report_says_when_strict_is_safe() -> Result<()> {
    let s = setup()?;
    let outsider = s.pod("outsider")?.ipv4().to_string();
    let client = s.pod("client")?.ipv4().to_string();
    for _ in 0..2 {
        Exact::open(&s, "outsider", 10)?.close()?;
    }
    let held = Exact::open(&s, "client", 10)?;
    let status = |args: &[&str]| -> Result<String> {
        let agent = mesh_tests::agent_bin();
        let agent = agent.to_str().context("the agent's path")?;
        let out = s
            .cluster
            .run_in_node("node-b", agent, args.iter().copied(), LOG_WAIT)?;
        ensure!(out.success(), "mesh-agent {args:?}: {}", out.stderr_str());
        Ok(out.stdout_str())
    };
    let node = status(&["status"])?;
    for want in [
        "Node node-b, trust domain cluster.local: ready",
        "default/web",
        WEB_ID,
        "PERMISSIVE (default)",
        "expires in",
        "Open connections (1)",
        "inbound",
        "default/client",
        "🔒 mTLS",
    ] {
        ensure!(node.contains(want), "no {want:?} in `status`:\n{node}");
    }
    let report = status(&["status", "--plaintext"])?;
    let outsider_row = report
        .lines()
        .find(|l| l.contains(&format!("{outsider} (outside the mesh)")))
        .with_context(|| format!("the outsider is not in the report:\n{report}"))?;
    ensure!(
        outsider_row.contains("default/web")
            && outsider_row.contains(" 2 ")
            && outsider_row.contains(&format!("{ECHO_PORT}"))
            && outsider_row.contains("would be refused"),
        "the outsider's row: {outsider_row}\n{report}"
    );
    ensure!(
        !report.contains(&client),
        "an mTLS client is in the plaintext report:\n{report}"
    );
    held.close()?;

    let dump: Value =
        serde_json::from_str(&s.get("node-b", "http://127.0.0.1:15000/config_dump")?)?;
    let web = &dump["workloads"][0];
    ensure!(web["mtls"]["mode"] == "PERMISSIVE", "{web}");
    let leaf = &dump["certificates"][0]["chain"][0];
    ensure!(
        leaf["uris"]
            .as_array()
            .is_some_and(|u| u.iter().any(|u| u == WEB_ID)),
        "the leaf of the chain: {leaf}"
    );
    let hooks: Vec<&str> = dump["ebpf"]["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["hook"].as_str())
        .collect();
    for hook in ["cgroup/connect", "sockops", "cgroup_skb", "sk_lookup"] {
        ensure!(hooks.contains(&hook), "no {hook} attachment: {hooks:?}");
    }

    s.cluster.apply_policy(
        "strict",
        &common::peer_auth("default", "default", None, "STRICT"),
    )?;
    let report = status(&["status", "--plaintext"])?;
    ensure!(
        report.contains("Already STRICT: default/web") && !report.contains("would be refused"),
        "after STRICT:\n{report}"
    );
    Ok(())
}

#[test]
fn prometheus_scrapes_every_agent_and_the_graph_marks_each_edge() -> Result<()> {
    let s = setup()?;
    let prometheus = mesh_tests::Prometheus::start(&s.cluster)?;
    prometheus.wait_for_agents(2)?;
    s.cluster.apply_policy(
        "deny-other",
        &deny("deny-other", "spiffe://cluster.local/ns/default/sa/other"),
    )?;
    let traffic = || -> Result<()> {
        Exact::open(&s, "client", 2_000)?.close()?;
        Exact::open(&s, "outsider", 1_000)?.close()?;
        ensure!(
            Exact::open(&s, "client2", 10).is_err(),
            "client2 was not denied"
        );
        Ok(())
    };
    // Rates need a counter seen before it grows: a first round makes the series, a second one
    // (after a scrape) is the traffic the graph shows.
    traffic()?;
    let series = |result: &[Value]| {
        let has = |source: &str, security: &str| {
            result.iter().any(|r| {
                r["metric"]["source_workload"] == source
                    && r["metric"]["connection_security_policy"] == security
            })
        };
        has("client", "mutual_tls") && has("unknown", "unknown") && has("client2", "mutual_tls")
    };
    // Kiali's security view: connections to web by source and security, from the destination.
    let kiali = "sum by (source_workload, destination_workload, connection_security_policy) \
                 (istio_tcp_connections_opened_total{reporter=\"destination\", destination_workload=\"web\"})";
    prometheus.wait_for(kiali, FLUSH_WAIT, series)?;
    thread::sleep(Duration::from_secs(2));
    traffic()?;
    let grown = "sum by (source_workload, destination_workload, connection_security_policy) \
                 (increase(istio_tcp_connections_opened_total{reporter=\"destination\", destination_workload=\"web\"}[1m])) > 0";
    prometheus.wait_for(grown, FLUSH_WAIT, series)?;
    prometheus.wait_for(
        "sum(increase(istio_tcp_connections_closed_total{reporter=\"destination\", response_flags=\"DENY\"}[1m])) > 0",
        FLUSH_WAIT,
        |r| !r.is_empty(),
    )?;

    let out_dir = prometheus.dir().to_owned();
    let graph = |out: &std::path::Path| -> Result<()> {
        let agent = mesh_tests::agent_bin();
        let out = out.to_str().context("path")?;
        let drawn = prometheus.run(
            agent.to_str().context("the agent's path")?,
            [
                "graph",
                "--prometheus",
                &prometheus.url(),
                "--window",
                "1m",
                "--out",
                out,
            ],
        )?;
        ensure!(
            drawn.success(),
            "mesh-agent graph --out {out}: {}",
            drawn.stderr_str()
        );
        Ok(())
    };
    let dot_path = out_dir.join("graph.dot");
    graph(&dot_path)?;
    let dot = std::fs::read_to_string(&dot_path)?;
    let edge = |source: &str| -> Result<&str> {
        dot.lines()
            .find(|l| {
                l.trim_start()
                    .starts_with(&format!("\"{source}\" -> \"default/web\""))
            })
            .with_context(|| format!("no edge from {source}:\n{dot}"))
    };
    let mtls = edge("default/client")?;
    ensure!(
        mtls.contains("🔒 mTLS") && !mtls.contains("denied"),
        "{mtls}"
    );
    let plaintext = edge("unknown")?;
    ensure!(
        plaintext.contains("🔓 plaintext") && plaintext.contains("dashed"),
        "{plaintext}"
    );
    let denied = edge("default/client2")?;
    ensure!(
        denied.contains("denied") && denied.contains("#c62828"),
        "{denied}"
    );

    // With Graphviz installed, the same graph as SVG.
    let svg_path = out_dir.join("graph.svg");
    graph(&svg_path)?;
    let svg = std::fs::read_to_string(&svg_path)?;
    ensure!(
        svg.contains("<svg") && svg.contains("default/client2"),
        "{svg}"
    );
    Ok(())
}
