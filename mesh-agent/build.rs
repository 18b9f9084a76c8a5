//! Builds the kernel programs of `mesh-ebpf` with the nightly toolchain pinned in the
//! workspace's `ebpf-toolchain` file and bpf-linker, so that
//! a plain `cargo build` of the agent embeds up-to-date eBPF objects. `AYA_BUILD_SKIP=1` skips it
//! (for clippy or docs).
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "mesh-ebpf")
        .ok_or_else(|| anyhow!("mesh-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("mesh-ebpf manifest has no parent directory"))?;
    let pin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf-toolchain");
    println!("cargo:rerun-if-changed={}", pin.display());
    let toolchain =
        std::fs::read_to_string(&pin).with_context(|| format!("reading {}", pin.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(toolchain.trim()),
    )
}
