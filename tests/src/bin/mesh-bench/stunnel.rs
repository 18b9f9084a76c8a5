//! The peer: a mutual-TLS tunnel made of two stunnel4 instances.

use std::fs;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_tests::{ChildGuard, Cluster, Pod};

use crate::{
    ECHO_PORT, IPERF_PORT, TUN_ECHO_PORT, TUN_IPERF_PORT, TUN_SRV_ECHO_PORT, TUN_SRV_IPERF_PORT,
};

/// Self-signed P-256 certificates for both ends, then a stunnel client in `client_pod`
/// (127.0.0.1 listeners) and a stunnel server in `server_pod` forwarding to its local
/// iperf3 and echo servers; mutual TLS (`verify = 2` against the other end's certificate).
pub fn start_stunnel(
    cluster: &Cluster,
    client_pod: &Pod,
    server_pod: &Pod,
) -> Result<Vec<ChildGuard>> {
    let dir = cluster.workdir().join("stunnel");
    fs::create_dir_all(&dir)?;
    for side in ["client", "server"] {
        let mut c = std::process::Command::new("openssl");
        c.args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=bench-{side}"),
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{side}.key")))
        .arg("-out")
        .arg(dir.join(format!("{side}.pem")));
        mesh_tests::run_with_timeout(&mut c, Duration::from_secs(20))?
            .check()
            .context("openssl req")?;
    }
    let d = dir.display();
    let server_ip = server_pod.ipv4();
    let client_conf = format!(
        "foreground = quiet\npid =\ndebug = 4\noutput = {d}/client.log\n\
         cert = {d}/client.pem\nkey = {d}/client.key\nCAfile = {d}/server.pem\nverify = 2\n\
         client = yes\n\
         [iperf]\naccept = 127.0.0.1:{TUN_IPERF_PORT}\nconnect = {server_ip}:{TUN_SRV_IPERF_PORT}\n\
         [echo]\naccept = 127.0.0.1:{TUN_ECHO_PORT}\nconnect = {server_ip}:{TUN_SRV_ECHO_PORT}\n"
    );
    let server_conf = format!(
        "foreground = quiet\npid =\ndebug = 4\noutput = {d}/server.log\n\
         cert = {d}/server.pem\nkey = {d}/server.key\nCAfile = {d}/client.pem\nverify = 2\n\
         [iperf]\naccept = 0.0.0.0:{TUN_SRV_IPERF_PORT}\nconnect = 127.0.0.1:{IPERF_PORT}\n\
         [echo]\naccept = 0.0.0.0:{TUN_SRV_ECHO_PORT}\nconnect = 127.0.0.1:{ECHO_PORT}\n"
    );
    fs::write(dir.join("client.conf"), client_conf)?;
    fs::write(dir.join("server.conf"), server_conf)?;
    let mut srv = server_pod.spawn("stunnel4", [dir.join("server.conf")])?;
    server_pod
        .wait_for_port(&mut srv, TUN_SRV_ECHO_PORT)
        .with_context(|| fs::read_to_string(dir.join("server.log")).unwrap_or_default())?;
    let mut cli = client_pod.spawn("stunnel4", [dir.join("client.conf")])?;
    client_pod
        .wait_for_port(&mut cli, TUN_ECHO_PORT)
        .with_context(|| fs::read_to_string(dir.join("client.log")).unwrap_or_default())?;
    Ok(vec![cli, srv])
}
