//! Compiles the two wire APIs. protoc comes from the `protoc-bin-vendored` crate so a fresh
//! machine needs no system package; `$PROTOC` overrides it.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=PROTOC");
    println!("cargo:rerun-if-changed=proto");
    let protoc: std::path::PathBuf = match std::env::var_os("PROTOC") {
        Some(path) => path.into(),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let config = || {
        let mut config = tonic_prost_build::Config::new();
        config.protoc_executable(&protoc);
        config
    };
    // The customer API's descriptors are also compiled in for gRPC server reflection
    // (grpcurl and friends need no .proto file); the peer API's are not published.
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("banks_descriptor.bin"))
        .compile_with_config(config(), &["proto/banks.proto"], &["proto"])?;
    tonic_prost_build::configure().compile_with_config(config(), &["proto/peer.proto"], &["proto"])?;
    Ok(())
}
