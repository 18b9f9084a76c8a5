//! `mesh-kubelet`: the test harness's kubelet, container runtime and kube-proxy for one node
//! (see [`mesh_tests::kubelet`]).

use std::process::ExitCode;

use clap::Parser as _;
use mesh_tests::kubelet::{self, Config};

fn main() -> ExitCode {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("mesh-kubelet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kubelet::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("mesh-kubelet: {e:#}");
            ExitCode::FAILURE
        }
    }
}
