//! Pooled HBONE connections belong to one source workload: two replicas with one service
//! account on one node each reach the far side from their own IP, so `ipBlocks` tells them
//! apart even while their connections are pooled.

mod common;

use anyhow::{Result, ensure};
use common::web_root;
use mesh_tests::{Cluster, NodeSpec, PodSpec, http_url};

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
