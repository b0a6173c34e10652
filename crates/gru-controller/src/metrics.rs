//! The controller's Prometheus metrics (docs/metrics.md lists them).
//!
//! Two kinds: events counted as they happen (reports, decisions, drains,
//! cloud calls, reconcile passes), through [`FleetMetrics`] handles each
//! fleet's registry and loop hold; and the fleet's current picture (desired,
//! minions by state, queue), read from the fleet's registry at scrape time
//! by [`FleetCollector`], so nothing is kept twice and a scrape costs one
//! short lock per fleet. Every series is labelled by fleet, none by minion.

use std::sync::Arc;

use async_trait::async_trait;
use gru_cloud::{
    CapacityGroup, CloudError, GroupLifecycle, GroupState, HookedGroup, InstanceId, LifecycleHook,
    LifecycleResult, Target, TargetGroup, TargetGroupSetup, TargetState,
};
use gru_core::lifecycle::MinionState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry as Prom;

use crate::reconcile::Fleet;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetLabel {
    fleet: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    fleet: String,
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabels {
    fleet: String,
    signal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    fleet: String,
    source: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    fleet: String,
    state: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Drains and deregistrations: half a second to an hour.
fn drain_histogram() -> Histogram {
    Histogram::new([
        0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    ])
}

/// Cloud calls and reconcile passes: a millisecond to half a minute.
fn call_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

/// Report delays: a tenth of a millisecond to five seconds.
pub fn delay_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ])
}

/// The controller's metric families, before they are split per fleet.
pub struct Metrics {
    received: Family<FleetLabel, Counter>,
    processed: Family<FleetLabel, Counter>,
    failed: Family<FleetLabel, Counter>,
    reports: Family<FleetLabel, Counter>,
    report_delay: Histograms<FleetLabel>,
    lost: Family<FleetLabel, Counter>,
    shed: Family<FleetLabel, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    drain: Histograms<FleetLabel>,
    deregistration: Histograms<FleetLabel>,
    cloud_requests: Family<OperationLabels, Counter>,
    cloud_errors: Family<OperationLabels, Counter>,
    cloud_duration: Histograms<OperationLabels>,
    passes: Family<FleetLabel, Counter>,
    pass_errors: Family<FleetLabel, Counter>,
    pass_duration: Histograms<FleetLabel>,
    last_pass: Family<FleetLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    tls_reloads: Family<ResultLabel, Counter>,
    signal_value: Family<SignalLabels, Gauge>,
    signal_errors: Family<SignalLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            received: Family::default(),
            processed: Family::default(),
            failed: Family::default(),
            reports: Family::default(),
            report_delay: Family::new_with_constructor(delay_histogram),
            lost: Family::default(),
            shed: Family::default(),
            decisions: Family::default(),
            drain: Family::new_with_constructor(drain_histogram),
            deregistration: Family::new_with_constructor(drain_histogram),
            cloud_requests: Family::default(),
            cloud_errors: Family::default(),
            cloud_duration: Family::new_with_constructor(call_histogram),
            passes: Family::default(),
            pass_errors: Family::default(),
            pass_duration: Family::new_with_constructor(call_histogram),
            last_pass: Family::default(),
            tls_reloads: Family::default(),
            signal_value: Family::default(),
            signal_errors: Family::default(),
        }
    }
}

impl Metrics {
    /// Registers every family in `prom`.
    pub fn register(&self, prom: &mut Prom) {
        prom.register(
            "gru_fleet_received_messages",
            "Messages the fleet's engines accepted",
            self.received.clone(),
        );
        prom.register(
            "gru_fleet_processed_messages",
            "Messages the fleet's engines delivered",
            self.processed.clone(),
        );
        prom.register(
            "gru_fleet_failed_messages",
            "Messages the fleet's engines gave up on",
            self.failed.clone(),
        );
        prom.register(
            "gru_minion_reports",
            "Reports received from the fleet's minions",
            self.reports.clone(),
        );
        prom.register(
            "gru_minion_report_delay_seconds",
            "From a minion sending a report to the controller having applied it (includes clock skew between their hosts)",
            self.report_delay.clone(),
        );
        prom.register(
            "gru_minions_lost",
            "Minions that went silent past the lost timeout",
            self.lost.clone(),
        );
        prom.register(
            "gru_connections_shed",
            "Connections in-service minions were asked to close so their senders reconnect onto minions below their share",
            self.shed.clone(),
        );
        prom.register(
            "gru_signal_value",
            "The last value read from an external signal the fleet's policy sizes on (an SQS queue's visible plus in-flight messages)",
            self.signal_value.clone(),
        );
        prom.register(
            "gru_signal_read_errors",
            "Reads of an external signal that failed or got no answer in time (its rule then recommends nothing that pass)",
            self.signal_errors.clone(),
        );
        prom.register(
            "gru_scaling_decisions",
            "Decisions that changed the fleet's size, by what decided and which way",
            self.decisions.clone(),
        );
        prom.register(
            "gru_drain_duration_seconds",
            "From a minion's drain start to Drained",
            self.drain.clone(),
        );
        prom.register(
            "gru_deregistration_duration_seconds",
            "Time in Draining/Deregistering: until the load balancer sends no new connections",
            self.deregistration.clone(),
        );
        prom.register(
            "gru_cloud_requests",
            "Calls to the cloud provider",
            self.cloud_requests.clone(),
        );
        prom.register(
            "gru_cloud_request_errors",
            "Calls to the cloud provider that failed",
            self.cloud_errors.clone(),
        );
        prom.register(
            "gru_cloud_request_duration_seconds",
            "Latency of calls to the cloud provider",
            self.cloud_duration.clone(),
        );
        prom.register(
            "gru_reconcile_passes",
            "Reconcile passes that completed",
            self.passes.clone(),
        );
        prom.register(
            "gru_reconcile_errors",
            "Reconcile passes that failed (the cloud could not be read)",
            self.pass_errors.clone(),
        );
        prom.register(
            "gru_reconcile_duration_seconds",
            "One reconcile pass, cloud calls included",
            self.pass_duration.clone(),
        );
        prom.register(
            "gru_reconcile_last_pass_timestamp_seconds",
            "Unix time of the last completed reconcile pass",
            self.last_pass.clone(),
        );
        prom.register(
            "gru_tls_reloads",
            "Attempts to load new TLS files (SIGHUP or a changed file), by whether they were loaded or refused",
            self.tls_reloads.clone(),
        );
        for result in ["loaded", "refused"] {
            drop(self.tls_reloads.get_or_create(&ResultLabel { result }));
        }
    }

    /// Counts an attempt to load new TLS files.
    pub fn tls_reload(&self, loaded: bool) {
        let result = if loaded { "loaded" } else { "refused" };
        self.tls_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The handles one fleet counts with. Creating them makes the fleet's
    /// series exist (at zero) from the start, so rates and alerts have data.
    pub fn fleet(&self, name: &str) -> FleetMetrics {
        let label = FleetLabel {
            fleet: name.to_owned(),
        };
        FleetMetrics {
            fleet: name.to_owned(),
            received: self.received.get_or_create_owned(&label),
            processed: self.processed.get_or_create_owned(&label),
            failed: self.failed.get_or_create_owned(&label),
            reports: self.reports.get_or_create_owned(&label),
            report_delay: self.report_delay.get_or_create_owned(&label),
            lost: self.lost.get_or_create_owned(&label),
            shed: self.shed.get_or_create_owned(&label),
            decisions: self.decisions.clone(),
            signal_value: self.signal_value.clone(),
            signal_errors: self.signal_errors.clone(),
            drain: self.drain.get_or_create_owned(&label),
            deregistration: self.deregistration.get_or_create_owned(&label),
            cloud: CloudMetrics {
                fleet: name.to_owned(),
                requests: self.cloud_requests.clone(),
                errors: self.cloud_errors.clone(),
                duration: self.cloud_duration.clone(),
            },
            passes: self.passes.get_or_create_owned(&label),
            pass_errors: self.pass_errors.get_or_create_owned(&label),
            pass_duration: self.pass_duration.get_or_create_owned(&label),
            last_pass: self.last_pass.get_or_create_owned(&label),
        }
    }
}

/// One fleet's counters and histograms. Cloning shares them.
#[derive(Clone, Debug)]
pub struct FleetMetrics {
    fleet: String,
    pub received: Counter,
    pub processed: Counter,
    pub failed: Counter,
    pub reports: Counter,
    pub report_delay: Histogram,
    pub lost: Counter,
    /// Connections minions were asked to shed (rebalancing).
    pub shed: Counter,
    decisions: Family<DecisionLabels, Counter>,
    signal_value: Family<SignalLabels, Gauge>,
    signal_errors: Family<SignalLabels, Counter>,
    pub drain: Histogram,
    pub deregistration: Histogram,
    pub cloud: CloudMetrics,
    pub passes: Counter,
    pub pass_errors: Counter,
    pub pass_duration: Histogram,
    pub last_pass: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl FleetMetrics {
    /// Handles registered nowhere: for a registry outside a controller
    /// (tests, benchmarks).
    pub fn detached(fleet: &str) -> FleetMetrics {
        Metrics::default().fleet(fleet)
    }

    /// Records a value read from signal `name`.
    pub fn signal_read(&self, name: &str, value: u64) {
        self.signal_value
            .get_or_create(&SignalLabels {
                fleet: self.fleet.clone(),
                signal: name.to_owned(),
            })
            .set(i64::try_from(value).unwrap_or(i64::MAX));
    }

    /// Counts a failed read of signal `name`.
    pub fn signal_failed(&self, name: &str) {
        self.signal_errors
            .get_or_create(&SignalLabels {
                fleet: self.fleet.clone(),
                signal: name.to_owned(),
            })
            .inc();
    }

    /// Counts a decision that moved the size `direction` ("up" or "down"),
    /// decided by `source`.
    pub fn decision(&self, source: &str, direction: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                fleet: self.fleet.clone(),
                source: source.to_owned(),
                direction,
            })
            .inc();
    }
}

/// Counts and times a fleet's cloud calls by operation.
#[derive(Clone, Debug)]
pub struct CloudMetrics {
    fleet: String,
    requests: Family<OperationLabels, Counter>,
    errors: Family<OperationLabels, Counter>,
    duration: Histograms<OperationLabels>,
}

impl CloudMetrics {
    async fn call<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, CloudError>>,
    ) -> Result<T, CloudError> {
        let labels = OperationLabels {
            fleet: self.fleet.clone(),
            operation,
        };
        let start = std::time::Instant::now();
        let r = call.await;
        self.duration
            .get_or_create(&labels)
            .observe(start.elapsed().as_secs_f64());
        self.requests.get_or_create(&labels).inc();
        if r.is_err() {
            self.errors.get_or_create(&labels).inc();
        }
        r
    }
}

/// A provider with every call counted and timed: wraps each of a fleet's
/// provider traits.
pub struct Metered<T: ?Sized> {
    inner: Arc<T>,
    metrics: CloudMetrics,
}

impl<T: ?Sized> Metered<T> {
    pub fn new(inner: Arc<T>, metrics: CloudMetrics) -> Self {
        Metered { inner, metrics }
    }
}

#[async_trait]
impl CapacityGroup for Metered<dyn CapacityGroup> {
    async fn describe(&self) -> Result<GroupState, CloudError> {
        self.metrics.call("describe", self.inner.describe()).await
    }
    async fn set_desired(&self, desired: u32) -> Result<(), CloudError> {
        self.metrics
            .call("set_desired", self.inner.set_desired(desired))
            .await
    }
    async fn terminate(&self, id: &InstanceId, decrement: bool) -> Result<(), CloudError> {
        self.metrics
            .call("terminate", self.inner.terminate(id, decrement))
            .await
    }
    async fn running(&self, id: &InstanceId) -> Result<bool, CloudError> {
        self.metrics.call("running", self.inner.running(id)).await
    }
}

#[async_trait]
impl TargetGroup for Metered<dyn TargetGroup> {
    async fn register(&self, target: &Target) -> Result<(), CloudError> {
        self.metrics
            .call("register", self.inner.register(target))
            .await
    }
    async fn deregister(&self, target: &Target) -> Result<(), CloudError> {
        self.metrics
            .call("deregister", self.inner.deregister(target))
            .await
    }
    async fn target_state(&self, target: &Target) -> Result<TargetState, CloudError> {
        self.metrics
            .call("target_state", self.inner.target_state(target))
            .await
    }
    fn connections_total(&self, target: &Target) -> Option<u64> {
        self.inner.connections_total(target)
    }
}

#[async_trait]
impl GroupLifecycle for Metered<dyn GroupLifecycle> {
    async fn describe_hooked(&self) -> Result<HookedGroup, CloudError> {
        self.metrics
            .call("describe_hooked", self.inner.describe_hooked())
            .await
    }
    async fn target_group_setup(&self) -> Result<TargetGroupSetup, CloudError> {
        self.metrics
            .call("target_group_setup", self.inner.target_group_setup())
            .await
    }
    async fn complete_lifecycle_action(
        &self,
        id: &InstanceId,
        hook: LifecycleHook,
        result: LifecycleResult,
    ) -> Result<(), CloudError> {
        self.metrics
            .call(
                "complete_lifecycle_action",
                self.inner.complete_lifecycle_action(id, hook, result),
            )
            .await
    }
    async fn record_lifecycle_heartbeat(
        &self,
        id: &InstanceId,
        hook: LifecycleHook,
    ) -> Result<(), CloudError> {
        self.metrics
            .call(
                "record_lifecycle_heartbeat",
                self.inner.record_lifecycle_heartbeat(id, hook),
            )
            .await
    }
    async fn set_unhealthy(&self, id: &InstanceId) -> Result<(), CloudError> {
        self.metrics
            .call("set_unhealthy", self.inner.set_unhealthy(id))
            .await
    }
    async fn set_scale_in_protection(
        &self,
        ids: &[InstanceId],
        protected: bool,
    ) -> Result<(), CloudError> {
        self.metrics
            .call(
                "set_scale_in_protection",
                self.inner.set_scale_in_protection(ids, protected),
            )
            .await
    }
}

/// The states `gru_fleet_minions` reports, by label value.
const STATES: [&str; 9] = [
    "pending",
    "joining",
    "ready",
    "in_service",
    "unhealthy",
    "draining",
    "drained",
    "terminating",
    "lost",
];

/// Where `state` counts in [`STATES`]: draining phases are one state here,
/// and Gone is not a minion any more.
fn state_index(state: MinionState) -> Option<usize> {
    Some(match state {
        MinionState::Pending => 0,
        MinionState::Joining => 1,
        MinionState::Ready => 2,
        MinionState::InService => 3,
        MinionState::Unhealthy => 4,
        MinionState::Draining(_) => 5,
        MinionState::Drained => 6,
        MinionState::Terminating => 7,
        MinionState::Lost => 8,
        MinionState::Gone => return None,
    })
}

/// What a fleet looks like now, as far as the gauges go.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FleetPicture {
    pub desired: Option<u32>,
    pub group_desired: Option<u32>,
    pub capacity: u64,
    pub by_state: [u64; STATES.len()],
    pub active_min: u32,
    pub active_max: u32,
    pub paused: bool,
    pub pinned: bool,
    pub queued: u64,
    pub in_flight: u64,
    pub sessions: u64,
    pub drains_overdue: u64,
    /// Messages per second arriving, as the last decision estimated it.
    pub arrivals_per_s: Option<f64>,
    /// What one minion serves per second at full load, as learned.
    pub service_rate: Option<f64>,
    /// What the forecast asked for at the last decision.
    pub forecast: Option<u32>,
}

impl FleetPicture {
    /// Minions in the state labelled `label` (see docs/metrics.md).
    pub fn in_state(&self, label: &str) -> u64 {
        STATES
            .iter()
            .position(|l| *l == label)
            .map_or(0, |i| self.by_state[i])
    }

    /// Counts `state` under its label.
    pub fn count(&mut self, state: MinionState) {
        if let Some(i) = state_index(state) {
            self.by_state[i] += 1;
        }
    }
}

/// Reads every fleet's picture at scrape time.
pub struct FleetCollector {
    pub fleets: Vec<Arc<Fleet>>,
}

impl std::fmt::Debug for FleetCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCollector")
            .field("fleets", &self.fleets.len())
            .finish()
    }
}

type Gauges = [(&'static str, &'static str, fn(&FleetPicture) -> Option<f64>)];

const FLEET_GAUGES: &Gauges = &[
    (
        "gru_fleet_desired",
        "The size the controller last decided",
        |p| p.desired.map(f64::from),
    ),
    (
        "gru_fleet_group_desired",
        "The group's desired capacity as the cloud last reported it",
        |p| p.group_desired.map(f64::from),
    ),
    (
        "gru_fleet_capacity",
        "Minions that count as capacity (taking work)",
        |p| Some(p.capacity as f64),
    ),
    (
        "gru_fleet_active_min",
        "The fleet's lower bound in force after schedule windows",
        |p| Some(f64::from(p.active_min)),
    ),
    (
        "gru_fleet_active_max",
        "The fleet's upper bound in force after schedule windows",
        |p| Some(f64::from(p.active_max)),
    ),
    (
        "gru_fleet_paused",
        "1 when an operator paused the fleet",
        |p| Some(if p.paused { 1.0 } else { 0.0 }),
    ),
    (
        "gru_fleet_pinned",
        "1 when an operator pinned the fleet's size",
        |p| Some(if p.pinned { 1.0 } else { 0.0 }),
    ),
    (
        "gru_fleet_queued_messages",
        "Messages queued on the fleet's minions, as last reported",
        |p| Some(p.queued as f64),
    ),
    (
        "gru_fleet_in_flight_messages",
        "Messages handed downstream and not yet acknowledged, as last reported",
        |p| Some(p.in_flight as f64),
    ),
    ("gru_fleet_sessions", "Minions with an open Session", |p| {
        Some(p.sessions as f64)
    }),
    (
        "gru_fleet_drains_overdue",
        "Draining minions past their drain deadline",
        |p| Some(p.drains_overdue as f64),
    ),
    (
        "gru_fleet_arrival_rate",
        "Messages per second arriving, as the last decision estimated it",
        |p| p.arrivals_per_s,
    ),
    (
        "gru_fleet_service_rate",
        "Messages per second one minion serves at full load, as learned",
        |p| p.service_rate,
    ),
    (
        "gru_fleet_forecast_minions",
        "The minions the forecast asked for at the last decision, acted on or not",
        |p| p.forecast.map(f64::from),
    ),
];

impl Collector for FleetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = crate::now();
        let pictures: Vec<(String, FleetPicture)> = self
            .fleets
            .iter()
            .map(|f| (f.name().to_owned(), f.registry().picture(f.name(), now)))
            .collect();
        for (name, help, value) in FLEET_GAUGES {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (fleet, p) in &pictures {
                if let Some(v) = value(p) {
                    let label = FleetLabel {
                        fleet: fleet.clone(),
                    };
                    ConstGauge::new(v).encode(metric.encode_family(&label)?)?;
                }
            }
        }
        let mut metric = encoder.encode_descriptor(
            "gru_fleet_minions",
            "Minions per state",
            None,
            MetricType::Gauge,
        )?;
        for (fleet, p) in &pictures {
            for (state, n) in STATES.into_iter().zip(p.by_state) {
                let labels = StateLabels {
                    fleet: fleet.clone(),
                    state,
                };
                ConstGauge::new(n as i64).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
