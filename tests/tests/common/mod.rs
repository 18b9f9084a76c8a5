//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::fs;
use std::net::IpAddr;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_tests::{Cluster, ConnectionLog, NodeSpec, Pod, PodSpec, http_url};

/// How long an agent may take to log a finished connection.
pub const LOG_WAIT: Duration = Duration::from_secs(10);

/// A directory in the cluster's scratch dir holding `index.html` = `body`.
pub fn web_root(cluster: &Cluster, name: &str, body: &[u8]) -> Result<PathBuf> {
    let dir = cluster.workdir().join(name);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("index.html"), body)?;
    Ok(dir)
}

/// `curl http://ip:port/` from `pod`; must exit 0 and return `body`.
pub fn fetch(pod: &Pod, ip: impl Into<IpAddr>, port: u16, body: &[u8]) -> Result<()> {
    let url = http_url(ip, port);
    let out = pod.curl(&url)?;
    ensure!(
        out.success(),
        "curl {url} from {} exited {:?}: {}",
        pod.name(),
        out.code(),
        out.stderr_str().trim()
    );
    ensure!(
        out.stdout == body,
        "curl {url} from {}: body of {} bytes differs from the {} served",
        pod.name(),
        out.stdout.len(),
        body.len()
    );
    Ok(())
}

/// Lines of `node`'s agent with destination `dst`.
pub fn lines_for(cluster: &Cluster, node: &str, dst: &str) -> Result<Vec<ConnectionLog>> {
    Ok(cluster
        .connections(node)?
        .into_iter()
        .filter(|c| c.dst == dst)
        .collect())
}

/// Waits for the `connection closed` line of `src_workload` to `dst` on `node`.
pub fn wait_conn(cluster: &Cluster, node: &str, src: &str, dst: &str) -> Result<ConnectionLog> {
    cluster
        .wait_for_connection(node, |c| c.dst == dst && c.src_workload == src, LOG_WAIT)
        .with_context(|| format!("waiting for {node}'s log of {src} -> {dst}"))
}

/// Gives an agent time to log a connection that it should not have captured,
/// after a later connection that it did capture has been logged.
pub fn settle() {
    thread::sleep(Duration::from_millis(300));
}

/// Waits for `child` to exit, at most `timeout`.
pub fn wait_for_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "process did not exit in {timeout:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Python: holds one echo connection open for `secs` seconds (argv: host, port, secs),
/// exchanging a line twice a second; exits non-zero if the connection breaks.
pub const HOLD_ECHO: &str = r#"
import socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with socket.create_connection((host, port), timeout=10) as s:
    end = time.time() + secs
    i = 0
    while time.time() < end:
        msg = b"line %d\n" % i
        s.sendall(msg)
        if s.recv(64) != msg:
            sys.exit(1)
        i += 1
        time.sleep(0.5)
"#;

/// The smallest mesh: `client` on node-a, `web` on node-b, both enrolled, agents running.
pub fn client_and_web() -> Result<Cluster> {
    let cluster = Cluster::builder()
        .node(NodeSpec::new("node-a").pod(PodSpec::new("client")))
        .node(NodeSpec::new("node-b").pod(PodSpec::new("web")))
        .build()?;
    cluster.start_agents()?;
    Ok(cluster)
}
