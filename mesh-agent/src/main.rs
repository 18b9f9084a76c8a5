use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use mesh_agent::{agent, ebpf};
use tracing_subscriber::EnvFilter;

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
    /// Run the agent for one node until SIGTERM.
    Run {
        /// The cluster file (docs/cluster-file.md).
        #[arg(long, env = "MESH_CLUSTER_FILE")]
        cluster: PathBuf,
        /// This node's name in the cluster file.
        #[arg(long, env = "MESH_NODE")]
        node: String,
        /// Where to pin programs and maps (on bpffs). Default: /sys/fs/bpf/mesh/<node>.
        #[arg(long)]
        bpf_pin_dir: Option<PathBuf>,
        /// Seconds that in-flight connections may take to finish after SIGTERM.
        #[arg(long, default_value_t = 5)]
        drain_timeout_secs: u64,
    },
    /// Remove a node's capture programs and maps: its workloads connect directly again.
    Uninstall {
        /// This node's name; selects the default pin directory.
        #[arg(long, env = "MESH_NODE", required_unless_present = "bpf_pin_dir")]
        node: Option<String>,
        #[arg(long)]
        bpf_pin_dir: Option<PathBuf>,
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
        Command::Run {
            cluster,
            node,
            bpf_pin_dir,
            drain_timeout_secs,
        } => tokio::runtime::Runtime::new()?.block_on(agent::run(agent::Config {
            cluster_file: cluster,
            node,
            bpf_pin_dir,
            drain_timeout: Duration::from_secs(drain_timeout_secs),
        })),
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

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}
