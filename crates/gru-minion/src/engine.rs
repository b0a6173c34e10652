//! The boundary between the agent and the engine it manages. The agent only
//! needs these few things from an engine, so other engines can be adapted.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::EngineSection;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

/// What the agent reports about its engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineStatus {
    pub queue_depth: u64,
    pub in_flight: u64,
    pub processed_total: u64,
    pub failed_total: u64,
    pub open_connections: u64,
    pub health: Health,
    pub draining: bool,
    pub drained: bool,
}

#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Where the load balancer sends work.
    fn address(&self) -> SocketAddr;
    fn status(&self) -> EngineStatus;
    /// Stops intake at message boundaries and flushes the queue. Idempotent.
    fn drain(&self);
    /// Takes work again after a drain.
    fn resume(&self);
    /// Drains, waits up to `grace` for it to finish, and stops.
    async fn shutdown(&self, grace: Duration);
}

/// gru's own HL7/MLLP pass-through engine, in this process.
pub struct ReferenceEngine {
    handle: gru_engine::engine::EngineHandle,
    advertise: Option<SocketAddr>,
}

impl ReferenceEngine {
    pub async fn start(section: &EngineSection) -> Result<Self, gru_engine::engine::EngineError> {
        let config = gru_engine::engine::EngineConfig {
            listen: section.listen,
            downstream: section.downstream,
            max_connection_age: section.max_connection_age,
            forwarders: section.forwarders,
            ..Default::default()
        };
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

    async fn shutdown(&self, grace: Duration) {
        self.handle.shutdown(grace).await;
    }
}
