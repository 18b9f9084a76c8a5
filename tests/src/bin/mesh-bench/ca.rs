//! `--ca`: what the CA service (`mesh-agent ca serve`) costs. One CA on 127.0.0.1 with a cluster
//! file of one node and 100 workload identities; a client holding that node's credential (from
//! `ca add-node`) asks over TLS 1.3, as an agent does, with a fresh ECDSA P-256 key per request.
//! The keys and CSRs are made beforehand: the figures are the CA's (network, TLS, TokenReview-free
//! node authentication, authorization, signing), not the client's key generation.
//!
//! - CSR latency: one request at a time, p50 and p99 per repetition;
//! - throughput: signatures per second with [`IN_FLIGHT`] requests in flight, and the CA's CPU
//!   time per signature over that run.
//!
//! Figures are medians over the repetitions; the report goes to `bench/results/ca.md`.

use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_ca_api::{IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateServiceClient};
use mesh_tests::{ChildGuard, agent_bin};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::Opts;
use crate::report::{median, percentile};

const NODE: &str = "bench-node";
const IDENTITIES: usize = 100;
/// Requests in flight in the throughput run (as many as an agent's store sends at once).
const IN_FLIGHT: usize = 16;

/// One repetition's figures.
struct Rep {
    p50_ms: f64,
    p99_ms: f64,
    per_s: f64,
    cpu_ms_per_signature: f64,
}

pub fn run(opts: &Opts) -> Result<()> {
    let (sequential, concurrent) = if opts.quick {
        (200, 1000)
    } else {
        (1000, 5000)
    };
    let dir = std::env::temp_dir().join(format!("mesh-bench-ca-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let ca = BenchCa::start(&dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut reps = Vec::new();
    for rep in 0..opts.reps {
        let r = runtime.block_on(ca.measure(sequential, concurrent))?;
        eprintln!(
            "mesh-bench ca: rep {}: CSR p50 {:.2} ms p99 {:.2} ms; {:.0} signatures/s, {:.2} CPU ms each",
            rep + 1,
            r.p50_ms,
            r.p99_ms,
            r.per_s,
            r.cpu_ms_per_signature
        );
        reps.push(r);
    }
    let text = report(opts, sequential, concurrent, &reps, ca.rss_kib()?);
    print!("{text}");
    fs::create_dir_all(&opts.out)?;
    let path = opts.out.join("ca.md");
    fs::write(&path, &text).with_context(|| format!("write {}", path.display()))?;
    eprintln!("mesh-bench ca: report written to {}", path.display());
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct BenchCa {
    process: ChildGuard,
    address: SocketAddr,
    node_dir: PathBuf,
}

impl BenchCa {
    fn start(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)?;
        agent(["ca", "init"], &[dir.join("ca").as_os_str()])?;
        let address = free_local_port()?;
        let metrics = free_local_port()?;
        fs::write(dir.join("cluster.yaml"), cluster_file(address))?;
        fs::write(
            dir.join("ca.yaml"),
            format!(
                "listen: {address}\nsigningCert: ca/ca-cert.pem\nsigningKey: ca/ca-key.pem\n\
                 serverNames: [127.0.0.1]\nnodes: nodes\nauthorization: {{clusterFile: cluster.yaml}}\n"
            ),
        )?;
        let config = dir.join("ca.yaml");
        let node_dir = dir.join("node");
        agent(
            ["ca", "add-node", "--config"],
            &[
                config.as_os_str(),
                NODE.as_ref(),
                "--out".as_ref(),
                node_dir.as_os_str(),
            ],
        )?;
        let log = fs::File::create(dir.join("serve.log"))?;
        let child = Command::new(agent_bin())
            .args(["ca", "serve", "--config"])
            .arg(&config)
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start mesh-agent ca serve")?;
        let process = ChildGuard::new(child, "mesh-agent ca serve".into());
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(address).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "the CA does not listen on {address}; see {}",
                    dir.join("serve.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            process,
            address,
            node_dir,
        })
    }

    async fn client(&self) -> Result<IstioCertificateServiceClient<Channel>> {
        let read =
            |file: &str| fs::read(self.node_dir.join(file)).with_context(|| format!("read {file}"));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca-roots.pem")?))
            .identity(Identity::from_pem(
                read("node-cert.pem")?,
                read("node-key.pem")?,
            ));
        let channel = Endpoint::from_shared(format!("https://{}", self.address))?
            .tls_config(tls)?
            .connect()
            .await
            .context("connect to the CA")?;
        Ok(IstioCertificateServiceClient::new(channel))
    }

    async fn measure(&self, sequential: usize, concurrent: usize) -> Result<Rep> {
        let client = self.client().await?;
        let csrs = csrs(sequential + concurrent + 50)?;
        let (warm_up, rest) = csrs.split_at(50);
        for (id, csr) in warm_up {
            ask(&client, id, csr).await?;
        }
        let (one_by_one, parallel) = rest.split_at(sequential);
        let mut latencies = Vec::with_capacity(sequential);
        for (id, csr) in one_by_one {
            let t = Instant::now();
            ask(&client, id, csr).await?;
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let cpu_before = self.cpu_seconds()?;
        let t = Instant::now();
        let queue = std::sync::Arc::new(std::sync::Mutex::new(parallel.to_vec()));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..IN_FLIGHT {
            let (client, queue) = (client.clone(), queue.clone());
            tasks.spawn(async move {
                loop {
                    let next = queue.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pop();
                    let Some((id, csr)) = next else {
                        return Ok::<_, anyhow::Error>(());
                    };
                    ask(&client, &id, &csr).await?;
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        let wall = t.elapsed().as_secs_f64();
        let cpu = self.cpu_seconds()? - cpu_before;
        Ok(Rep {
            p50_ms: percentile(&latencies, 50.0).unwrap_or(f64::NAN),
            p99_ms: percentile(&latencies, 99.0).unwrap_or(f64::NAN),
            per_s: concurrent as f64 / wall,
            cpu_ms_per_signature: cpu * 1000.0 / concurrent as f64,
        })
    }

    /// The CA process's user + system CPU time so far.
    fn cpu_seconds(&self) -> Result<f64> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.process.pid()))?;
        let after_name = stat.rsplit_once(')').context("odd /proc stat")?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: f64 = fields
            .get(11..13)
            .context("short /proc stat")?
            .iter()
            .map(|f| f.parse::<f64>().unwrap_or(0.0))
            .sum();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(ticks / hz)
    }

    fn rss_kib(&self) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.process.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmHWM")
    }
}

fn agent<const N: usize>(words: [&str; N], more: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new(agent_bin())
        .args(words)
        .args(more)
        .output()
        .with_context(|| format!("mesh-agent {}", words.join(" ")))?;
    if !out.status.success() {
        bail!(
            "mesh-agent {} failed: {}",
            words.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn free_local_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One node running [`IDENTITIES`] workloads, each its own service account.
fn cluster_file(ca: SocketAddr) -> String {
    let mut text = format!(
        "identity: {{ca: {{address: \"https://{ca}\", roots: node/ca-roots.pem}}}}\nnodes:\n  - name: {NODE}\n    workloadCgroup: /sys/fs/cgroup/mesh-bench-ca\n    workloads:\n"
    );
    for i in 0..IDENTITIES {
        let _ = writeln!(
            text,
            "      - {{name: w{i}, namespace: bench, serviceAccount: sa-{i}, ips: [10.9.{}.{}], netns: /run/netns/w{i}, cgroup: /sys/fs/cgroup/mesh-bench-ca/w{i}}}",
            i / 250,
            i % 250 + 1
        );
    }
    text
}

/// `(identity, PEM CSR)` pairs over the identities in turn, each with a fresh key.
fn csrs(n: usize) -> Result<Vec<(String, String)>> {
    (0..n)
        .map(|i| {
            let id = format!("spiffe://cluster.local/ns/bench/sa/sa-{}", i % IDENTITIES);
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = rcgen::CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.subject_alt_names = vec![rcgen::SanType::URI(id.clone().try_into()?)];
            let csr = params.serialize_request(&key)?.pem()?;
            Ok((id, csr))
        })
        .collect()
}

async fn ask(client: &IstioCertificateServiceClient<Channel>, id: &str, csr: &str) -> Result<()> {
    let value = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(id.to_owned())),
    };
    let request = IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: 3600,
        metadata: Some(prost_types::Struct {
            fields: [(IMPERSONATED_IDENTITY.to_owned(), value)].into(),
        }),
    };
    let chain = client
        .clone()
        .create_certificate(request)
        .await
        .with_context(|| format!("CreateCertificate for {id}"))?
        .into_inner()
        .cert_chain;
    if chain.is_empty() {
        bail!("the CA returned no certificate for {id}");
    }
    Ok(())
}

fn report(opts: &Opts, sequential: usize, concurrent: usize, reps: &[Rep], rss_kib: u64) -> String {
    let med =
        |f: fn(&Rep) -> f64| median(&reps.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN);
    let mut text = String::new();
    let _ = writeln!(text, "# The CA service\n");
    let _ = writeln!(
        text,
        "`cargo xtask bench --ca{}`: `mesh-agent ca serve` on 127.0.0.1, one node credential, \
         {IDENTITIES} identities on that node; medians of {} repetitions, each {sequential} requests \
         one at a time and {concurrent} with {IN_FLIGHT} in flight. Keys and CSRs are made before \
         timing.\n",
        if opts.quick { " --quick" } else { "" },
        reps.len()
    );
    let _ = writeln!(text, "| figure | value |\n| --- | --- |");
    let _ = writeln!(text, "| CSR latency p50 (ms) | {:.2} |", med(|r| r.p50_ms));
    let _ = writeln!(text, "| CSR latency p99 (ms) | {:.2} |", med(|r| r.p99_ms));
    let _ = writeln!(
        text,
        "| signatures/s ({IN_FLIGHT} in flight) | {:.0} |",
        med(|r| r.per_s)
    );
    let _ = writeln!(
        text,
        "| CA CPU per signature (ms) | {:.2} |",
        med(|r| r.cpu_ms_per_signature)
    );
    let _ = writeln!(
        text,
        "| CA peak RSS (MiB) | {:.1} |",
        rss_kib as f64 / 1024.0
    );
    text
}
