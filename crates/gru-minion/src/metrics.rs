//! The agent's Prometheus metrics (docs/metrics.md): its engine's figures as
//! the agent reports them to the controller, read at scrape time, and the
//! agent's own Session.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::engine::{Engine, Health};

/// What the agent counts of its own Session.
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    /// 1 while a Session with the controller is open.
    pub connected: Gauge,
    /// Sessions opened again after the first.
    pub reconnects: Counter,
    pub reports: Counter,
    /// Unix seconds when the minion's certificate expires (0: none yet).
    pub certificate_expiry: Gauge,
}

impl AgentMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "gru_agent_session_connected",
            "1 while the agent's Session with the controller is open",
            self.connected.clone(),
        );
        registry.register(
            "gru_agent_reconnects",
            "Sessions the agent had to open again",
            self.reconnects.clone(),
        );
        registry.register(
            "gru_agent_reports",
            "Reports the agent sent",
            self.reports.clone(),
        );
        registry.register(
            "gru_agent_certificate_expiry_timestamp_seconds",
            "Unix time the minion's certificate from the controller expires (0 before the first Join); renewed at three fifths of its lifetime",
            self.certificate_expiry.clone(),
        );
    }
}

/// Reads the engine's figures at scrape time.
struct EngineCollector {
    engine: Arc<dyn Engine>,
}

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineCollector").finish_non_exhaustive()
    }
}

fn flag(b: bool) -> i64 {
    i64::from(b)
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.engine.status();
        let gauges = [
            (
                "gru_engine_queued_messages",
                "Messages accepted and not yet handed downstream",
                s.queue_depth as i64,
            ),
            (
                "gru_engine_in_flight_messages",
                "Messages handed downstream and not yet acknowledged",
                s.in_flight as i64,
            ),
            (
                "gru_engine_open_connections",
                "Inbound connections open on the engine",
                s.open_connections as i64,
            ),
            (
                "gru_engine_healthy",
                "1 when the engine's last health check passed",
                flag(s.health == Health::Healthy),
            ),
            (
                "gru_engine_draining",
                "1 when intake stopped after a Drain command",
                flag(s.draining),
            ),
        ];
        for (name, help, v) in gauges {
            let gauge = ConstGauge::new(v);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let counters = [
            (
                "gru_engine_processed_messages",
                "Messages the engine delivered",
                s.processed_total,
            ),
            (
                "gru_engine_failed_messages",
                "Messages the engine gave up on",
                s.failed_total,
            ),
        ];
        for (name, help, v) in counters {
            let counter = ConstCounter::new(v);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        if let Some(l) = self.engine.ack_latency() {
            let mut metric = encoder.encode_descriptor(
                "gru_engine_ack_duration_seconds",
                "From a message's last byte read to its ACK written",
                None,
                MetricType::Histogram,
            )?;
            metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                l.sum_seconds,
                l.count,
                &l.buckets,
                None,
            )?;
        }
        Ok(())
    }
}

/// What the agent's metrics listener serves.
pub fn site(engine: Arc<dyn Engine>, agent: &AgentMetrics) -> gru_proto::metrics::Site {
    let mut registry = Registry::default();
    gru_proto::metrics::register_build_info(&mut registry, "minion");
    agent.register(&mut registry);
    registry.register_collector(Box::new(EngineCollector { engine }));
    gru_proto::metrics::Site::new(registry)
}
