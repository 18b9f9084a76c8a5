//! Mutual TLS between node agents: what crosses the wire, who is proven to whom, and who is
//! refused.

mod common;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use common::{HOLD_ECHO, LOG_WAIT, fetch, wait_for_exit, web_root};
use mesh_agent::identity::{CertificateAuthority, SpiffeId, WorkloadCert};
use mesh_tests::{Cluster, ClusterBuilder, NodeSpec, Pod, PodSpec, addr};
use serde_json::Value;

const BODY: &[u8] = b"<h1>served over the mesh</h1>\n";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
const ECHO_PORT: u16 = 7000;
const HTTP_PORT: u16 = 8080;

/// node-a: `client` (enrolled, sa client) and `outsider` (not in the mesh);
/// node-b: `web` (sa web) and `echo` (sa echo). Certificates come from the CA service; the
/// tests that mint certificates of their own (bad peers) take its signing key from its host.
fn mtls_cluster(builder: ClusterBuilder) -> Result<Cluster> {
    builder
        .with_ca_service()
        .node(
            NodeSpec::new("node-a")
                .pod(PodSpec::new("client").service_account("client"))
                .pod(PodSpec::new("outsider").enrolled(false)),
        )
        .node(
            NodeSpec::new("node-b")
                .pod(PodSpec::new("web").service_account("web"))
                .pod(PodSpec::new("echo").service_account("echo")),
        )
        .build()
}

fn started_cluster(builder: ClusterBuilder) -> Result<Cluster> {
    let cluster = mtls_cluster(builder)?;
    cluster.start_agents()?;
    Ok(cluster)
}

/// The cluster file with workload `name` running as another service account.
fn with_service_account(cluster_file: &Path, name: &str, service_account: &str) -> Result<String> {
    let mut doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&fs::read_to_string(cluster_file)?)?;
    let workloads = doc["nodes"]
        .as_sequence_mut()
        .context("no nodes")?
        .iter_mut()
        .filter_map(|node| node["workloads"].as_sequence_mut())
        .flatten();
    let mut found = false;
    for workload in workloads.filter(|w| w["name"] == name) {
        workload["serviceAccount"] = service_account.into();
        found = true;
    }
    ensure!(found, "no workload {name} in the cluster file");
    Ok(serde_yaml_ng::to_string(&doc)?)
}

fn logs_with(cluster: &Cluster, node: &str, message: &str) -> Result<Vec<Value>> {
    Ok(cluster
        .agent_logs(node)?
        .into_iter()
        .filter(|line| line["message"] == message)
        .collect())
}

#[test]
fn cross_node_call_is_mutual_tls_and_both_agents_verify_the_peer() -> Result<()> {
    let cluster = started_cluster(Cluster::builder())?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let server = web.http_server(HTTP_PORT, &web_root(&cluster, "www", BODY)?)?;

    fetch(client, web.ipv4(), HTTP_PORT, BODY)?;
    fetch(client, web.ipv6(), HTTP_PORT, BODY)?;
    ensure!(
        server.requests()?.len() == 2,
        "the server got {:?}",
        server.requests()?
    );

    for dst in [addr(web.ipv4(), HTTP_PORT), addr(web.ipv6(), HTTP_PORT)] {
        let outbound = cluster.wait_for_connection(
            "node-a",
            |c| c.dst == dst && c.src_workload == "default/client",
            LOG_WAIT,
        )?;
        ensure!(
            outbound.other["security"] == "mutual_tls" && outbound.other["dst_identity"] == WEB_ID,
            "node-a did not verify web's identity: {outbound:?}"
        );
        let inbound = cluster.wait_for_log(
            "node-b",
            |l| {
                l["message"] == "connection closed"
                    && l["direction"] == "inbound"
                    && l["dst_addr"] == dst.as_str()
            },
            LOG_WAIT,
        )?;
        ensure!(
            inbound["src_identity"] == CLIENT_ID && inbound["bytes_received"].as_u64() > Some(0),
            "node-b did not verify client's identity: {inbound}"
        );
    }
    Ok(())
}

#[test]
fn the_link_between_nodes_carries_tls_never_plaintext() -> Result<()> {
    let cluster = started_cluster(Cluster::builder())?;
    let client = cluster.pod("node-a", "client")?;
    let outsider = cluster.pod("node-a", "outsider")?;
    let echo = cluster.pod("node-b", "echo")?;
    let _echo_server = echo.tcp_echo(ECHO_PORT)?;
    let pcap = cluster.workdir().join("link.pcap");
    let capture = start_capture(&cluster, "node-a", &pcap)?;

    let meshed = format!("INSIDE-MESH-MARKER-{}", cluster.id());
    let unmeshed = format!("OUTSIDE-MESH-MARKER-{}", cluster.id());
    ensure!(
        echo_round_trip(client, echo, &meshed)? == meshed,
        "client echo failed"
    );
    ensure!(
        echo_round_trip(outsider, echo, &unmeshed)? == unmeshed,
        "outsider echo failed"
    );
    stop_capture(capture, &pcap)?;

    let wire = fs::read(&pcap)?;
    if std::env::var_os("MESH_DEBUG_PCAP").is_some() {
        let _ = fs::copy(&pcap, "/tmp/mesh-debug.pcap");
        let _ = fs::copy(pcap.with_extension("log"), "/tmp/mesh-debug.log");
    }
    ensure!(
        !contains(&wire, meshed.as_bytes()),
        "the mesh client's bytes crossed the link in plaintext"
    );
    // The control: the same capture does show plaintext when it is there.
    ensure!(
        contains(&wire, unmeshed.as_bytes()),
        "the capture missed the unmeshed plaintext: it proves nothing"
    );
    let tls_records = tshark_count(&pcap, "tls.record.opaque_type == 23 && tcp.port == 15008")?;
    ensure!(tls_records > 0, "no TLS application data on port 15008");
    let handshakes = tshark_count(&pcap, "tls.handshake.type == 1 && tcp.port == 15008")?;
    ensure!(handshakes >= 1, "no TLS ClientHello to port 15008");
    let meshed_app_port = tshark_count(
        &pcap,
        &format!("ip.src == {} && tcp.dstport == {ECHO_PORT}", client.ipv4()),
    )?;
    ensure!(
        meshed_app_port == 0,
        "the client reached the app port directly across the link"
    );
    Ok(())
}

#[test]
fn the_hbone_port_refuses_bad_peers_with_distinct_reasons_and_keeps_serving() -> Result<()> {
    let cluster = started_cluster(Cluster::builder())?;
    let client = cluster.pod("node-a", "client")?;
    let outsider = cluster.pod("node-a", "outsider")?;
    let web = cluster.pod("node-b", "web")?;
    let _server = web.http_server(HTTP_PORT, &web_root(&cluster, "www", BODY)?)?;
    let certs = PeerCerts::new(&cluster)?;
    let hbone = addr(web.ipv4(), 15008);

    // (rejection expected, client certificate arguments, ALPN offered)
    let h2 = Some("h2");
    let cases: Vec<(&str, Vec<String>, Option<&str>)> = vec![
        ("unknown_ca", certs.s_client_args(&certs.other_ca)?, h2),
        (
            "wrong_trust_domain",
            certs.s_client_args(&certs.other_trust_domain)?,
            h2,
        ),
        ("expired", certs.s_client_args(&certs.expired)?, h2),
        (
            "not_yet_valid",
            certs.s_client_args(&certs.not_yet_valid)?,
            h2,
        ),
        (
            "missing_spiffe_id",
            certs.openssl_signed("dns-only", "DNS:client.example")?,
            h2,
        ),
        (
            "malformed_spiffe_id",
            certs.openssl_signed("bad-uri", "URI:spiffe://cluster.local/not/a/workload")?,
            h2,
        ),
        ("no_client_certificate", vec![], h2),
        ("not_http2", certs.s_client_args(&certs.valid)?, None),
        (
            "not_http2",
            certs.s_client_args(&certs.valid)?,
            Some("http/1.1"),
        ),
    ];
    for (expected, cert_args, alpn) in cases {
        let before = rejections(&cluster, expected)?;
        let ca_file = cluster.ca_dir().join("ca-cert.pem").display().to_string();
        let mut args = vec![
            "s_client", "-connect", &hbone, "-tls1_3", "-CAfile", &ca_file,
        ];
        if let Some(protocol) = alpn {
            args.extend(["-alpn", protocol]);
        }
        args.extend(cert_args.iter().map(String::as_str));
        outsider.run("openssl", &args, Duration::from_secs(15))?;
        wait_until(|| Ok(rejections(&cluster, expected)? > before))
            .with_context(|| format!("node-b logged no `{expected}` rejection"))?;
    }

    let plain = outsider.curl(&format!("http://{hbone}/"))?;
    ensure!(!plain.success(), "plaintext HTTP to 15008 got an answer");
    wait_until(|| Ok(rejections(&cluster, "not_tls")? > 0)).context("no `not_tls` rejection")?;

    fetch(client, web.ipv4(), HTTP_PORT, BODY).context("node-b stopped serving")?;
    Ok(())
}

#[test]
fn the_far_agent_only_serves_its_own_workload_addresses() -> Result<()> {
    let cluster = started_cluster(Cluster::builder())?;
    let outsider = cluster.pod("node-a", "outsider")?;
    let web = cluster.pod("node-b", "web")?;
    let echo = cluster.pod("node-b", "echo")?;
    let _server = web.http_server(HTTP_PORT, &web_root(&cluster, "www", BODY)?)?;
    let _echo_server = echo.tcp_echo(ECHO_PORT)?;
    let via = SocketAddr::new(web.ipv4().into(), 15008);

    // A well-behaved HBONE peer with a valid certificate, tunnelling from outside the mesh.
    let web_http = SocketAddr::new(web.ipv4().into(), HTTP_PORT);
    let served = hbone_connect(&cluster, outsider, via, web_http)?;
    ensure!(
        served.is_ok(),
        "CONNECT to web's own address failed: {served:?}"
    );
    let elsewhere = SocketAddr::new(echo.ipv4().into(), ECHO_PORT);
    let refused = hbone_connect(&cluster, outsider, via, elsewhere)?;
    ensure!(
        refused.as_ref().is_err_and(|e| e.contains("400")),
        "CONNECT to another workload through web's listener: {refused:?}"
    );
    wait_until(|| Ok(rejections(&cluster, "authority_not_served")? == 1))
        .context("node-b logged no `authority_not_served` rejection")?;
    Ok(())
}

#[test]
fn the_client_agent_refuses_a_server_that_fails_secure_naming() -> Result<()> {
    let cluster = mtls_cluster(Cluster::builder())?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let server = web.http_server(HTTP_PORT, &web_root(&cluster, "www", BODY)?)?;
    // node-a believes web runs as `impostor`; node-b's agent proves `web`.
    let skewed = cluster.workdir().join("cluster-node-a.yaml");
    fs::write(
        &skewed,
        with_service_account(cluster.cluster_file(), "web", "impostor")?,
    )?;
    cluster.start_agent_with("node-a", &skewed)?;
    cluster.start_agent("node-b")?;

    let out = client.curl(&mesh_tests::http_url(web.ipv4(), HTTP_PORT))?;
    ensure!(
        !out.success(),
        "curl succeeded although the server's identity was wrong"
    );
    let refused = cluster.wait_for_connection("node-a", |c| c.error.is_some(), LOG_WAIT)?;
    ensure!(
        refused.other["rejection"] == "secure_naming_mismatch",
        "node-a logged {refused:?}"
    );
    let error = refused.error.unwrap_or_default();
    ensure!(
        error.contains("sa/impostor") && error.contains(WEB_ID),
        "the error should name expected and presented identities: {error}"
    );
    ensure!(
        server.requests()?.is_empty(),
        "the request reached the server"
    );
    Ok(())
}

#[test]
fn concurrent_connections_share_pooled_tls_connections() -> Result<()> {
    let cluster = started_cluster(Cluster::builder())?;
    let client = cluster.pod("node-a", "client")?;
    let echo = cluster.pod("node-b", "echo")?;
    let _echo_server = echo.tcp_echo(ECHO_PORT)?;

    let out = client.run(
        "/usr/bin/python3",
        [
            "-c",
            PARALLEL_ECHOES,
            &echo.ipv4().to_string(),
            &ECHO_PORT.to_string(),
            "50",
        ],
        Duration::from_secs(60),
    )?;
    ensure!(
        out.success(),
        "parallel echoes failed: {}",
        out.stderr_str()
    );
    ensure!(
        out.stdout_str().trim() == "50",
        "echoes: {}",
        out.stdout_str()
    );
    let dst = addr(echo.ipv4(), ECHO_PORT);
    wait_until(|| {
        Ok(cluster
            .connections("node-a")?
            .iter()
            .filter(|c| c.dst == dst)
            .count()
            == 50)
    })?;
    let handshakes = logs_with(&cluster, "node-a", "hbone connection established")?.len();
    ensure!(
        (1..=2).contains(&handshakes),
        "50 concurrent connections used {handshakes} TLS connections"
    );
    Ok(())
}

#[test]
fn a_thousand_sequential_connections_cost_one_tls_handshake() -> Result<()> {
    let cluster = started_cluster(Cluster::builder())?;
    let client = cluster.pod("node-a", "client")?;
    let echo = cluster.pod("node-b", "echo")?;
    let _echo_server = echo.tcp_echo(ECHO_PORT)?;

    let started = Instant::now();
    let out = client.run(
        "/usr/bin/python3",
        [
            "-c",
            SEQUENTIAL_ECHOES,
            &echo.ipv4().to_string(),
            &ECHO_PORT.to_string(),
            "1000",
        ],
        Duration::from_secs(120),
    )?;
    ensure!(
        out.success(),
        "sequential echoes failed: {}",
        out.stderr_str()
    );
    ensure!(
        out.stdout_str().trim() == "1000",
        "echoes: {}",
        out.stdout_str()
    );
    let handshakes = logs_with(&cluster, "node-a", "hbone connection established")?.len();
    eprintln!(
        "1000 sequential connections through the mesh: {handshakes} TLS handshake(s), {:?}",
        started.elapsed()
    );
    ensure!(
        handshakes == 1,
        "1000 sequential connections cost {handshakes} TLS handshakes"
    );
    Ok(())
}

#[test]
fn connections_survive_certificate_renewals() -> Result<()> {
    let cluster = started_cluster(
        Cluster::builder()
            .certificate_lifetime("4s")
            .hbone_idle_timeout("500ms"),
    )?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let echo = cluster.pod("node-b", "echo")?;
    let _server = web.http_server(HTTP_PORT, &web_root(&cluster, "www", BODY)?)?;
    let _echo_server = echo.tcp_echo(ECHO_PORT)?;

    // One connection held open across several renewals, and new ones made all along.
    let mut long_lived = client.spawn(
        "/usr/bin/python3",
        [
            "-c",
            HOLD_ECHO,
            &echo.ipv4().to_string(),
            &ECHO_PORT.to_string(),
            "9",
        ],
    )?;
    let until = Instant::now() + Duration::from_secs(9);
    let mut fetches = 0;
    while Instant::now() < until {
        fetch(client, web.ipv4(), HTTP_PORT, BODY)
            .with_context(|| format!("fetch {fetches} during renewals"))?;
        fetches += 1;
        thread::sleep(Duration::from_millis(700));
    }
    let status = wait_for_exit(long_lived.child_mut(), Duration::from_secs(10))?;
    ensure!(
        status.success(),
        "the long-lived connection broke during renewals"
    );

    for node in ["node-a", "node-b"] {
        let issued = logs_with(&cluster, node, "certificate issued")?.len();
        ensure!(
            issued >= 4,
            "{node} issued {issued} certificates in ~10 s of 4 s lifetimes"
        );
    }
    let handshakes = logs_with(&cluster, "node-a", "hbone connection established")?.len();
    ensure!(
        handshakes >= 3,
        "only {handshakes} TLS handshakes: renewed certificates untested"
    );
    Ok(())
}

// ------------------------------------------------------------------ helpers

const SEQUENTIAL_ECHOES: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok = 0
for i in range(n):
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"ping\n")
        if s.recv(16) == b"ping\n":
            ok += 1
print(ok)
"#;

const PARALLEL_ECHOES: &str = r#"
import socket, sys, threading
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
barrier = threading.Barrier(n)
ok = []
def one(i):
    with socket.create_connection((host, port), timeout=20) as s:
        barrier.wait()
        msg = b"conn %d\n" % i
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(64)
            if not chunk:
                break
            got += chunk
        if got == msg:
            ok.append(i)
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print(len(ok))
"#;

fn echo_round_trip(from: &Pod, echo: &Pod, message: &str) -> Result<String> {
    let out = from.run(
        "/usr/bin/python3",
        [
            "-c",
            "import socket,sys\ns=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=10)\ns.sendall(sys.argv[3].encode())\ns.shutdown(socket.SHUT_WR)\nb=b''\nwhile True:\n  c=s.recv(4096)\n  if not c: break\n  b+=c\nprint(b.decode(),end='')",
            &echo.ipv4().to_string(),
            &ECHO_PORT.to_string(),
            message,
        ],
        Duration::from_secs(20),
    )?;
    ensure!(
        out.success(),
        "echo from {}: {}",
        from.name(),
        out.stderr_str()
    );
    Ok(out.stdout_str())
}

fn start_capture(cluster: &Cluster, node: &str, pcap: &Path) -> Result<mesh_tests::ChildGuard> {
    let stderr = pcap.with_extension("log");
    let guard = cluster.spawn_in_node(
        node,
        "/bin/sh",
        [
            "-c",
            &format!(
                "exec tcpdump -Z root --immediate-mode -i eth0 -U -s 0 -w {} tcp 2>{}",
                pcap.display(),
                stderr.display()
            ),
        ],
    )?;
    wait_until(|| {
        Ok(fs::read_to_string(&stderr)
            .unwrap_or_default()
            .contains("listening on"))
    })
    .context("tcpdump did not start")?;
    Ok(guard)
}

fn stop_capture(mut capture: mesh_tests::ChildGuard, pcap: &Path) -> Result<()> {
    // Let the last segments reach the capture before stopping it.
    thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(capture.pid() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    wait_for_exit(capture.child_mut(), Duration::from_secs(5))?;
    ensure!(pcap.exists(), "no capture file");
    Ok(())
}

fn tshark_count(pcap: &Path, filter: &str) -> Result<usize> {
    let out = std::process::Command::new("tshark")
        .args(["-n", "-r"])
        .arg(pcap)
        .args([
            "-d",
            "tcp.port==15008,tls",
            "-Y",
            filter,
            "-T",
            "fields",
            "-e",
            "frame.number",
        ])
        .output()
        .context("running tshark")?;
    ensure!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn rejections(cluster: &Cluster, kind: &str) -> Result<usize> {
    Ok(cluster
        .agent_logs("node-b")?
        .iter()
        .filter(|l| l["rejection"] == kind)
        .count())
}

fn wait_until(mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + LOG_WAIT;
    while Instant::now() < deadline {
        if done()? {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("condition not met within {LOG_WAIT:?}")
}

fn cluster_ca(cluster: &Cluster) -> Result<CertificateAuthority> {
    let dir = cluster.ca_dir();
    Ok(CertificateAuthority::load(
        &dir.join("ca-cert.pem"),
        &dir.join("ca-key.pem"),
    )?)
}

/// Client certificates for `openssl s_client`, good and bad, written as PEM files.
struct PeerCerts {
    dir: PathBuf,
    ca_dir: PathBuf,
    valid: WorkloadCert,
    other_ca: WorkloadCert,
    other_trust_domain: WorkloadCert,
    expired: WorkloadCert,
    not_yet_valid: WorkloadCert,
}

impl PeerCerts {
    fn new(cluster: &Cluster) -> Result<Self> {
        let ca = cluster_ca(cluster)?;
        let client: SpiffeId = CLIENT_ID.parse()?;
        let hour = Duration::from_secs(3600);
        let now = SystemTime::now();
        let dir = cluster.workdir().join("peer-certs");
        fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            ca_dir: cluster.ca_dir(),
            valid: ca.issue(&client, hour)?,
            other_ca: CertificateAuthority::generate_root("other mesh")?.issue(&client, hour)?,
            other_trust_domain: ca
                .issue(&"spiffe://other.org/ns/default/sa/client".parse()?, hour)?,
            expired: ca.issue_with_validity(&client, now - 2 * hour, now - hour)?,
            not_yet_valid: ca.issue_with_validity(&client, now + hour, now + 2 * hour)?,
        })
    }

    fn s_client_args(&self, cert: &WorkloadCert) -> Result<Vec<String>> {
        let name = cert.serial().to_owned();
        let cert_path = self.dir.join(format!("{name}.crt"));
        let key_path = self.dir.join(format!("{name}.key"));
        let chain: Vec<pem::Pem> = cert
            .chain()
            .iter()
            .map(|der| pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()))
            .collect();
        fs::write(&cert_path, pem::encode_many(&chain))?;
        let key = pem::Pem::new("PRIVATE KEY", cert.key().secret_der().to_vec());
        fs::write(&key_path, pem::encode(&key))?;
        Ok(vec![
            "-cert".into(),
            cert_path.display().to_string(),
            "-key".into(),
            key_path.display().to_string(),
        ])
    }

    /// A leaf signed by the mesh CA with the openssl CLI, carrying only `san`.
    fn openssl_signed(&self, name: &str, san: &str) -> Result<Vec<String>> {
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let cert = self.dir.join(format!("{name}.crt"));
        let ext = self.dir.join(format!("{name}.ext"));
        fs::write(
            &ext,
            format!("subjectAltName={san}\nextendedKeyUsage=clientAuth,serverAuth\n"),
        )?;
        let ca_cert = self.ca_dir.join("ca-cert.pem");
        let ca_key = self.ca_dir.join("ca-key.pem");
        let p = |p: &Path| p.display().to_string();
        openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &p(&key),
        ])?;
        openssl(&[
            "req",
            "-new",
            "-key",
            &p(&key),
            "-subj",
            &format!("/CN={name}"),
            "-out",
            &p(&csr),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(&csr),
            "-CA",
            &p(&ca_cert),
            "-CAkey",
            &p(&ca_key),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &p(&ext),
            "-out",
            &p(&cert),
        ])?;
        Ok(vec!["-cert".into(), p(&cert), "-key".into(), p(&key)])
    }
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("openssl").args(args).output()?;
    ensure!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Opens one HBONE stream from inside `from`'s namespace, as a peer with a valid client
/// certificate from the cluster's CA: `Ok(())` when the far agent accepted the CONNECT,
/// `Err(reason)` otherwise.
fn hbone_connect(
    cluster: &Cluster,
    from: &Pod,
    via: SocketAddr,
    authority: SocketAddr,
) -> Result<std::result::Result<(), String>> {
    use mesh_agent::identity::{IdentityStore, TrustBundle};
    use mesh_agent::netns::{self, NetNs};
    use mesh_agent::proxy::hbone::HboneClient;
    use std::sync::Arc;

    netns::remember_home()?;
    let ca = cluster_ca(cluster)?;
    let bundle = TrustBundle::from_ca(&ca)?;
    let client: SpiffeId = CLIENT_ID.parse()?;
    let store = IdentityStore::new(Arc::new(ca), Duration::from_secs(3600));
    let netns = NetNs::open(&from.netns_path())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        store.issue_all([client.clone()]).await?;
        let hbone = HboneClient::new(store, bundle.into(), Duration::from_secs(5));
        let expected: SpiffeId = WEB_ID.parse()?;
        Ok(
            match hbone
                .open(
                    ("default/client", &client),
                    (&netns, &tokio::sync::Semaphore::new(1)),
                    via,
                    &expected,
                    authority,
                )
                .await
            {
                Ok(mut stream) => stream.reader.accepted().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
        )
    })
}
