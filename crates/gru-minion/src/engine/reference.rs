//! gru's own HL7/MLLP engine, in this process: the minion config's
//! `[engine]` settings go straight into `gru_engine::EngineConfig`.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use gru_engine::routes::AckMode;

use super::{Engine, EngineStatus, Health};
use crate::config::ReferenceSection;

/// gru's own HL7/MLLP pass-through engine, in this process.
pub struct ReferenceEngine {
    handle: gru_engine::engine::EngineHandle,
    advertise: Option<SocketAddr>,
}

impl ReferenceEngine {
    pub async fn start(
        section: &ReferenceSection,
    ) -> Result<Self, gru_engine::engine::EngineError> {
        let defaults = gru_engine::engine::EngineConfig::default();
        let config = gru_engine::engine::EngineConfig {
            listen: section.listen,
            // Unused when routes are given (the config allows no downstream
            // then).
            downstream: section.downstream.unwrap_or(defaults.downstream),
            max_connection_age: section.max_connection_age,
            forwarders: section.forwarders,
            ack_mode: section.ack_mode,
            queue_dir: section.queue_dir.clone(),
            routes: section.routes.clone(),
            ..defaults
        };
        if config.ack_mode == AckMode::AfterEnqueue && config.queue_dir.is_none() {
            // Allowed (benchmarks), but it breaks the rule that every ACKed
            // message reaches its destination; say so where operators look.
            tracing::warn!(
                "ack_mode = \"after-enqueue\" without queue_dir: messages already ACKed are lost if this process dies"
            );
        }
        let handle = gru_engine::engine::start(config).await?;
        Ok(ReferenceEngine {
            handle,
            advertise: section.advertise,
        })
    }
}

#[async_trait]
impl Engine for ReferenceEngine {
    fn address(&self) -> SocketAddr {
        self.advertise.unwrap_or_else(|| self.handle.local_addr())
    }

    fn status(&self) -> EngineStatus {
        let s = self.handle.status();
        EngineStatus {
            queue_depth: s.queue_depth,
            in_flight: s.in_flight,
            processed_total: s.processed,
            failed_total: s.failed,
            open_connections: s.open_connections,
            health: if s.healthy {
                Health::Healthy
            } else {
                Health::Unhealthy
            },
            draining: s.draining,
            drained: s.drained,
        }
    }

    fn drain(&self) {
        self.handle.drain();
    }

    fn resume(&self) {
        self.handle.resume();
    }

    fn can_shed(&self) -> bool {
        true
    }

    fn shed(&self, count: u64) -> u64 {
        self.handle.shed(count)
    }

    async fn shutdown(&self, grace: Duration) {
        self.handle.shutdown(grace).await;
    }

    fn ack_latency(&self) -> Option<gru_engine::latency::LatencySnapshot> {
        Some(self.handle.ack_latency())
    }
}
