//! A pod's outbound connection to a pod on another node is captured by its
//! node's agent and still works, over IPv4 and IPv6.

mod common;

use std::net::IpAddr;

use anyhow::{Result, ensure};
use common::{fetch, wait_conn, web_root};
use mesh_tests::{Cluster, NodeSpec, PodSpec, addr};

fn fetch_is_captured(server_ip: impl Fn(&mesh_tests::Pod) -> IpAddr) -> Result<()> {
    let cluster = Cluster::builder()
        .node(
            NodeSpec::new("node-a").pod(
                PodSpec::new("client")
                    .namespace("shop")
                    .service_account("client"),
            ),
        )
        .node(NodeSpec::new("node-b").pod(PodSpec::new("web").namespace("shop")))
        .build()?;
    cluster.start_agents()?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let body: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let _server = web.http_server(8080, &web_root(&cluster, "www", &body)?)?;

    let ip = server_ip(web);
    fetch(client, ip, 8080, &body)?;

    let dst = addr(ip, 8080);
    let conn = wait_conn(&cluster, "node-a", "shop/client", &dst)?;
    ensure!(conn.error.is_none(), "connection logged an error: {conn:?}");
    ensure!(
        conn.bytes_received >= body.len() as u64,
        "bytes_received {} < body {}: {conn:?}",
        conn.bytes_received,
        body.len()
    );
    ensure!(conn.bytes_sent > 0, "no request bytes logged: {conn:?}");
    Ok(())
}

#[test]
fn ipv4_fetch_across_nodes_is_captured() -> Result<()> {
    fetch_is_captured(|web| web.ipv4().into())
}

#[test]
fn ipv6_fetch_across_nodes_is_captured() -> Result<()> {
    fetch_is_captured(|web| web.ipv6().into())
}
