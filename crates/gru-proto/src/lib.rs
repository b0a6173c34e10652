//! gru's gRPC contract, generated at build time from `proto/gru/v1` by
//! protox + tonic-prost-build (no system protoc needed).
//!
//! This is the only crate that knows prost types: the controller, the minion
//! agent and the CLI convert to their own types at their edge.

pub mod codec;
pub mod metrics;
pub mod preflight;

/// Types and services of the `gru.v1` package.
pub mod v1 {
    tonic::include_proto!("gru.v1");
}

/// The encoded `FileDescriptorSet` of every gru proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gru_descriptor.bin"));

/// Makes ring the process's TLS crypto provider, once; later calls change
/// nothing. Every gRPC endpoint calls it before its first TLS connection.
///
/// Why: rustls picks a provider by itself only when exactly one is compiled
/// in. The AWS SDK brings aws-lc-rs beside tonic's ring, and cargo unifies
/// features across the workspace, so without this the first TLS handshake
/// panics ("no process-level CryptoProvider available").
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
