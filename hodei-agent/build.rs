//! Compiles the wire protocol with the vendored protoc: nothing to install beyond cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Log data as `Bytes`: decoding then shares the receive buffer instead of copying each
    // batch out of it, and the agent hands out pieces of its held output without copying them.
    config.bytes([".hodei.agent.v1.LogBatch.data"]);
    // Messages that carry a secret value get a hand-written `Debug` (in `protocol.rs`) that
    // prints it redacted: a derived one would print it with any `{:?}`.
    config.skip_debug([".hodei.agent.v1.JobSpec", ".hodei.agent.v1.RegisterRequest"]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/hodei/agent/v1/agent.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
