//! Inbound capture and policy: every inbound connection passes the agent, which applies Istio's
//! PeerAuthentication and AuthorizationPolicy as users write them.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{HOLD_ECHO, LOG_WAIT, peer_auth, wait_for_exit, web_root};
use mesh_tests::{Cluster, NodeSpec, Pod, PodSpec, RunOutput, http_url};
use serde_json::Value;

const BODY: &[u8] = b"<h1>policy</h1>\n";
const HTTP_PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
const ECHO_PORT: u16 = 7000;

/// node-a: `client` (sa client), `client2` (sa other, namespace team), `outsider` (not in the
/// mesh); node-b: `web` (app=web, ns default) serving HTTP on 8080 and 9090 and echo on 7000,
/// `outside-web` (not in the mesh).
struct Setup {
    cluster: Cluster,
    _servers: Vec<mesh_tests::ChildGuard>,
    /// web:8080, web:9090, outside-web:8080.
    http: Vec<mesh_tests::HttpServer>,
}

fn setup() -> Result<Setup> {
    let cluster = Cluster::builder()
        .node(
            NodeSpec::new("node-a")
                .pod(PodSpec::new("client").service_account("client"))
                .pod(
                    PodSpec::new("client2")
                        .namespace("team")
                        .service_account("other"),
                )
                .pod(PodSpec::new("outsider").enrolled(false)),
        )
        .node(
            NodeSpec::new("node-b")
                .pod(PodSpec::new("web").label("app", "web"))
                .pod(PodSpec::new("outside-web").enrolled(false)),
        )
        .build()?;
    cluster.start_agents()?;
    let root = web_root(&cluster, "www", BODY)?;
    let web = cluster.pod("node-b", "web")?;
    let http = vec![
        web.http_server(HTTP_PORT, &root)?,
        web.http_server(OTHER_PORT, &root)?,
        cluster
            .pod("node-b", "outside-web")?
            .http_server(HTTP_PORT, &root)?,
    ];
    let servers = vec![web.tcp_echo(ECHO_PORT)?];
    Ok(Setup {
        cluster,
        _servers: servers,
        http,
    })
}

impl Setup {
    fn pod(&self, name: &str) -> Result<&Pod> {
        let node = if ["client", "client2", "outsider"].contains(&name) {
            "node-a"
        } else {
            "node-b"
        };
        self.cluster.pod(node, name)
    }

    /// `curl http://web:<port>/` from `from`, by name as in the seed story.
    fn curl_web(&self, from: &str, port: u16) -> Result<RunOutput> {
        self.pod(from)?
            .curl(&format!("http://web:{port}/"))
            .with_context(|| format!("curl from {from}"))
    }

    fn expect_ok(&self, from: &str, port: u16) -> Result<()> {
        let out = self.curl_web(from, port)?;
        ensure!(
            out.success() && out.stdout == BODY,
            "{from} -> web:{port}: exit {:?}, {}\nnode-a: {}\nnode-b: {}",
            out.code(),
            out.stderr_str().trim(),
            self.cluster.agent_log_tail("node-a"),
            self.cluster.agent_log_tail("node-b"),
        );
        Ok(())
    }

    /// The seed story's symptom: `curl: (56) Recv failure: Connection reset by peer`.
    fn expect_reset(&self, from: &str, port: u16) -> Result<()> {
        let out = self.curl_web(from, port)?;
        ensure!(
            out.code() == Some(56),
            "{from} -> web:{port}: want exit 56 (reset), got {:?}: {}\nnode-b: {}",
            out.code(),
            out.stderr_str().trim(),
            self.cluster.agent_log_tail("node-b"),
        );
        Ok(())
    }

    fn node_b_lines(&self, message: &str) -> Result<Vec<Value>> {
        Ok(self
            .cluster
            .agent_logs("node-b")?
            .into_iter()
            .filter(|l| l["message"] == message)
            .collect())
    }

    /// node-b's inbound `connection closed` lines, delivered or refused.
    fn node_b_inbound(&self) -> Result<Vec<Value>> {
        Ok(self
            .node_b_lines("connection closed")?
            .into_iter()
            .filter(|l| l["direction"] == "inbound")
            .collect())
    }

    fn wait_node_b(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        self.cluster
            .wait_for_log("node-b", pred, LOG_WAIT)
            .with_context(|| format!("node-b never logged {what}"))
    }
}

#[test]
fn inbound_connections_pass_the_agent_and_say_how_they_were_secured() -> Result<()> {
    let s = setup()?;
    let outsider = s.pod("outsider")?;
    s.expect_ok("outsider", HTTP_PORT)?;
    s.expect_ok("client", HTTP_PORT)?;
    let plaintext = s.wait_node_b("the plaintext connection", |l| {
        is_inbound_closed(l) && l["security"] == "none"
    })?;
    ensure!(
        plaintext["src_addr"]
            .as_str()
            .is_some_and(|a| is_address_of(outsider, a)),
        "the agent should see the outsider's own address: {plaintext}"
    );
    s.wait_node_b("the mTLS connection", |l| {
        is_inbound_closed(l)
            && l["security"] == "mutual_tls"
            && l["src_identity"] == "spiffe://cluster.local/ns/default/sa/client"
    })?;

    // Inside the pod, loopback is the pod's own business.
    let web = s.pod("web")?;
    let local = web.curl(&http_url(std::net::Ipv4Addr::LOCALHOST, HTTP_PORT))?;
    ensure!(local.success(), "loopback inside web failed");
    thread::sleep(Duration::from_millis(300));
    let captured = s.node_b_inbound()?.len();
    ensure!(
        captured == 2,
        "{captured} inbound lines; loopback must not be captured"
    );
    Ok(())
}

#[test]
fn with_the_agent_down_inbound_fails_closed_and_recovers() -> Result<()> {
    let s = setup()?;
    s.expect_ok("outsider", HTTP_PORT)?;
    s.cluster.stop_agent("node-b")?;
    let out = s.curl_web("outsider", HTTP_PORT)?;
    ensure!(
        !out.success(),
        "plaintext reached web with its agent stopped: the mesh was bypassed"
    );
    s.cluster.start_agent("node-b")?;
    s.expect_ok("outsider", HTTP_PORT)?;
    Ok(())
}

#[test]
fn strict_resets_plaintext_clients_and_keeps_mesh_clients() -> Result<()> {
    let s = setup()?;
    s.cluster
        .apply_policy("strict", &peer_auth("default", "default", None, "STRICT"))?;
    s.expect_reset("outsider", HTTP_PORT)?;
    s.expect_ok("client", HTTP_PORT)?;
    let rejected = s.wait_node_b("a STRICT rejection", |l| {
        is_inbound_closed(l) && l["rejection"] == "plaintext_strict"
    })?;
    ensure!(
        rejected["security"] == "none" && rejected["response_flags"] == "DENY",
        "{rejected}"
    );

    // Back to PERMISSIVE: both work again.
    s.cluster.apply_policy(
        "strict",
        &peer_auth("default", "default", None, "PERMISSIVE"),
    )?;
    s.expect_ok("outsider", HTTP_PORT)?;
    s.expect_ok("client", HTTP_PORT)?;
    Ok(())
}

#[test]
fn the_most_specific_peer_authentication_wins_down_to_the_port() -> Result<()> {
    let s = setup()?;
    // Mesh-wide STRICT, the namespace PERMISSIVE: plaintext accepted.
    s.cluster.apply_policy(
        "mesh",
        &peer_auth("default", "istio-system", None, "STRICT"),
    )?;
    s.expect_reset("outsider", HTTP_PORT)?;
    s.cluster
        .apply_policy("ns", &peer_auth("default", "default", None, "PERMISSIVE"))?;
    s.expect_ok("outsider", HTTP_PORT)?;
    // The workload STRICT, except port 9090; DISABLE there behaves as PERMISSIVE for plaintext.
    let workload = format!(
        "{}  portLevelMtls:\n    \"{OTHER_PORT}\":\n      mode: DISABLE\n",
        peer_auth("web-strict", "default", Some("web"), "STRICT")
    );
    s.cluster.apply_policy("workload", &workload)?;
    s.expect_reset("outsider", HTTP_PORT)?;
    s.expect_ok("outsider", OTHER_PORT)?;
    s.expect_ok("client", HTTP_PORT)?;
    // UNSET on the workload inherits the namespace's PERMISSIVE.
    s.cluster.apply_policy(
        "workload",
        &peer_auth("web-strict", "default", Some("web"), "UNSET"),
    )?;
    s.expect_ok("outsider", HTTP_PORT)?;
    Ok(())
}

#[test]
fn authorization_allows_only_the_named_principal_and_logs_the_denying_policy() -> Result<()> {
    let s = setup()?;
    s.cluster.apply_policy(
        "allow-client",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-client
  namespace: default
spec:
  selector:
    matchLabels:
      app: web
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/default/sa/client\"]
",
    )?;
    s.expect_ok("client", HTTP_PORT)?;
    s.expect_reset("client2", HTTP_PORT)?;
    s.expect_reset("outsider", HTTP_PORT)?;
    // The denied callers' requests never reached web, not even the bytes client2's agent sent
    // along with its CONNECT before the far agent answered.
    let served = s.http[0].requests()?;
    ensure!(
        served.len() == 1,
        "web should have served client's request only: {served:?}"
    );
    let denied = s.wait_node_b("a denial of client2", |l| {
        is_inbound_closed(l)
            && l["rejection"] == "policy_denied"
            && l["src_identity"] == "spiffe://cluster.local/ns/team/sa/other"
    })?;
    ensure!(
        denied["denied_by"]
            .as_str()
            .is_some_and(|p| p.contains("default/allow-client")),
        "the denial should name the policy: {denied}"
    );
    s.wait_node_b("a denial of the plaintext outsider", |l| {
        is_inbound_closed(l) && l["rejection"] == "policy_denied" && l["security"] == "none"
    })?;
    Ok(())
}

#[test]
fn deny_policies_match_namespaces_ip_blocks_and_ports() -> Result<()> {
    let s = setup()?;
    let outsider = s.pod("outsider")?;
    let (outsider_v4, outsider_v6) = (outsider.ipv4(), outsider.ipv6());
    s.cluster.apply_policy(
        "deny",
        &format!(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-team
  namespace: default
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: [\"team\"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-outsider-on-9090
  namespace: default
spec:
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks: [\"{outsider_v4}/32\", \"{outsider_v6}/128\"]
    to:
    - operation:
        ports: [\"{OTHER_PORT}\"]
"
        ),
    )?;
    s.expect_reset("client2", HTTP_PORT)?;
    s.expect_ok("client", HTTP_PORT)?;
    s.expect_ok("outsider", HTTP_PORT)?;
    s.expect_reset("outsider", OTHER_PORT)?;
    s.expect_ok("client", OTHER_PORT)?;
    let denied = s.wait_node_b("the namespace denial", |l| {
        is_inbound_closed(l)
            && l["rejection"] == "policy_denied"
            && l["denied_by"]
                .as_str()
                .is_some_and(|p| p.contains("default/deny-team"))
    })?;
    ensure!(denied["security"] == "mutual_tls", "{denied}");
    Ok(())
}

#[test]
fn a_bad_policy_file_is_rejected_whole_and_the_last_good_one_stays() -> Result<()> {
    let s = setup()?;
    s.cluster
        .apply_policy("strict", &peer_auth("default", "default", None, "STRICT"))?;
    s.expect_reset("outsider", HTTP_PORT)?;
    // An L7 field, and a typo in the mode: each refused with the file and the field named.
    s.cluster.apply_policy(
        "l7",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: paths
  namespace: default
spec:
  rules:
  - to:
    - operation:
        paths: [\"/admin\"]
",
    )?;
    let refused = s.wait_node_b("the L7 refusal", |l| {
        l["message"] == "policy rejected; keeping the last good policy"
    })?;
    let error = refused.to_string();
    ensure!(
        error.contains("l7.yaml") && error.contains("paths"),
        "the refusal should name the file and the field: {error}"
    );
    s.expect_reset("outsider", HTTP_PORT)?;
    s.expect_ok("client", HTTP_PORT)?;

    s.cluster.delete_policy("l7")?;
    s.cluster
        .apply_policy("typo", &peer_auth("web", "default", Some("web"), "STRICTT"))?;
    let refusals = s.node_b_lines("policy rejected; keeping the last good policy")?;
    let last = refusals.last().context("no refusal logged")?.to_string();
    ensure!(
        last.contains("typo.yaml") && last.contains("STRICTT"),
        "the refusal should name the file and the bad value: {last}"
    );
    s.expect_reset("outsider", HTTP_PORT)?;
    Ok(())
}

#[test]
fn a_policy_change_closes_only_the_connections_it_no_longer_allows() -> Result<()> {
    let s = setup()?;
    let web = s.pod("web")?;
    let mut keeps = s.pod("client")?.spawn(
        "/usr/bin/python3",
        [
            "-c",
            HOLD_ECHO,
            &web.ipv4().to_string(),
            &ECHO_PORT.to_string(),
            "4",
        ],
    )?;
    let mut loses = s.pod("client2")?.spawn(
        "/usr/bin/python3",
        [
            "-c",
            HOLD_ECHO,
            &web.ipv4().to_string(),
            &ECHO_PORT.to_string(),
            "4",
        ],
    )?;
    // Both connections are up before the policy changes.
    let deadline = Instant::now() + LOG_WAIT;
    while s.node_b_lines("inbound mTLS connection accepted")?.len() < 2 {
        ensure!(Instant::now() < deadline, "connections did not come up");
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(500));
    s.cluster.apply_policy(
        "allow-client",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-client
  namespace: default
spec:
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/default/sa/client\"]
",
    )?;
    let kept = wait_for_exit(keeps.child_mut(), Duration::from_secs(20))?;
    let lost = wait_for_exit(loses.child_mut(), Duration::from_secs(20))?;
    ensure!(
        kept.success(),
        "the still-allowed connection broke on reload"
    );
    ensure!(
        !lost.success(),
        "the no-longer-allowed connection survived the reload"
    );
    s.wait_node_b("the revocation", |l| {
        l["message"] == "policy changed: closing a connection it no longer allows"
            && l["peer_identity"] == "spiffe://cluster.local/ns/team/sa/other"
    })?;
    Ok(())
}

#[test]
fn outbound_outside_the_mesh_stays_plaintext_and_into_it_becomes_mtls() -> Result<()> {
    let s = setup()?;
    let client = s.pod("client")?;
    let outside = s.pod("outside-web")?;
    let out = client.curl(&http_url(outside.ipv4(), HTTP_PORT))?;
    ensure!(
        out.success() && out.stdout == BODY,
        "client -> outside-web failed"
    );
    s.expect_ok("client", HTTP_PORT)?;
    let lines = s.cluster.connections("node-a")?;
    let to_outside = lines
        .iter()
        .find(|c| is_address_of(outside, &c.dst))
        .context("no outbound line for outside-web")?;
    ensure!(to_outside.other["security"] == "none", "{to_outside:?}");
    let web = s.pod("web")?;
    let to_web = lines
        .iter()
        .find(|c| is_address_of(web, &c.dst))
        .context("no outbound line for web")?;
    ensure!(to_web.other["security"] == "mutual_tls", "{to_web:?}");
    Ok(())
}

/// Whether `line` is an inbound `connection closed` line (delivered or refused).
fn is_inbound_closed(line: &Value) -> bool {
    line["message"] == "connection closed" && line["direction"] == "inbound"
}

/// Whether `addr` ("ip:port" or "[ip]:port") is one of `pod`'s addresses.
fn is_address_of(pod: &Pod, addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>()
        .is_ok_and(|a| pod.ips().contains(&a.ip()))
}

#[test]
fn metrics_say_which_connections_were_mutual_tls_and_pass_promtool() -> Result<()> {
    let s = setup()?;
    s.expect_ok("outsider", HTTP_PORT)?;
    s.expect_ok("client", HTTP_PORT)?;
    s.wait_node_b("both connections", |_| {
        s.node_b_inbound().is_ok_and(|lines| lines.len() >= 2)
    })?;
    let node_b = s.cluster.node("node-b")?.netns_name().to_owned();
    let get = |url: &str| -> Result<String> {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &node_b,
                "curl",
                "-sS",
                "--max-time",
                "5",
                url,
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "GET {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    ensure!(
        get("http://127.0.0.1:15021/healthz/ready")?.trim() == "ready",
        "not ready"
    );
    let metrics = get("http://127.0.0.1:15020/metrics")?;
    let series = |security: &str, source: &str| {
        metrics.lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains(&format!("connection_security_policy=\"{security}\""))
                && l.contains(&format!("source_workload=\"{source}\""))
                && l.contains("destination_workload=\"web\"")
        })
    };
    ensure!(
        series("mutual_tls", "client"),
        "no mTLS series for client:\n{metrics}"
    );
    ensure!(
        series("unknown", "unknown"),
        "no plaintext series for the outsider:\n{metrics}"
    );
    ensure!(
        metrics.contains("destination_principal=\"spiffe://cluster.local/ns/default/sa/default\""),
        "no destination principal:\n{metrics}"
    );
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("promtool (Debian package prometheus)")?;
    std::io::Write::write_all(
        promtool.stdin.as_mut().context("stdin")?,
        metrics.as_bytes(),
    )?;
    let checked = promtool.wait_with_output()?;
    ensure!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let dump: Value = serde_json::from_str(&get("http://127.0.0.1:15000/config_dump")?)?;
    ensure!(
        dump["workloads"][0]["name"] == "default/web",
        "config dump: {dump}"
    );
    Ok(())
}
