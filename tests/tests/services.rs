//! Services: a connection to a virtual IP goes to one of the Service's endpoints, through HBONE
//! to the endpoint's agent, with the port mapped; endpoints take turns, an endpoint that leaves
//! the Service gets no new connection, and one whose agent cannot be reached is skipped.

mod common;

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use common::web_root;
use mesh_tests::{Cluster, NodeSpec, PodSpec};

const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";

/// The cluster file as the harness writes it, plus one Service `web` on port 80 → 8080.
fn with_service(cluster: &Cluster, selector: &str) -> Result<String> {
    let mut text = cluster.cluster_file_text()?;
    text.push_str(&format!(
        "services:\n- name: web\n  namespace: default\n  addresses: [{VIP4}, \"{VIP6}\"]\n  ports:\n  - {{port: 80, targetPort: 8080}}\n  selector: {selector}\n"
    ));
    Ok(text)
}

fn apply(cluster: &Cluster, text: &str) -> Result<()> {
    let reloads = cluster.write_raw_cluster_file(text)?;
    for (node, reload) in &reloads {
        ensure!(
            matches!(reload, mesh_tests::Reload::Loaded(_)),
            "{node}'s agent did not load the Service: {reload:?}"
        );
    }
    Ok(())
}

/// Which endpoint answered each of `n` requests to `url` from the client (bodies name them).
fn answers(cluster: &Cluster, url: &str, n: usize) -> Result<BTreeMap<String, usize>> {
    let client = cluster.pod("node-a", "client")?;
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let out = client.curl(url)?;
        ensure!(
            out.success(),
            "request {i} to {url} failed ({:?}): {}",
            out.code(),
            out.stderr_str().trim()
        );
        *seen.entry(out.stdout_str().trim().to_owned()).or_default() += 1;
    }
    Ok(seen)
}

#[test]
fn a_service_spreads_over_its_endpoints_maps_the_port_and_skips_the_unreachable() -> Result<()> {
    let cluster = Cluster::builder()
        .node(NodeSpec::new("node-a").pod(PodSpec::new("client")))
        .node(
            NodeSpec::new("node-b").pod(
                PodSpec::new("web-1")
                    .service_account("web")
                    .label("app", "web")
                    .label("version", "v1"),
            ),
        )
        .node(
            NodeSpec::new("node-c").pod(
                PodSpec::new("web-2")
                    .service_account("web")
                    .label("app", "web")
                    .label("version", "v2"),
            ),
        )
        .build()?;
    cluster.start_agents()?;
    let mut servers = Vec::new();
    for (node, pod) in [("node-b", "web-1"), ("node-c", "web-2")] {
        let web = cluster.pod(node, pod)?;
        let root = web_root(&cluster, pod, format!("{pod}\n").as_bytes())?;
        servers.push(web.http_server(8080, &root)?);
    }
    apply(&cluster, &with_service(&cluster, "{app: web}")?)?;

    // Both endpoints get traffic, over IPv4 and IPv6, on the mapped port.
    let v4 = answers(&cluster, &format!("http://{VIP4}:80/"), 10)?;
    ensure!(
        v4.get("web-1") == Some(&5) && v4.get("web-2") == Some(&5),
        "10 requests to the IPv4 VIP: {v4:?}, want 5 each"
    );
    let v6 = answers(&cluster, &format!("http://[{VIP6}]:80/"), 4)?;
    ensure!(v6.len() == 2, "requests to the IPv6 VIP: {v6:?}");
    let line = cluster
        .connections("node-a")?
        .into_iter()
        .find(|c| c.dst == format!("{VIP4}:80"))
        .context("no log line for the VIP")?;
    ensure!(
        line.other.get("dst_service").and_then(|v| v.as_str())
            == Some("web.default.svc.cluster.local")
            && line.other.get("security").and_then(|v| v.as_str()) == Some("mutual_tls"),
        "the VIP's log line: {line:?}"
    );
    let endpoint = line.other.get("endpoint").and_then(|v| v.as_str());
    ensure!(
        endpoint.is_some_and(|e| e.ends_with(":8080")),
        "endpoint {endpoint:?}: the port is not mapped"
    );

    // Istio's metrics name the Service the client called.
    let metrics = cluster.run_in_node(
        "node-a",
        "curl",
        ["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"],
        std::time::Duration::from_secs(10),
    )?;
    let text = metrics.stdout_str();
    ensure!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"source\"")
                && l.contains("destination_service=\"web.default.svc.cluster.local\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "no source-reported series with destination_service web.default.svc.cluster.local:\n{text}"
    );

    // A port the Service does not declare is refused.
    let client = cluster.pod("node-a", "client")?;
    let out = client.curl(&format!("http://{VIP4}:8080/"))?;
    ensure!(!out.success(), "an undeclared port of the VIP was served");

    // web-2 leaves the Service: it gets no new connection.
    apply(
        &cluster,
        &with_service(&cluster, "{app: web, version: v1}")?,
    )?;
    let only_v1 = answers(&cluster, &format!("http://{VIP4}:80/"), 6)?;
    ensure!(
        only_v1.keys().collect::<Vec<_>>() == ["web-1"],
        "after web-2 left the Service: {only_v1:?}"
    );

    // Back in, but its agent is down: its endpoint is skipped, every request succeeds.
    apply(&cluster, &with_service(&cluster, "{app: web}")?)?;
    cluster.stop_agent("node-c")?;
    let skipped = answers(&cluster, &format!("http://{VIP4}:80/"), 6)?;
    ensure!(
        skipped.keys().collect::<Vec<_>>() == ["web-1"],
        "with web-2's agent down: {skipped:?}"
    );
    Ok(())
}
