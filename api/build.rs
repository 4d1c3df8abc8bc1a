//! Compiles the agent API and the CSI protos in pure Rust (protox): no
//! protoc needed. protox brings the google well-known types csi.proto
//! imports (descriptor, timestamp, wrappers); their Rust types come from
//! prost-types.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/volmig/agent/v1/agent.proto",
        "proto/csi/v1/csi.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
