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

/// Now as a report's stamp (`MinionReport.sent_at_unix_us`): microseconds
/// since the Unix epoch on this host's clock.
pub fn report_stamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// How long ago a report was stamped, by this host's clock: `None` for an
/// unstamped report (0), zero for one from the future (its host's clock is
/// ahead of ours).
pub fn since_stamp(sent_at_unix_us: u64) -> Option<std::time::Duration> {
    (sent_at_unix_us > 0)
        .then(|| std::time::Duration::from_micros(report_stamp().saturating_sub(sent_at_unix_us)))
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_stamp_ages_by_this_hosts_clock_and_an_unstamped_report_has_no_age() {
        assert_eq!(since_stamp(0), None);
        let a_second_ago = report_stamp() - 1_000_000;
        let age = since_stamp(a_second_ago).expect("stamped");
        assert!(
            age >= Duration::from_secs(1) && age < Duration::from_secs(60),
            "{age:?}"
        );
        let from_the_future = report_stamp() + 60_000_000;
        assert_eq!(since_stamp(from_the_future), Some(Duration::ZERO));
    }
}
