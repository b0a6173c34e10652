//! The reconcile loop: one task per fleet that brings the cloud in line with
//! the registry, and the registry in line with the cloud.
//!
//! A pass is idempotent: every action it takes is safe to repeat (register a
//! registered target, deregister a draining one), and a pass that fails half
//! way leaves minions in states the next pass continues from. Each pass
//! returns when it wants to run again, like kube-runtime's `Action::requeue`.
//!
//! AWS fleets add what only an Auto Scaling group has. Each pass reads the
//! group's lifecycle hook wait states into the registry ([`AwsView`]): an
//! instance the group itself is terminating (`Terminating:Wait`) is drained
//! like a scale-in victim, without decrement, heartbeated while it drains and
//! then released with CONTINUE, never terminated by the controller; an
//! instance held at launch (`Pending:Wait`) is released with CONTINUE once
//! its minion's engine is healthy, or ABANDONed if it never joins; one in
//! service that never joins is reported unhealthy so the group replaces it.
//! The first pass reads whether the target group is attached to the group
//! (then the group registers targets and the controller does not) and its
//! deregistration delay, which bounds the wait for a drained target to show
//! `unused`.

use crate::metrics::{FleetCollector, FleetMetrics, Metered, Metrics};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gru_cloud::{CapacityGroup, CloudError, GroupState, SignalSource, TargetGroup, TargetState};
use gru_core::{DrainPhase, LifecycleEvent, MinionState};
use tokio::sync::{Notify, broadcast};

use crate::config::{ControllerConfig, FleetConfig};
use crate::registry::{
    Action, AwsSetup, AwsView, Command, DecrementClaim, Event, EventKind, Finish,
    PROTECT_AFTER_WORK, Registry, Report, TERMINATE_RETRY_AFTER, unix_ms,
};
use crate::store::{Loaded, Store, StoreError};
use gru_cloud::{GroupLifecycle, InstanceId, LifecycleHook, LifecycleResult};
pub use gru_core::error_chain;
use gru_core::plan::Limits;
use gru_core::policy::ExternalSignal;

/// How soon a pass with work under way (a drain, a registration) runs again.
pub const BUSY_REQUEUE: Duration = Duration::from_millis(200);
/// The same for an AWS fleet: each pass describes the group and its
/// instances, and AWS throttles Describe calls per account. Reports that
/// change a minion's state still wake the loop at once.
pub const AWS_BUSY_REQUEUE: Duration = Duration::from_secs(2);
/// A pass woken early (by a Join or a report that changed a minion) waits
/// until this many times the last pass's bookkeeping (its time under the
/// fleet's lock) has gone by since that pass, so that a large fleet's loop
/// holds the lock at most a fifth of the time while Joins and reports
/// stream in, instead of running back to back.
pub const WAKE_GAP_FACTOR: u32 = 4;
/// Below this the gap is not worth waiting for: small fleets react at once.
pub const WAKE_GAP_MIN: Duration = Duration::from_millis(10);
/// How long a woken loop waits after a pass whose bookkeeping took `held`.
pub fn wake_gap(held: Duration) -> Duration {
    let gap = held * WAKE_GAP_FACTOR;
    if gap < WAKE_GAP_MIN {
        Duration::ZERO
    } else {
        gap
    }
}

/// The longest a pass waits for one signal (an SQS call).
pub const SIGNAL_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the event log is pruned to its retention.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// A fleet's providers: how the controller reaches its group and load balancer.
#[derive(Clone)]
pub struct FleetRuntime {
    pub config: FleetConfig,
    pub group: Arc<dyn CapacityGroup>,
    pub targets: Arc<dyn TargetGroup>,
    /// What only a group with lifecycle hooks has (AWS): hook actions and
    /// heartbeats, instance health, protection, the target group's
    /// settings. `None` for other providers.
    pub hooks: Option<Arc<dyn GroupLifecycle>>,
    /// Signals from outside the fleet its policy's external rules size on
    /// (an SQS queue's backlog), read once a pass.
    pub signals: Vec<Arc<dyn SignalSource>>,
}

impl FleetRuntime {
    /// The same providers, each call counted and timed in `metrics`.
    fn metered(self, metrics: &FleetMetrics) -> Self {
        FleetRuntime {
            config: self.config,
            group: Arc::new(Metered::new(self.group, metrics.cloud.clone())),
            targets: Arc::new(Metered::new(self.targets, metrics.cloud.clone())),
            hooks: self.hooks.map(|h| {
                Arc::new(Metered::new(h, metrics.cloud.clone())) as Arc<dyn GroupLifecycle>
            }),
            signals: self.signals,
        }
    }

    /// With `signal` read every pass for the policy's external rules.
    pub fn with_signal(mut self, signal: Arc<dyn SignalSource>) -> Self {
        self.signals.push(signal);
        self
    }

    /// A fleet whose group has no lifecycle hooks (the local provider).
    pub fn new(
        config: FleetConfig,
        group: Arc<dyn CapacityGroup>,
        targets: Arc<dyn TargetGroup>,
    ) -> Self {
        FleetRuntime {
            config,
            group,
            targets,
            hooks: None,
            signals: Vec::new(),
        }
    }

    /// A fleet whose one provider is the group, the targets and the
    /// lifecycle calls (the AWS provider's `AwsFleet`).
    pub fn with_hooks<P>(config: FleetConfig, provider: Arc<P>) -> Self
    where
        P: CapacityGroup + TargetGroup + GroupLifecycle,
    {
        FleetRuntime {
            config,
            group: provider.clone(),
            targets: provider.clone(),
            hooks: Some(provider),
            signals: Vec::new(),
        }
    }
}

/// One fleet: its providers, what the controller knows of it, and its
/// loop's wake-up. Fleets share no lock: a report or a pass of one fleet
/// never waits on another's.
pub struct Fleet {
    pub runtime: FleetRuntime,
    registry: Mutex<Registry>,
    /// Reports read from Sessions and not applied yet. A Session never
    /// waits for the registry's lock: it queues its report here and applies
    /// the queue only if the lock is free. Whoever holds the lock applies
    /// the queue when it takes the lock and again when it lets it go, so a
    /// long pass holds reports up but no Session, and no runtime thread.
    inbox: Mutex<Vec<Inbound>>,
    wake: Notify,
    metrics: FleetMetrics,
    /// The last pass's bookkeeping under the lock, in nanoseconds.
    bookkeeping_ns: std::sync::atomic::AtomicU64,
    /// The last failure to read a signal, so it is an event once, not
    /// every pass.
    signal_error: Mutex<Option<String>>,
}

/// A report waiting in a fleet's inbox.
struct Inbound {
    minion: Arc<str>,
    generation: u64,
    report: Report,
    /// When the Session read it.
    at: Instant,
    /// The minion's stamp (Unix microseconds), 0 if none.
    sent_at_unix_us: u64,
}

/// The fleet's registry, locked. Letting it go applies the reports that
/// queued up meanwhile.
pub struct RegistryGuard<'a> {
    fleet: &'a Fleet,
    guard: Option<MutexGuard<'a, Registry>>,
}

impl std::ops::Deref for RegistryGuard<'_> {
    type Target = Registry;
    fn deref(&self) -> &Registry {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for RegistryGuard<'_> {
    fn deref_mut(&mut self) -> &mut Registry {
        self.guard.as_mut().expect("held until dropped")
    }
}

impl Drop for RegistryGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // A report queued after the last look at the inbox but before the
        // lock was free found the lock taken: look again once it is free,
        // and take it back if nobody else did.
        let mut guard = self.guard.take();
        while let Some(mut reg) = guard {
            self.fleet.apply_inbox(&mut reg);
            drop(reg);
            if lock(&self.fleet.inbox).is_empty() {
                break;
            }
            guard = self.fleet.try_lock_registry();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock would be a bug; the data is still the
    // best we have, so keep going with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Fleet {
    pub fn name(&self) -> &str {
        &self.runtime.config.name
    }

    /// The fleet's registry, with every report read so far applied. Never
    /// hold the guard across an `.await`.
    pub fn registry(&self) -> RegistryGuard<'_> {
        let mut reg = lock(&self.registry);
        self.apply_inbox(&mut reg);
        RegistryGuard {
            fleet: self,
            guard: Some(reg),
        }
    }

    fn try_lock_registry(&self) -> Option<MutexGuard<'_, Registry>> {
        match self.registry.try_lock() {
            Ok(reg) => Some(reg),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Takes a report read from minion `minion`'s Session `generation` at
    /// `at`: applied now if the registry is free, else by whoever holds it
    /// as it lets it go. Wakes the loop if the report changed the minion's
    /// state.
    pub fn report(
        &self,
        minion: &Arc<str>,
        generation: u64,
        report: Report,
        at: Instant,
        sent_at_unix_us: u64,
    ) {
        lock(&self.inbox).push(Inbound {
            minion: minion.clone(),
            generation,
            report,
            at,
            sent_at_unix_us,
        });
        if let Some(reg) = self.try_lock_registry() {
            drop(RegistryGuard {
                fleet: self,
                guard: Some(reg),
            });
        }
    }

    /// Applies the queued reports, in the order they were read.
    fn apply_inbox(&self, reg: &mut Registry) {
        let queued = std::mem::take(&mut *lock(&self.inbox));
        let mut changed = false;
        for r in queued {
            changed |= reg.report(&r.minion, r.generation, r.report, r.at);
            // From the minion's stamp to applied, on two hosts' clocks.
            if let Some(delay) = gru_proto::since_stamp(r.sent_at_unix_us) {
                self.metrics.report_delay.observe(delay.as_secs_f64());
            }
        }
        if changed {
            self.wake();
        }
    }

    /// Makes the fleet's loop run now instead of at its next tick.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// The controller's shared state, handed to every server and loop.
pub struct Controller {
    pub config: ControllerConfig,
    fleets: BTreeMap<String, Arc<Fleet>>,
    pub events: broadcast::Sender<Event>,
    pub join_token: String,
    store: Arc<dyn Store>,
    metrics: Metrics,
    /// The lease this controller leads under, when it shares its store
    /// with standbys; unset with a store of its own.
    leadership: std::sync::OnceLock<Arc<dyn crate::ha::Leadership>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("failed to describe the group of fleet {fleet}")]
    Describe {
        fleet: String,
        #[source]
        source: CloudError,
    },
    #[error("failed to read the target group settings of fleet {fleet}")]
    AwsSetup {
        fleet: String,
        #[source]
        source: CloudError,
    },
}

impl Controller {
    /// A controller for `fleets`, resumed from `store`.
    pub fn new(
        config: ControllerConfig,
        fleets: Vec<FleetRuntime>,
        join_token: String,
        store: Arc<dyn Store>,
    ) -> Result<Arc<Self>, StoreError> {
        let (events, _) = broadcast::channel(1024);
        let mut loaded = store.load()?;
        for m in &loaded.minions {
            if !fleets.iter().any(|f| f.config.name == m.fleet) {
                tracing::warn!(minion = %m.id, fleet = %m.fleet, "the store holds a minion of a fleet no longer configured; leaving it alone");
            }
        }
        let now = crate::now();
        let metrics = Metrics::default();
        let mut built = BTreeMap::new();
        for runtime in fleets {
            let name = runtime.config.name.clone();
            let fleet_metrics = metrics.fleet(&name);
            let runtime = runtime.metered(&fleet_metrics);
            let (mine, rest): (Vec<_>, Vec<_>) =
                loaded.minions.into_iter().partition(|m| m.fleet == name);
            loaded.minions = rest;
            let (fleet_rows, rest): (Vec<_>, Vec<_>) =
                loaded.fleets.into_iter().partition(|f| f.name == name);
            loaded.fleets = rest;
            let (ledger, rest): (Vec<_>, Vec<_>) =
                loaded.ledger.into_iter().partition(|l| l.fleet == name);
            loaded.ledger = rest;
            let (histories, rest): (Vec<_>, Vec<_>) =
                loaded.histories.into_iter().partition(|h| h.name == name);
            loaded.histories = rest;
            let part = Loaded {
                minions: mine,
                fleets: fleet_rows,
                ledger,
                histories,
            };
            let mut registry = Registry::open(
                std::slice::from_ref(&runtime.config),
                events.clone(),
                store.clone(),
                part,
                now,
            )?;
            if let Some(f) = registry.fleet_state_mut(&name) {
                f.metrics = fleet_metrics.clone();
            }
            built.insert(
                name,
                Arc::new(Fleet {
                    runtime,
                    registry: Mutex::new(registry),
                    inbox: Mutex::default(),
                    wake: Notify::new(),
                    metrics: fleet_metrics,
                    bookkeeping_ns: Default::default(),
                    signal_error: Mutex::new(None),
                }),
            );
        }
        Ok(Arc::new(Controller {
            config,
            fleets: built,
            events,
            join_token,
            store,
            metrics,
            leadership: std::sync::OnceLock::new(),
        }))
    }

    /// Records the lease this controller leads under (set once).
    pub fn lead_under(&self, leadership: Arc<dyn crate::ha::Leadership>) {
        let _ = self.leadership.set(leadership);
    }

    /// Which controller leads, for `ControllerStatus`.
    pub fn leadership(&self) -> crate::ha::LeaseStatus {
        match self.leadership.get() {
            Some(l) => l.status(),
            None => crate::ha::LeaseStatus {
                controller: "this controller".to_owned(),
                leading: true,
                store: format!("{}:{}", self.store.kind(), self.store.location().display()),
                ..Default::default()
            },
        }
    }

    /// Prunes the event log to the configured retention, now and every
    /// [`PRUNE_EVERY`], until `shutdown` resolves.
    pub async fn prune_events(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let before = SystemTime::now()
                .checked_sub(self.config.event_retention)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            match self.store.prune_events(unix_ms(before)) {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, "pruned events past retention"),
                Err(e) => tracing::warn!(error = %error_chain(&e), "failed to prune events"),
            }
            tokio::select! {
                _ = tokio::time::sleep(PRUNE_EVERY) => {}
                _ = &mut shutdown => return,
            }
        }
    }

    /// Records an identity-document join of `instance`, or returns when it
    /// joined so before (see [`Store::claim_identity_join`]).
    pub fn claim_identity_join(
        &self,
        instance: &str,
        fleet: &str,
    ) -> Result<Option<i64>, StoreError> {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.store.claim_identity_join(instance, fleet, at_ms)
    }

    /// Lets `instance` join with its identity document again.
    pub fn forget_identity_join(&self, instance: &str) -> Result<Option<String>, StoreError> {
        self.store.forget_identity_join(instance)
    }

    /// Counts an attempt to load new TLS files.
    pub fn tls_reloaded(&self, loaded: bool) {
        self.metrics.tls_reload(loaded);
    }

    /// What the metrics listener serves: the controller's metrics and
    /// `/sd/minions`, Prometheus HTTP service discovery for the agents.
    pub fn metrics_site(self: &Arc<Self>) -> gru_proto::metrics::Site {
        let mut prom = prometheus_client::registry::Registry::default();
        gru_proto::metrics::register_build_info(&mut prom, "controller");
        // It serves only while it leads: a deposed leader stops.
        crate::ha::register_leading(&mut prom, true);
        self.metrics.register(&mut prom);
        prom.register_collector(Box::new(FleetCollector {
            fleets: self.fleets.values().cloned().collect(),
        }));
        let me = self.clone();
        gru_proto::metrics::Site::new(prom).route(
            "/sd/minions",
            Box::new(move || {
                let groups: Vec<serde_json::Value> = me
                    .fleets
                    .values()
                    .flat_map(|f| f.registry().metrics_targets(f.name()))
                    .collect();
                gru_proto::metrics::Reply::json(serde_json::Value::from(groups).to_string())
            }),
        )
    }

    /// The fleet named `name`.
    pub fn fleet(&self, name: &str) -> Option<&Arc<Fleet>> {
        self.fleets.get(name)
    }

    /// Every fleet, by name.
    pub fn fleets(&self) -> impl Iterator<Item = &Arc<Fleet>> {
        self.fleets.values()
    }

    /// The fleet that has a minion with this id or instance id (looks in
    /// each fleet in turn: for admin calls and new Sessions, not reports).
    pub fn fleet_of(&self, id_or_instance: &str) -> Option<&Arc<Fleet>> {
        self.fleets
            .values()
            .find(|f| f.registry().find(id_or_instance).is_some())
    }

    /// Makes the fleet's loop run now instead of at its next tick.
    pub fn wake(&self, fleet: &str) {
        if let Some(f) = self.fleets.get(fleet) {
            f.wake();
        }
    }

    /// The event log since `since` (every fleet when `fleet` is empty),
    /// oldest first, at most `limit`.
    pub fn events_since(
        &self,
        since: SystemTime,
        fleet: &str,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let fleet = (!fleet.is_empty()).then_some(fleet);
        Ok(self
            .store
            .events_since(unix_ms(since), fleet, limit)?
            .into_iter()
            .map(crate::registry::event_from_row)
            .collect())
    }

    /// Runs the fleet's loop until `shutdown` resolves.
    pub async fn run_fleet(
        self: Arc<Self>,
        fleet: String,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let Some(f) = self.fleets.get(&fleet).cloned() else {
            return;
        };
        tokio::pin!(shutdown);
        let span = tracing::info_span!("reconcile", fleet = %fleet);
        loop {
            let pass = tracing::Instrument::instrument(self.reconcile(&fleet), span.clone());
            let started = std::time::Instant::now();
            let result = pass.await;
            f.metrics
                .pass_duration
                .observe(started.elapsed().as_secs_f64());
            let next = match result {
                Ok(next) => {
                    f.metrics.passes.inc();
                    let wall = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default();
                    f.metrics.last_pass.set(wall.as_secs_f64());
                    next
                }
                Err(e) => {
                    f.metrics.pass_errors.inc();
                    let message = format!("reconcile failed: {}", error_chain(&e));
                    f.registry().emit(&fleet, None, EventKind::Warning, message);
                    self.config.eval_interval
                }
            };
            let ended = tokio::time::Instant::now();
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = f.wake.notified() => {
                    let held = Duration::from_nanos(
                        f.bookkeeping_ns.load(std::sync::atomic::Ordering::Relaxed),
                    );
                    let gap = wake_gap(held).min(next);
                    if !gap.is_zero() {
                        tokio::select! {
                            _ = tokio::time::sleep_until(ended + gap) => {}
                            _ = &mut shutdown => return,
                        }
                    }
                }
                _ = &mut shutdown => return,
            }
        }
    }

    /// One pass over one fleet.
    pub async fn reconcile(&self, fleet: &str) -> Result<Duration, ReconcileError> {
        let Some(f) = self.fleets.get(fleet) else {
            return Ok(self.config.eval_interval);
        };
        let rt = &f.runtime;
        let (group, view) =
            match &rt.hooks {
                Some(hooks) => {
                    self.aws_setup(f, hooks.as_ref()).await?;
                    let g = hooks.describe_hooked().await.map_err(|source| {
                        ReconcileError::Describe {
                            fleet: fleet.to_owned(),
                            source,
                        }
                    })?;
                    let view = AwsView {
                        pending_wait: g.pending_wait,
                        terminating_wait: g.terminating_wait,
                        in_service: g.in_service,
                        protected: g.protected,
                    };
                    (g.group, Some(view))
                }
                None => {
                    let g: GroupState =
                        rt.group
                            .describe()
                            .await
                            .map_err(|source| ReconcileError::Describe {
                                fleet: fleet.to_owned(),
                                source,
                            })?;
                    (g, None)
                }
            };
        // One clock reading for the whole pass, on both clocks: every age the
        // planner sees and every time the pass records come from it; the
        // wall clock is for schedules in time zones.
        let now = crate::now();
        let wall = jiff::Timestamp::now();
        let limits = self.limits(rt);
        let held = std::time::Instant::now();
        let actions = {
            let mut reg = f.registry();
            if let Some(f) = reg.fleet_state_mut(fleet) {
                f.aws = view;
            }
            reg.sync(fleet, group, now);
            reg.plan(fleet, &limits, now)
        };
        let mut bookkeeping = held.elapsed();
        for action in actions {
            if let Err(e) = self.act(f, &action, now).await {
                f.registry()
                    .emit(fleet, action.minion(), EventKind::Warning, error_chain(&e));
            }
        }
        let external = self.read_signals(f, fleet).await;
        let held = std::time::Instant::now();
        let grow_to = f.registry().decide(fleet, now, wall, external);
        bookkeeping += held.elapsed();
        f.bookkeeping_ns.store(
            bookkeeping.as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if let Some(n) = grow_to {
            match rt.group.set_desired(n).await {
                Ok(()) => f.registry().emit(
                    fleet,
                    None,
                    EventKind::Step,
                    format!("group desired capacity set to {n}"),
                ),
                Err(e) => f.registry().emit(
                    fleet,
                    None,
                    EventKind::Warning,
                    format!("failed to set desired capacity to {n}: {}", error_chain(&e)),
                ),
            }
        }
        let busy = f.registry().busy(fleet);
        let busy_requeue = if rt.hooks.is_some() {
            AWS_BUSY_REQUEUE
        } else {
            BUSY_REQUEUE
        };
        Ok(if busy {
            busy_requeue.min(self.config.eval_interval)
        } else {
            self.config.eval_interval
        })
    }

    /// Reads the fleet's signals, each within [`SIGNAL_TIMEOUT`]. A signal
    /// that cannot be read is left out (its rule recommends nothing this
    /// pass) and is a warning event when its failure changes.
    async fn read_signals(&self, f: &Fleet, fleet: &str) -> Vec<ExternalSignal> {
        let mut values = Vec::new();
        let mut failures = Vec::new();
        for signal in &f.runtime.signals {
            match tokio::time::timeout(SIGNAL_TIMEOUT, signal.read()).await {
                Ok(Ok(value)) => {
                    f.metrics.signal_read(signal.name(), value);
                    values.push(ExternalSignal {
                        name: signal.name().to_owned(),
                        value,
                    })
                }
                Ok(Err(e)) => {
                    f.metrics.signal_failed(signal.name());
                    failures.push(format!(
                        "cannot read signal {}: {}",
                        signal.name(),
                        error_chain(&e)
                    ))
                }
                Err(_) => {
                    f.metrics.signal_failed(signal.name());
                    failures.push(format!(
                        "cannot read signal {}: no answer within {}",
                        signal.name(),
                        humantime::format_duration(SIGNAL_TIMEOUT)
                    ))
                }
            }
        }
        let failure = (!failures.is_empty()).then(|| failures.join("; "));
        let changed = {
            let mut last = f.signal_error.lock().unwrap_or_else(|p| p.into_inner());
            let changed = *last != failure;
            *last = failure.clone();
            changed
        };
        if changed {
            match failure {
                Some(message) => f.registry().emit(fleet, None, EventKind::Warning, message),
                None if !f.runtime.signals.is_empty() => f.registry().emit(
                    fleet,
                    None,
                    EventKind::Step,
                    "every signal reads again".to_owned(),
                ),
                None => {}
            }
        }
        values
    }

    /// The limits a pass of `rt`'s fleet plans by.
    fn limits(&self, rt: &FleetRuntime) -> Limits {
        Limits {
            lost_timeout: self.config.lost_timeout,
            join_timeout: self.config.join_timeout,
            unhealthy_timeout: self.config.unhealthy_timeout,
            drain_deadline: self.config.drain_deadline,
            heartbeat_every: rt
                .config
                .provider
                .aws()
                .map_or(Duration::MAX, |a| a.heartbeat_interval),
            terminate_retry_after: TERMINATE_RETRY_AFTER,
            protect_after_work: PROTECT_AFTER_WORK,
            rebalance: rt.config.rebalance,
        }
    }

    /// Reads what an AWS fleet's passes need once: whether the target group
    /// is attached to the group (warned about once) and its deregistration
    /// delay. Until both are read, the pass stops here and retries.
    async fn aws_setup(
        &self,
        f: &Fleet,
        hooks: &dyn GroupLifecycle,
    ) -> Result<AwsSetup, ReconcileError> {
        let rt = &f.runtime;
        let fleet = rt.config.name.as_str();
        if let Some(setup) = f.registry().fleet_state(fleet).and_then(|f| f.aws_setup) {
            return Ok(setup);
        }
        let err = |source| ReconcileError::AwsSetup {
            fleet: fleet.to_owned(),
            source,
        };
        let read = hooks.target_group_setup().await.map_err(err)?;
        let target_group_attached = read.attached;
        let setup = AwsSetup {
            target_group_attached,
            deregistration_delay: read.deregistration_delay,
        };
        let mut reg = f.registry();
        if let Some(f) = reg.fleet_state_mut(fleet) {
            f.aws_setup = Some(setup);
        }
        if target_group_attached && let Some(aws) = rt.config.provider.aws() {
            reg.emit(
                fleet,
                None,
                EventKind::Warning,
                format!(
                    "target group {} is attached to group {}: the group registers and deregisters instances itself, so the controller does not (it registers engines before they are ready and waits out the whole deregistration delay; detach it)",
                    aws.fleet.target_group_arn, aws.fleet.group_name
                ),
            );
        }
        Ok(setup)
    }

    /// False when the group manages the target group itself (attached).
    fn manages_targets(&self, f: &Fleet) -> bool {
        let fleet = f.name();
        !f.registry()
            .fleet_state(fleet)
            .and_then(|f| f.aws_setup)
            .is_some_and(|s| s.target_group_attached)
    }

    /// Makes one call of the pass's plan, then records its outcome.
    async fn act(&self, f: &Fleet, action: &Action, now: Instant) -> Result<(), CloudError> {
        let rt = &f.runtime;
        let fleet = rt.config.name.as_str();
        let manages_targets = self.manages_targets(f);
        let (target, instance) = match action.minion() {
            Some(id) => {
                let reg = f.registry();
                (reg.target(id), reg.instance(id))
            }
            None => (None, None),
        };
        let instance = instance.as_ref();
        match action {
            Action::Register { id: minion } => {
                let Some(target) = &target else {
                    return Ok(());
                };
                let reason = if manages_targets {
                    rt.targets.register(target).await?;
                    format!("registered {} in the load balancer", target.address)
                } else {
                    "the group registers it (target group attached)".to_owned()
                };
                let mut reg = f.registry();
                let Some(m) = reg.minion_mut(minion) else {
                    return Ok(());
                };
                // The pass planned this before a report could move the
                // minion on (an engine that turned unhealthy, a drain):
                // only a minion still Ready or InService counts as
                // registered; a later TakeOut or Deregister undoes the call.
                if !matches!(m.state(), MinionState::Ready | MinionState::InService) {
                    m.registered = manages_targets;
                    reg.persist(minion);
                    return Ok(());
                }
                let verified = std::mem::take(&mut m.verify_registration);
                m.registered = manages_targets;
                if verified {
                    reg.persist(minion);
                    reg.emit(
                        fleet,
                        Some(minion),
                        EventKind::Step,
                        format!("{reason} again after the controller restarted"),
                    );
                } else {
                    let _ = reg.transition(minion, LifecycleEvent::Registered, &reason, now);
                }
            }
            Action::TakeOut { id: minion } => {
                if manages_targets && let Some(target) = &target {
                    rt.targets.deregister(target).await?;
                }
                let mut reg = f.registry();
                if let Some(m) = reg.minion_mut(minion) {
                    m.registered = false;
                    reg.persist(minion);
                    reg.emit(
                        fleet,
                        Some(minion),
                        EventKind::Step,
                        "unhealthy: taken out of the load balancer".to_owned(),
                    );
                }
            }
            Action::Deregister {
                id: minion,
                registered,
            } => {
                let target = target.as_ref().filter(|_| manages_targets && *registered);
                if let Some(target) = target {
                    rt.targets.deregister(target).await?;
                    let state = rt.targets.target_state(target).await?;
                    if !state.takes_no_new_connections() {
                        // Still getting new connections; look again next pass.
                        return Ok(());
                    }
                    let mut reg = f.registry();
                    if let Some(m) = reg.minion_mut(minion)
                        && m.deregistered_at.is_none()
                    {
                        m.deregistered_at = Some(now);
                        m.lb_connections_at_deregistration = rt.targets.connections_total(target);
                        let msg = format!(
                            "deregistered from the load balancer: target {state:?}, no new connections"
                        );
                        reg.persist(minion);
                        reg.emit(fleet, Some(minion), EventKind::Step, msg);
                    }
                }
                self.start_flush(f, minion, target, now);
            }
            Action::AwaitUnused {
                id: minion,
                registered,
                waiting_for,
            } => {
                let why = match target.as_ref().filter(|_| manages_targets && *registered) {
                    None => "not in the load balancer".to_owned(),
                    Some(target) => {
                        rt.targets.deregister(target).await?;
                        match rt.targets.target_state(target).await? {
                            TargetState::Unused => "target unused".to_owned(),
                            // The engine has no connection left, so whatever
                            // the load balancer still shows is its own
                            // bookkeeping: on AWS the target stays draining
                            // for the whole deregistration delay. Wait a short
                            // grace, not the delay.
                            state
                                if rt.hooks.is_some()
                                    && *waiting_for >= self.config.unused_grace =>
                            {
                                format!(
                                    "target still {state:?} {} after the engine closed its last connection: going on",
                                    humantime::format_duration(self.config.unused_grace)
                                )
                            }
                            _ => return Ok(()),
                        }
                    }
                };
                let mut reg = f.registry();
                if let Some(m) = reg.minion_mut(minion) {
                    m.registered = false;
                }
                let _ = reg.transition(minion, LifecycleEvent::TargetUnused, &why, now);
            }
            Action::Finish {
                id: minion,
                finish,
                decrement,
                take_out,
            } => {
                let Some(instance) = instance else {
                    return Ok(());
                };
                if let Some(target) = target.as_ref().filter(|_| manages_targets && *take_out) {
                    // A Lost minion: only once the load balancer is done with it.
                    rt.targets.deregister(target).await?;
                    let state = rt.targets.target_state(target).await?;
                    if state.takes_no_new_connections()
                        && let Some(m) = f.registry().minion_mut(minion)
                    {
                        m.deregistered_at.get_or_insert_with(Instant::now);
                    }
                    if state != TargetState::Unused {
                        if !self.waited_out_delay(f, minion, now) {
                            return Ok(());
                        }
                        f.registry().emit(
                            fleet,
                            Some(minion),
                            EventKind::Step,
                            format!(
                                "target still {state:?} a whole deregistration delay after it was deregistered: the load balancer has cut its connections, going on"
                            ),
                        );
                    }
                }
                let reason = match finish {
                    Finish::Terminate => {
                        // The intent first: the decrement ledger in the store
                        // allows one decrement per instance across any number
                        // of calls and restarts.
                        let decrementing = if *decrement {
                            let mut reg = f.registry();
                            let leaving = reg.instance_leaving(fleet, instance);
                            let claim = reg
                                .claim_decrement(minion, instance, leaving, now)
                                .map_err(|e| CloudError::Provider {
                                    call: "the decrement ledger",
                                    message: error_chain(&e),
                                })?;
                            match claim {
                                DecrementClaim::Claimed => true,
                                DecrementClaim::Done => false,
                                DecrementClaim::Wait => {
                                    tracing::info!(minion, instance = %instance, "an earlier decrementing terminate is unresolved; waiting for the group's view");
                                    return Ok(());
                                }
                            }
                        } else {
                            false
                        };
                        let reason = if decrementing {
                            format!(
                                "terminating {instance} with a decrement of the desired capacity"
                            )
                        } else if *decrement {
                            format!("terminating {instance} (its decrement was already asked for)")
                        } else {
                            format!("terminating {instance} to be replaced")
                        };
                        // Terminating is recorded before the call: a
                        // controller killed during it finds the minion
                        // Terminating (and retries the idempotent call if
                        // the instance still runs), never Drained with its
                        // instance gone. A failed call is retried the same way.
                        record_terminate(f, fleet, minion, &reason, now);
                        match rt.group.terminate(instance, decrementing).await {
                            Ok(()) => {
                                if decrementing {
                                    let mut reg = f.registry();
                                    reg.settle_decrement(instance, true, now);
                                    // Said once the cloud took the call.
                                    reg.emit(
                                        fleet,
                                        Some(minion),
                                        EventKind::Step,
                                        format!(
                                            "terminate of {instance} accepted, desired capacity decremented"
                                        ),
                                    );
                                }
                            }
                            Err(e) => {
                                if decrementing && e.certainly_not_applied() {
                                    f.registry().settle_decrement(instance, false, now);
                                }
                                return Err(e);
                            }
                        }
                        return Ok(());
                    }
                    Finish::ContinueTermination => {
                        aws_only(rt)?
                            .complete_lifecycle_action(
                                instance,
                                LifecycleHook::Terminating,
                                LifecycleResult::Continue,
                            )
                            .await?;
                        let mut reg = f.registry();
                        if let Some(m) = reg.minion_mut(minion) {
                            m.termination_completed = true;
                            reg.persist(minion);
                        }
                        format!("terminating lifecycle action of {instance} completed: CONTINUE")
                    }
                    Finish::MarkUnhealthy => {
                        aws_only(rt)?.set_unhealthy(instance).await?;
                        format!("{instance} marked unhealthy: the group replaces it")
                    }
                    Finish::AbandonLaunch => {
                        aws_only(rt)?
                            .complete_lifecycle_action(
                                instance,
                                LifecycleHook::Launching,
                                LifecycleResult::Abandon,
                            )
                            .await?;
                        format!(
                            "launching lifecycle action of {instance} completed: ABANDON, the group replaces it"
                        )
                    }
                };
                record_terminate(f, fleet, minion, &reason, now);
            }
            Action::Heartbeat { id: minion } => {
                let Some(instance) = instance else {
                    return Ok(());
                };
                aws_only(rt)?
                    .record_lifecycle_heartbeat(instance, LifecycleHook::Terminating)
                    .await?;
                let mut reg = f.registry();
                if let Some(m) = reg.minion_mut(minion) {
                    m.hook_heartbeat_at = Some(now);
                    reg.persist(minion);
                }
                reg.emit(
                    fleet,
                    Some(minion),
                    EventKind::Step,
                    format!("lifecycle heartbeat recorded for {instance}"),
                );
            }
            Action::Protect {
                instances,
                protected,
            } => {
                let ids: Vec<InstanceId> =
                    instances.iter().map(|i| InstanceId(i.clone())).collect();
                aws_only(rt)?
                    .set_scale_in_protection(&ids, *protected)
                    .await?;
                let list: Vec<&str> = instances.iter().map(String::as_str).collect();
                let message = if *protected {
                    format!(
                        "protected from the group's scale-in (busy): {}",
                        list.join(", ")
                    )
                } else {
                    format!("scale-in protection removed (idle): {}", list.join(", "))
                };
                f.registry().emit(fleet, None, EventKind::Step, message);
            }
            Action::Shed {
                id: minion,
                count,
                reason,
            } => {
                if f.registry().ask_to_shed(fleet, minion, *count, reason, now) {
                    f.metrics.shed.inc_by(*count);
                }
            }
            Action::CompleteLaunch { id: minion } => {
                let Some(instance) = instance else {
                    return Ok(());
                };
                aws_only(rt)?
                    .complete_lifecycle_action(
                        instance,
                        LifecycleHook::Launching,
                        LifecycleResult::Continue,
                    )
                    .await?;
                let mut reg = f.registry();
                if let Some(m) = reg.minion_mut(minion) {
                    m.launch_completed = true;
                    reg.persist(minion);
                }
                reg.emit(
                    fleet,
                    Some(minion),
                    EventKind::Step,
                    format!("launching lifecycle action of {instance} completed: CONTINUE"),
                );
            }
        }
        Ok(())
    }

    /// True once an AWS target has had the whole deregistration delay since
    /// it stopped getting new connections: the load balancer has cut its
    /// connections by then, whatever DescribeTargetHealth still says.
    /// Always false for other providers (their `unused` is exact).
    fn waited_out_delay(&self, f: &Fleet, minion: &str, now: Instant) -> bool {
        let fleet = f.name();
        let reg = f.registry();
        let Some(delay) = reg
            .fleet_state(fleet)
            .and_then(|f| f.aws_setup)
            .map(|s| s.deregistration_delay)
        else {
            return false;
        };
        reg.find(minion)
            .and_then(|m| m.deregistered_at)
            .is_some_and(|at| now.saturating_duration_since(at) >= delay)
    }

    /// Sends the Drain command once the load balancer sends no new
    /// connections: Deregistering → Flushing.
    fn start_flush(
        &self,
        f: &Fleet,
        minion: &str,
        target: Option<&gru_cloud::Target>,
        now: Instant,
    ) {
        let deadline = self.config.drain_deadline;
        let mut reg = f.registry();
        let Some(m) = reg.minion_mut(minion) else {
            return;
        };
        if m.state() != MinionState::Draining(DrainPhase::Deregistering) {
            return;
        }
        let Some(plan) = m.drain.as_ref() else { return };
        let reason = plan.reason.clone();
        match &m.session {
            Some(link) => {
                let cmd = Command::Drain { deadline, reason };
                if link.tx.try_send(Ok(cmd)).is_err() {
                    // Session gone or full: try again next pass.
                    return;
                }
                m.lb_connections_at_drain_start =
                    target.and_then(|t| f.runtime.targets.connections_total(t));
                let _ =
                    reg.transition(minion, LifecycleEvent::DrainSent, "drain command sent", now);
            }
            None if m.engine_address.is_none() => {
                // Never joined: there is no engine and so nothing to drain.
                let why = "never joined: nothing to drain";
                for event in [
                    LifecycleEvent::DrainSent,
                    LifecycleEvent::Drained,
                    LifecycleEvent::TargetUnused,
                ] {
                    let _ = reg.transition(minion, event, why, now);
                }
            }
            None => {}
        }
    }
}

/// The lifecycle calls of `rt`'s group; the planner asks for them only for
/// a group with hooks, so this failing is a bug, reported like any failed
/// call.
fn aws_only(rt: &FleetRuntime) -> Result<&dyn GroupLifecycle, CloudError> {
    rt.hooks.as_deref().ok_or_else(|| CloudError::NotFound {
        what: format!("a group with lifecycle hooks for fleet {}", rt.config.name),
    })
}

/// Records a terminate (or the group's own termination let go on): the
/// minion moves to Terminating, or, already there, the step is an event.
fn record_terminate(f: &Fleet, fleet: &str, minion: &str, reason: &str, now: Instant) {
    let mut reg = f.registry();
    let already = reg
        .find(minion)
        .is_some_and(|m| m.state() == MinionState::Terminating);
    let _ = reg.transition(minion, LifecycleEvent::TerminateIssued, reason, now);
    if already {
        // No change of state to record the step by.
        reg.emit(fleet, Some(minion), EventKind::Step, reason.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_costly_pass_makes_a_woken_loop_wait() {
        assert_eq!(wake_gap(Duration::from_micros(300)), Duration::ZERO);
        assert_eq!(wake_gap(Duration::from_micros(2_400)), Duration::ZERO);
        assert_eq!(
            wake_gap(Duration::from_millis(3)),
            Duration::from_millis(12)
        );
        assert_eq!(
            wake_gap(Duration::from_millis(50)),
            Duration::from_millis(200)
        );
    }
}
