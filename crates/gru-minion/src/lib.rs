//! The gru minion agent: runs on every minion, starts its engine, joins the
//! controller and keeps one Session open to report load and obey drains.
//!
//! Start at [`run`]. The agent talks to its engine only through the
//! [`engine::Engine`] trait, so engines other than gru's reference engine
//! can be adapted.

pub mod agent;
pub mod config;
pub mod engine;
pub mod imds;

use std::future::Future;
use std::sync::Arc;

pub use agent::{Agent, AgentError};
pub use config::{ConfigError, MinionConfig};
use engine::{Engine, ReferenceEngine};

/// Starts the engine and the agent; on `shutdown` drains the engine (up to
/// the config's stop grace) and returns.
pub async fn run(
    config: MinionConfig,
    instance_id: String,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let engine = ReferenceEngine::start(&config.engine)
        .await
        .map_err(AgentError::Engine)?;
    tracing::info!(engine = %engine.address(), "engine listening");
    let engine: Arc<dyn Engine> = Arc::new(engine);
    let grace = config.stop_grace;
    let agent = Agent::new(config, instance_id, engine.clone())?;
    agent.run(shutdown).await;
    tracing::info!(grace = ?grace, "stopping: draining the engine");
    engine.shutdown(grace).await;
    Ok(())
}

/// `{:#}`-style: each cause once, separated by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
