//! Pods come and go on a node by the hundred while the mesh runs: the node's agent serves each
//! one, and once they are gone it holds nothing more than before (descriptors, memory, map
//! entries, pinned links), and the workloads that stayed are served as before.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{LOG_WAIT, fd_count, http_get, poll_for, rss_kib, web_root};
use mesh_tests::{Cluster, NodeSpec, Pod, PodSpec, Reload, addr, http_url, run_with_timeout};
use serde_json::Value;

const BODY: &[u8] = b"<h1>churn</h1>\n";
const HTTP_PORT: u16 = 8080;
/// 200 add/remove cycles, as 20 rounds of 10 pods of node-b added, then removed.
///
/// Each cluster file edit costs one of the agents' 500 ms polls, so 400 edits (one per add and
/// one per remove) would take 200 s. To stay near a minute, one round in
/// [`SINGLE_EDIT_EVERY`] adds and removes its pods one edit each (`add_pod`/`remove_pod`
/// of enrolled pods: each waits until both agents loaded it); the other rounds make their ten
/// pods with `add_pod` (not enrolled yet, so no edit), enrol all ten with one edit, and drop
/// all ten with one edit (the first `remove_pod` rewrites the file without them; the
/// other nine find it already so). Every pod goes through a whole lifecycle in node-b's agent
/// either way, and the batched rounds also have ten workloads appear and go in one reload.
const ROUNDS: usize = 20;
const PODS_PER_ROUND: usize = 10;
const SINGLE_EDIT_EVERY: usize = 5;
/// How long after its `add_pod` returns a churned pod must answer through the mesh.
const SERVED_WITHIN: Duration = Duration::from_secs(2);
/// How long the agent may take to give back what the churn took.
const SETTLE: Duration = Duration::from_secs(5);
/// The pinned maps whose entries belong to the node's workloads.
const MAPS: [&str; 3] = ["MESH_ENROLLED", "MESH_INBOUND_ENROLLED", "MESH_GUARDED_IPS"];
/// Descriptors the agent may hold more or fewer at the end than at the start (a pooled
/// connection opened or idled out meanwhile, a namespace file being read by the reconciler).
const FD_SLACK: i64 = 2;
const RSS_SLACK_KIB: u64 = 4 * 1024;

/// What the node's agent holds, as seen from outside it.
#[derive(Debug, Clone, PartialEq)]
struct Holdings {
    pid: u32,
    fds: usize,
    rss_kib: u64,
    /// Map name -> the keys of its entries (as bpftool prints them).
    maps: BTreeMap<&'static str, BTreeSet<String>>,
    links: BTreeSet<String>,
}

impl Holdings {
    fn of(cluster: &Cluster, node: &str) -> Result<Self> {
        let pid = agent_pid(cluster, node)?;
        let pin_dir = cluster.node(node)?.pin_dir().join("v1");
        let mut maps = BTreeMap::new();
        for name in MAPS {
            maps.insert(name, map_keys(&pin_dir.join("maps").join(name))?);
        }
        Ok(Holdings {
            pid,
            fds: fd_count(pid)?,
            rss_kib: rss_kib(pid)?,
            maps,
            links: dir_names(&pin_dir.join("links"))?,
        })
    }

    fn summary(&self) -> String {
        let maps: Vec<String> = self
            .maps
            .iter()
            .map(|(name, keys)| format!("{name}={}", keys.len()))
            .collect();
        format!(
            "pid {} fds {} rss {} KiB maps [{}] links {:?}",
            self.pid,
            self.fds,
            self.rss_kib,
            maps.join(" "),
            self.links
        )
    }

    /// Why `self` (now) is not back to `start`, or None.
    fn differences(&self, start: &Holdings) -> Option<String> {
        let mut why = Vec::new();
        if self.pid != start.pid {
            why.push(format!(
                "the agent is another process ({} then, {} now)",
                start.pid, self.pid
            ));
        }
        let fds = self.fds as i64 - start.fds as i64;
        if fds.abs() > FD_SLACK {
            why.push(format!(
                "{} open descriptors, {} at the start ({fds:+})",
                self.fds, start.fds
            ));
        }
        if self.rss_kib > start.rss_kib + RSS_SLACK_KIB {
            why.push(format!(
                "VmRSS {} KiB, {} KiB at the start (+{} KiB, more than +{RSS_SLACK_KIB})",
                self.rss_kib,
                start.rss_kib,
                self.rss_kib - start.rss_kib
            ));
        }
        for (name, keys) in &self.maps {
            let before = &start.maps[name];
            if keys != before {
                why.push(format!(
                    "{name} has {} entries, {} at the start; added {:?}, gone {:?}",
                    keys.len(),
                    before.len(),
                    keys.difference(before).collect::<Vec<_>>(),
                    before.difference(keys).collect::<Vec<_>>()
                ));
            }
        }
        if self.links != start.links {
            why.push(format!(
                "pinned links {:?}, at the start {:?}",
                self.links, start.links
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// The PID of the node's agent: the one process in the node's `agent` cgroup.
fn agent_pid(cluster: &Cluster, node: &str) -> Result<u32> {
    let procs = cluster.node(node)?.agent_cgroup().join("cgroup.procs");
    let text = fs::read_to_string(&procs).with_context(|| format!("read {}", procs.display()))?;
    let pids: Vec<u32> = text
        .split_whitespace()
        .map(|p| {
            p.parse()
                .with_context(|| format!("{p:?} in {}", procs.display()))
        })
        .collect::<Result<_>>()?;
    match pids[..] {
        [pid] => Ok(pid),
        _ => bail!(
            "{}: want exactly one process (the agent), found {pids:?}",
            procs.display()
        ),
    }
}

/// The keys of a pinned map's entries: `bpftool map dump pinned PATH -j`, one JSON object per
/// entry.
fn map_keys(path: &Path) -> Result<BTreeSet<String>> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["map", "dump", "pinned"]).arg(path).arg("-j");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(10))?;
    ensure!(
        out.success(),
        "bpftool map dump pinned {}: {}",
        path.display(),
        out.stderr_str().trim()
    );
    let dump: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool's dump of {}: {}", path.display(), out.stdout_str()))?;
    let entries = dump
        .as_array()
        .with_context(|| format!("bpftool's dump of {} is not a list: {dump}", path.display()))?;
    Ok(entries
        .iter()
        .map(|e| {
            e.get("formatted")
                .and_then(|f| f.get("key"))
                .or_else(|| e.get("key"))
                .unwrap_or(e)
                .to_string()
        })
        .collect())
}

fn dir_names(dir: &Path) -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for e in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        names.insert(e?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// `client` gets [`BODY`] from `url` before `deadline` (attempts of at most 500 ms each).
fn get_before(cluster: &Cluster, url: &str, deadline: Instant) -> Result<Duration> {
    let client = cluster.pod("node-a", "client")?;
    let started = Instant::now();
    let within = deadline.saturating_duration_since(started);
    poll_for(within, &format!("client gets 200 from {url}"), || {
        let got = http_get(client, url, Duration::from_millis(500))?;
        Ok(if got.is_ok_with(BODY) {
            Ok(())
        } else {
            Err(got.describe())
        })
    })?;
    Ok(started.elapsed())
}

/// How many `connection closed` lines node-a has from client to one of `dsts`.
fn client_lines(cluster: &Cluster, dsts: &[String]) -> Result<usize> {
    Ok(cluster
        .connections("node-a")?
        .iter()
        .filter(|c| c.src_workload == "default/client" && dsts.contains(&c.dst))
        .count())
}

/// node-a's `connection closed` line number `seen` from client to one of `dsts` says the
/// connection went through the mesh.
fn ensure_mesh(cluster: &Cluster, dsts: &[String], seen: usize) -> Result<()> {
    let conn = poll_for(
        LOG_WAIT,
        &format!("node-a logs a new connection from client to {dsts:?}"),
        || {
            let lines: Vec<_> = cluster
                .connections("node-a")?
                .into_iter()
                .filter(|c| c.src_workload == "default/client" && dsts.contains(&c.dst))
                .collect();
            Ok(lines
                .get(seen)
                .cloned()
                .ok_or_else(|| format!("{} lines", lines.len())))
        },
    )?;
    ensure!(
        conn.other.get("security").and_then(Value::as_str) == Some("mutual_tls"),
        "client -> {} did not go through the mesh: {conn:?}",
        conn.dst
    );
    Ok(())
}

/// Puts `pods` (made with `enrolled(false)`) into `node`'s workloads with one cluster file edit,
/// and waits until both agents loaded it.
fn enrol(cluster: &Cluster, node: &str, pods: &[&Pod]) -> Result<()> {
    let text = cluster.cluster_file_text()?;
    let mut doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).context("parse the harness's cluster file")?;
    let workloads = doc["nodes"]
        .as_sequence_mut()
        .context("no nodes in the cluster file")?
        .iter_mut()
        .find(|n| n["name"].as_str() == Some(node))
        .with_context(|| format!("no node {node} in the cluster file"))?["workloads"]
        .as_sequence_mut()
        .with_context(|| format!("no workloads for {node} in the cluster file"))?;
    for pod in pods {
        workloads.push(serde_yaml_ng::to_value(serde_json::json!({
            "name": pod.name(),
            "namespace": pod.namespace(),
            "serviceAccount": pod.service_account(),
            "ips": pod.ips().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "netns": pod.netns_path(),
            "cgroup": pod.cgroup(),
        }))?);
    }
    let verdicts = cluster.write_raw_cluster_file(&serde_yaml_ng::to_string(&doc)?)?;
    ensure!(
        verdicts.len() == 2,
        "verdicts from {:?}, want both agents",
        verdicts.keys()
    );
    for (node, verdict) in verdicts {
        ensure!(
            matches!(verdict, Reload::Loaded(_)),
            "{node}'s agent did not load the file enrolling {} pods: {verdict:?}",
            pods.len()
        );
    }
    Ok(())
}

/// `pod` (just added, its add loaded by both agents at `added`) answers client through the
/// mesh within [`SERVED_WITHIN`]; returns how long after `added` it answered.
fn probe(
    cluster: &Cluster,
    pod: &Pod,
    root: &Path,
    added: Instant,
    round: usize,
) -> Result<Duration> {
    let _server = pod.http_server(HTTP_PORT, root)?;
    let dsts = [addr(pod.ipv4(), HTTP_PORT)];
    let seen = client_lines(cluster, &dsts)?;
    get_before(
        cluster,
        &http_url(pod.ipv4(), HTTP_PORT),
        added + SERVED_WITHIN,
    )
    .with_context(|| {
        format!(
            "round {round}: {} not served within {SERVED_WITHIN:?} of its add; node-b: {}",
            pod.name(),
            cluster.agent_log_tail("node-b")
        )
    })?;
    let answered = added.elapsed();
    ensure_mesh(cluster, &dsts, seen).with_context(|| format!("round {round}"))?;
    Ok(answered)
}

/// node-b's agent holds `extra` more workloads than at `start`: one enrolled cgroup, two
/// inbound-enrolled and guarded IPs and one `sk_lookup` link each.
fn during_churn(cluster: &Cluster, start: &Holdings, extra: usize) -> Result<()> {
    poll_for(
        SERVED_WITHIN,
        &format!("node-b's pinned state shows {extra} more workloads"),
        || {
            let now = Holdings::of(cluster, "node-b")?;
            let want = |name: &str, per: usize| start.maps[name].len() + per * extra;
            let links = |h: &Holdings| {
                h.links
                    .iter()
                    .filter(|l| l.starts_with("mesh_sk_lookup_"))
                    .count()
            };
            Ok(
                if now.maps["MESH_ENROLLED"].len() == want("MESH_ENROLLED", 1)
                    && now.maps["MESH_INBOUND_ENROLLED"].len() == want("MESH_INBOUND_ENROLLED", 2)
                    && now.maps["MESH_GUARDED_IPS"].len() == want("MESH_GUARDED_IPS", 2)
                    && links(&now) == links(start) + extra
                {
                    eprintln!(
                        "node-b's agent with {extra} churned pods: {}",
                        now.summary()
                    );
                    Ok(())
                } else {
                    Err(now.summary())
                },
            )
        },
    )
}

#[test]
fn churn_leaves_nothing_behind() -> Result<()> {
    let test_started = Instant::now();
    let cluster = Cluster::builder()
        .node(NodeSpec::new("node-a").pod(PodSpec::new("client")))
        .node(NodeSpec::new("node-b").pod(PodSpec::new("web")))
        .build()?;
    cluster.start_agents()?;
    let web = cluster.pod("node-b", "web")?;
    let root = web_root(&cluster, "www", BODY)?;
    let _web_server = web.http_server(HTTP_PORT, &root)?;
    // By name, as a client would (the pods' hosts file has both of web's addresses).
    let web_url = format!("http://web:{HTTP_PORT}/");
    let web_dsts = [addr(web.ipv4(), HTTP_PORT), addr(web.ipv6(), HTTP_PORT)];

    // The mesh works before the churn, and node-b holds an HBONE connection from node-a (pooled
    // for 60 s) then as it will at the end.
    let seen = client_lines(&cluster, &web_dsts)?;
    get_before(&cluster, &web_url, Instant::now() + Duration::from_secs(5))?;
    ensure_mesh(&cluster, &web_dsts, seen)?;
    let start = Holdings::of(&cluster, "node-b")?;
    let start_a = Holdings::of(&cluster, "node-a")?;
    eprintln!("node-b's agent at the start: {}", start.summary());
    eprintln!("node-a's agent at the start: {}", start_a.summary());
    ensure!(
        start.maps.values().all(|keys| !keys.is_empty())
            && start.links.iter().any(|l| l.starts_with("mesh_sk_lookup_")),
        "node-b's pinned state at the start does not show web being served: {}",
        start.summary()
    );

    let churn_started = Instant::now();
    let mut served_in = Vec::new();
    for round in 0..ROUNDS {
        let names: Vec<String> = (0..PODS_PER_ROUND)
            .map(|k| format!("churn-{}", round * PODS_PER_ROUND + k))
            .collect();
        let single = round % SINGLE_EDIT_EVERY == 0;
        // One pod of each round, a different position each time, is asked for a page right
        // after its add: it is really served, through the mesh.
        let probed = round % PODS_PER_ROUND;
        if single {
            for (k, name) in names.iter().enumerate() {
                let pod = cluster
                    .add_pod("node-b", PodSpec::new(name))
                    .with_context(|| format!("round {round}: add {name}"))?;
                if k == probed {
                    served_in.push(probe(&cluster, pod, &root, Instant::now(), round)?);
                }
            }
        } else {
            let mut pods = Vec::new();
            for name in &names {
                pods.push(
                    cluster
                        .add_pod("node-b", PodSpec::new(name).enrolled(false))
                        .with_context(|| format!("round {round}: make pod {name}"))?,
                );
            }
            enrol(&cluster, "node-b", &pods).with_context(|| format!("round {round}"))?;
            served_in.push(probe(&cluster, pods[probed], &root, Instant::now(), round)?);
            if round == 1 {
                // The control: what is measured does show the churned pods while they live.
                during_churn(&cluster, &start, pods.len())?;
            }
        }
        for name in &names {
            cluster
                .remove_pod("node-b", name)
                .with_context(|| format!("round {round}: remove {name}"))?;
        }
    }
    let churn_took = churn_started.elapsed();
    served_in.sort();
    eprintln!(
        "churn: {} pods added and removed in {churn_took:?}; probed pods answered {:?} to {:?} \
         after their add",
        ROUNDS * PODS_PER_ROUND,
        served_in.first(),
        served_in.last()
    );

    // The pods that stayed are served as before.
    let seen = client_lines(&cluster, &web_dsts)?;
    get_before(&cluster, &web_url, Instant::now() + Duration::from_secs(5)).with_context(|| {
        format!(
            "client -> web after the churn; {}",
            cluster.agent_log_tail("node-b")
        )
    })?;
    ensure_mesh(&cluster, &web_dsts, seen).context("client -> web after the churn")?;

    let mut last = None;
    let back = poll_for(
        SETTLE,
        "node-b's agent back to what it held at the start",
        || {
            let now = Holdings::of(&cluster, "node-b")?;
            let why = now.differences(&start);
            last = Some(now.clone());
            Ok(match why {
                None => Ok(now),
                Some(why) => Err(why),
            })
        },
    );
    if let Some(now) = &last {
        eprintln!("node-b's agent at the end: {}", now.summary());
    }
    match Holdings::of(&cluster, "node-a") {
        Ok(a) => eprintln!("node-a's agent at the end (not checked): {}", a.summary()),
        Err(e) => eprintln!("node-a's agent at the end: {e:#}"),
    }
    back?;
    eprintln!("test took {:?}", test_started.elapsed());
    Ok(())
}
