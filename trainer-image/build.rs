//! Compiles the parameter-server and data-parallel protocols with protox (a Rust protobuf compiler: no system
//! protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ps.proto");
    println!("cargo:rerun-if-changed=proto/collective.proto");
    let descriptors = protox::compile(["proto/ps.proto", "proto/collective.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
