//! Compiles the vendored ONNX schema with prost-build. The descriptors come from protox, a
//! protobuf compiler written in Rust, so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/onnx.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    prost_build::Config::new()
        // Every `bytes` field becomes `bytes::Bytes`: decoding from a memory map then slices the
        // map instead of copying weights.
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
