/// The eBPF binary is linked by `bpf-linker`, a dependency cargo cannot see: rebuild when the
/// linker on PATH changes.
fn main() {
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
