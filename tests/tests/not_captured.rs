//! What the mesh must leave alone: pods that are not enrolled, the agent's own
//! upstream connections (no capture loop), loopback, excluded ports.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::{fetch, lines_for, settle, wait_conn, web_root};
use mesh_tests::{Cluster, NodeSpec, PodSpec, addr};

const BODY: &[u8] = b"hello from web\n";

/// node-a: enrolled `client`, unenrolled `outsider`; node-b: enrolled `web`.
fn cluster(excluded_on_a: &[u16]) -> Result<Cluster> {
    let cluster = Cluster::builder()
        .node(
            NodeSpec::new("node-a")
                .pod(PodSpec::new("client"))
                .pod(PodSpec::new("outsider").enrolled(false))
                .excluded_ports(excluded_on_a.iter().copied()),
        )
        .node(NodeSpec::new("node-b").pod(PodSpec::new("web")))
        .build()?;
    cluster.start_agents()?;
    Ok(cluster)
}

#[test]
fn unenrolled_pod_is_not_captured() -> Result<()> {
    let cluster = cluster(&[])?;
    let outsider = cluster.pod("node-a", "outsider")?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let server = web.http_server(8080, &web_root(&cluster, "www", BODY)?)?;

    fetch(outsider, web.ipv4(), 8080, BODY)?;
    fetch(outsider, web.ipv6(), 8080, BODY)?;
    // A captured connection afterwards tells us the agent is logging.
    fetch(client, web.ipv4(), 8080, BODY)?;
    wait_conn(
        &cluster,
        "node-a",
        "default/client",
        &addr(web.ipv4(), 8080),
    )?;
    settle();

    let conns = cluster.connections("node-a")?;
    ensure!(
        !conns.iter().any(|c| c.src_workload.contains("outsider")),
        "outsider's connection was captured: {conns:?}"
    );
    ensure!(
        lines_for(&cluster, "node-a", &addr(web.ipv4(), 8080))?.len() == 1,
        "expected only client's connection: {conns:?}"
    );
    ensure!(
        lines_for(&cluster, "node-a", &addr(web.ipv6(), 8080))?.is_empty(),
        "outsider's IPv6 connection was captured: {conns:?}"
    );
    // Not captured means direct: node-b's agent (inbound capture) saw plaintext from the
    // outsider's own addresses, not a tunnel from node-a's agent.
    ensure!(
        server.requests()?.len() == 3,
        "server got {:?}",
        server.requests()?
    );
    let direct = plaintext_sources(&cluster)?;
    ensure!(
        direct.len() == 2 && direct.iter().all(|ip| outsider.ips().contains(ip)),
        "node-b saw plaintext from {direct:?}, want the outsider's {:?}",
        outsider.ips()
    );
    Ok(())
}

/// Source IPs of the plaintext (not mTLS) connections node-b's agent delivered.
fn plaintext_sources(cluster: &Cluster) -> Result<Vec<std::net::IpAddr>> {
    Ok(cluster
        .agent_logs("node-b")?
        .iter()
        .filter(|l| {
            l["message"] == "connection closed"
                && l["direction"] == "inbound"
                && l.get("rejection").is_none()
                && l["security"] == "none"
        })
        .filter_map(|l| l["src_addr"].as_str()?.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.ip())
        .collect())
}

#[test]
fn agent_upstream_is_not_captured_again() -> Result<()> {
    let cluster = cluster(&[])?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let server = web.http_server(8080, &web_root(&cluster, "www", BODY)?)?;

    fetch(client, web.ipv4(), 8080, BODY)?;
    let dst = addr(web.ipv4(), 8080);
    wait_conn(&cluster, "node-a", "default/client", &dst)?;
    settle();

    let lines = lines_for(&cluster, "node-a", &dst)?;
    ensure!(
        lines.len() == 1,
        "one curl, {} log lines: {lines:?}",
        lines.len()
    );
    let reqs = server.requests()?;
    ensure!(
        reqs.len() == 1,
        "server got {} requests: {reqs:?}",
        reqs.len()
    );
    // Cross-node calls arrive through node-b's agent, which delivers them from inside the
    // destination pod: exactly one inbound tunnel stream there, from the client's identity.
    let inbound = cluster.wait_for_log(
        "node-b",
        |line| {
            line["message"] == "connection closed"
                && line["direction"] == "inbound"
                && line["dst_addr"] == dst.as_str()
        },
        Duration::from_secs(5),
    )?;
    ensure!(
        inbound["src_identity"] == "spiffe://cluster.local/ns/default/sa/default",
        "node-b saw {inbound}"
    );
    let inbound_lines = cluster
        .agent_logs("node-b")?
        .into_iter()
        .filter(|line| line["message"] == "connection closed" && line["direction"] == "inbound")
        .count();
    ensure!(
        inbound_lines == 1,
        "one curl, {inbound_lines} inbound streams on node-b"
    );
    let seen = server.client_addrs()?;
    ensure!(
        seen == [std::net::IpAddr::from(web.ipv4())],
        "server saw {seen:?} as source, want its own {} (delivered by its node's agent)",
        web.ipv4()
    );
    Ok(())
}

#[test]
fn loopback_is_not_captured() -> Result<()> {
    let cluster = cluster(&[])?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let root = web_root(&cluster, "www", BODY)?;
    let _local = client.http_server(8081, &root)?;
    let _remote = web.http_server(8080, &root)?;

    fetch(client, std::net::Ipv4Addr::LOCALHOST, 8081, BODY)?;
    fetch(client, std::net::Ipv6Addr::LOCALHOST, 8081, BODY)?;
    fetch(client, web.ipv4(), 8080, BODY)?;
    wait_conn(
        &cluster,
        "node-a",
        "default/client",
        &addr(web.ipv4(), 8080),
    )?;
    settle();

    let conns = cluster.connections("node-a")?;
    ensure!(
        !conns.iter().any(|c| c.dst.ends_with(":8081")),
        "loopback connection was captured: {conns:?}"
    );
    Ok(())
}

#[test]
fn excluded_port_is_not_captured() -> Result<()> {
    let cluster = cluster(&[9090])?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let root = web_root(&cluster, "www", BODY)?;
    let excluded = web.http_server(9090, &root)?;
    let _captured = web.http_server(8080, &root)?;

    fetch(client, web.ipv4(), 9090, BODY)?;
    fetch(client, web.ipv6(), 9090, BODY)?;
    fetch(client, web.ipv4(), 8080, BODY)?;
    wait_conn(
        &cluster,
        "node-a",
        "default/client",
        &addr(web.ipv4(), 8080),
    )?;
    settle();

    let conns = cluster.connections("node-a")?;
    ensure!(
        !conns.iter().any(|c| c.dst.ends_with(":9090")),
        "connection to excluded port 9090 was captured: {conns:?}"
    );
    // Not captured means direct: node-b's agent saw plaintext from the pod itself.
    ensure!(
        excluded.requests()?.len() == 2,
        "server got {:?}",
        excluded.requests()?
    );
    let direct = plaintext_sources(&cluster)?;
    ensure!(
        direct == client.ips(),
        "node-b saw plaintext from {direct:?}, want the client's {:?}",
        client.ips()
    );
    Ok(())
}
