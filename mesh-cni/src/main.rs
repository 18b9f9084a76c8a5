//! `mesh-cni`: run by the container runtime as a chained CNI plugin, or by the DaemonSet as
//! `mesh-cni install|uninstall` to put itself in place. Runtimes exec plugins without
//! arguments, so a first argument is never ambiguous.

mod installer_cli;
mod plugin;

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    match args.next() {
        Some(sub) if sub == "install" => installer_cli::install(args),
        Some(sub) if sub == "uninstall" => installer_cli::uninstall(args),
        _ => plugin::run(),
    }
}
