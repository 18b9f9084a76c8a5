use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use mesh_agent::{
    admin::AdminConfig,
    agent, ebpf,
    identity::{self, CertificateAuthority},
};

/// The mesh's node agent.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The node's workloads, certificates and open connections, from the local agent's admin
    /// API; with --plaintext, who still reaches each workload in plaintext.
    Status {
        /// The agent's admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        /// The migration report: for each workload that still accepts plaintext, the clients
        /// that reached it in plaintext (when, how many), so you know when STRICT is safe.
        #[arg(long)]
        plaintext: bool,
    },
    /// The service graph from Prometheus, as Kiali's security view draws it: a lock for mTLS,
    /// an open mark for plaintext, red for denied, a badge for same-node (docs/observability.md).
    Graph {
        /// Prometheus's URL.
        #[arg(long, env = "MESH_PROMETHEUS")]
        prometheus: String,
        /// The rate window (PromQL duration).
        #[arg(long, default_value = "5m")]
        window: String,
        /// Where to write it: `.dot`, or `.svg`/`.png` rendered by Graphviz's `dot`.
        #[arg(long, default_value = "mesh-graph.dot")]
        out: PathBuf,
    },
    /// Run the agent for one node until SIGTERM.
    Run {
        /// The cluster file (docs/cluster-file.md).
        #[arg(
            long,
            env = "MESH_CLUSTER_FILE",
            required_unless_present = "kubernetes",
            conflicts_with = "kubernetes"
        )]
        cluster: Option<PathBuf>,
        /// Follow the Kubernetes API instead (in-cluster config, else KUBECONFIG), with the
        /// mesh settings of --mesh-config (docs/kubernetes.md).
        #[arg(long, requires = "mesh_config")]
        kubernetes: bool,
        /// The mesh settings in Kubernetes mode (the `mesh-config` ConfigMap's `mesh.yaml`).
        #[arg(long, env = "MESH_CONFIG")]
        mesh_config: Option<PathBuf>,
        /// This node's name (in the cluster file, or the Kubernetes Node).
        #[arg(long, env = "MESH_NODE")]
        node: String,
        /// Where to pin programs and maps (on bpffs). Default: /sys/fs/bpf/mesh/<node>.
        #[arg(long)]
        bpf_pin_dir: Option<PathBuf>,
        /// Seconds that in-flight connections may take to finish after SIGTERM.
        #[arg(long, default_value_t = 5)]
        drain_timeout_secs: u64,
        /// Admin endpoint (config dump).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: std::net::SocketAddr,
        /// Prometheus metrics endpoint.
        #[arg(long, default_value = "0.0.0.0:15020")]
        metrics_addr: std::net::SocketAddr,
        /// Readiness endpoint (GET /healthz/ready).
        #[arg(long, default_value = "0.0.0.0:15021")]
        readiness_addr: std::net::SocketAddr,
        /// Threads that carry connections. Default: half the CPUs this process may use, at
        /// least one; the node's workloads need the others (docs/performance.md).
        #[arg(long, env = "MESH_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
        worker_threads: Option<u16>,
        /// This node's credential for the CA service: a directory with node-cert.pem and
        /// node-key.pem, made by `mesh-agent ca add-node` (not needed with a token).
        #[arg(long, env = "MESH_CA_CREDENTIAL")]
        ca_credential: Option<PathBuf>,
        /// The CA service's `https://host:port`, instead of identity.ca.address of the
        /// configuration (deploy/istiod points the agents at istiod with it).
        #[arg(long, env = "MESH_CA_ADDRESS")]
        ca_address: Option<String>,
    },
    /// Manage the mesh's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Remove a node's capture programs and maps: its workloads connect directly again.
    Uninstall {
        /// This node's name; selects the default pin directory.
        #[arg(long, env = "MESH_NODE", required_unless_present = "bpf_pin_dir")]
        node: Option<String>,
        #[arg(long)]
        bpf_pin_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Write a new root certificate and key (ECDSA P-256) into DIR: ca-cert.pem, ca-key.pem.
    Init {
        /// Directory to write into; existing files are never overwritten.
        dir: PathBuf,
    },
    /// Run the CA service (Istio's CA API over TLS) until SIGTERM.
    Serve {
        /// The CA's configuration (CA.yaml).
        #[arg(long, env = "MESH_CA_CONFIG")]
        config: PathBuf,
        /// Prometheus metrics (/metrics) and readiness (/healthz/ready).
        #[arg(long, default_value = mesh_agent::ca::DEFAULT_METRICS_ADDR)]
        metrics_addr: std::net::SocketAddr,
    },
    /// Issue a node credential into --out (node-cert.pem, node-key.pem, ca-roots.pem); the
    /// node's previous credential, if any, stops being valid.
    AddNode {
        #[arg(long, env = "MESH_CA_CONFIG")]
        config: PathBuf,
        /// The node's name, as in the cluster file.
        name: String,
        /// Directory to write the credential into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke a node's credential: it authenticates nothing any more.
    RevokeNode {
        #[arg(long, env = "MESH_CA_CONFIG")]
        config: PathBuf,
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    unblock_signals();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "mesh-agent failed");
            eprintln!("mesh-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Graph {
            prometheus,
            window,
            out,
        } => {
            let request = mesh_agent::admin::graph::GraphRequest {
                prometheus,
                window,
                out,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let edges = runtime.block_on(mesh_agent::admin::graph::draw(&request))?;
            println!("wrote {} ({} edges)", request.out.display(), edges.len());
            Ok(())
        }
        Command::Status { admin, plaintext } => {
            let report = if plaintext {
                mesh_agent::admin::status::Report::Plaintext
            } else {
                mesh_agent::admin::status::Report::Node
            };
            // A client: one thread, and no log line on stdout before the report.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let text = runtime.block_on(mesh_agent::admin::status::status(admin, report))?;
            print!("{text}");
            Ok(())
        }
        Command::Run {
            cluster,
            kubernetes: _,
            mesh_config,
            node,
            bpf_pin_dir,
            drain_timeout_secs,
            admin_addr,
            metrics_addr,
            readiness_addr,
            worker_threads,
            ca_credential,
            ca_address,
        } => runtime(worker_threads)?.block_on(agent::run(agent::Config {
            admin: AdminConfig {
                admin: admin_addr,
                metrics: metrics_addr,
                readiness: readiness_addr,
            },
            source: match (cluster, mesh_config) {
                (Some(cluster), _) => agent::Source::ClusterFile(cluster),
                (None, Some(mesh_config)) => agent::Source::Kubernetes { mesh_config },
                (None, None) => anyhow::bail!("give --cluster, or --kubernetes with --mesh-config"),
            },
            node,
            bpf_pin_dir,
            drain_timeout: Duration::from_secs(drain_timeout_secs),
            ca_credential,
            ca_address,
        })),
        Command::Ca(CaCommand::Serve {
            config,
            metrics_addr,
        }) => runtime(None)?.block_on(mesh_agent::ca::serve(&config, metrics_addr)),
        Command::Ca(CaCommand::AddNode { config, name, out }) => {
            mesh_agent::ca::add_node(&config, &name, &out)
        }
        Command::Ca(CaCommand::RevokeNode { config, name }) => {
            mesh_agent::ca::revoke_node(&config, &name)
        }
        Command::Ca(CaCommand::Init { dir }) => {
            CertificateAuthority::init(&dir)?;
            println!(
                "wrote {} (mode 0644) and {} (mode 0600) in {}",
                identity::CA_CERT_FILE,
                identity::CA_KEY_FILE,
                dir.display()
            );
            Ok(())
        }
        Command::Uninstall { node, bpf_pin_dir } => {
            let pin_dir = match (bpf_pin_dir, node) {
                (Some(dir), _) => dir,
                (None, Some(node)) => ebpf::default_pin_dir(&node),
                (None, None) => anyhow::bail!("give --node or --bpf-pin-dir"),
            };
            agent::uninstall(&pin_dir)
        }
    }
}

/// Every proxied connection holds two descriptors on each agent it crosses; the usual soft limit
/// of 1024 would cap a node at a few hundred connections.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let soft = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if soft < limit.rlim_max && libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            tracing::warn!(
                soft,
                hard = limit.rlim_max,
                "cannot raise the open files limit"
            );
        }
    }
}

fn runtime(worker_threads: Option<u16>) -> anyhow::Result<tokio::runtime::Runtime> {
    raise_open_files_limit();
    let threads = worker_threads.map_or_else(default_worker_threads, usize::from);
    tracing::info!(worker_threads = threads, "starting the runtime");
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?)
}

/// Fewer threads than CPUs: on a node the agent shares the CPUs with its workloads, and each
/// extra worker adds cross-thread wake-ups to every request (docs/performance.md).
fn default_worker_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    (cpus / 2).max(1)
}

/// A parent may start us with SIGTERM blocked (Rust's `Command` passes its mask on); the agent
/// must hear it to stop cleanly.
fn unblock_signals() {
    use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
    if let Err(err) = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None) {
        tracing::warn!(error = %err, "cannot clear the inherited signal mask");
    }
}

fn init_logging(format: LogFormat) {
    mesh_agent::logging::init(match format {
        LogFormat::Text => mesh_agent::logging::Format::Text,
        LogFormat::Json => mesh_agent::logging::Format::Json,
    });
}
