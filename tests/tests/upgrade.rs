//! Upgrading an agent in place: a second agent for the node starts beside the first, takes over,
//! and the first drains and exits, while a client keeps opening connections through the node.
//! And `uninstall` never pulls the capture from under a running agent.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{client_and_web, web_root};
use mesh_tests::{Cluster, agent_bin, http_url, run_with_timeout, sys};

/// Opens a new connection every 50 ms for `secs` seconds (20/s) and writes `ok fail` to `out`.
const LOAD: &str = r#"
import sys, time, urllib.request
url, secs, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
ok = fail = 0
errors = []
end = time.time() + secs
while time.time() < end:
    started = time.time()
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            r.read()
        ok += 1
    except Exception as e:
        fail += 1
        errors.append(repr(e))
    time.sleep(max(0.0, 0.05 - (time.time() - started)))
open(out, "w").write(f"{ok} {fail}\n" + "\n".join(errors[:5]))
"#;

/// The second agent's admin ports, so the test can ask it (and only it) whether it is ready.
const NEW_READINESS: &str = "127.0.0.1:15121";

#[test]
fn a_second_agent_takes_over_without_a_refused_connection() -> Result<()> {
    let cluster = client_and_web()?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let root = web_root(&cluster, "www", b"hello\n")?;
    // A 3 MiB file fetched at 1 MiB/s: a transfer that starts on the old agent and outlives it.
    fs::write(root.join("big"), vec![b'x'; 3 << 20])?;
    let _server = web.http_server(8080, &root)?;

    let script = cluster.workdir().join("load.py");
    fs::write(&script, LOAD)?;
    let result = cluster.workdir().join("load.out");
    let mut load = client.spawn(
        "python3",
        [
            script.display().to_string(),
            http_url(web.ipv4(), 8080),
            "10".into(),
            result.display().to_string(),
        ],
    )?;
    let big = cluster.workdir().join("big.out");
    let mut transfer = client.spawn(
        "curl",
        [
            "-sS".to_owned(),
            "--limit-rate".into(),
            "1M".into(),
            "-o".into(),
            big.display().to_string(),
            format!("{}big", http_url(web.ipv4(), 8080)),
        ],
    )?;
    thread::sleep(Duration::from_secs(1));

    // The upgrade: the new agent starts while the old one runs, then the old one stops.
    let _new_agent = start_second_agent(&cluster, "node-a")?;
    wait_ready(&cluster, "node-a", Duration::from_secs(20))?;
    let status = cluster.stop_agent("node-a")?;
    ensure!(status.success(), "the old agent exited with {status}");

    let load_status = load.child_mut().wait()?;
    ensure!(
        load_status.success(),
        "the load script failed: {load_status}"
    );
    let outcome = fs::read_to_string(&result)?;
    let mut counts = outcome.split_whitespace();
    let ok: u32 = counts.next().context("no count")?.parse()?;
    let fail: u32 = counts.next().context("no count")?.parse()?;
    ensure!(
        fail == 0,
        "{fail} of {} connections failed across the upgrade: {outcome}",
        ok + fail
    );
    ensure!(ok >= 100, "only {ok} connections in 10 s");
    let transfer_status = transfer.child_mut().wait()?;
    ensure!(
        transfer_status.success(),
        "the transfer that started on the old agent failed: {transfer_status}"
    );
    ensure!(
        fs::metadata(&big)?.len() == 3 << 20,
        "the transfer that started on the old agent is incomplete"
    );
    Ok(())
}

#[test]
fn uninstall_refuses_while_an_agent_runs_and_names_an_unknown_node() -> Result<()> {
    let cluster = client_and_web()?;
    let pin_dir = cluster.node("node-a")?.pin_dir().to_owned();
    let out = uninstall(&pin_dir)?;
    ensure!(
        !out.success() && out.stderr_str().contains("an agent is running"),
        "uninstall with the agent running: {:?} {}",
        out.code(),
        out.stderr_str()
    );
    ensure!(
        pin_dir.join("v1/links/mesh_connect4").exists(),
        "the refused uninstall removed the capture"
    );
    let missing = pin_dir.with_file_name("no-such-node");
    let out = uninstall(&missing)?;
    ensure!(
        !out.success() && out.stderr_str().contains("nothing is installed"),
        "uninstall of an unknown node: {:?} {}",
        out.code(),
        out.stderr_str()
    );
    cluster.stop_agent("node-a")?;
    let out = uninstall(&pin_dir)?;
    ensure!(
        out.success(),
        "uninstall with no agent: {}",
        out.stderr_str()
    );
    ensure!(!pin_dir.exists(), "uninstall left {}", pin_dir.display());
    Ok(())
}

fn uninstall(pin_dir: &Path) -> Result<mesh_tests::RunOutput> {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("uninstall").arg("--bpf-pin-dir").arg(pin_dir);
    run_with_timeout(&mut cmd, Duration::from_secs(20))
}

/// Starts another `mesh-agent run` for `node`, beside the running one, with its own readiness
/// port; its log goes to the node's agent log.
fn start_second_agent(cluster: &Cluster, node: &str) -> Result<mesh_tests::ChildGuard> {
    let n = cluster.node(node)?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cluster.agent_log_path(node))?;
    let mut cmd = Command::new(agent_bin());
    cmd.arg("run")
        .arg("--cluster")
        .arg(cluster.cluster_file())
        .args(["--node", node, "--bpf-pin-dir"])
        .arg(n.pin_dir())
        .args(["--log-format", "json", "--readiness-addr", NEW_READINESS])
        .args([
            "--admin-addr",
            "127.0.0.1:15100",
            "--metrics-addr",
            "127.0.0.1:15120",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    sys::place(&mut cmd, &n.agent_cgroup(), &n.netns_path())?;
    let child = cmd.spawn().context("spawn the second agent")?;
    Ok(mesh_tests::ChildGuard::new(
        child,
        format!("second agent of {node}"),
    ))
}

fn wait_ready(cluster: &Cluster, node: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut curl = cluster.spawn_in_node(
            node,
            "curl",
            [
                "-sf",
                "-o",
                "/dev/null",
                &format!("http://{NEW_READINESS}/healthz/ready"),
            ],
        )?;
        if curl.child_mut().wait()?.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the second agent is not ready after {timeout:?}; {}",
                cluster.agent_log_tail(node)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}
