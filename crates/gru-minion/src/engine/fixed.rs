//! An engine that only reports a queue it is told: for benchmarks and tests
//! that drive the agent against a real controller without a real engine.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use super::{Engine, EngineStatus, Health};

/// Healthy, never draining, with `queue` messages queued and nothing else
/// going on; its address is the discard port on loopback, which nothing
/// is sent to.
#[derive(Debug, Default)]
pub struct FixedEngine {
    queue: AtomicU64,
}

impl FixedEngine {
    pub fn new(queue: u64) -> Self {
        FixedEngine {
            queue: AtomicU64::new(queue),
        }
    }

    /// What the next status reports as queued.
    pub fn set_queue(&self, queue: u64) {
        self.queue.store(queue, Ordering::SeqCst);
    }
}

#[async_trait]
impl Engine for FixedEngine {
    fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }
    fn status(&self) -> EngineStatus {
        EngineStatus {
            queue_depth: self.queue.load(Ordering::SeqCst),
            in_flight: 0,
            processed_total: 0,
            failed_total: 0,
            open_connections: 0,
            health: Health::Healthy,
            draining: false,
            drained: false,
        }
    }
    fn drain(&self) {}
    fn resume(&self) {}
    async fn shutdown(&self, _grace: Duration) {}
}
