//! Compiles proto/gru/v1 with protox (no system protoc) and writes the
//! descriptor set that the controller serves over gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script binary may be reused from another
    // checkout sharing the target directory.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        root.join("gru/v1/minion.proto"),
        root.join("gru/v1/admin.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("gru_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // One long-lived stream per minion: small codec buffers keep the
        // per-stream memory near 8 KiB instead of 16 KiB (DESIGN.md).
        .codec_path("crate::codec::SmallBufferCodec")
        // The CLI's --json output is the API's own shape.
        .type_attribute(".gru.v1", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
