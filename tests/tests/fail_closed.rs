//! When the agent stops, captured pods lose connectivity (fail closed) instead
//! of silently bypassing the mesh; when it comes back, traffic flows again.

mod common;

use anyhow::{Result, ensure};
use common::{client_and_web, fetch, web_root};
use mesh_tests::http_url;

const BODY: &[u8] = b"hello from web\n";

#[test]
fn stopped_agent_fails_closed_and_recovers() -> Result<()> {
    let cluster = client_and_web()?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let server = web.http_server(8080, &web_root(&cluster, "www", BODY)?)?;

    fetch(client, web.ipv4(), 8080, BODY)?;
    ensure!(server.requests()?.len() == 1);

    let status = cluster.stop_agent("node-a")?;
    ensure!(
        status.code() == Some(0),
        "agent exited with {status} on SIGTERM"
    );

    for ip in web.ips() {
        let url = http_url(ip, 8080);
        let out = client.curl(&url)?;
        ensure!(
            !out.success(),
            "curl {url} succeeded with the agent stopped: the mesh was bypassed"
        );
        // 7: connection refused, 52: empty reply, 56: reset.
        ensure!(
            matches!(out.code(), Some(7 | 52 | 56)),
            "curl {url} with the agent stopped exited {:?} ({}), want 7, 52 or 56",
            out.code(),
            out.stderr_str().trim()
        );
    }
    let reqs = server.requests()?;
    ensure!(
        reqs.len() == 1,
        "requests reached the server without the agent: {reqs:?}"
    );

    cluster.start_agent("node-a")?;
    fetch(client, web.ipv4(), 8080, BODY)?;
    fetch(client, web.ipv6(), 8080, BODY)?;
    Ok(())
}
