//! Certificates from a central CA service (issue 11): no node holds a signing key, and a
//! node's credential gets certificates only for the workloads running on that node.
//!
//! Every cluster here is made with [`ClusterBuilder::with_ca_service`]: `mesh-agent ca serve`
//! on a host of its own on the fabric (10.255.0.253), every node enrolled with `ca add-node`,
//! the cluster file naming the CA (`identity.ca`) and no key.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{LOG_WAIT, fetch, poll_for, web_root};
use mesh_tests::{
    CA_ISSUED, CA_REFUSED, CaAnswer, Cluster, ClusterBuilder, NODE_CERT_FILE, NODE_KEY_FILE,
    NodeSpec, PodSpec, addr, http_url,
};
use serde_json::Value;
use tonic::Code;

const BODY: &[u8] = b"<h1>signed by the CA service</h1>\n";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
/// The identity of no workload anywhere.
const NOBODY_ID: &str = "spiffe://cluster.local/ns/default/sa/nobody";
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7000;

/// node-a runs `client` (sa client), node-b runs `web` (sa web); certificates from the CA
/// service. Agents not started.
fn ca_cluster(builder: ClusterBuilder) -> Result<Cluster> {
    builder
        .with_ca_service()
        .node(NodeSpec::new("node-a").pod(PodSpec::new("client").service_account("client")))
        .node(NodeSpec::new("node-b").pod(PodSpec::new("web").service_account("web")))
        .build()
}

fn agent_logs_with(cluster: &Cluster, node: &str, message: &str) -> Result<Vec<Value>> {
    Ok(cluster
        .agent_logs(node)?
        .into_iter()
        .filter(|line| line["message"] == message)
        .collect())
}

#[test]
fn cross_node_calls_are_mutual_tls_with_certificates_from_the_ca_service() -> Result<()> {
    let cluster = ca_cluster(Cluster::builder())?;
    // What the nodes read names the CA service and holds no key.
    let file: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&fs::read_to_string(cluster.cluster_file())?)?;
    let identity = &file["identity"];
    ensure!(
        identity["ca"]["address"].as_str() == Some(cluster.ca_service()?.address().as_str())
            && identity.get("caKey").is_none()
            && identity.get("caCert").is_none(),
        "the cluster file's identity section: {identity:?}"
    );
    cluster.start_agents()?;
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

    // The certificates both agents used came from the CA service, each to its own node.
    let ca = cluster.ca_service()?;
    for (node, id) in [("node-a", CLIENT_ID), ("node-b", WEB_ID)] {
        ca.wait_for_log(
            |l| l["message"] == CA_ISSUED && l["node"] == node && l["identity"] == id,
            LOG_WAIT,
        )
        .with_context(|| format!("the CA never issued {id} to {node}"))?;
        let agent_issued = agent_logs_with(&cluster, node, "certificate issued")?;
        ensure!(
            agent_issued.iter().any(|l| l["identity"] == id),
            "{node}'s agent logged no certificate for {id}: {agent_issued:?}"
        );
    }
    let refused = ca.logs_with(CA_REFUSED)?;
    ensure!(
        refused.is_empty(),
        "the CA refused agents' requests: {refused:?}"
    );
    Ok(())
}

#[test]
fn a_node_gets_no_certificate_for_a_workload_of_another_node() -> Result<()> {
    let cluster = ca_cluster(Cluster::builder())?;
    let ca = cluster.ca_service()?;
    let node_a = cluster.node_credential_dir("node-a");
    let node_b = cluster.node_credential_dir("node-b");

    // The control: node-a's credential does get its own workload's identity.
    let own = cluster.request_certificate("node-a", Some(&node_a), CLIENT_ID)?;
    check_issued(&cluster, &own, CLIENT_ID)?;

    for id in [WEB_ID, NOBODY_ID] {
        let answer = cluster.request_certificate("node-a", Some(&node_a), id)?;
        ensure!(
            answer.refusal() == Some(Code::PermissionDenied),
            "node-a asking for {id}: {answer:?}"
        );
        let line = ca
            .wait_for_log(
                |l| l["message"] == CA_REFUSED && l["identity"] == id,
                LOG_WAIT,
            )
            .with_context(|| format!("no refusal of {id} logged"))?;
        ensure!(
            line["node"] == "node-a"
                && line["caller"].as_str().is_some_and(|c| !c.is_empty())
                && line["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "the refusal does not say who asked for what and why: {line}"
        );
    }
    // Nothing was issued but the control.
    let issued = ca.logs_with(CA_ISSUED)?;
    ensure!(
        issued.len() == 1 && issued[0]["identity"] == CLIENT_ID && issued[0]["node"] == "node-a",
        "the CA issued {issued:?}"
    );
    let metrics = ca.metrics()?;
    ensure!(
        counter(&metrics, "mesh_ca_requests_total", "result=\"issued\"")? == 1.0
            && counter(&metrics, "mesh_ca_requests_total", "result=\"refused\"")? == 2.0,
        "mesh_ca_requests_total: {}",
        metric_lines(&metrics, "mesh_ca_requests_total")
    );

    // web's identity is grantable: to its own node.
    let web = cluster.request_certificate("node-b", Some(&node_b), WEB_ID)?;
    check_issued(&cluster, &web, WEB_ID)?;
    // The other way round is refused too.
    let answer = cluster.request_certificate("node-b", Some(&node_b), CLIENT_ID)?;
    ensure!(
        answer.refusal() == Some(Code::PermissionDenied),
        "node-b asking for {CLIENT_ID}: {answer:?}"
    );
    Ok(())
}

#[test]
fn requests_without_a_valid_node_credential_are_unauthenticated() -> Result<()> {
    let cluster = ca_cluster(Cluster::builder())?;
    let ca = cluster.ca_service()?;
    let credential = cluster.node_credential_dir("node-a");
    let mut granted = 0;

    // No credential at all.
    let answer = cluster.request_certificate("node-a", None, CLIENT_ID)?;
    ensure!(
        answer.refusal() == Some(Code::Unauthenticated),
        "no credential: {answer:?}"
    );
    let line = ca.wait_for_log(|l| l["message"] == CA_REFUSED, LOG_WAIT)?;
    ensure!(
        line["identity"] == CLIENT_ID && line["node"] != "node-a",
        "the refusal of an anonymous request: {line}"
    );

    // A workload certificate signed by the CA is no node credential.
    let workload = cluster.request_certificate("node-a", Some(&credential), CLIENT_ID)?;
    let CaAnswer::Issued { chain, key_pem } = &workload else {
        bail!("node-a's own workload: {workload:?}");
    };
    granted += 1;
    let as_node = cluster.workdir().join("workload-as-node");
    fs::create_dir_all(&as_node)?;
    fs::write(as_node.join(NODE_CERT_FILE), chain.concat())?;
    fs::write(as_node.join(NODE_KEY_FILE), key_pem)?;
    // Refused by the service (Unauthenticated) or already by its TLS client verification,
    // which in TLS 1.3 the client learns only after its handshake: the call then ends in a
    // transport error or a cancelled call (whichever the client's connection task sees first),
    // or no connection is made at all.
    match cluster.request_certificate("node-a", Some(&as_node), CLIENT_ID) {
        Ok(CaAnswer::Refused { code, message })
            if code == Code::Unauthenticated
                || (matches!(code, Code::Unknown | Code::Unavailable)
                    && message.contains("transport error"))
                || code == Code::Cancelled => {}
        Ok(answer) => bail!("a workload certificate as node credential: {answer:?}"),
        Err(e) => eprintln!("a workload certificate as node credential: no answer: {e:#}"),
    }

    // A credential replaced by a second add-node.
    let old = cluster.workdir().join("old-node-a-credential");
    fs::create_dir_all(&old)?;
    for file in [NODE_CERT_FILE, NODE_KEY_FILE] {
        fs::copy(credential.join(file), old.join(file))?;
    }
    ca.add_node("node-a", &credential)?;
    ensure!(
        fs::read(old.join(NODE_CERT_FILE))? != fs::read(credential.join(NODE_CERT_FILE))?,
        "add-node wrote the same certificate again"
    );
    granted += refused_within(&cluster, &old, "a replaced credential")?;
    let new = cluster.request_certificate("node-a", Some(&credential), CLIENT_ID)?;
    ensure!(
        matches!(new, CaAnswer::Issued { .. }),
        "the new credential: {new:?}"
    );
    granted += 1;

    // A revoked credential.
    ca.revoke_node("node-a")?;
    granted += refused_within(&cluster, &credential, "a revoked credential")?;

    let issued = ca.logs_with(CA_ISSUED)?;
    ensure!(
        issued.len() == granted,
        "the CA issued {} certificates, {granted} requests had a valid credential: {issued:?}",
        issued.len()
    );
    let refusals = ca.logs_with(CA_REFUSED)?;
    ensure!(
        refusals.len() >= 3 && refusals.iter().all(|l| l["identity"] == CLIENT_ID),
        "refusals logged: {refusals:?}"
    );
    Ok(())
}

#[test]
fn no_file_a_node_sees_holds_a_private_key_of_the_ca() -> Result<()> {
    let cluster = ca_cluster(Cluster::builder())?;
    cluster.start_agents()?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let _server = web.http_server(HTTP_PORT, &web_root(&cluster, "www", BODY)?)?;
    fetch(client, web.ipv4(), HTTP_PORT, BODY)?;

    let ca = cluster.ca_service()?;
    let keys = [
        SecretKey::load(&ca.signing_key_path())?,
        SecretKey::load(&ca.node_ca_key_path())?,
    ];
    // The control: the search finds the keys where they are.
    let mut control = Search::new(&keys);
    control.dir(ca.dir())?;
    for key in &keys {
        ensure!(
            control.found.iter().any(|(_, k, _)| *k == key.path),
            "the search did not find {} in the CA's directory: {:?}",
            key.path.display(),
            control.found
        );
    }

    let mut search = Search::new(&keys);
    // The cluster file's directory: the cluster file, policies, the trust bundle, every
    // node's directory (its credential), the agents' logs.
    search.dir(cluster.workdir())?;
    for node in cluster.nodes() {
        ensure!(
            search
                .searched
                .iter()
                .any(|p| p.starts_with(cluster.node_credential_dir(node.name()))),
            "{}'s credential was not searched",
            node.name()
        );
        // What the agent pinned: each map's contents, and whatever else reads as a file.
        let dumped = search.pinned(node.pin_dir())?;
        ensure!(dumped > 0, "no pinned map of {} could be read", node.name());
        // Every file the agent holds open (also deleted ones and memfds).
        let pid = cluster
            .agent_pid(node.name())
            .context("the agent is not running")?;
        search.open_files(pid)?;
    }
    ensure!(
        search.found.is_empty(),
        "a private key of the CA is in files the nodes see: {:?}",
        search.found
    );
    eprintln!(
        "searched {} files and {} pinned maps for the CA's keys",
        search.searched.len(),
        search.maps
    );
    Ok(())
}

#[test]
fn a_ca_outage_across_renewals_costs_no_connection_and_renewals_resume() -> Result<()> {
    // Renewal is due half-way (25 s) into a certificate's 50 s: inside a 30 s outage that
    // starts right after the first certificates, with their expiry still well after it.
    const OUTAGE: Duration = Duration::from_secs(30);
    let cluster = ca_cluster(
        Cluster::builder()
            .certificate_lifetime("50s")
            // Every connection of the loop (one each 0.5 s) makes a new TLS connection, so
            // the certificates in hand are shown and verified all along.
            .hbone_idle_timeout("300ms"),
    )?;
    cluster.start_agents()?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let _echo = web.tcp_echo(ECHO_PORT)?;
    let mut conns = ConnectionLoop::start(client, &web.ipv4().to_string(), ECHO_PORT)?;
    conns
        .wait_ok(1, LOG_WAIT)
        .context("the loop's first connection")?;

    let count = |node: &str, message: &str, id: &str| -> Result<usize> {
        Ok(agent_logs_with(&cluster, node, message)?
            .iter()
            .filter(|l| l["identity"] == id)
            .count())
    };
    let handshakes = || -> Result<usize> {
        Ok(agent_logs_with(&cluster, "node-a", "hbone connection established")?.len())
    };
    let ours = [("node-a", CLIENT_ID), ("node-b", WEB_ID)];
    let failed_before: Vec<usize> = ours
        .iter()
        .map(|(n, id)| count(n, "certificate renewal failed", id))
        .collect::<Result<_>>()?;
    let handshakes_before = handshakes()?;

    cluster.stop_ca()?;
    let stopped = Instant::now();
    // Renewals fail meanwhile: the outage covers them.
    for ((node, id), before) in ours.iter().zip(&failed_before) {
        poll_for(
            OUTAGE.saturating_sub(stopped.elapsed()),
            &format!("{node}'s failed renewal of {id} during the outage"),
            || {
                let now = count(node, "certificate renewal failed", id)?;
                Ok(if now > *before {
                    Ok(())
                } else {
                    Err(format!("{now} failures"))
                })
            },
        )?;
    }
    // The outage is the test's subject: it lasts its full length.
    thread::sleep(OUTAGE.saturating_sub(stopped.elapsed()));
    let handshakes_in_outage = handshakes()? - handshakes_before;
    let ok_in_outage = conns.ok_so_far();
    conns.check_no_failure().context("during the CA outage")?;

    let issued_before: Vec<usize> = ours
        .iter()
        .map(|(n, id)| count(n, "certificate issued", id))
        .collect::<Result<_>>()?;
    let ca_issued_before = cluster.ca_service()?.logs_with(CA_ISSUED)?.len();
    cluster.start_ca()?;
    for ((node, id), before) in ours.iter().zip(&issued_before) {
        poll_for(
            Duration::from_secs(15),
            &format!("{node}'s renewal of {id} after the CA came back"),
            || {
                let now = count(node, "certificate issued", id)?;
                Ok(if now > *before {
                    Ok(())
                } else {
                    Err(format!("{now} issued"))
                })
            },
        )?;
    }
    let ca_issued: Vec<Value> = cluster.ca_service()?.logs_with(CA_ISSUED)?;
    let renewed_nodes: BTreeSet<String> = ca_issued[ca_issued_before..]
        .iter()
        .filter_map(|l| l["node"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        renewed_nodes.contains("node-a") && renewed_nodes.contains("node-b"),
        "the restarted CA issued to {renewed_nodes:?}"
    );
    // And the renewed certificates carry connections.
    let seen = conns.ok_so_far();
    conns.wait_ok(seen + 3, LOG_WAIT).context("after renewal")?;
    let (ok, failed) = conns.finish()?;
    ensure!(
        failed == 0,
        "{failed} of {} connections failed",
        ok + failed
    );
    ensure!(
        ok_in_outage >= 30 && handshakes_in_outage >= 20,
        "the outage saw only {ok_in_outage} connections and {handshakes_in_outage} TLS \
         handshakes: the certificates in hand were hardly used"
    );
    eprintln!(
        "{ok} connections, none failed; {ok_in_outage} and {handshakes_in_outage} TLS \
         handshakes during the {OUTAGE:?} outage"
    );
    Ok(())
}

#[test]
fn an_agent_restarted_while_the_ca_is_away_serves_nothing_until_it_has_certificates() -> Result<()>
{
    let cluster = Cluster::builder()
        .with_ca_service()
        .node(
            NodeSpec::new("node-a")
                .pod(PodSpec::new("client").service_account("client"))
                .pod(PodSpec::new("outsider").enrolled(false)),
        )
        .node(NodeSpec::new("node-b").pod(PodSpec::new("web").service_account("web")))
        .build()?;
    cluster.start_agents()?;
    let client = cluster.pod("node-a", "client")?;
    let outsider = cluster.pod("node-a", "outsider")?;
    let web = cluster.pod("node-b", "web")?;
    let server = web.http_server(HTTP_PORT, &web_root(&cluster, "www", BODY)?)?;
    fetch(client, web.ipv4(), HTTP_PORT, BODY)?;

    // The restarted agent has no certificate (they live in memory only) and cannot get one.
    cluster.stop_ca()?;
    cluster.stop_agent("node-b")?;
    cluster.start_agent_unready("node-b")?;
    let (code, body) = cluster.readiness("node-b")?;
    ensure!(
        code == 503 && body.contains("default/web") && body.contains(WEB_ID),
        "node-b's readiness without a certificate for web: {code} {body}"
    );
    // web stays guarded: neither the mesh client nor a plaintext caller reaches it.
    let url = http_url(web.ipv4(), HTTP_PORT);
    for (pod, marker) in [(client, "from-client"), (outsider, "from-outsider")] {
        let out = pod.curl_within(&format!("{url}{marker}"), Duration::from_secs(3))?;
        ensure!(
            !out.success(),
            "{} reached web while its agent had no certificate: {}",
            pod.name(),
            out.stdout_str()
        );
    }
    let served: Vec<String> = server
        .requests()?
        .into_iter()
        .filter(|r| r.contains("from-"))
        .collect();
    ensure!(served.is_empty(), "web served {served:?}");

    // The CA back: the agent gets web's certificate, becomes ready and serves.
    cluster.start_ca()?;
    poll_for(Duration::from_secs(20), "node-b ready again", || {
        let (code, body) = cluster.readiness("node-b")?;
        Ok(if code == 200 {
            Ok(())
        } else {
            Err(format!("{code} {body}"))
        })
    })?;
    fetch(client, web.ipv4(), HTTP_PORT, BODY)?;
    Ok(())
}

#[test]
fn the_ca_service_goes_with_its_cluster_even_on_panic() -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let outcome = std::panic::catch_unwind(move || {
        let cluster = ca_cluster(Cluster::builder()).expect("build");
        let ca = cluster.ca_service().expect("a CA service");
        tx.send((
            ca.pid().expect("running"),
            ca.netns_path(),
            ca.dir().to_owned(),
        ))
        .unwrap();
        panic!("deliberate panic with the CA service running");
    });
    ensure!(outcome.is_err(), "the closure did not panic");
    let (pid, netns, dir) = rx.recv()?;
    ensure!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "ca serve ({pid}) outlived its cluster"
    );
    ensure!(!netns.exists(), "{} outlived its cluster", netns.display());
    ensure!(!dir.exists(), "{} outlived its cluster", dir.display());
    Ok(())
}

// ------------------------------------------------------------------ helpers

/// That `answer` is a certificate for `id` as the CA service must issue it: the leaf's only
/// SAN is `id`, the chain ends with the mesh's root.
fn check_issued(cluster: &Cluster, answer: &CaAnswer, id: &str) -> Result<()> {
    let CaAnswer::Issued { chain, .. } = answer else {
        bail!("asking for {id}: {answer:?}");
    };
    ensure!(chain.len() >= 2, "a chain of {} certificates", chain.len());
    let sans = answer.leaf_sans()?;
    ensure!(
        sans == [format!("URI:{id}")],
        "the leaf for {id} has SANs {sans:?}"
    );
    let root = pem::parse_many(chain.last().unwrap())?;
    let ours = pem::parse_many(fs::read(cluster.ca_service()?.signing_cert_path())?)?;
    ensure!(
        root.last().map(pem::Pem::contents) == ours.last().map(pem::Pem::contents),
        "the chain does not end with the mesh's root"
    );
    Ok(())
}

/// The value of the Prometheus sample `name{...labels...}` (0 if absent).
/// The root rotation of docs/identity.md, step by step, under a steady loop of new connections
/// (each its own TLS handshake): trust both roots, move the CA to the new one, wait for every
/// certificate to be renewed under it, drop the old root. No connection fails.
#[test]
fn rotating_the_root_under_a_steady_connection_loop_fails_no_connection() -> Result<()> {
    let cluster = ca_cluster(
        Cluster::builder()
            .certificate_lifetime("20s")
            .hbone_idle_timeout("300ms"),
    )?;
    cluster.start_agents()?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let _echo = web.tcp_echo(ECHO_PORT)?;
    let mut conns = ConnectionLoop::start(client, &web.ipv4().to_string(), ECHO_PORT)?;
    conns
        .wait_ok(1, LOG_WAIT)
        .context("the loop's first connection")?;
    let ca = cluster.ca_service()?;
    let bundle = cluster.ca_roots_path();
    let old_roots = fs::read(&bundle)?;

    // 1. A new root, made on the CA's host.
    let new_dir = ca.dir().join("new-root");
    let init = std::process::Command::new(mesh_tests::agent_bin())
        .args(["ca", "init"])
        .arg(&new_dir)
        .output()?;
    ensure!(
        init.status.success(),
        "ca init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let new_root = fs::read(new_dir.join("ca-cert.pem"))?;

    // 2. Every agent trusts both (they follow the file).
    let both = [old_roots.as_slice(), new_root.as_slice()].concat();
    replace_bundle(&cluster, &bundle, &both)?;
    let ok = conns.ok_so_far();
    conns.wait_ok(ok + 2, LOG_WAIT).context("with both roots")?;

    // 3. The CA signs with the new root; every certificate moves to it at its renewal.
    let issued_before = ca.logs_with(CA_ISSUED)?.len();
    cluster.stop_ca()?;
    fs::copy(new_dir.join("ca-cert.pem"), ca.signing_cert_path())?;
    fs::copy(new_dir.join("ca-key.pem"), ca.signing_key_path())?;
    cluster.start_ca()?;
    poll_for(
        Duration::from_secs(30),
        "both nodes' certificates renewed under the new root",
        || {
            let issued = ca.logs_with(CA_ISSUED)?;
            let renewed: BTreeSet<String> = issued[issued_before.min(issued.len())..]
                .iter()
                .filter_map(|l| l["identity"].as_str().map(str::to_owned))
                .collect();
            Ok(if renewed.contains(CLIENT_ID) && renewed.contains(WEB_ID) {
                Ok(())
            } else {
                Err(format!("renewed so far: {renewed:?}"))
            })
        },
    )?;
    let ok = conns.ok_so_far();
    conns.wait_ok(ok + 2, LOG_WAIT).context("on the new root")?;

    // 4. The old root goes; the new certificates carry on alone.
    replace_bundle(&cluster, &bundle, &new_root)?;
    let ok = conns.ok_so_far();
    conns
        .wait_ok(ok + 4, LOG_WAIT)
        .context("with the new root alone")?;
    conns.check_no_failure().context("during the rotation")?;
    Ok(())
}

/// Writes the agents' trust bundle and waits until both have reloaded it.
fn replace_bundle(cluster: &Cluster, bundle: &Path, roots: &[u8]) -> Result<()> {
    let before: Vec<usize> = ["node-a", "node-b"]
        .iter()
        .map(|n| Ok(agent_logs_with(cluster, n, "trust bundle reloaded")?.len()))
        .collect::<Result<_>>()?;
    mesh_tests::sys::write_atomic(bundle, roots)?;
    for (node, before) in ["node-a", "node-b"].iter().zip(before) {
        poll_for(
            LOG_WAIT,
            &format!("{node} reloads its trust bundle"),
            || {
                let now = agent_logs_with(cluster, node, "trust bundle reloaded")?.len();
                Ok(if now > before {
                    Ok(())
                } else {
                    Err(format!("{now} reloads"))
                })
            },
        )?;
    }
    Ok(())
}

fn counter(metrics: &str, name: &str, label: &str) -> Result<f64> {
    let line = metrics
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label));
    match line {
        None => Ok(0.0),
        Some(l) => l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("sample {l:?}")),
    }
}

fn metric_lines(metrics: &str, name: &str) -> String {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .collect::<Vec<_>>()
        .join("; ")
}

/// How long after a change of the node registry the running CA may still honour the old
/// credential (it re-reads the registry when the file changes).
const REGISTRY_PICKUP: Duration = Duration::from_secs(2);

/// Asks for node-a's own workload with the credential in `dir` until the CA refuses it as
/// Unauthenticated: at once, or within [`REGISTRY_PICKUP`] of the registry change. Returns
/// how many certificates it got meanwhile.
fn refused_within(cluster: &Cluster, dir: &Path, what: &str) -> Result<usize> {
    let changed = Instant::now();
    let mut leaked = 0;
    poll_for(REGISTRY_PICKUP, &format!("{what} refused"), || {
        let answer = cluster.request_certificate("node-a", Some(dir), CLIENT_ID)?;
        Ok(match answer.refusal() {
            Some(Code::Unauthenticated) => Ok(()),
            None if changed.elapsed() < REGISTRY_PICKUP => {
                leaked += 1;
                Err(format!("{answer:?}"))
            }
            _ => Err(format!("{answer:?}")),
        })
    })?;
    // And it stays so.
    let again = cluster.request_certificate("node-a", Some(dir), CLIENT_ID)?;
    ensure!(
        again.refusal() == Some(Code::Unauthenticated),
        "{what}, asked again: {again:?}"
    );
    if leaked > 0 {
        eprintln!("{what}: {leaked} certificate(s) issued before the CA saw the registry change");
    }
    Ok(leaked)
}

/// A private key, and the forms in which a copy of it would show.
struct SecretKey {
    path: PathBuf,
    /// (form, bytes)
    needles: Vec<(&'static str, Vec<u8>)>,
}

impl SecretKey {
    /// A PKCS#8 PEM file (a P-256 key, as `ca init` and `add-node` write).
    fn load(path: &Path) -> Result<SecretKey> {
        let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let der = pem::parse(&text)?.contents().to_vec();
        let body: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("-----"))
            .collect();
        ensure!(body.len() >= 2, "{}: not a PEM key", path.display());
        let mut needles = vec![
            ("DER", der.clone()),
            ("PEM body", body.concat().into_bytes()),
            // The first two lines hold bytes of the secret scalar (the third only public ones).
            ("PEM line 1", body[0].as_bytes().to_vec()),
            ("PEM line 2", body[1].as_bytes().to_vec()),
        ];
        // ECPrivateKey: version 1, then the scalar as a 32-byte OCTET STRING.
        let marker = [0x02, 0x01, 0x01, 0x04, 0x20];
        let at = der
            .windows(marker.len())
            .position(|w| w == marker)
            .with_context(|| format!("{}: no P-256 private scalar", path.display()))?;
        let scalar = der[at + marker.len()..][..32].to_vec();
        let hex: String = scalar.iter().map(|b| format!("{b:02x}")).collect();
        needles.push(("raw scalar", scalar));
        needles.push(("hex scalar", hex.into_bytes()));
        Ok(SecretKey {
            path: path.to_owned(),
            needles,
        })
    }
}

/// Searches files for copies of keys.
struct Search<'k> {
    keys: &'k [SecretKey],
    /// Every file searched.
    searched: Vec<PathBuf>,
    /// Pinned maps dumped.
    maps: usize,
    /// (where, which key, in which form)
    found: Vec<(String, PathBuf, &'static str)>,
}

impl<'k> Search<'k> {
    fn new(keys: &'k [SecretKey]) -> Self {
        Search {
            keys,
            searched: Vec::new(),
            maps: 0,
            found: Vec::new(),
        }
    }

    fn bytes(&mut self, place: &str, haystack: &[u8]) {
        for key in self.keys {
            for (form, needle) in &key.needles {
                if haystack
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice())
                {
                    self.found.push((place.to_owned(), key.path.clone(), form));
                }
            }
        }
    }

    /// Every regular file below `dir` (symbolic links not followed).
    fn dir(&mut self, dir: &Path) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                self.dir(&path)?;
            } else if kind.is_file() {
                let data = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
                self.bytes(&path.display().to_string(), &data);
                self.searched.push(path);
            }
        }
        Ok(())
    }

    /// What is pinned below `dir` on bpffs: the contents of every map (`bpftool map dump`,
    /// keys and values as bytes, and the JSON as text), and the text of pins that read as
    /// files. Returns how many maps were dumped.
    fn pinned(&mut self, dir: &Path) -> Result<usize> {
        let mut dumped = 0;
        for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                dumped += self.pinned(&path)?;
                continue;
            }
            let place = path.display().to_string();
            // Maps with BTF read as text; programs and links do not read at all.
            if let Ok(text) = fs::read(&path) {
                self.bytes(&place, &text);
            }
            let out = std::process::Command::new("bpftool")
                .args(["-j", "map", "dump", "pinned"])
                .arg(&path)
                .output()
                .context("run bpftool")?;
            if !out.status.success() {
                continue; // not a map (a program, a link), or a map that cannot be listed
            }
            self.bytes(&place, &out.stdout);
            let json: Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("bpftool map dump of {place}"))?;
            let mut raw = Vec::new();
            hex_bytes(&json, &mut raw);
            self.bytes(&place, &raw);
            self.searched.push(path);
            self.maps += 1;
            dumped += 1;
        }
        Ok(dumped)
    }

    /// Every regular file process `pid` has open (read through /proc, so deleted files and
    /// memfds too).
    fn open_files(&mut self, pid: u32) -> Result<()> {
        let fds = PathBuf::from(format!("/proc/{pid}/fd"));
        for entry in fs::read_dir(&fds).with_context(|| format!("read {}", fds.display()))? {
            let path = entry?.path();
            let Ok(meta) = fs::metadata(&path) else {
                continue; // closed meanwhile
            };
            if !meta.is_file() {
                continue;
            }
            let target = fs::read_link(&path).unwrap_or_else(|_| path.clone());
            let Ok(data) = fs::read(&path) else {
                continue; // not readable (a write-only pipe-like file)
            };
            self.bytes(&format!("{} ({})", path.display(), target.display()), &data);
            self.searched.push(target);
        }
        Ok(())
    }
}

/// The bytes of every array of `"0x.."` strings in a `bpftool -j` dump, one after another.
fn hex_bytes(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Array(items) if items.iter().all(|i| i.as_str().is_some_and(is_hex_byte)) => {
            out.extend(
                items
                    .iter()
                    .filter_map(|i| u8::from_str_radix(&i.as_str()?[2..], 16).ok()),
            );
            out.push(0);
        }
        Value::Array(items) => items.iter().for_each(|i| hex_bytes(i, out)),
        Value::Object(fields) => fields.values().for_each(|v| hex_bytes(v, out)),
        _ => {}
    }
}

fn is_hex_byte(s: &str) -> bool {
    s.len() == 4 && s.starts_with("0x") && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Python: a new echo connection (argv: host, port) every 0.5 s until stdin closes; prints
/// `ok N` or `fail N: why` for each, then `done ok=N failed=M`.
const CONNECTION_LOOP: &str = r#"
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
stop = threading.Event()
def wait_stdin():
    sys.stdin.read()
    stop.set()
threading.Thread(target=wait_stdin, daemon=True).start()
ok = failed = i = 0
while not stop.is_set():
    msg = b"conn %d\n" % i
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.settimeout(5)
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(64)
                if not chunk:
                    raise OSError("closed by the peer after %d bytes" % len(got))
                got += chunk
            if got != msg:
                raise OSError("echo differs: %r" % got)
        ok += 1
        print("ok %d" % i, flush=True)
    except OSError as e:
        failed += 1
        print("fail %d: %s" % (i, e), flush=True)
    i += 1
    stop.wait(0.5)
print("done ok=%d failed=%d" % (ok, failed), flush=True)
"#;

/// A steady loop of new connections from a pod, see [`CONNECTION_LOOP`].
struct ConnectionLoop {
    guard: mesh_tests::ChildGuard,
    lines: mpsc::Receiver<String>,
    ok: usize,
    failures: Vec<String>,
    done: Option<String>,
}

impl ConnectionLoop {
    fn start(from: &mesh_tests::Pod, host: &str, port: u16) -> Result<Self> {
        let mut guard = from.spawn_piped(
            "/usr/bin/python3",
            ["-c", CONNECTION_LOOP, host, &port.to_string()],
        )?;
        let lines = common::stdout_lines(&mut guard)?;
        Ok(ConnectionLoop {
            guard,
            lines,
            ok: 0,
            failures: Vec::new(),
            done: None,
        })
    }

    fn take(&mut self, line: String) {
        if line.starts_with("ok ") {
            self.ok += 1;
        } else if line.starts_with("done ") {
            self.done = Some(line);
        } else {
            self.failures.push(line);
        }
    }

    /// Takes the lines printed so far.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.take(line);
        }
    }

    fn ok_so_far(&mut self) -> usize {
        self.drain();
        self.ok
    }

    fn check_no_failure(&mut self) -> Result<()> {
        self.drain();
        ensure!(
            self.failures.is_empty(),
            "{} failed connections (of {}): {:?}",
            self.failures.len(),
            self.ok + self.failures.len(),
            self.failures
        );
        Ok(())
    }

    /// Waits until `n` connections in all have succeeded; fails at the first failure.
    fn wait_ok(&mut self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.ok < n {
            self.check_no_failure()?;
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.take(line),
                Err(_) => bail!("{} of {n} connections within {timeout:?}", self.ok),
            }
        }
        self.check_no_failure()
    }

    /// Stops the loop; returns (ok, failed) as it counted them.
    fn finish(mut self) -> Result<(usize, usize)> {
        drop(self.guard.child_mut().stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.done.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.take(line),
                Err(_) => bail!("the connection loop did not finish"),
            }
        }
        let done = self.done.clone().unwrap_or_default();
        let field = |name: &str| -> Result<usize> {
            done.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("unexpected last line {done:?}"))
        };
        let (ok, failed) = (field("ok=")?, field("failed=")?);
        ensure!(
            ok == self.ok && failed == self.failures.len(),
            "the loop says {done:?}, its lines {} ok and failures {:?}",
            self.ok,
            self.failures
        );
        Ok((ok, failed))
    }
}
