//! The second peer: Istio's ztunnel, a binary the user built (docs/performance.md, "ztunnel side
//! by side"); the project neither builds nor ships it.
//!
//! Two pods outside our mesh, `zt-client` on node-a and `zt-server` on node-b, each run one
//! ztunnel in their own network namespace, as ztunnel's own namespaced tests do: dedicated mode
//! (`PROXY_MODE=dedicated`, `PROXY_WORKLOAD_INFO`), a local xDS file naming both workloads with
//! protocol HBONE instead of istiod, and its fake CA (`FAKE_CA=true`: certificates for the
//! pod's identity signed by the test root compiled into ztunnel, the same root on both sides,
//! trust domain `cluster.local`). iptables in each pod's netns send the pod's outbound TCP to
//! ztunnel's outbound listener (15001) and all inbound TCP but HBONE (15008) to its plaintext
//! inbound (15006), so nothing reaches the servers around it.
//!
//! Every run is checked against ztunnel's own counters (`:15020/metrics`): both ztunnels must
//! have opened at least as many mutual-TLS connections as the run made and relayed at least the
//! bytes it moved, and opened none without mutual TLS; otherwise the benchmark fails rather than
//! report a path that bypassed the proxy.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_tests::{ChildGuard, Cluster, Pod, PodSpec};

pub const CLIENT_POD: &str = "zt-client";
pub const SERVER_POD: &str = "zt-server";

const OUTBOUND_PORT: u16 = 15001;
const INBOUND_PLAINTEXT_PORT: u16 = 15006;
const HBONE_PORT: u16 = 15008;
const STATS_PORT: u16 = 15020;
const READINESS_PORT: u16 = 15021;
/// ztunnel's default mark for its own sockets (`PACKET_MARK`), which capture must skip.
const PACKET_MARK: u32 = 1337;
/// Its test root's (and its default) trust domain; without it in the local xDS the identities
/// would have an empty one.
const TRUST_DOMAIN: &str = "cluster.local";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Share of the bytes a run moved that ztunnel must have counted.
const BYTES_SEEN_MIN: f64 = 0.9;

/// The two pods, outside the mesh (not enrolled), each with a service account of its own so the
/// two identities differ.
pub fn pod_specs() -> (PodSpec, PodSpec) {
    (
        PodSpec::new(CLIENT_POD)
            .enrolled(false)
            .service_account(CLIENT_POD),
        PodSpec::new(SERVER_POD)
            .enrolled(false)
            .service_account(SERVER_POD),
    )
}

/// Checks the binary before the cluster is built: it runs and says what it is.
pub fn version(bin: &Path) -> Result<String> {
    let out = mesh_tests::run_with_timeout(
        std::process::Command::new(bin).arg("version"),
        Duration::from_secs(10),
    )
    .with_context(|| format!("--ztunnel {}", bin.display()))?
    .check()
    .with_context(|| format!("`{} version`", bin.display()))?;
    Ok(short_version(&out.stdout_str()))
}

/// `version.BuildInfo{Version:"…", GitRevision:"…", RustVersion:"…", …}` as `GitRevision …,
/// RustVersion …, BuildProfile …, CryptoProvider …`; other text as its first line.
fn short_version(text: &str) -> String {
    let field = |key: &str| {
        let start = text.find(&format!("{key}:\""))? + key.len() + 2;
        let len = text[start..].find('"')?;
        Some(format!("{key} {}", &text[start..start + len]))
    };
    let fields: Vec<String> = [
        "GitRevision",
        "RustVersion",
        "BuildProfile",
        "CryptoProvider",
    ]
    .iter()
    .filter_map(|k| field(k))
    .collect();
    if !fields.is_empty() {
        return fields.join(", ");
    }
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    line.trim().chars().take(200).collect()
}

/// The iptables binary capture needs, found before the cluster is built.
pub fn check_iptables() -> Result<()> {
    let found = ["/usr/sbin/iptables", "/sbin/iptables", "/usr/bin/iptables"]
        .iter()
        .any(|p| Path::new(p).exists());
    ensure!(
        found,
        "--ztunnel needs iptables for the capture in the ztunnel pods: apt-get install iptables"
    );
    Ok(())
}

/// Both ztunnels, running and capturing; killed on drop (the pods' netns, and with them the
/// iptables rules, go with the cluster).
pub struct Ztunnels {
    /// client's, then server's.
    guards: Vec<ChildGuard>,
    client: Pod,
    server: Pod,
    logs: [PathBuf; 2],
}

/// ztunnel's counters, one side: the client's as `reporter="source"`, the server's as
/// `reporter="destination"`. Mutual TLS counts only with the expected peer identity (the
/// server's `destination_principal`, the client's `source_principal`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    /// `istio_tcp_connections_opened_total` with `connection_security_policy="mutual_tls"`
    /// and the expected peer.
    pub mtls_opened: f64,
    /// The same without mutual TLS or with another peer.
    pub other_opened: f64,
    /// `istio_tcp_{sent,received}_bytes_total` with mutual TLS.
    pub mtls_bytes: f64,
}

impl Counters {
    fn minus(self, before: Counters) -> Counters {
        Counters {
            mtls_opened: self.mtls_opened - before.mtls_opened,
            other_opened: self.other_opened - before.other_opened,
            mtls_bytes: self.mtls_bytes - before.mtls_bytes,
        }
    }
}

impl Ztunnels {
    /// Writes the local xDS file, starts a ztunnel in each pod, waits until both are ready,
    /// then installs the capture rules in both pods.
    pub fn start(cluster: &Cluster, bin: &Path, client: &Pod, server: &Pod) -> Result<Self> {
        let dir = cluster.workdir().join("ztunnel");
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let xds = dir.join("local-xds.yaml");
        fs::write(&xds, local_xds(&[client, server]))
            .with_context(|| format!("write {}", xds.display()))?;
        let mut guards = Vec::new();
        let mut logs = Vec::new();
        for pod in [client, server] {
            let log = dir.join(format!("{}.log", pod.name()));
            let mut guard = spawn(bin, pod, &xds, &dir, &log)?;
            wait_ready(pod, &mut guard, &log)?;
            guards.push(guard);
            logs.push(log);
        }
        for pod in [client, server] {
            capture(pod)?;
        }
        let logs = [logs[0].clone(), logs[1].clone()];
        Ok(Ztunnels {
            guards,
            client: client.clone(),
            server: server.clone(),
            logs,
        })
    }

    pub fn pids(&self) -> Vec<u32> {
        self.guards.iter().map(ChildGuard::pid).collect()
    }

    /// Both sides' counters now: (client, server).
    pub fn counters(&self) -> Result<(Counters, Counters)> {
        let peer = |label: &str, pod: &Pod| format!("{label}=\"{}\"", spiffe_id(pod));
        Ok((
            scrape(
                &self.client,
                "source",
                &peer("destination_principal", &self.server),
            )?,
            scrape(
                &self.server,
                "destination",
                &peer("source_principal", &self.client),
            )?,
        ))
    }

    /// What a run that made `connections` connections and moved `bytes` application bytes
    /// must have left in both ztunnels' counters (from `before`, taken just before it).
    pub fn check_run(
        &mut self,
        before: (Counters, Counters),
        connections: u64,
        bytes: f64,
    ) -> Result<(Counters, Counters)> {
        self.check_alive()?;
        let after = self.counters()?;
        for (side, b, a) in [
            (&self.client, before.0, after.0),
            (&self.server, before.1, after.1),
        ] {
            let d = a.minus(b);
            let what = format!(
                "{}'s ztunnel counted {} mutual-TLS connections, {} without mutual TLS and {:.0} \
                 bytes for a run of {connections} connections and {bytes:.0} bytes",
                side.name(),
                d.mtls_opened,
                d.other_opened,
                d.mtls_bytes
            );
            ensure!(
                d.mtls_opened >= connections as f64
                    && d.other_opened == 0.0
                    && d.mtls_bytes >= BYTES_SEEN_MIN * bytes,
                "the ztunnel path did not go through both ztunnels with mutual TLS: {what}"
            );
        }
        Ok(after)
    }

    /// Fails if either ztunnel has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for (g, log) in self.guards.iter_mut().zip(&self.logs) {
            if let Some(status) = g.child_mut().try_wait()? {
                bail!("ztunnel exited ({status}); {}", tail(log));
            }
        }
        Ok(())
    }

    /// One line for the report: totals over the whole run.
    pub fn summary(&self) -> Result<String> {
        let (c, s) = self.counters()?;
        Ok(format!(
            "{}'s ztunnel opened {:.0} outbound connections with mutual TLS ({:.0} without) and \
             relayed {:.2} GB; {}'s ztunnel accepted {:.0} with mutual TLS from {} ({:.0} \
             without), {:.2} GB",
            self.client.name(),
            c.mtls_opened,
            c.other_opened,
            c.mtls_bytes / 1e9,
            self.server.name(),
            s.mtls_opened,
            spiffe_id(&self.client),
            s.other_opened,
            s.mtls_bytes / 1e9
        ))
    }
}

/// The identity ztunnel's fake CA gives a pod.
fn spiffe_id(pod: &Pod) -> String {
    format!(
        "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
        pod.namespace(),
        pod.service_account()
    )
}

/// ztunnel's local xDS (its `examples/localhost.yaml` format): both pods as HBONE workloads.
fn local_xds(pods: &[&Pod]) -> String {
    let mut s = String::from("workloads:\n");
    for p in pods {
        s.push_str(&format!(
            "- uid: cluster1//v1/Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  \
             serviceAccount: {sa}\n  trustDomain: {TRUST_DOMAIN}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  \
             node: {node}\n  network: \"\"\n  services: {{}}\n",
            ns = p.namespace(),
            name = p.name(),
            sa = p.service_account(),
            ip = p.ipv4(),
            node = p.node(),
        ));
    }
    s.push_str("policies: []\nservices: []\n");
    s
}

fn spawn(bin: &Path, pod: &Pod, xds: &Path, dir: &Path, log: &Path) -> Result<ChildGuard> {
    let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut cmd = pod.command(bin, std::iter::empty::<&str>())?;
    cmd.current_dir(dir)
        .env("FAKE_CA", "true")
        .env("XDS_ADDRESS", "")
        .env("LOCAL_XDS_PATH", xds)
        .env("PROXY_MODE", "dedicated")
        .env(
            "PROXY_WORKLOAD_INFO",
            format!(
                "{}/{}/{}",
                pod.namespace(),
                pod.name(),
                pod.service_account()
            ),
        )
        .env("NODE_NAME", pod.node())
        .env("PACKET_MARK", PACKET_MARK.to_string())
        .env("ENABLE_ORIG_SRC", "false")
        .stdout(out.try_clone()?)
        .stderr(out);
    let name = format!("ztunnel in pod {}", pod.name());
    let child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
    Ok(ChildGuard::new(child, name))
}

/// Until its readiness endpoint answers 200 (certificate issued, listeners bound).
fn wait_ready(pod: &Pod, guard: &mut ChildGuard, log: &Path) -> Result<()> {
    let url = format!("http://127.0.0.1:{READINESS_PORT}/healthz/ready");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let out = pod.run(
            "curl",
            ["-sf", "-o", "/dev/null", "--max-time", "2", &url],
            Duration::from_secs(5),
        )?;
        if out.success() {
            return Ok(());
        }
        if let Some(status) = guard.child_mut().try_wait()? {
            bail!(
                "ztunnel in pod {} exited ({status}) before ready; {}",
                pod.name(),
                tail(log)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "ztunnel in pod {} not ready after {READY_TIMEOUT:?}; {}",
                pod.name(),
                tail(log)
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The pod's capture, as ztunnel's in-pod redirection does it for TCP: outbound (not to `lo`,
/// not ztunnel's own marked sockets) to 15001; inbound, all but HBONE, to 15006.
fn capture(pod: &Pod) -> Result<()> {
    let mark = format!("{PACKET_MARK:#x}/0xfff");
    let rules: [Vec<String>; 2] = [
        [
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "!",
            "-o",
            "lo",
            "-m",
            "mark",
            "!",
            "--mark",
            &mark,
            "-j",
            "REDIRECT",
            "--to-ports",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([OUTBOUND_PORT.to_string()])
        .collect(),
        [
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "!",
            "--dport",
            &HBONE_PORT.to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            &INBOUND_PLAINTEXT_PORT.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    ];
    for rule in rules {
        pod.run("iptables", &rule, Duration::from_secs(20))?
            .check()
            .with_context(|| format!("iptables {} in pod {}", rule.join(" "), pod.name()))?;
    }
    Ok(())
}

fn scrape(pod: &Pod, reporter: &str, peer: &str) -> Result<Counters> {
    let url = format!("http://127.0.0.1:{STATS_PORT}/metrics");
    let out = pod
        .curl(&url)?
        .check()
        .with_context(|| format!("ztunnel metrics in pod {}", pod.name()))?;
    Ok(parse_counters(&out.stdout_str(), reporter, peer))
}

/// Sums ztunnel's TCP counters of one reporter from its Prometheus text; mutual TLS counts
/// only in series with the label `peer` (`name="value"`).
fn parse_counters(text: &str, reporter: &str, peer: &str) -> Counters {
    let want = format!("reporter=\"{reporter}\"");
    let mut c = Counters::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let has = |label: &str| labels.trim_end_matches('}').split(',').any(|l| l == label);
        if !has(&want) {
            continue;
        }
        let mtls = has("connection_security_policy=\"mutual_tls\"") && has(peer);
        match name {
            "istio_tcp_connections_opened_total" if mtls => c.mtls_opened += v,
            "istio_tcp_connections_opened_total" => c.other_opened += v,
            "istio_tcp_sent_bytes_total" | "istio_tcp_received_bytes_total" if mtls => {
                c.mtls_bytes += v;
            }
            _ => {}
        }
    }
    c
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "last lines of {}:\n{}",
        log.display(),
        lines[lines.len().saturating_sub(20)..].join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_keeps_the_build_fields() {
        let v = "version.BuildInfo{Version:\"62d8-dirty\", GitRevision:\"62d8-dirty\", \
                 RustVersion:\"1.95.0\", BuildProfile:\"release\", BuildStatus:\"Modified\", \
                 IstioVersion:\"unknown\", CryptoProvider:\"tls-aws-lc\"}\n";
        assert_eq!(
            short_version(v),
            "GitRevision 62d8-dirty, RustVersion 1.95.0, BuildProfile release, CryptoProvider \
             tls-aws-lc"
        );
        assert_eq!(short_version("\nztunnel 1.2\n"), "ztunnel 1.2");
    }

    #[test]
    fn counters_sum_one_reporter_and_split_by_mutual_tls() {
        let text = "\
# HELP istio_tcp_connections_opened The total number of TCP connections opened.
# TYPE istio_tcp_connections_opened counter
istio_tcp_connections_opened_total{reporter=\"source\",p=\"s\",connection_security_policy=\"mutual_tls\"} 7
istio_tcp_connections_opened_total{reporter=\"source\",p=\"other\",connection_security_policy=\"mutual_tls\"} 2
istio_tcp_connections_opened_total{reporter=\"source\",p=\"s\",connection_security_policy=\"unknown\"} 1
istio_tcp_connections_opened_total{reporter=\"destination\",p=\"s\",connection_security_policy=\"mutual_tls\"} 100
istio_tcp_sent_bytes_total{reporter=\"source\",p=\"s\",connection_security_policy=\"mutual_tls\"} 1000
istio_tcp_received_bytes_total{reporter=\"source\",connection_security_policy=\"mutual_tls\",p=\"s\"} 24
istio_tcp_received_bytes_total{reporter=\"source\",p=\"s\",connection_security_policy=\"unknown\"} 5
# EOF
";
        assert_eq!(
            parse_counters(text, "source", "p=\"s\""),
            Counters {
                mtls_opened: 7.0,
                other_opened: 3.0,
                mtls_bytes: 1024.0
            }
        );
        assert_eq!(
            parse_counters(text, "destination", "p=\"s\"").mtls_opened,
            100.0
        );
    }
}
