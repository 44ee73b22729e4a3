//! Compiles the Open Inference Protocol with protox (a Rust protobuf compiler: no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/grpc_predict_v2.proto");
    println!("cargo:rerun-if-changed=proto/feedback.proto");
    let descriptors = protox::compile(
        ["proto/grpc_predict_v2.proto", "proto/feedback.proto"],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
