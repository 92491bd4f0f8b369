//! Compiles the two wire APIs. protoc comes from the `protoc-bin-vendored` crate so a fresh
//! machine needs no system package; `$PROTOC` overrides it.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=PROTOC");
    println!("cargo:rerun-if-changed=proto");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(match std::env::var_os("PROTOC") {
        Some(path) => path.into(),
        None => protoc_bin_vendored::protoc_bin_path()?,
    });
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_with_config(config, &["proto/banks.proto", "proto/peer.proto"], &["proto"])?;
    Ok(())
}
