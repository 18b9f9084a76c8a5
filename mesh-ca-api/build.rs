//! Generates the client and server of Istio's certificate service from `proto/`, with protox
//! (a protobuf compiler in Rust) so that no `protoc` is needed on the build machine.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let proto = "proto/istio/v1/auth/ca.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"]).context("compiling the CA API")?;
    tonic_prost_build::configure()
        .compile_fds(descriptors)
        .context("generating the CA API's Rust code")?;
    Ok(())
}
