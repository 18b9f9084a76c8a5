//! The mesh follows a running cluster: pods restarted (a new network namespace), containers
//! restarted (a new cgroup at the same path), pods added and removed, and cluster file edits,
//! good and bad, all without restarting an agent and without a moment of plaintext.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::net::IpAddr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{
    LOG_WAIT, assert_no_plaintext_served, fetch, hold_echo, http_get, lines_for, peer_auth,
    poll_for, wait_next_conn, web_root,
};
use mesh_tests::{Cluster, Pod, PodSpec, Reload, addr, http_url};

const BODY: &[u8] = b"<h1>live</h1>\n";
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7000;
/// How long the agent may take to notice a change it watches for (netns, cgroup, pods).
const NOTICE: Duration = Duration::from_secs(2);

/// node-a: `client` (in the mesh) and `outside` (not in the mesh: a plaintext client);
/// node-b: `web`. Agents running.
fn mesh() -> Result<Cluster> {
    let cluster = common::client_outside_web()?;
    cluster.start_agents()?;
    Ok(cluster)
}

/// Mesh-wide STRICT: the workloads accept mutual TLS only.
fn strict(cluster: &Cluster) -> Result<()> {
    cluster.apply_policy(
        "strict",
        &peer_auth("default", "istio-system", None, "STRICT"),
    )
}

/// `http://ip:port/?m=marker`: served as `/` (200), and the marker is in the server's log.
fn marked_url(ip: impl Into<IpAddr>, port: u16, marker: &str) -> String {
    format!("{}?m={marker}", http_url(ip, port))
}

/// How many `connection closed` lines node-a has from `client` to `ip:port`.
fn client_conns(cluster: &Cluster, dst: &str) -> Result<usize> {
    Ok(lines_for(cluster, "node-a", dst)?
        .iter()
        .filter(|c| c.src_workload == "default/client")
        .count())
}

/// Polls (at most `within`) until `client` gets 200 with [`BODY`] from `url`; then checks that
/// node-a's agent logged that connection as mutual TLS (`seen` lines to `dst` came before).
fn mesh_get_within(
    cluster: &Cluster,
    url: &str,
    dst: &str,
    seen: usize,
    within: Duration,
) -> Result<()> {
    let client = cluster.pod("node-a", "client")?;
    poll_for(within, &format!("client gets 200 from {url}"), || {
        let got = http_get(client, url, Duration::from_millis(500))?;
        Ok(if got.is_ok_with(BODY) {
            Ok(())
        } else {
            Err(got.describe())
        })
    })
    .with_context(|| logs(cluster))?;
    let conn = wait_next_conn(cluster, "node-a", "default/client", dst, seen)?;
    ensure!(
        conn.other.get("security").and_then(|v| v.as_str()) == Some("mutual_tls"),
        "client -> {dst} did not go through the mesh: {conn:?}"
    );
    Ok(())
}

/// Both agents' last log lines, for errors.
fn logs(cluster: &Cluster) -> String {
    format!(
        "node-a: {}\nnode-b: {}",
        cluster.agent_log_tail("node-a"),
        cluster.agent_log_tail("node-b")
    )
}

/// Plaintext from `from` (not in the mesh) to `to:port`, attempt after attempt (IPv4 and IPv6
/// in turn) for `period`: every attempt must fail. Returns the markers sent.
fn plaintext_refused_for(
    cluster: &Cluster,
    from: &Pod,
    to: &Pod,
    port: u16,
    period: Duration,
) -> Result<Vec<String>> {
    let end = Instant::now() + period;
    let mut markers = Vec::new();
    while Instant::now() < end {
        let n = markers.len();
        let ip: IpAddr = if n % 2 == 0 {
            to.ipv4().into()
        } else {
            to.ipv6().into()
        };
        let marker = format!("plaintext-marker-{n}-{}", cluster.id());
        let url = marked_url(ip, port, &marker);
        let got = http_get(from, &url, Duration::from_millis(500))?;
        ensure!(
            got.exit != Some(0),
            "attempt {n}: plaintext {url} from {} was answered ({}): the workload served \
             plaintext under STRICT",
            from.name(),
            got.describe()
        );
        markers.push(marker);
        thread::sleep(Duration::from_millis(50));
    }
    Ok(markers)
}

/// Restarting web's pod (a new netns, the server started again) under STRICT never lets a
/// plaintext client through, not even before the agent has noticed; then the mesh serves it.
fn netns_recreated_under_strict(stop_agent: bool) -> Result<()> {
    let cluster = mesh()?;
    strict(&cluster)?;
    let client = cluster.pod("node-a", "client")?;
    let outside = cluster.pod("node-a", "outside")?;
    let web = cluster.pod("node-b", "web")?;
    let root = web_root(&cluster, "www", BODY)?;
    let server = web.http_server(HTTP_PORT, &root)?;
    let dst = addr(web.ipv4(), HTTP_PORT);
    fetch(client, web.ipv4(), HTTP_PORT, BODY)?;
    let seen = client_conns(&cluster, &dst)?;

    if stop_agent {
        cluster.stop_agent("node-b")?;
    }
    let old_netns = web.netns_inode()?;
    let capture = cluster.capture("node-b", "web-app-port", &format!("tcp port {HTTP_PORT}"))?;
    web.recreate_netns()?;
    drop(server);
    ensure!(
        web.netns_inode()? != old_netns,
        "the recreated netns is the old one"
    );
    let server = web.http_server(HTTP_PORT, &root)?;
    let markers = plaintext_refused_for(&cluster, outside, web, HTTP_PORT, Duration::from_secs(3))?;
    let pcap = capture.stop()?;

    assert_no_plaintext_served(&server, &pcap, outside, HTTP_PORT, "plaintext-marker", 1)
        .with_context(|| format!("{} plaintext attempts", markers.len()))?;

    if stop_agent {
        cluster.start_agent("node-b")?;
    }
    mesh_get_within(
        &cluster,
        &http_url(web.ipv4(), HTTP_PORT),
        &dst,
        seen,
        NOTICE,
    )
}

#[test]
fn netns_recreated_under_strict_never_serves_plaintext() -> Result<()> {
    netns_recreated_under_strict(false)
}

#[test]
fn netns_recreated_under_strict_never_serves_plaintext_with_agent_stopped() -> Result<()> {
    netns_recreated_under_strict(true)
}

/// Restarting client's container (a new cgroup at the same path) never lets its traffic out in
/// plaintext; once the agent has noticed, it goes through the mesh.
fn cgroup_recreated(stop_agent: bool) -> Result<()> {
    let cluster = mesh()?;
    strict(&cluster)?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let server = web.http_server(HTTP_PORT, &web_root(&cluster, "www", BODY)?)?;
    let dst = addr(web.ipv4(), HTTP_PORT);
    fetch(client, web.ipv4(), HTTP_PORT, BODY)?;
    let seen = client_conns(&cluster, &dst)?;

    if stop_agent {
        cluster.stop_agent("node-a")?;
    }
    let capture = cluster.capture("node-a", "underlay", "tcp")?;
    let old_cgroup = client.cgroup_id()?;
    client.recreate_cgroup()?;
    ensure!(
        client.cgroup_id()? != old_cgroup,
        "the recreated cgroup has the old id"
    );
    let marker = |n: usize| format!("cgroup-marker-{n}-{}", cluster.id());
    let mut failed = Vec::new();
    if stop_agent {
        for n in 0..3 {
            let url = marked_url(web.ipv4(), HTTP_PORT, &marker(n));
            let got = http_get(client, &url, Duration::from_secs(1))?;
            ensure!(
                got.exit != Some(0),
                "{url} from client's new cgroup was answered with node-a's agent stopped ({}): \
                 the restarted container bypassed the mesh",
                got.describe()
            );
            failed.push(marker(n));
        }
        cluster.start_agent("node-a")?;
    }
    // Attempts from the new cgroup until one gets through (through the mesh: checked below).
    let first = failed.len();
    let mut n = first;
    let answered = poll_for(NOTICE, "client's new cgroup gets 200 from web", || {
        let m = marker(n);
        n += 1;
        let got = http_get(
            client,
            &marked_url(web.ipv4(), HTTP_PORT, &m),
            Duration::from_millis(500),
        )?;
        if got.is_ok_with(BODY) {
            return Ok(Ok(m));
        }
        failed.push(m);
        Ok(Err(got.describe()))
    });
    let pcap = capture.stop()?;

    // Plaintext on the underlay is the worse failure: checked first, whether or not an
    // attempt got through.
    if pcap.contains(b"cgroup-marker")? {
        bail!(
            "requests of client's new cgroup crossed node-a's link in plaintext:\n{}",
            pcap.packets("frame contains \"cgroup-marker\"")?.join("\n")
        );
    }
    let answered = answered.with_context(|| logs(&cluster))?;
    // The control: the answered request did cross the link, inside HBONE.
    let hbone = pcap.count("tcp.port == 15008 && tcp.len > 0")?;
    ensure!(
        hbone >= 1,
        "no HBONE traffic on node-a's link: the capture proves nothing"
    );
    let served = server.requests()?;
    ensure!(
        served.iter().any(|l| l.contains(&answered)),
        "web did not log the answered request {answered}: {served:?}"
    );
    for m in &failed {
        ensure!(
            !served.iter().any(|l| l.contains(m.as_str())),
            "the failed attempt {m} reached web anyway: {served:?}"
        );
    }
    let conn = wait_next_conn(&cluster, "node-a", "default/client", &dst, seen)?;
    ensure!(
        conn.other.get("security").and_then(|v| v.as_str()) == Some("mutual_tls"),
        "the new cgroup's connection did not go through the mesh: {conn:?}"
    );
    Ok(())
}

#[test]
fn cgroup_recreated_is_still_captured() -> Result<()> {
    cgroup_recreated(false)
}

#[test]
fn cgroup_recreated_is_still_captured_with_agent_stopped() -> Result<()> {
    cgroup_recreated(true)
}

/// The `mesh_sk_lookup_*` links in a node's pin dir.
fn sk_lookup_links(cluster: &Cluster, node: &str) -> Result<BTreeSet<String>> {
    let dir = cluster.node(node)?.pin_dir().join("v1/links");
    let entries = fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))?;
    let mut links = BTreeSet::new();
    for e in entries {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.starts_with("mesh_sk_lookup_") {
            links.insert(name);
        }
    }
    Ok(links)
}

fn sk_lookup_link(pod: &Pod) -> Result<String> {
    Ok(format!("mesh_sk_lookup_{}", pod.netns_inode()?))
}

#[test]
fn workload_added_and_removed_live() -> Result<()> {
    let cluster = mesh()?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let _web_echo = web.tcp_echo(ECHO_PORT)?;
    let mut held = hold_echo(client, web.ipv4(), ECHO_PORT)?;
    let links = sk_lookup_links(&cluster, "node-b")?;
    let web_link = sk_lookup_link(web)?;
    ensure!(
        links == BTreeSet::from([web_link.clone()]),
        "node-b's sk_lookup links before the add: {links:?}, want [{web_link}]"
    );

    let web2 = cluster.add_pod("node-b", PodSpec::new("web2").label("app", "web2"))?;
    held.ensure_up().with_context(|| {
        format!(
            "the connection to web, across the add of web2; {}",
            logs(&cluster)
        )
    })?;
    let web2_link = sk_lookup_link(web2)?;
    let _server2 = web2.http_server(HTTP_PORT, &web_root(&cluster, "www2", BODY)?)?;
    let _web2_echo = web2.tcp_echo(ECHO_PORT)?;
    let dst2 = addr(web2.ipv4(), HTTP_PORT);
    mesh_get_within(
        &cluster,
        &http_url(web2.ipv4(), HTTP_PORT),
        &dst2,
        0,
        NOTICE,
    )?;
    poll_for(NOTICE, "node-b attaches sk_lookup for web2", || {
        let now = sk_lookup_links(&cluster, "node-b")?;
        let want = BTreeSet::from([web_link.clone(), web2_link.clone()]);
        Ok(if now == want {
            Ok(())
        } else {
            Err(format!("{now:?}, want {want:?}"))
        })
    })?;

    let held2 = hold_echo(client, web2.ipv4(), ECHO_PORT)?;
    let web2_netns = web2.netns_path();
    cluster.remove_pod("node-b", "web2")?;
    let why = held2
        .wait_broken(Duration::from_secs(5))
        .context("a connection to the removed pod")?;
    eprintln!("the connection to the removed web2 ended: {why}");
    ensure!(!web2_netns.exists(), "web2's netns is still there");
    ensure!(
        cluster.pod("node-b", "web2").is_err(),
        "web2 is still listed"
    );
    poll_for(NOTICE, "node-b detaches web2's sk_lookup", || {
        let now = sk_lookup_links(&cluster, "node-b")?;
        Ok(if now == BTreeSet::from([web_link.clone()]) {
            Ok(())
        } else {
            Err(format!("{now:?}, want only {web_link}"))
        })
    })?;

    // The connection to web, open all along, never noticed: it still carries data after the
    // removal, and it held until the end.
    held.ensure_up().with_context(|| {
        format!(
            "the connection to web, after the remove of web2; {}",
            logs(&cluster)
        )
    })?;
    let exchanged = held.finish().with_context(|| {
        format!(
            "the connection to web across the add and the remove; {}",
            logs(&cluster)
        )
    })?;
    // 1 when opened, 3 after the add, 3 after the remove: whatever the timing, at least 7.
    ensure!(exchanged >= 7, "only {exchanged} echo exchanges");
    Ok(())
}

/// A metadata edit of a running pod (a new label) reaches the agents, and the pod's open
/// connections stay: nothing they depend on changed.
#[test]
fn workload_metadata_update_keeps_its_connections() -> Result<()> {
    let cluster = mesh()?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let _echo = web.tcp_echo(ECHO_PORT)?;
    let mut held = hold_echo(client, web.ipv4(), ECHO_PORT)?;

    let web_v2 = cluster.update_pod("node-b", "web", |spec| spec.label("version", "v2"))?;
    ensure!(
        web_v2.labels().get("version").map(String::as_str) == Some("v2")
            && web.labels().get("version").is_none(),
        "update_pod: new labels {:?}, old {:?}",
        web_v2.labels(),
        web.labels()
    );
    let file = cluster.cluster_file_text()?;
    ensure!(
        file.contains("version: v2"),
        "the label is not in the cluster file:\n{file}"
    );
    // The agents have loaded the change (update_pod waited for that); data still flows.
    held.ensure_up().with_context(|| {
        format!(
            "the connection to web across web's label change; {}",
            logs(&cluster)
        )
    })?;
    let exchanged = held.finish()?;
    ensure!(exchanged >= 4, "only {exchanged} echo exchanges");
    Ok(())
}

/// A label change is a policy change for the workload: a DENY policy that now selects it
/// closes its open connections, as a policy edit would.
#[test]
fn a_label_change_reevaluates_policy_on_open_connections() -> Result<()> {
    let cluster = mesh()?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let _echo = web.tcp_echo(ECHO_PORT)?;
    cluster.apply_policy(
        "deny-locked",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-locked\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      locked: \"yes\"\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/client\"]\n",
    )?;
    let mut held = hold_echo(client, web.ipv4(), ECHO_PORT)?;
    held.ensure_up()?;
    cluster.update_pod("node-b", "web", |spec| spec.label("locked", "yes"))?;
    let why = held
        .wait_broken(NOTICE)
        .context("the connection to web after a label made the DENY policy select it")?;
    eprintln!("the held connection ended: {why}");
    cluster.wait_for_log(
        "node-b",
        |l| l["message"] == "policy changed: closing a connection it no longer allows",
        LOG_WAIT,
    )?;
    Ok(())
}

#[test]
fn bad_cluster_file_edit_keeps_last_good_state() -> Result<()> {
    let cluster = mesh()?;
    strict(&cluster)?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let _server = web.http_server(HTTP_PORT, &web_root(&cluster, "www", BODY)?)?;
    let dst = addr(web.ipv4(), HTTP_PORT);
    fetch(client, web.ipv4(), HTTP_PORT, BODY)?;

    let good = cluster.cluster_file_text()?;
    let item = format!("- {}", web.ipv4());
    let index = good
        .lines()
        .position(|l| l.trim() == item)
        .with_context(|| format!("no line `{item}` in the cluster file:\n{good}"))?;
    let bad_ip = format!("10.2.0.{}", 300);
    let bad: String = good
        .lines()
        .enumerate()
        .map(|(k, l)| {
            if k == index {
                l.replace(&web.ipv4().to_string(), &bad_ip)
            } else {
                l.to_owned()
            }
        })
        .map(|l| l + "\n")
        .collect();
    let line = index + 1;

    let verdicts = cluster.write_raw_cluster_file(&bad)?;
    ensure!(
        verdicts.len() == 2,
        "verdicts from {:?}, want both nodes",
        verdicts.keys()
    );
    for (node, verdict) in &verdicts {
        match verdict {
            Reload::Rejected(l) => {
                let text = l.to_string();
                ensure!(
                    text.contains(&format!("cluster.yaml:{line}:")),
                    "{node}'s rejection should point at cluster.yaml:{line}: (`{bad_ip}`): {text}"
                );
            }
            Reload::Loaded(l) => bail!("{node}'s agent loaded a cluster file with {bad_ip}: {l}"),
        }
    }

    // The last good state still serves: through the mesh (STRICT would refuse anything else).
    let seen = client_conns(&cluster, &dst)?;
    mesh_get_within(
        &cluster,
        &http_url(web.ipv4(), HTTP_PORT),
        &dst,
        seen,
        LOG_WAIT,
    )?;

    // And a good file is taken again.
    for (node, verdict) in cluster.write_raw_cluster_file(&good)? {
        ensure!(
            matches!(verdict, Reload::Loaded(_)),
            "{node}'s agent did not load the good file again: {verdict:?}"
        );
    }
    Ok(())
}

#[test]
fn readiness_reports_unserved_workload() -> Result<()> {
    let cluster = mesh()?;
    let web = cluster.pod("node-b", "web")?;
    let root = web_root(&cluster, "www", BODY)?;
    let server = web.http_server(HTTP_PORT, &root)?;
    let ready = cluster.readiness("node-b")?;
    ensure!(ready.0 == 200, "node-b not ready at the start: {ready:?}");

    web.delete_netns()?;
    drop(server);
    poll_for(NOTICE, "node-b reports default/web unserved", || {
        let (code, body) = cluster.readiness("node-b")?;
        Ok(if code == 503 && body.contains("default/web") {
            Ok(())
        } else {
            Err(format!("{code} {body:?}"))
        })
    })?;

    web.recreate_netns()?;
    let _server = web.http_server(HTTP_PORT, &root)?;
    poll_for(NOTICE, "node-b ready again", || {
        let (code, body) = cluster.readiness("node-b")?;
        Ok(if code == 200 {
            Ok(())
        } else {
            Err(format!("{code} {body:?}"))
        })
    })?;
    let dst = addr(web.ipv4(), HTTP_PORT);
    let seen = client_conns(&cluster, &dst)?;
    mesh_get_within(
        &cluster,
        &http_url(web.ipv4(), HTTP_PORT),
        &dst,
        seen,
        NOTICE,
    )
}
