//! A real Prometheus (Debian's `prometheus`) on a host of its own on the cluster's fabric
//! (netns `{id}-prom`, 10.255.0.252), scraping every node's agent (`:15020/metrics`) each
//! second, as a cluster's Prometheus scrapes the agents' pods. Queries and `mesh-agent graph`
//! run on that host. Everything goes with the guard and the cluster: the process (in the
//! cluster's cgroup `prometheus`), its netns and its data directory.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{ChildGuard, Cluster, RunOutput, run_with_timeout, sys};

/// Its address on the fabric (the control plane is .254, the CA service .253).
pub const PROMETHEUS_IPV4: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 252);
const PROMETHEUS_IPV6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, 0xfc);
pub const PROMETHEUS_PORT: u16 = 9090;
/// The scrape job of the agents, as `up{job=...}` names it.
pub const AGENTS_JOB: &str = "mesh-agents";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running Prometheus; killed on drop.
pub struct Prometheus {
    netns: String,
    cgroup: PathBuf,
    dir: PathBuf,
    _process: ChildGuard,
}

impl Prometheus {
    /// Starts Prometheus scraping every node of `cluster` and waits until it is ready.
    pub fn start(cluster: &Cluster) -> Result<Prometheus> {
        let netns = format!("{}-prom", cluster.id());
        let cgroup = cluster.cgroup_dir().join("prometheus");
        sys::mkdir_all(&cgroup)?;
        cluster
            .add_fabric_host(&netns, "prom0", PROMETHEUS_IPV4, PROMETHEUS_IPV6)
            .context("attach Prometheus's netns to the fabric")?;
        let dir = cluster.workdir().join("prometheus");
        fs::create_dir_all(dir.join("data"))?;
        let targets: Vec<String> = cluster
            .nodes()
            .iter()
            .map(|n| format!("{}:15020", n.ipv4()))
            .collect();
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": AGENTS_JOB,
                "metrics_path": "/stats/prometheus",
                "static_configs": [{"targets": targets}],
            }],
        });
        let config_path = dir.join("prometheus.yml");
        fs::write(&config_path, serde_yaml_ng::to_string(&config)?)?;
        let log = fs::File::create(dir.join("prometheus.log"))?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!(
                "--web.listen-address={PROMETHEUS_IPV4}:{PROMETHEUS_PORT}"
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        sys::place(&mut cmd, &cgroup, &sys::netns_path(&netns))?;
        let child = cmd
            .spawn()
            .context("spawn prometheus (Debian package prometheus)")?;
        let prometheus = Prometheus {
            netns,
            cgroup,
            dir,
            _process: ChildGuard::new(child, "prometheus".to_owned()),
        };
        prometheus.wait_ready()?;
        Ok(prometheus)
    }

    /// `http://10.255.0.252:9090`, reachable from its host (see [`Prometheus::command`]).
    pub fn url(&self) -> String {
        format!("http://{PROMETHEUS_IPV4}:{PROMETHEUS_PORT}")
    }

    /// Where it keeps its configuration, data and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `program` on Prometheus's host (its netns and cgroup), e.g. `mesh-agent graph`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let mut cmd = Command::new(program);
        sys::place(&mut cmd, &self.cgroup, &sys::netns_path(&self.netns))?;
        Ok(cmd)
    }

    /// Runs `program args` on Prometheus's host to completion.
    pub fn run<I, S>(&self, program: &str, args: I) -> Result<RunOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command(program)?;
        cmd.args(args);
        run_with_timeout(&mut cmd, Duration::from_secs(30))
            .with_context(|| format!("{program} on Prometheus's host"))
    }

    fn get(&self, path: &str) -> Result<String> {
        let url = format!("{}{path}", self.url());
        let out = self.run("curl", ["-sS", "--fail", "--max-time", "5", &url])?;
        ensure!(out.success(), "GET {url}: {}", out.stderr_str().trim());
        Ok(out.stdout_str())
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.get("/-/ready") {
                Ok(_) => return Ok(()),
                Err(err) if Instant::now() >= deadline => {
                    let log =
                        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
                    bail!("Prometheus not ready within {READY_TIMEOUT:?}: {err:#}\n{log}");
                }
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// The result of an instant query: the `data.result` array of `/api/v1/query`.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let mut cmd = self.command("curl")?;
        cmd.args([
            "-sS",
            "--fail",
            "--max-time",
            "5",
            "--data-urlencode",
            &format!("query={promql}"),
            &format!("{}/api/v1/query", self.url()),
        ]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(10))?;
        ensure!(out.success(), "query {promql}: {}", out.stderr_str().trim());
        let answer: Value = serde_json::from_str(&out.stdout_str())
            .with_context(|| format!("query {promql}: {}", out.stdout_str()))?;
        ensure!(answer["status"] == "success", "query {promql}: {answer}");
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits until `up` is 1 for every agent target (`n` of them).
    pub fn wait_for_agents(&self, n: usize) -> Result<()> {
        self.wait_for(
            &format!("sum(up{{job=\"{AGENTS_JOB}\"}})"),
            READY_TIMEOUT,
            |result| {
                let up = result
                    .first()
                    .and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok())
                    .unwrap_or(0.0);
                up as usize == n
            },
        )
        .map(|_| ())
    }

    /// Polls `promql` until `done` accepts its result (at most `timeout`).
    pub fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(promql)?;
            if done(&result) {
                return Ok(result);
            }
            if Instant::now() >= deadline {
                bail!("{promql} within {timeout:?}: last result {result:?}");
            }
            thread::sleep(Duration::from_millis(500));
        }
    }
}
