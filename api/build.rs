//! Compiles the agent API protos in pure Rust (protox): no protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/volmig/agent/v1/agent.proto"];
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
