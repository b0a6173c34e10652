//! The boundary between the agent and the engine it manages. The agent only
//! needs these few things from an engine, so other engines can be adapted:
//! [`ReferenceEngine`] runs gru's own engine in this process; [`HttpEngine`]
//! and [`ExecEngine`] watch and drive an engine that runs on its own;
//! [`FixedEngine`] only reports a queue it is told (benchmarks, tests).

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;

mod adapter;
pub mod exec;
mod fixed;
pub mod http;
mod reference;

pub use exec::ExecEngine;
pub use fixed::FixedEngine;
pub use http::HttpEngine;
pub use reference::ReferenceEngine;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not known yet: the engine has not answered since the agent started.
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
    /// Whether [`Engine::shed`] closes connections; engines that cannot shed
    /// leave rebalancing to their own max connection age.
    fn can_shed(&self) -> bool {
        false
    }
    /// Closes `count` inbound connections at message boundaries (idle ones
    /// first, busy ones right after their ACK) so their senders reconnect
    /// elsewhere; replaces any earlier request. Returns how many will close.
    fn shed(&self, count: u64) -> u64 {
        let _ = count;
        0
    }
    /// Drains, waits up to `grace` for it to finish, and stops.
    async fn shutdown(&self, grace: Duration);
    /// How long the engine took to ACK messages, where it can tell (gru's
    /// reference engine can; engines watched from outside cannot).
    fn ack_latency(&self) -> Option<gru_engine::latency::LatencySnapshot> {
        None
    }
}
