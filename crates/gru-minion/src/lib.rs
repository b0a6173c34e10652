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
pub mod metrics;
pub mod sd_notify;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub use agent::{Agent, AgentError, Stopped};
pub use config::{ConfigError, MinionConfig};
use config::{EngineSection, ReferenceSection};
use engine::{Engine, ExecEngine, HttpEngine, ReferenceEngine};
pub use gru_core::error_chain;
use sd_notify::Notifier;

/// Starts the engine and the agent; on `shutdown` drains the engine (up to
/// the config's stop grace) and returns.
pub async fn run(
    config: MinionConfig,
    instance_id: String,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    run_service(config, Some(instance_id), &Notifier::disabled(), shutdown).await
}

/// [`run`] as `gru minion` runs it. With `[aws] imds = true` the instance's
/// identity comes from the instance metadata service: its id when
/// `instance_id` is `None`, and the address to advertise when the engine
/// listens on every interface. `notifier` hears `READY=1` once the engine
/// listens and the agent starts (before any warm-pool wait, which can last
/// for days), and `STOPPING=1` when the agent stops.
pub async fn run_service(
    mut config: MinionConfig,
    instance_id: Option<String>,
    notifier: &Notifier,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let identity = match &config.aws {
        None => None,
        Some(aws) => match imds::Imds::new(aws.imds_endpoint.to_string())
            .identity()
            .await
        {
            Ok(id) => Some(id),
            // The id is given: the metadata would only have refined the
            // advertised address.
            Err(e) if instance_id.is_some() => {
                tracing::warn!(error = %error_chain(&e), "cannot read the instance identity");
                None
            }
            Err(e) => return Err(AgentError::Identity(e)),
        },
    };
    let instance_id = instance_id
        .or_else(|| identity.as_ref().map(|id| id.instance_id.clone()))
        .ok_or(AgentError::NoInstanceId)?;
    if let Some(id) = &identity {
        tracing::info!(
            instance = %id.instance_id,
            region = %id.region,
            zone = %id.availability_zone,
            ip = %id.private_ip,
            "instance identity from the instance metadata"
        );
        // The external engines' addresses are always configured.
        // The external engines' addresses are always configured.
        if let EngineSection::Reference(engine) = &mut config.engine {
            engine.advertise = advertise(engine, id.private_ip);
        }
    }
    let span = tracing::info_span!("minion", instance = %instance_id);
    tracing::Instrument::instrument(serve(config, instance_id, notifier, shutdown), span).await
}

async fn serve(
    config: MinionConfig,
    instance_id: String,
    notifier: &Notifier,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let engine: Arc<dyn Engine> = match &config.engine {
        EngineSection::Reference(section) => Arc::new(
            ReferenceEngine::start(section)
                .await
                .map_err(AgentError::Engine)?,
        ),
        EngineSection::Http(section) => {
            Arc::new(HttpEngine::start(section).map_err(|e| AgentError::HttpEngine(Box::new(e)))?)
        }
        EngineSection::Exec(section) => Arc::new(ExecEngine::start(section)),
    };
    tracing::info!(engine = %engine.address(), "engine listening");
    let grace = config.stop_grace;
    let metrics_listen = config.metrics_listen;
    let mut agent = Agent::new(config, instance_id, engine.clone())?;
    let (stop_metrics, metrics_stopped) = tokio::sync::watch::channel(false);
    if let Some(at) = metrics_listen {
        let listener = tokio::net::TcpListener::bind(at)
            .await
            .map_err(|source| AgentError::Metrics { at, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| AgentError::Metrics { at, source })?;
        let advertised = metrics_advertise(bound, engine.address());
        tracing::info!(listen = %bound, advertised = %advertised, "metrics served at http://{bound}/metrics");
        agent = agent.with_metrics_address(advertised);
        let site = metrics::site(engine.clone(), agent.metrics());
        let mut stopped = metrics_stopped;
        tokio::spawn(gru_proto::metrics::serve(listener, site, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
    }
    notifier.ready();
    agent.run(shutdown).await;
    let _ = stop_metrics.send(true);
    notifier.stopping();
    tracing::info!(grace = ?grace, "stopping: draining the engine");
    engine.shutdown(grace).await;
    Ok(())
}

/// Where Prometheus reaches the metrics listener bound at `bound`: that
/// address, or the engine's host when the listener takes every interface.
fn metrics_advertise(bound: SocketAddr, engine: SocketAddr) -> SocketAddr {
    if bound.ip().is_unspecified() {
        SocketAddr::new(engine.ip(), bound.port())
    } else {
        bound
    }
}

/// The address the load balancer should reach the engine on, given the
/// instance's private IP: the configured one if any, else the private IP
/// when the engine listens on every interface (the bound 0.0.0.0 is no
/// address to send work to) on a known port.
fn advertise(engine: &ReferenceSection, private_ip: IpAddr) -> Option<SocketAddr> {
    engine.advertise.or_else(|| {
        (engine.listen.ip().is_unspecified() && engine.listen.port() != 0)
            .then(|| SocketAddr::new(private_ip, engine.listen.port()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn engine(listen: &str, advertise: Option<&str>) -> ReferenceSection {
        ReferenceSection {
            listen: listen.parse().unwrap(),
            advertise: advertise.map(|a| a.parse().unwrap()),
            downstream: Some("127.0.0.1:2576".parse().unwrap()),
            max_connection_age: Duration::ZERO,
            forwarders: 1,
            ack_mode: Default::default(),
            queue_dir: None,
            routes: Vec::new(),
        }
    }

    #[test]
    fn advertises_the_private_ip_only_for_a_wildcard_listen() {
        let ip: IpAddr = "10.0.1.23".parse().unwrap();
        let a = |listen, adv| advertise(&engine(listen, adv), ip).map(|a| a.to_string());
        assert_eq!(a("0.0.0.0:2575", None).as_deref(), Some("10.0.1.23:2575"));
        assert_eq!(
            a("0.0.0.0:2575", Some("10.9.9.9:1")).as_deref(),
            Some("10.9.9.9:1"),
            "the configured address wins"
        );
        assert_eq!(a("10.0.1.23:2575", None), None, "the bound address is fine");
        assert_eq!(a("0.0.0.0:0", None), None, "port unknown until bound");
    }
}
