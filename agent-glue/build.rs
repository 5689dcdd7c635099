//! Generates the local API's gRPC code from proto/ (needs `protoc`: Debian
//! `protobuf-compiler`, installed by `make deps`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[
                "proto/weir/v1/endpoints.proto",
                "proto/weir/v1/fqdn.proto",
                "proto/weir/v1/observer.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
