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
        outbound.other["security"] == "same_node" && outbound.other["peer_identity"] == WEB_ID,
        "the source side's line: {outbound:?}"
    );
    ensure!(outbound.bytes_received >= BODY.len() as u64, "{outbound:?}");
    let inbound = s
        .cluster
        .wait_for_log(
            "node-a",
            |l| l["message"] == "inbound connection closed" && l["dst"] == dst.as_str(),
            LOG_WAIT,
        )
        .context("the destination side's line")?;
    // Policy sees the caller at its pod's address, not the loopback it was captured on.
    let client_ip = format!("{}:", s.cluster.pod("node-a", "client")?.ipv4());
    ensure!(
        inbound["security"] == "same_node"
            && inbound["peer_identity"] == CLIENT_ID
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
        "inbound connection denied",
        "peer_identity",
        "spiffe://cluster.local/ns/team/sa/other",
    )?;
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
