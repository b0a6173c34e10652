//! gru's gRPC contract, generated at build time from `proto/gru/v1` by
//! protox + tonic-prost-build (no system protoc needed).
//!
//! This is the only crate that knows prost types: the controller, the minion
//! agent and the CLI convert to their own types at their edge.

pub mod codec;

/// Types and services of the `gru.v1` package.
pub mod v1 {
    tonic::include_proto!("gru.v1");
}

/// The encoded `FileDescriptorSet` of every gru proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gru_descriptor.bin"));
