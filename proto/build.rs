//! Compiles `proto/overlay/v1/overlay.proto` with protox (pure Rust), so building the API
//! needs no protoc. (etcd-client still needs protoc for its own protos.)
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/overlay/v1/overlay.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
