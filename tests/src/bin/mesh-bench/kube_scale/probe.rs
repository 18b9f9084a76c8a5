//! What the Kubernetes scale benchmark reads: the agent's and the API server's Prometheus
//! metrics, their processes in /proc, the agent's JSON log and its config dump.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use mesh_tests::kube::{ControlPlane, KubeMesh};
use serde_json::Value;

use crate::idle::vm_rss_kib;
use crate::state_scale::parse_log_timestamp;
use crate::usage::read_pids;

/// The FlowSchema that classifies the agent's requests alone (see [`AGENT_FLOW_SCHEMA_YAML`]).
pub const AGENT_FLOW_SCHEMA: &str = "mesh-bench-agent";

/// The API server's request metrics carry no user, but API Priority and Fairness counts per
/// FlowSchema: one that matches only the agent's ServiceAccount, at the priority level the
/// agent's requests get anyway (`workload-low`, through the built-in `service-accounts`
/// schema), makes `apiserver_flowcontrol_*{flow_schema="mesh-bench-agent"}` the agent's own.
pub const AGENT_FLOW_SCHEMA_YAML: &str = r#"
apiVersion: flowcontrol.apiserver.k8s.io/v1
kind: FlowSchema
metadata: {name: mesh-bench-agent}
spec:
  matchingPrecedence: 1000
  priorityLevelConfiguration: {name: workload-low}
  distinguisherMethod: {type: ByUser}
  rules:
  - subjects:
    - kind: ServiceAccount
      serviceAccount: {name: mesh-agent, namespace: mesh-system}
    resourceRules:
    - {verbs: ["*"], apiGroups: ["*"], resources: ["*"], clusterScope: true, namespaces: ["*"]}
    nonResourceRules:
    - {verbs: ["*"], nonResourceURLs: ["*"]}
"#;

const CURL_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- Prometheus text

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// A parsed `/metrics` page.
#[derive(Debug, Clone, Default)]
pub struct Metrics(Vec<Sample>);

impl Metrics {
    /// Parses the text format; comments and lines it cannot read are skipped.
    pub fn parse(text: &str) -> Self {
        Self(text.lines().filter_map(parse_sample).collect())
    }

    /// The sum of the samples of `name` whose labels include all of `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                filter
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// The sums of `name` per value of label `by`.
    fn sum_by(&self, name: &str, by: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.0.iter().filter(|s| s.name == name) {
            if let Some((_, v)) = s.labels.iter().find(|(k, _)| k == by) {
                *out.entry(v.clone()).or_default() += s.value;
            }
        }
        out
    }
}

/// `name{a="1",b="x"} 3.5 [timestamp]` or `name 3.5`.
fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line.find(['{', ' '])?;
    let name = line[..end].to_owned();
    let (labels, rest) = match line[end..].strip_prefix('{') {
        Some(inner) => parse_labels(inner)?,
        None => (Vec::new(), &line[end..]),
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The labels after `{`, up to and including `}`; the rest of the line.
fn parse_labels(mut rest: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_owned();
        rest = rest[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let close = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        rest = &rest[close + 1..];
        labels.push((key, value));
    }
}

// ---------------------------------------------------------------- the agent

/// The agent's Kubernetes counters: watch events per kind, states built.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AgentCounters {
    pub pods: f64,
    pub namespaces: f64,
    pub services: f64,
    pub slices: f64,
    pub builds: f64,
}

impl AgentCounters {
    fn of(m: &Metrics) -> Self {
        let kind = |k: &str| m.sum("mesh_agent_kubernetes_watch_events_total", &[("kind", k)]);
        Self {
            pods: kind("Pod"),
            namespaces: kind("Namespace"),
            services: kind("Service"),
            slices: kind("EndpointSlice"),
            builds: m.sum("mesh_agent_state_builds_total", &[]),
        }
    }

    /// Watch events of every kind.
    pub fn events(&self) -> f64 {
        self.pods + self.namespaces + self.services + self.slices
    }

    /// What was counted since `before`.
    pub fn since(&self, before: &Self) -> Self {
        Self {
            pods: self.pods - before.pods,
            namespaces: self.namespaces - before.namespaces,
            services: self.services - before.services,
            slices: self.slices - before.slices,
            builds: self.builds - before.builds,
        }
    }
}

/// The agent of one node of a [`KubeMesh`].
pub struct Agent<'a> {
    pub mesh: &'a KubeMesh,
    pub node: &'static str,
}

impl Agent<'_> {
    pub fn pid(&self) -> Result<u32> {
        self.mesh
            .cluster()
            .agent_pid(self.node)
            .ok_or_else(|| anyhow!("no agent runs on {}", self.node))
    }

    /// Its resident memory now (`VmRSS`), MiB.
    pub fn rss_mib(&self) -> Result<f64> {
        Ok(vm_rss_kib(self.pid()?)? as f64 / 1024.0)
    }

    /// `GET url` inside the agent's node, where its ports are.
    fn get(&self, url: &str) -> Result<String> {
        let out = self
            .mesh
            .cluster()
            .run_in_node(self.node, "curl", ["-sS", "--fail", url], CURL_TIMEOUT)?
            .check()
            .with_context(|| format!("GET {url} in {}", self.node))?;
        Ok(out.stdout_str())
    }

    pub fn counters(&self) -> Result<AgentCounters> {
        let text = self.get("http://127.0.0.1:15020/metrics")?;
        let counters = AgentCounters::of(&Metrics::parse(&text));
        if counters.events() == 0.0 {
            bail!("the agent's metrics count no watch events: is it following the API?");
        }
        Ok(counters)
    }

    /// How many of its Services (`namespace/name`) whose namespace `wanted` accepts have
    /// exactly `endpoints` endpoints (workloads) in its state.
    pub fn services_with_endpoints(
        &self,
        wanted: impl Fn(&str) -> bool,
        endpoints: usize,
    ) -> Result<usize> {
        let text = self.get("http://127.0.0.1:15000/config_dump")?;
        let dump: Value = serde_json::from_str(&text).context("the config dump is not JSON")?;
        let services = dump["services"]
            .as_array()
            .context("the config dump has no services")?;
        Ok(services
            .iter()
            .filter(|s| {
                s["name"]
                    .as_str()
                    .and_then(|n| n.split_once('/'))
                    .is_some_and(|(ns, _)| wanted(ns))
            })
            .filter(|s| s["endpoints"].as_array().map(Vec::len) == Some(endpoints))
            .count())
    }

    /// Its log lines with this message, with their timestamps, in order.
    pub fn log_lines(&self, message: &str) -> Result<Vec<(SystemTime, Value)>> {
        Ok(self
            .mesh
            .cluster()
            .agent_logs(self.node)?
            .into_iter()
            .filter(|l| l["message"] == message)
            .filter_map(|l| Some((parse_log_timestamp(l["timestamp"].as_str()?)?, l)))
            .collect())
    }
}

// ---------------------------------------------------------------- the API server

/// What the API server counts of the agent (its FlowSchema) and of everyone.
#[derive(Debug, Clone, Default)]
pub struct ApiCounters {
    /// Requests of the agent dispatched (watches count once, when they start).
    pub agent_requests: f64,
    /// Seconds the API server spent executing them (for a watch: its start, the list it
    /// serves from the watch cache included).
    pub agent_exec_s: f64,
    /// Requests of everyone, per verb (`apiserver_request_total`).
    pub requests_by_verb: BTreeMap<String, f64>,
}

impl ApiCounters {
    fn of(m: &Metrics) -> Self {
        let agent = [("flow_schema", AGENT_FLOW_SCHEMA)];
        Self {
            agent_requests: m.sum("apiserver_flowcontrol_dispatched_requests_total", &agent),
            agent_exec_s: m.sum(
                "apiserver_flowcontrol_request_execution_seconds_sum",
                &agent,
            ),
            requests_by_verb: m.sum_by("apiserver_request_total", "verb"),
        }
    }

    pub fn since(&self, before: &Self) -> Self {
        Self {
            agent_requests: self.agent_requests - before.agent_requests,
            agent_exec_s: self.agent_exec_s - before.agent_exec_s,
            requests_by_verb: self
                .requests_by_verb
                .iter()
                .map(|(verb, n)| {
                    let was = before.requests_by_verb.get(verb).copied().unwrap_or(0.0);
                    (verb.clone(), n - was)
                })
                .filter(|(_, n)| *n > 0.0)
                .collect(),
        }
    }

    pub fn requests(&self) -> f64 {
        self.requests_by_verb.values().sum()
    }
}

/// The control plane's kube-apiserver process.
pub struct ApiServer<'a> {
    cp: &'a ControlPlane,
    pub pid: u32,
}

impl<'a> ApiServer<'a> {
    pub fn find(cp: &'a ControlPlane) -> Result<Self> {
        let pid = pid_named(cp.cgroup(), "kube-apiserver")?;
        Ok(Self { cp, pid })
    }

    /// Its `/metrics`, as admin.
    pub fn counters(&self) -> Result<ApiCounters> {
        let out = self.cp.kubectl(["get", "--raw", "/metrics"])?;
        Ok(ApiCounters::of(&Metrics::parse(&out.stdout_str())))
    }
}

/// The process of `cgroup` whose command name (`/proc/<pid>/comm`) is `name`.
pub fn pid_named(cgroup: &Path, name: &str) -> Result<u32> {
    read_pids(&cgroup.join("cgroup.procs"))
        .into_iter()
        .find(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .ok_or_else(|| anyhow!("no {name} process in {}", cgroup.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP mesh_agent_kubernetes_watch_events Watch events.
# TYPE mesh_agent_kubernetes_watch_events counter
mesh_agent_kubernetes_watch_events_total{kind="Pod"} 20012
mesh_agent_kubernetes_watch_events_total{kind="EndpointSlice"} 1003
mesh_agent_state_builds_total 57
apiserver_request_total{code="200",component="apiserver",verb="LIST",resource="pods"} 4
apiserver_request_total{code="201",component="apiserver",verb="POST",resource="pods"} 10000
apiserver_flowcontrol_dispatched_requests_total{flow_schema="mesh-bench-agent",priority_level="workload-low"} 12
weird{a="x, \"y\"}",b="2"} 1.5e3 1700000000
"#;

    #[test]
    fn sums_samples_by_labels() {
        let m = Metrics::parse(PAGE);
        let agent = AgentCounters::of(&m);
        assert_eq!(
            (agent.pods, agent.slices, agent.services),
            (20012.0, 1003.0, 0.0)
        );
        assert_eq!(agent.builds, 57.0);
        let api = ApiCounters::of(&m);
        assert_eq!(api.agent_requests, 12.0);
        assert_eq!(api.requests_by_verb["POST"], 10000.0);
        assert_eq!(api.requests(), 10004.0);
        assert_eq!(m.sum("weird", &[("a", "x, \"y\"}"), ("b", "2")]), 1500.0);
    }

    #[test]
    fn differences() {
        let before = AgentCounters {
            pods: 2.0,
            builds: 1.0,
            ..AgentCounters::default()
        };
        let after = AgentCounters {
            pods: 1002.0,
            slices: 990.0,
            builds: 31.0,
            ..AgentCounters::default()
        };
        let d = after.since(&before);
        assert_eq!(
            (d.pods, d.slices, d.builds, d.events()),
            (1000.0, 990.0, 30.0, 1990.0)
        );
    }
}
