//! The agents' memory with many idle connections held open through the mesh.
//!
//! The `client` pod (node-a) opens N connections to a single-thread echo server in the `server`
//! pod (node-b), so each one crosses both agents (HBONE), echoes 1 byte on each to prove it is
//! established end to end, and then holds them. The agents' current RSS (`VmRSS`) is read before
//! (idle), once all are open and settled, and after they are closed again.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use mesh_tests::{ChildGuard, Cluster, Pod};
use serde_json::Value;

use crate::PYTHON;
use crate::usage::read_pids;

/// Connections held open, in both normal and `--quick` runs.
pub const IDLE_CONNECTIONS: usize = 10_000;
/// The many-connection echo server's port in the server pod.
const MANY_ECHO_PORT: u16 = 7002;
/// Opening 10,000 connections one after the other takes seconds; this is only a safety net.
const OPEN_TIMEOUT: Duration = Duration::from_secs(300);
/// Time for the agents to finish per-connection work (logs, pools) before RSS is read.
pub const SETTLE: Duration = Duration::from_secs(2);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);

/// One node's agent: current RSS (KiB) and open file descriptors, summed over its processes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentFootprint {
    pub rss_kib: u64,
    pub fds: u64,
}

/// One node's agent over the measurement.
#[derive(Debug, Clone)]
pub struct AgentMemory {
    pub node: String,
    /// Right after the agents were ready, before any traffic.
    pub at_start: Option<AgentFootprint>,
    /// After the benchmark's tests, just before the connections are opened.
    pub idle: AgentFootprint,
    pub held: AgentFootprint,
    pub closed: AgentFootprint,
}

impl AgentMemory {
    /// RSS growth per held connection, KiB.
    pub fn per_connection_kib(&self, n: usize) -> f64 {
        (self.held.rss_kib as f64 - self.idle.rss_kib as f64) / n.max(1) as f64
    }
}

#[derive(Debug, Clone)]
pub struct IdleConnections {
    pub n: usize,
    /// How long the client took to open and echo on all of them.
    pub open_s: f64,
    /// The client's open-files limit after raising it.
    pub client_nofile: u64,
    pub agents: Vec<AgentMemory>,
}

impl IdleConnections {
    /// The agent with the larger RSS while the connections were held.
    pub fn largest(&self) -> Option<&AgentMemory> {
        self.agents.iter().max_by_key(|a| a.held.rss_kib)
    }
}

/// Both agents' footprint now, by node name.
pub fn agent_footprints(cluster: &Cluster) -> Result<BTreeMap<String, AgentFootprint>> {
    cluster
        .nodes()
        .iter()
        .map(|n| {
            let pids = read_pids(&n.agent_cgroup().join("cgroup.procs"));
            if pids.is_empty() {
                bail!("no agent process in {}'s agent cgroup", n.name());
            }
            let mut total = AgentFootprint::default();
            for pid in pids {
                total.rss_kib += vm_rss_kib(pid)
                    .with_context(|| format!("VmRSS of {}'s agent (pid {pid})", n.name()))?;
                total.fds += open_fds(pid).unwrap_or(0);
            }
            Ok((n.name().to_owned(), total))
        })
        .collect()
}

/// Opens `n` connections from `client` to `server` through the mesh, holds them and reads the
/// agents' memory; `at_start` is the agents' footprint before any traffic.
pub fn measure(
    cluster: &Cluster,
    client: &Pod,
    server: &Pod,
    helper: &Path,
    n: usize,
    at_start: &BTreeMap<String, AgentFootprint>,
) -> Result<IdleConnections> {
    let server_log = cluster.workdir().join("server-many-echo.log");
    let _server = start_many_echo_server(server, helper, &server_log)?;
    let idle = agent_footprints(cluster)?;

    let mut holder = client.spawn_piped(
        PYTHON,
        [
            "-u".to_string(),
            helper.to_string_lossy().into_owned(),
            "hold".into(),
            server.ipv4().to_string(),
            MANY_ECHO_PORT.to_string(),
            n.to_string(),
        ],
    )?;
    let (held_n, open_s, client_nofile) = first_stdout_line(&mut holder, OPEN_TIMEOUT)
        .and_then(|line| parse_hold_reply(&line))
        .map_err(|e| anyhow!("{e:#}; {}", diagnose_open_failure(cluster, &server_log)))?;
    if held_n != n {
        bail!("the client holds {held_n} connections, not {n}");
    }
    thread::sleep(SETTLE);
    let held = agent_footprints(cluster)?;

    close_and_wait(&mut holder, CLOSE_TIMEOUT)?;
    thread::sleep(SETTLE);
    let closed = agent_footprints(cluster)?;

    let agents = idle
        .iter()
        .map(|(node, idle)| {
            let get = |m: &BTreeMap<String, AgentFootprint>| {
                m.get(node)
                    .copied()
                    .ok_or_else(|| anyhow!("agent of {node} gone during the measurement"))
            };
            Ok(AgentMemory {
                node: node.clone(),
                at_start: at_start.get(node).copied(),
                idle: *idle,
                held: get(&held)?,
                closed: get(&closed)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(IdleConnections {
        n,
        open_s,
        client_nofile,
        agents,
    })
}

/// Fails unless both agents still run and the mesh path still carries new connections.
pub fn check_agents_healthy(cluster: &Cluster, probe: impl FnOnce() -> Result<f64>) -> Result<()> {
    for n in cluster.nodes() {
        if !cluster.agent_running(n.name()) {
            bail!(
                "agent of {} is not running; {}",
                n.name(),
                cluster.agent_log_tail(n.name())
            );
        }
    }
    probe().context("new connections on the mesh path")?;
    Ok(())
}

/// The selectors echo server: one thread copes with thousands of connections, where the
/// thread-per-connection one of the other tests would need thousands of threads.
fn start_many_echo_server(server: &Pod, helper: &Path, log: &Path) -> Result<ChildGuard> {
    // Through sh for the redirection: accept errors (EMFILE) go to the log, for the report.
    let mut g = server.spawn(
        "/bin/sh",
        [
            "-c".to_string(),
            format!(
                "exec {PYTHON} -u '{}' many-server {MANY_ECHO_PORT} 2>'{}'",
                helper.display(),
                log.display()
            ),
        ],
    )?;
    server.wait_for_port(&mut g, MANY_ECHO_PORT)?;
    Ok(g)
}

/// The first line the child prints, waiting at most `timeout` (the child keeps running).
fn first_stdout_line(child: &mut ChildGuard, timeout: Duration) -> Result<String> {
    let stdout = child
        .child_mut()
        .stdout
        .take()
        .context("hold client's stdout is not piped")?;
    let (tx, rx) = mpsc::channel();
    // A thread, because a pipe read cannot time out; it ends when the child is killed.
    thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(line)) if !line.trim().is_empty() => Ok(line),
        Ok(Ok(_)) => bail!(
            "hold client exited without a result ({})",
            exit_status(child)
        ),
        Ok(Err(e)) => Err(e).context("read the hold client's output"),
        Err(_) => bail!("hold client gave no result within {timeout:?}"),
    }
}

fn exit_status(child: &mut ChildGuard) -> String {
    match child.child_mut().try_wait() {
        Ok(Some(status)) => status.to_string(),
        Ok(None) => "still running".into(),
        Err(e) => format!("status unknown: {e}"),
    }
}

/// (held, open_s, nofile) from the client's JSON line; its own error becomes ours.
fn parse_hold_reply(line: &str) -> Result<(usize, f64, u64)> {
    let v: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("hold client output not JSON: {line}"))?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        let errno = v.get("errno").and_then(Value::as_i64);
        bail!(
            "hold client: {err}{}, after {} connections were established",
            errno.map_or(String::new(), |n| format!(" (errno {n})")),
            v.get("held").and_then(Value::as_u64).unwrap_or(0)
        );
    }
    let field = |k: &str| v.get(k).ok_or_else(|| anyhow!("no {k} in {v}"));
    let held = field("held")?
        .as_u64()
        .ok_or_else(|| anyhow!("held is not a count in {v}"))?;
    let open_s = field("open_s")?
        .as_f64()
        .ok_or_else(|| anyhow!("open_s is not a number in {v}"))?;
    let nofile = field("nofile")?.as_u64().unwrap_or(0);
    Ok((usize::try_from(held)?, open_s, nofile))
}

/// Closes the child's stdin, which tells it to close its connections and exit, and waits.
fn close_and_wait(child: &mut ChildGuard, timeout: Duration) -> Result<()> {
    drop(child.child_mut().stdin.take());
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.child_mut().try_wait()? {
            if !status.success() {
                bail!("hold client exited with {status} while closing");
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("hold client still running {timeout:?} after its stdin closed");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Where the connections stopped: evidence of running out of file descriptors (EMFILE) on the
/// server or in either agent, and how many descriptors each agent holds (a connection accepted
/// by node-a's agent but never delivered by node-b's shows as a difference).
fn diagnose_open_failure(cluster: &Cluster, server_log: &Path) -> String {
    let mut found = Vec::new();
    for n in cluster.nodes() {
        let log = fs::read_to_string(cluster.agent_log_path(n.name())).unwrap_or_default();
        let lines = log.lines().filter(|l| mentions_emfile(l)).count();
        if lines > 0 {
            found.push(format!(
                "{}'s agent logged {lines} lines about too many open files",
                n.name()
            ));
        }
    }
    let server = fs::read_to_string(server_log).unwrap_or_default();
    if let Some(first) = server.lines().find(|l| l.contains("accept failed")) {
        found.push(format!("the echo server: {first}"));
    }
    if found.is_empty() {
        found.push(
            "no sign of running out of file descriptors in the agents' logs or the echo server's"
                .into(),
        );
    }
    if let Ok(now) = agent_footprints(cluster) {
        found.push(format!(
            "agents' open descriptors now: {}",
            now.iter()
                .map(|(node, f)| format!("{node} {}", f.fds))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    found.join("; ")
}

fn mentions_emfile(line: &str) -> bool {
    line.contains("Too many open files") || line.contains("os error 24")
}

/// The process's current resident memory (`VmRSS`), KiB.
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status_kib(&status, "VmRSS:").ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// A `Field:  123 kB` value of /proc/<pid>/status.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn open_fds(pid: u32) -> Option<u64> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tmesh-agent\nVmHWM:\t   20480 kB\nVmRSS:\t   12345 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(12345));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn parses_hold_replies() {
        let (n, s, f) =
            parse_hold_reply("{\"held\": 10, \"open_s\": 1.5, \"nofile\": 20000}\n").unwrap();
        assert_eq!((n, s, f), (10, 1.5, 20000));
        let err = parse_hold_reply(
            "{\"error\": \"connection 1021: [Errno 24] Too many open files\", \"errno\": 24, \"held\": 1020}",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("Too many open files"));
        assert!(parse_hold_reply("not json").is_err());
    }

    #[test]
    fn per_connection_growth() {
        let fp = |kib| AgentFootprint {
            rss_kib: kib,
            fds: 0,
        };
        let a = AgentMemory {
            node: "node-a".into(),
            at_start: None,
            idle: fp(10_000),
            held: fp(30_000),
            closed: fp(12_000),
        };
        assert_eq!(a.per_connection_kib(10_000), 2.0);
    }
}
